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

Mixture-of-experts families (``qwen2_moe``, ``qwen3_moe``) are recognised and rejected for now; the
record keeps a :class:`MoESpec` slot and the weight mapping is rule-based
(:mod:`megatron_sdar.models.weight_mapping`) so they can be added by filling that slot and adding
the expert rules, without restructuring.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
_PLANNED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
# rope types whose frequencies Megatron-Core computes exactly like transformers
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


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
    """Placeholder for the Qwen-MoE families (not converted yet)."""

    num_experts: int
    num_experts_per_token: int
    expert_ffn_hidden_size: int
    shared_expert_ffn_hidden_size: int | None = None


@dataclass(frozen=True)
class QwenArchitecture:
    """A validated Qwen dense decoder. Shapes below use h=hidden_size, d=head_dim."""

    model_type: str
    vocab_size: int  # rows of embed_tokens / lm_head in the HF checkpoint (no TP padding)
    hidden_size: int
    intermediate_size: int
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
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise UnsupportedConfigError(
                f"tensor parallel size {tp} must divide {', '.join(problems)} "
                "(each TP rank owns whole key/value groups)"
            )

    def torch_dtype_object(self):
        import torch

        return getattr(torch, self.torch_dtype)

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> "QwenArchitecture":
        """Parse an HF ``config.json`` (a dict, the file, or the directory holding it)."""
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no Hugging Face config.json at {path}")
            config = json.loads(path.read_text())
        cfg = dict(config)
        model_type = cfg.get("model_type")
        if model_type in _PLANNED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r}: mixture-of-experts Qwen is not converted yet "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
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
            hf_config=cfg,
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
