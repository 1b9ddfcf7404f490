"""What a Hugging Face Qwen ``config.json`` describes, validated, in one typed record.

:func:`QwenArchitecture.from_hf_config` is the single place that reads HF config keys; everything
downstream (the Megatron ``TransformerConfig``, the weight mapping, the exporter, the HF writer)
works from the :class:`QwenArchitecture` it returns. Values we cannot reproduce exactly in
Megatron-Core raise :class:`UnsupportedConfigError` instead of converting into a silently
different model.

Supported families (``model_type``):

* ``qwen2`` (Qwen2 and Qwen2.5): QKV bias, no QK-norm, tied or untied embeddings.
* ``qwen3``: QK RMSNorm per head, optional attention bias, explicit ``head_dim`` (which may differ
  from ``hidden_size / num_attention_heads``).

* ``qwen3_moe``: Qwen3 attention with a sparse mixture-of-experts block in every layer (a softmax
  router ``mlp.gate`` over ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, top
  ``num_experts_per_tok``, optionally renormalised; no shared expert), recorded in :class:`MoESpec`.
  Only the layout of the released checkpoints is converted: ``decoder_sparse_step=1`` and no
  ``mlp_only_layers`` (a model mixing dense and sparse layers is rejected, see ``from_hf_config``).

``qwen2_moe`` (a shared expert behind a sigmoid gate in every layer) is recognised and rejected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")
_PLANNED_MODEL_TYPES = ("qwen2_moe",)
# rope types whose frequencies Megatron-Core computes exactly like transformers
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
# every config.json key from_hf_config reads (the rest of a config.json is ignored)
HF_CONFIG_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "attention_dropout", "initializer_range", "dtype", "torch_dtype",
    "use_sliding_window", "layer_types", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters",
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size",
    "n_shared_experts", "num_shared_experts",
})


class UnsupportedConfigError(ValueError):
    """The HF config asks for something this conversion cannot reproduce exactly."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters.

    ``kind``: ``default`` (plain RoPE), ``linear`` (positions divided by ``factor``) or ``yarn``
    (NTK-by-parts interpolation plus attention scaling ``0.1 * ln(factor) + 1``).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn only
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only


@dataclass(frozen=True)
class MoESpec:
    """The sparse MLP of every layer of a Qwen3-MoE model.

    Routing (transformers' ``Qwen3MoeTopKRouter``): ``p = softmax(x @ gate.T)`` in float32 over all
    experts, keep the ``num_experts_per_token`` largest, divide them by their sum when
    ``norm_topk_prob``; the block's output is the ``p``-weighted sum of the chosen experts' SwiGLU
    outputs. ``router_aux_loss_coef`` is HF's load-balancing loss weight: it changes training
    only, never the forward, and is kept so a trainer can opt into Megatron's aux loss with it.
    """

    num_experts: int
    num_experts_per_token: int
    expert_ffn_hidden_size: int
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0


