"""Per-GPU memory estimate of an SDAR training layout (the planner behind ``tools/plan.py``).

Everything is an estimate from tensor shapes; nothing is allocated. The terms:

* **weights**: this rank's parameters (worst pipeline stage: the first holds the embedding, the
  last the output layer), 2 bytes (bf16 / fp8; FP8 adds ~1 byte per GEMM weight for Transformer
  Engine's FP8 weight copies) or 4 bytes (fp32).
* **gradients**: Megatron DDP's fp32 main-grad buffer, 4 bytes per parameter, not sharded (the
  distributed optimizer reduce-scatters it but keeps the full buffer).
* **optimizer**: Adam, fp32 master copy (not for fp32 params) + two fp32 moments = 12 (or 8) bytes
  per parameter, divided by the data-parallel size (``dp * cp``; expert parameters by the
  expert-data-parallel size) when the distributed optimizer is on.
* **reference**: the frozen reference policy of the KL term (bf16 copy of the weights).
* **activations**: per layer and micro-batch the tensors autograd keeps (see
  :func:`layer_activation_bytes`), times the micro-batches a 1F1B pipeline keeps in flight (``pp``
  on the first stage, ``x (1 + (pp-1)/(pp*vpp))`` interleaved). ``recompute=full`` keeps only each
  layer's input plus one layer re-materialized; ``selective`` drops the attention score matrices.
* **logits**: the last stage's ``[tokens, V/tp]`` logits and their gradient, plus the objective's
  ~0.1x fp32 chunk workspace (the vocabulary-parallel objective never gathers the vocabulary).
* **teacher**: the no-grad teacher forward on the privileged-context sequence: one layer's
  transient tensors plus its logits. It runs inside the forward step, so the dynamic peak is
  ``activations + max(logits, teacher)``.
* **vLLM**: the colocated rollout engine reserves ``gpu_memory_utilization`` of the GPU: its
  weights (``params / rollout_tp``, bf16 or fp8) and the KV cache in the rest. With
  ``rollout_sleeps`` the engine frees its pool while Megatron trains.
* **overhead**: CUDA context, NCCL buffers, allocator fragmentation (a flat allowance).

Calibration: ``tools/validate_plan.py`` compares the estimate with the measured peak RSS of a tiny
CPU model (forward, backward, Adam step); GPU numbers should be added as they are measured.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from megatron_sdar.utils.parallel_dims import LayoutError, ParallelDims

GIB = 1024**3
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
PRECISIONS = ("bf16", "fp8", "fp32")
KERNELS = ("fused", "unfused")
# An H100 80GB reports 81559 MiB to CUDA.
H100_GIB = 81559 / 1024
FP8_WEIGHT_CACHE_BYTES = 1.0  # TE's FP8 copy of each GEMM weight (estimate; GPU runs should pin it)
OBJECTIVE_LOGITS_EXTRA = 0.1  # fp32 workspace of the chunked vocabulary-parallel objective, x full logits
VLLM_WORKSPACE_GIB = 1.5  # vLLM activations / sampler / CUDA graphs inside its pool


class PlanError(ValueError):
    """A model, layout or workload the planner cannot estimate (with the reason)."""


# --------------------------------------------------------------------------------------------
# model shape
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimate needs (names as in the model yaml ``architecture:``)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_hidden: int = 0

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if int(getattr(self, key)) <= 0:
                raise PlanError(f"model {self.name!r}: {key} must be positive, got {getattr(self, key)!r}")
        if self.heads % self.kv_heads:
            raise PlanError(f"model {self.name!r}: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts or self.moe_ffn_hidden <= 0:
                raise PlanError(f"model {self.name!r}: MoE needs 0 < experts_per_token <= num_experts "
                                "and moe_ffn_hidden > 0")
        elif self.ffn <= 0:
            raise PlanError(f"model {self.name!r}: ffn must be positive for a dense model")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def attention_linear_params(self) -> int:
        """q, k, v, o projections (+ QKV bias) of one layer, unsharded."""
        h = self.hidden
        bias = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + bias

    def replicated_layer_params(self) -> int:
        """Parameters every TP rank holds in full: the two RMSNorms, QK-norms, the MoE router."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0) + self.hidden * self.num_experts

    def dense_mlp_params(self) -> int:
        return 0 if self.is_moe else 3 * self.hidden * self.ffn

    def expert_params(self) -> int:
        """All experts of one layer (gate, up, down)."""
        return self.num_experts * 3 * self.hidden * self.moe_ffn_hidden

    def total_params(self) -> int:
        per_layer = (self.attention_linear_params() + self.replicated_layer_params() + self.dense_mlp_params()
                     + self.expert_params())
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: float, tp: int = 1) -> float:
        """KV cache of one token across all layers on one rollout rank (KV heads replicate past tp = kv_heads)."""
        return 2 * self.layers * self.kv_size / min(tp, self.kv_heads) * dtype_bytes


_HF_KEYS = {  # model yaml key -> HF config.json key
    "hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "ffn": "intermediate_size", "vocab": "vocab_size",
    "tied_embeddings": "tie_word_embeddings", "num_experts": "num_experts",
    "experts_per_token": "num_experts_per_tok", "moe_ffn_hidden": "moe_intermediate_size",
}


def shape_from_hf_config(config: Mapping[str, Any], name: str = "hf") -> ModelShape:
    """A :class:`ModelShape` from an HF ``config.json`` dict (Qwen2/2.5/3 dense, Qwen3-MoE)."""
    model_type = config.get("model_type")
    if model_type not in ("qwen2", "qwen3", "qwen3_moe"):
        raise PlanError(f"model_type={model_type!r}: the planner knows qwen2, qwen3 and qwen3_moe")
    missing = [hf for key, hf in _HF_KEYS.items()
               if config.get(hf) is None and key in ("hidden", "layers", "heads", "vocab")]
    if missing:
        raise PlanError(f"config.json lacks {', '.join(missing)}")
    heads = int(config["num_attention_heads"])
    moe = model_type == "qwen3_moe"
    if moe and (config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1):
        raise PlanError("Qwen3-MoE configs with dense layers (mlp_only_layers / decoder_sparse_step) are not planned")
    return ModelShape(
        name=name,
        hidden=int(config["hidden_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        ffn=int(config.get("intermediate_size") or 0),
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=model_type != "qwen2",
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        num_experts=int(config.get("num_experts") or 0) if moe else 0,
        experts_per_token=int(config.get("num_experts_per_tok") or 0) if moe else 0,
        moe_ffn_hidden=int(config.get("moe_intermediate_size") or 0) if moe else 0,
    )


def _read_yaml(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise PlanError(f"{path} is not a YAML mapping")
    return data


def shape_from_model_yaml(data: Mapping[str, Any], name: str) -> ModelShape:
    """A :class:`ModelShape` from a model yaml's ``architecture:`` block."""
    arch = data.get("architecture")
    if not isinstance(arch, Mapping):
        raise PlanError(f"model config {name!r} has no 'architecture:' block with the model's numbers")
    fields = {f for f in ModelShape.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise PlanError(f"model config {name!r}: unknown architecture keys {unknown}")
    try:
        return ModelShape(name=str(data.get("name") or name), **dict(arch))
    except TypeError as exc:
        raise PlanError(f"model config {name!r}: {exc}") from None


def load_model_shape(source: str | Path) -> ModelShape:
    """A model yaml name (``qwen2_5_7b_instruct``), a yaml path, an HF ``config.json`` or its directory."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise PlanError(f"no HF config at {path}")
        return shape_from_hf_config(json.loads(path.read_text()), name=path.parent.name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return shape_from_model_yaml(_read_yaml(path), path.stem)
    named = CONFIG_DIR / "model" / f"{source}.yaml"
    if named.is_file():
        return shape_from_model_yaml(_read_yaml(named), str(source))
    known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    raise PlanError(f"unknown model {str(source)!r}: not a file, not one of {known}")


# --------------------------------------------------------------------------------------------
# layout, workload, rollout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Per-step shapes. ``seq_len``: a training sample (prompt + response tokens); the teacher
    sees ``seq_len + teacher_extra_tokens`` (the privileged skills in front)."""

    seq_len: int = 2560
    micro_batch_size: int = 1
    global_batch_size: int = 128
    teacher_extra_tokens: int = 1024
    precision: str = "bf16"
    kernels: str = "fused"  # fused: flash attention + fused SwiGLU (GPU); unfused: local spec on CPU
    reference_model: bool = True  # frozen KL reference kept on the GPU
    teacher_pass: bool = True

    def check(self, layout: ParallelDims) -> None:
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.kernels not in KERNELS:
            raise PlanError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if min(self.seq_len, self.micro_batch_size, self.global_batch_size) < 1 or self.teacher_extra_tokens < 0:
            raise PlanError("seq_len, micro_batch_size, global_batch_size must be >= 1")
        if self.seq_len % layout.cp:
            raise PlanError(f"seq_len={self.seq_len} must be divisible by cp={layout.cp}")
        if self.global_batch_size % (self.micro_batch_size * layout.dp):
            raise PlanError(f"global_batch_size={self.global_batch_size} must be a multiple of "
                            f"micro_batch_size*dp={self.micro_batch_size * layout.dp}")

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def microbatches(self, layout: ParallelDims) -> int:
        return self.global_batch_size // (self.micro_batch_size * layout.dp)


@dataclass(frozen=True)
class Rollout:
    """The colocated vLLM engine: ``gpu_memory_utilization`` of the GPU is its pool."""

    gpu_memory_utilization: float = 0.0
    tp: int = 1
    fp8: bool = False
    sleeps: bool = False  # the engine frees its pool while Megatron trains

    def check(self) -> None:
        if not 0.0 <= self.gpu_memory_utilization < 1.0:
            raise PlanError(f"gpu_memory_utilization must be in [0, 1), got {self.gpu_memory_utilization}")
        if self.tp < 1:
            raise PlanError(f"rollout tp must be >= 1, got {self.tp}")


# --------------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageParams:
    """Parameters on one rank of one pipeline stage, split by how they are sharded."""

    dense: float  # sharded over tp (or replicated); optimizer shards over dp*cp
    expert: float  # sharded over ep*etp; optimizer shards over expert-dp
    gemm: float  # the part that is GEMM weights (FP8 weight copies)

    @property
    def total(self) -> float:
        return self.dense + self.expert


def stage_params(model: ModelShape, layout: ParallelDims, stage: int) -> StageParams:
    """Parameters one rank of pipeline ``stage`` holds."""
    tp, pp = layout.tp, layout.pp
    n_layers = model.layers // pp
    attn = model.attention_linear_params() / tp
    mlp = model.dense_mlp_params() / tp
    expert = n_layers * model.expert_params() / (layout.ep * layout.expert_tp)
    dense = n_layers * (attn + mlp + model.replicated_layer_params())
    gemm = n_layers * (attn + mlp) + expert
    vocab_rows = math.ceil(model.vocab / tp)  # padded to a multiple of tp
    first, last = stage == 0, stage == pp - 1
    if first:
        dense += vocab_rows * model.hidden
    if last:
        dense += model.hidden  # final norm
        if not model.tied_embeddings or pp > 1:  # tied + pp>1: the last stage keeps its own copy
            dense += vocab_rows * model.hidden
            gemm += vocab_rows * model.hidden
    return StageParams(dense=dense, expert=expert, gemm=gemm)


def layer_activation_bytes(model: ModelShape, layout: ParallelDims, work: Workload, tokens: float,
                           recompute: str | None = None) -> float:
    """Bytes autograd keeps for one layer on ``tokens`` tokens of one micro-batch on one rank.

    Kept per layer (a = activation bytes, t = tp, sp = t with sequence parallel else 1):
    four hidden-sized tensors (residual in, norm out, residual mid, norm out) ``4 T h a / sp``;
    q, k, v after RoPE ``T (q + 2 kv) a / t``; the attention output ``T q a / t``; the MLP's
    gate+up output ``2 T f a / t`` and SwiGLU output ``T f a / t``. Unfused kernels (the CPU
    local spec) also keep the softmax probabilities ``b heads/t s^2 a`` (plus the dropout copy
    and the boolean mask), SiLU's output ``T f a / t``, torch RMSNorm's normalized inputs
    ``2 T h a / sp`` and the fused QKV output (the ``v`` view holds it) ``T (q + 2 kv) a / t``. MoE replaces the MLP with the permuted tokens ``2 T k h a``
    (dispatch and combine), the expert MLP ``3 T k f_e a / etp`` and router logits ``T E 4``.
    """
    recompute = layout.recompute if recompute is None else recompute
    a, t = work.act_bytes, layout.tp
    sp = t if layout.sequence_parallel else 1
    h = model.hidden
    if recompute == "full":
        return tokens * h * a / sp
    total = 4 * tokens * h * a / sp
    total += tokens * (2 * model.q_size + 2 * model.kv_size) * a / t
    total += tokens * model.heads / t * 4  # softmax log-sum-exp (fp32)
    if work.kernels == "unfused":
        total += 2 * tokens * h * a / sp  # torch RMSNorm keeps its normalized input too
        total += tokens * (model.q_size + 2 * model.kv_size) * a / t  # v is a view: the fused QKV output stays
        if recompute != "selective":
            seq = tokens / work.micro_batch_size
            total += work.micro_batch_size * model.heads / t * seq * seq * (2 * a + 1)  # probs, dropout copy, mask
    if model.is_moe:
        k, fe, et = model.experts_per_token, model.moe_ffn_hidden, layout.expert_tp
        total += 2 * tokens * k * h * a + 3 * tokens * k * fe * a / et + tokens * model.num_experts * 4
        if work.kernels == "unfused":
            total += tokens * k * fe * a / et
    else:
        f = model.ffn
        total += 3 * tokens * f * a / t
        if work.kernels == "unfused":
            total += tokens * f * a / t
    return total


@dataclass
class Estimate:
    """Per-GPU memory in GiB, the worst pipeline stage; ``fits`` against ``capacity``."""

    model: str
    layout: dict
    stage: int
    params_billion: float
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float
    activations_no_recompute: float
    activations_full_recompute: float
    logits: float
    teacher: float
    training: float  # static + dynamic
    vllm_pool: float
    vllm_weights: float
    vllm_kv_cache: float
    vllm_kv_tokens: int
    overhead: float
    total: float
    capacity: float
    fits: bool
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _stage_estimate(model: ModelShape, layout: ParallelDims, work: Workload, stage: int) -> dict[str, float]:
    p = stage_params(model, layout, stage)
    fp32 = work.precision == "fp32"
    weight_b = 4.0 if fp32 else 2.0
    weights = p.total * weight_b + (p.gemm * FP8_WEIGHT_CACHE_BYTES if work.precision == "fp8" else 0.0)
    gradients = p.total * 4.0
    opt_b = 8.0 if fp32 else 12.0
    dense_shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    expert_dp = layout.tp * layout.cp * layout.dp // (layout.ep * layout.expert_tp)
    expert_shards = expert_dp if layout.distributed_optimizer else 1
    optimizer = p.dense * opt_b / dense_shards + p.expert * opt_b / expert_shards
    reference = p.total * weight_b if work.reference_model else 0.0

    tokens = work.micro_batch_size * work.seq_len / layout.cp
    layers = model.layers // layout.pp
    pp, vpp = layout.pp, layout.vpp or 1
    in_flight = min(pp - stage, work.microbatches(layout))
    if vpp > 1 and stage == 0:
        in_flight_layers = layers * in_flight * (1 + (pp - 1) / (pp * vpp))
    else:
        in_flight_layers = layers * in_flight
    edge = tokens * model.hidden * work.act_bytes / (layout.tp if layout.sequence_parallel else 1)

    def acts(recompute: str) -> float:
        stored = in_flight_layers * layer_activation_bytes(model, layout, work, tokens, recompute)
        if recompute == "full":  # one layer re-materialized during its backward
            stored += layer_activation_bytes(model, layout, work, tokens, "none")
        return stored + 2 * edge

    v_local = math.ceil(model.vocab / layout.tp)
    last = stage == pp - 1
    logits = tokens * v_local * (2 * work.act_bytes + 4 * OBJECTIVE_LOGITS_EXTRA) if last else 0.0
    teacher = 0.0
    if work.teacher_pass:
        t_tokens = work.micro_batch_size * (work.seq_len + work.teacher_extra_tokens) / layout.cp
        # no autograd: about half a layer's tensors are alive at once
        teacher = 0.5 * layer_activation_bytes(model, layout, work, t_tokens, "none")
        if last:
            teacher += t_tokens * v_local * (work.act_bytes + 4 * OBJECTIVE_LOGITS_EXTRA)
    return dict(weights=weights, gradients=gradients, optimizer=optimizer, reference=reference,
                activations=acts(layout.recompute), activations_no_recompute=acts("none"),
                activations_full_recompute=acts("full"), logits=logits, teacher=teacher)


def estimate(model: ModelShape, layout: ParallelDims, work: Workload, rollout: Rollout | None = None, *,
             capacity_gib: float = H100_GIB, overhead_gib: float = 3.0) -> Estimate:
    """Per-GPU memory of the worst pipeline stage (see the module docstring for every term)."""
    rollout = rollout or Rollout()
    try:
        layout.check(model)
    except LayoutError as exc:
        raise PlanError(str(exc)) from None
    work.check(layout)
    rollout.check()
    stages = {0, layout.pp - 1}
    per_stage = {s: _stage_estimate(model, layout, work, s) for s in stages}

    def training(parts: dict[str, float]) -> float:
        static = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["reference"]
        return static + parts["activations"] + max(parts["logits"], parts["teacher"])

    stage = max(stages, key=lambda s: training(per_stage[s]))
    parts = per_stage[stage]
    train_bytes = training(parts)
    static_bytes = train_bytes - parts["activations"] - max(parts["logits"], parts["teacher"])

    problems: list[str] = []
    pool = rollout.gpu_memory_utilization * capacity_gib * GIB
    vllm_weights = vllm_kv = 0.0
    kv_tokens = 0
    if pool:
        vllm_weights = model.total_params() / rollout.tp * (1.0 if rollout.fp8 else 2.0)
        vllm_kv = pool - vllm_weights - VLLM_WORKSPACE_GIB * GIB
        per_token = model.kv_bytes_per_token(2.0, rollout.tp)
        kv_tokens = max(0, int(vllm_kv // per_token))
        if vllm_kv <= 0:
            problems.append(f"vLLM weights ({vllm_weights / GIB:.1f} GiB at rollout tp={rollout.tp}) do not fit "
                            f"its pool of {pool / GIB:.1f} GiB: raise gpu_memory_utilization or rollout tp")
        elif kv_tokens < work.seq_len:
            problems.append(f"vLLM KV cache holds {kv_tokens} tokens, less than one {work.seq_len}-token sequence")
    overhead = overhead_gib * GIB
    if rollout.sleeps:
        total = max(train_bytes, static_bytes + pool) + overhead
    else:
        total = train_bytes + pool + overhead
    capacity = capacity_gib * GIB
    if total > capacity:
        problems.append(f"needs {total / GIB:.1f} GiB per GPU > {capacity_gib:.1f} GiB")
    g = {k: v / GIB for k, v in parts.items()}
    return Estimate(
        model=model.name, layout=asdict(layout), stage=stage,
        params_billion=model.total_params() / 1e9,
        training=train_bytes / GIB, vllm_pool=pool / GIB, vllm_weights=vllm_weights / GIB,
        vllm_kv_cache=max(vllm_kv, 0.0) / GIB, vllm_kv_tokens=kv_tokens, overhead=overhead_gib,
        total=total / GIB, capacity=capacity_gib, fits=not problems, problems=problems, **g)


# --------------------------------------------------------------------------------------------
# recipes (experiment yaml files)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    layout: ParallelDims
    workload: Workload
    rollout: Rollout
    nodes: int
    gpus_per_node: int


def _experiment_model(data: Mapping[str, Any], name: str) -> str:
    for entry in data.get("defaults") or []:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                if key.replace("override", "").strip().lstrip("/") == "model":
                    return str(value)
    raise PlanError(f"experiment {name!r} does not select a model in its defaults list")


def workload_for(seq_len: int, micro_batch_size: int, episodes: int, dp: int, precision: str) -> Workload:
    """The workload of one step of ``episodes`` (tasks x group): one sample per turn, the number of
    turns unknown, so one step's episodes rounded up to a multiple of ``micro_batch_size * dp``."""
    step = micro_batch_size * dp
    return Workload(seq_len=seq_len, micro_batch_size=micro_batch_size,
                    global_batch_size=max(step, -(-episodes // step) * step), precision=precision)


def load_recipe(source: str | Path) -> Recipe:
    """Read an experiment yaml (a name under ``config/experiment`` or a path) into planner inputs."""
    path = Path(source)
    if not path.is_file():
        path = CONFIG_DIR / "experiment" / f"{source}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
        raise PlanError(f"unknown experiment {str(source)!r}: not one of {known}")
    data = _read_yaml(path)
    name = path.stem
    par, ro, tr, sl = (data.get(k) or {} for k in ("parallel", "rollout", "trainer", "slurm"))
    model_data = (data.get("model") or {})
    nodes, gpn = int(sl.get("nodes", 1)), int(sl.get("gpus_per_node", 8))
    try:  # the parallel group as the trainer reads it (its defaults, e.g. no distributed optimizer)
        layout = ParallelDims.from_config(dict(par), nodes * gpn)
    except LayoutError as exc:
        raise PlanError(f"experiment {name!r}: {exc}") from None
    precision = "fp8" if model_data.get("fp8") else ("fp32" if model_data.get("dtype") == "float32" else "bf16")
    seq = int(ro.get("max_prompt_tokens", 2048)) + int(ro.get("max_response_tokens", 512))
    workload = workload_for(seq, int(tr.get("micro_batch_size", 1)),
                            int(ro.get("tasks_per_step", 16)) * int(ro.get("group_size", 8)), layout.dp, precision)
    rollout = Rollout(gpu_memory_utilization=float(ro.get("gpu_memory_utilization", 0.0)),
                      tp=int(ro.get("tp", 1)), fp8=bool(model_data.get("fp8_rollout", False)))
    return Recipe(name=name, model=_experiment_model(data, name), layout=layout, workload=workload,
                  rollout=rollout, nodes=nodes, gpus_per_node=gpn)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def plan_recipe(name: str, **kwargs: Any) -> tuple[Recipe, Estimate]:
    recipe = load_recipe(name)
    return recipe, estimate(load_model_shape(recipe.model), recipe.layout, recipe.workload, recipe.rollout,
                            **kwargs)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
COLUMNS = ("weights", "gradients", "optimizer", "reference", "activations", "logits", "teacher",
           "vllm_pool", "total")


def format_estimate(est: Estimate) -> str:
    """A two-column breakdown of one estimate."""
    lay = est.layout
    head = (f"{est.model} ({est.params_billion:.2f}B params)  tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} "
            f"dp={lay['dp']} ep={lay['ep']} vpp={lay['vpp']} sp={lay['sequence_parallel']} "
            f"distopt={lay['distributed_optimizer']} recompute={lay['recompute']}  worst stage {est.stage}")
    rows = [
        ("weights", est.weights), ("gradients (fp32 main grads)", est.gradients),
        ("optimizer (Adam, sharded)", est.optimizer), ("reference policy", est.reference),
        ("activations", est.activations), ("  without recompute", est.activations_no_recompute),
        ("  with full recompute", est.activations_full_recompute), ("logits + objective", est.logits),
        ("teacher pass (no grad)", est.teacher), ("training total", est.training),
        ("vLLM pool", est.vllm_pool), ("  vLLM weights", est.vllm_weights),
        ("  vLLM KV cache", est.vllm_kv_cache), ("overhead", est.overhead), ("TOTAL per GPU", est.total),
    ]
    lines = [head] + [f"  {label:<30} {value:9.2f} GiB" for label, value in rows]
    lines.append(f"  vLLM KV cache tokens           {est.vllm_kv_tokens:>9d}")
    verdict = "FITS" if est.fits else "DOES NOT FIT"
    lines.append(f"  {verdict} in {est.capacity:.1f} GiB" + "".join(f"\n    - {p}" for p in est.problems))
    return "\n".join(lines)


def recipe_table(names: Iterable[str] | None = None, **kwargs: Any) -> str:
    """The markdown table of every recipe (README)."""
    out = ["| recipe | model | GPUs | tp | pp | cp | ep | recompute | precision | rollout tp / mem | "
           "train GiB | vLLM GiB | total GiB/GPU | fits 80 GB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names or recipe_names():
        r, e = plan_recipe(name, **kwargs)
        lay = r.layout
        out.append(
            f"| {name} | {r.model} | {r.nodes}x{r.gpus_per_node} | {lay.tp} | {lay.pp} | {lay.cp} | {lay.ep} | "
            f"{lay.recompute} | {r.workload.precision} | {r.rollout.tp} / {r.rollout.gpu_memory_utilization:.2f} | "
            f"{e.training:.1f} | {e.vllm_pool:.1f} | {e.total:.1f} | {'yes' if e.fits else 'NO'} |")
    return "\n".join(out)