@dataclass(frozen=True)
class QwenArchitecture:
    """A validated Qwen decoder (dense, or MoE when ``moe`` is set). Shapes: h=hidden_size, d=head_dim."""

    model_type: str
    vocab_size: int  # rows of embed_tokens / lm_head in the HF checkpoint (no TP padding)
    hidden_size: int
    intermediate_size: int  # the dense MLP's width (unused when every layer is sparse)
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 always, Qwen3 if attention_bias)
    qk_norm: bool  # RMSNorm over d on queries and keys before RoPE (Qwen3)
    torch_dtype: str = "float32"  # the checkpoint's parameter dtype, as a torch attribute name
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    moe: MoESpec | None = None
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def padded_vocab_size(self, tp: int, multiple: int = 1) -> int:
        """Vocabulary rows in Megatron: ``vocab_size`` rounded up to a multiple of ``tp * multiple``.

        The extra rows are zero on load and dropped on export; their logits (0) must be masked by
        any loss that normalises over the vocabulary.
        """
        step = tp * multiple
        return -(-self.vocab_size // step) * step

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise unless this model can be split over ``tp`` ranks."""
        problems = []
        if self.num_key_value_heads % tp:
            problems.append(f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.moe is None and self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise UnsupportedConfigError(
                f"tensor parallel size {tp} must divide {', '.join(problems)} "
                "(each TP rank owns whole key/value groups)"
            )

    def check_expert_parallel(self, ep: int, etp: int) -> None:
        """Raise unless the experts can be spread over ``ep`` ranks, each split over ``etp`` ranks.

        Every expert-parallel rank owns ``num_experts / ep`` whole experts; inside an expert, the
        SwiGLU width is split over the expert-tensor-parallel ranks like a dense MLP over TP.
        """
        if self.moe is None:  # etp is irrelevant (Megatron defaults it to tp for every model)
            if ep > 1:
                raise UnsupportedConfigError(
                    f"expert parallel size {ep} needs a mixture-of-experts model, {self.model_type} is dense")
            return
        problems = []
        if self.moe.num_experts % ep:
            problems.append(f"expert parallel size {ep} must divide num_experts={self.moe.num_experts}")
        if self.moe.expert_ffn_hidden_size % etp:
            problems.append(f"expert tensor parallel size {etp} must divide "
                            f"moe_intermediate_size={self.moe.expert_ffn_hidden_size}")
        if problems:
            raise UnsupportedConfigError("; ".join(problems))

    def torch_dtype_object(self):
        import torch

        return getattr(torch, self.torch_dtype)

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_architecture_block(cls, model_type: str, block: Mapping[str, Any]) -> "QwenArchitecture":
        """Parse a model YAML's ``architecture:`` block: the shape keys of the model's ``config.json``
        under their own names (``hidden_size``, ``num_hidden_layers``, ...), ``model_type`` from the
        YAML's ``arch:``. It stands in for the ``config.json`` of a checkpoint that is not downloaded
        (the memory planner); parsing is :meth:`from_hf_config`'s. A key ``from_hf_config`` does not
        read (a typo) is an error, not a default."""
        if not isinstance(block, Mapping):
            raise UnsupportedConfigError(f"the architecture block must be a mapping of config.json keys, got {block!r}")
        unknown = sorted(set(block) - HF_CONFIG_KEYS)
        if unknown:
            raise UnsupportedConfigError(f"architecture keys {unknown} are not config.json keys of a Qwen model "
                                         f"(known: {', '.join(sorted(HF_CONFIG_KEYS))})")
        if block.get("model_type", model_type) != model_type:
            raise UnsupportedConfigError(f"architecture.model_type={block['model_type']!r} differs from "
                                         f"arch={model_type!r}")
        return cls.from_hf_config({**block, "model_type": model_type})

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> "QwenArchitecture":
        """Parse an HF ``config.json`` (a dict, the file, or the directory holding it)."""
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no Hugging Face config.json at {path}")
            try:
                config = json.loads(path.read_text())
            except ValueError as exc:  # named by the file, not its directory
                raise ValueError(f"{path} does not parse as JSON: {exc}") from None
        cfg = dict(config)
        model_type = cfg.get("model_type")
        if model_type in _PLANNED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r}: Qwen2-MoE (a gated shared expert next to the routed "
                f"ones) is not converted (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key: str):
            if cfg.get(key) is None:
                raise UnsupportedConfigError(f"config.json of a {model_type} model lacks {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise UnsupportedConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        if heads % kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act={act!r}: Qwen's SwiGLU MLP needs 'silu'")
        if cfg.get("use_sliding_window"):
            raise UnsupportedConfigError("use_sliding_window=true is not supported (full attention only)")
        layer_types = cfg.get("layer_types") or []
        odd_layers = sorted({t for t in layer_types if t != "full_attention"})
        if odd_layers:
            raise UnsupportedConfigError(f"layer_types {odd_layers} are not supported (full attention only)")
        if cfg.get("mlp_bias"):
            raise UnsupportedConfigError("mlp_bias=true is not supported")

        if model_type == "qwen2":
            qkv_bias, qk_norm = True, False
        else:
            qkv_bias, qk_norm = bool(cfg.get("attention_bias", False)), True

        moe = _parse_moe(cfg, need) if model_type == "qwen3_moe" else None

        max_pos = int(cfg.get("max_position_embeddings", 32768))
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UnsupportedConfigError(f"dtype={dtype!r} is not supported (float32, bfloat16, float16)")
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(cfg, max_pos),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            torch_dtype=dtype,
            attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            moe=moe,
            hf_config=cfg,
        )


def _parse_moe(cfg: Mapping[str, Any], need) -> MoESpec | None:
    """The MoE block of a ``qwen3_moe`` config, or None when ``num_experts == 0`` (all layers dense,
    as in transformers: then the model is a Qwen3 with the dense weight names)."""
    # transformers >= 5 writes num_local_experts (num_experts is an alias); released configs say num_experts
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if num_experts is None:
        raise UnsupportedConfigError("config.json of a qwen3_moe model lacks 'num_experts'")
    num_experts = int(num_experts)
    if num_experts == 0:
        return None
    top_k = int(need("num_experts_per_tok"))
    width = int(need("moe_intermediate_size"))
    if not 0 < top_k <= num_experts:
        raise UnsupportedConfigError(f"num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense_layers = sorted(int(i) for i in (cfg.get("mlp_only_layers") or []))
    if step != 1 or dense_layers:
        raise UnsupportedConfigError(
            f"qwen3_moe with dense MLP layers (decoder_sparse_step={step}, mlp_only_layers={dense_layers}) "
            "is not supported: only models whose every layer is sparse (decoder_sparse_step=1, no "
            "mlp_only_layers; all released Qwen3-MoE checkpoints) convert")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if cfg.get(key):
            raise UnsupportedConfigError(f"{key}={cfg[key]}: Qwen3-MoE has no shared expert; "
                                         "shared experts are not supported")
    return MoESpec(
        num_experts=num_experts,
        num_experts_per_token=top_k,
        expert_ffn_hidden_size=width,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
    )


def _parse_rope(cfg: Mapping[str, Any], max_pos: int) -> RopeSpec:
    """RoPE from either transformers>=5 ``rope_parameters`` or the legacy ``rope_theta``/``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling") or {}
    if not params:
        params = dict(legacy_scaling)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if kind == "default":
        return RopeSpec(theta=float(theta))
    factor = float(params.get("factor", 1.0))
    if factor < 1.0:
        raise UnsupportedConfigError(f"rope scaling factor {factor} < 1 is not supported")
    if kind == "linear":
        return RopeSpec(theta=float(theta), kind="linear", factor=factor)
    for unsupported in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(unsupported) is not None:
            raise UnsupportedConfigError(f"yarn with an explicit {unsupported!r} is not supported")
    if params.get("truncate", True) is False:
        raise UnsupportedConfigError("yarn with truncate=false is not supported")
    return RopeSpec(
        theta=float(theta),
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=int(params.get("original_max_position_embeddings") or max_pos),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
    )
