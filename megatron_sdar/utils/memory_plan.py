"""Per-GPU memory estimate of an SDAR training layout (the planner behind ``tools/plan.py`` and the
memory plan of ``--dry-run``).

The model is a :class:`~megatron_sdar.models.architecture.QwenArchitecture` (the one description of
a model's shape: its ``config.json``, or the model YAML's ``architecture:`` block where the checkpoint
is not downloaded). A run is planned from the :class:`~megatron_sdar.config.schema.RunConfig` that
``compose_run`` returns for the same overrides as ``python -m megatron_sdar.train``
(:func:`compose_plan`, :func:`run_inputs`).

Everything is an estimate from tensor shapes; nothing is allocated. The terms:

* **weights**: this rank's parameters (worst pipeline stage: the first holds the embedding, the
  last the output layer), 2 bytes (bf16 / fp8; FP8 adds ~1 byte per GEMM weight for Transformer
  Engine's FP8 weight copies) or 4 bytes (fp32).
* **gradients**: Megatron DDP's fp32 main-grad buffer, 4 bytes per parameter, not sharded (the
  distributed optimizer reduce-scatters it but keeps the full buffer).
* **optimizer**: Adam, fp32 master copy (not for fp32 params) + two fp32 moments = 12 (or 8) bytes
  per parameter, divided by the data-parallel size (``dp * cp``; expert parameters by the
  expert-data-parallel size) when the distributed optimizer is on.
* **reference**: the frozen reference policy of the KL term (bf16 copy of the weights; none when
  ``algo.kl_coef`` is 0, unless the teacher is frozen: ``algo.teacher=frozen`` runs the teacher on
  this same copy, so it costs no more than the KL term does).
* **teacher weights**: ``algo.teacher=ema`` keeps an exponential moving average of the policy: one
  more copy of the weights, plus an fp32 shadow of it when the weights are bf16 / fp8 (``shared``
  and ``frozen`` add nothing here).
* **activations**: per layer and micro-batch the tensors autograd keeps (see
  :func:`layer_activation_bytes`), times the micro-batches a 1F1B pipeline keeps in flight (``pp``
  on the first stage, ``x (1 + (pp-1)/(pp*vpp))`` interleaved). ``recompute=full`` keeps only each
  layer's input plus one layer re-materialized; ``selective`` drops the attention score matrices.
* **logits**: the last stage's ``[tokens, V/tp]`` logits and their gradient, plus the objective's
  ~0.1x fp32 chunk workspace (the vocabulary-parallel objective never gathers the vocabulary).
* **teacher**: the no-grad teacher forward on the privileged-context sequence (objectives with a
  teacher: ``distill_coef`` or ``rlsd_coef`` > 0): one layer's transient tensors plus its logits.
  It runs inside the forward step, so the dynamic peak is ``activations + max(logits, teacher)``.
* **vLLM**: the colocated rollout engine reserves ``gpu_memory_utilization`` of the GPU: its
  weights (``params / rollout_tp``, bf16 or fp8) and the KV cache in the rest. With
  ``rollout_sleeps`` the engine frees its pool while Megatron trains.
* **overhead**: CUDA context, NCCL buffers, allocator fragmentation (a flat allowance).

Calibration: ``tools/validate_plan.py`` compares the estimate with the measured peak RSS of a tiny
CPU model (forward, backward, Adam step); GPU numbers should be added as they are measured.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError
from megatron_sdar.utils.parallel_dims import LayoutError, ParallelDims

if TYPE_CHECKING:
    from megatron_sdar.config.schema import RunConfig

GIB = 1024**3
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
# parameters of a model (a QwenArchitecture: the model's config.json, or its YAML architecture block)
# --------------------------------------------------------------------------------------------
def is_moe(model: QwenArchitecture) -> bool:
    return model.moe is not None


def attention_linear_params(model: QwenArchitecture) -> int:
    """q, k, v, o projections (+ QKV bias) of one layer, unsharded."""
    h, q, kv = model.hidden_size, model.q_size, model.kv_size
    bias = (q + 2 * kv) if model.qkv_bias else 0
    return h * (q + 2 * kv) + q * h + bias


def replicated_layer_params(model: QwenArchitecture) -> int:
    """Parameters every TP rank holds in full: the two RMSNorms, QK-norms, the MoE router."""
    experts = model.moe.num_experts if model.moe else 0
    return 2 * model.hidden_size + (2 * model.head_dim if model.qk_norm else 0) + model.hidden_size * experts


def dense_mlp_params(model: QwenArchitecture) -> int:
    return 0 if is_moe(model) else 3 * model.hidden_size * model.intermediate_size


def expert_params(model: QwenArchitecture) -> int:
    """All experts of one layer (gate, up, down)."""
    return model.moe.num_experts * 3 * model.hidden_size * model.moe.expert_ffn_hidden_size if model.moe else 0


def total_params(model: QwenArchitecture) -> int:
    per_layer = (attention_linear_params(model) + replicated_layer_params(model) + dense_mlp_params(model)
                 + expert_params(model))
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * per_layer + embeddings + model.hidden_size


def kv_bytes_per_token(model: QwenArchitecture, dtype_bytes: float, tp: int = 1) -> float:
    """KV cache of one token across all layers on one rollout rank (KV heads replicate past tp = kv_heads)."""
    return 2 * model.num_layers * model.kv_size / min(tp, model.num_key_value_heads) * dtype_bytes


def check_layout(model: QwenArchitecture, layout: ParallelDims) -> None:
    """:class:`PlanError` unless ``layout`` can split ``model``: the layout's checks, then the model's
    own (the ones the trainer and the converter apply)."""
    shape = SimpleNamespace(heads=model.num_attention_heads, kv_heads=model.num_key_value_heads,
                            layers=model.num_layers, is_moe=is_moe(model),
                            num_experts=model.moe.num_experts if model.moe else 0)
    try:
        layout.check(shape)
        model.check_tensor_parallel(layout.tp)
        model.check_expert_parallel(layout.ep, layout.expert_tp)
    except (LayoutError, UnsupportedConfigError) as exc:
        raise PlanError(str(exc)) from None


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
    teacher_weights: str = "shared"  # algo.teacher: shared | frozen (the reference copy) | ema (a copy of its own)

    def check(self, layout: ParallelDims) -> None:
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.teacher_weights not in ("shared", "frozen", "ema"):
            raise PlanError(f"teacher_weights must be shared, frozen or ema, got {self.teacher_weights!r}")
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


def stage_params(model: QwenArchitecture, layout: ParallelDims, stage: int) -> StageParams:
    """Parameters one rank of pipeline ``stage`` holds."""
    tp, pp = layout.tp, layout.pp
    n_layers = model.num_layers // pp
    attn = attention_linear_params(model) / tp
    mlp = dense_mlp_params(model) / tp
    expert = n_layers * expert_params(model) / (layout.ep * layout.expert_tp)
    dense = n_layers * (attn + mlp + replicated_layer_params(model))
    gemm = n_layers * (attn + mlp) + expert
    h = model.hidden_size
    vocab_rows = math.ceil(model.vocab_size / tp)  # padded to a multiple of tp
    first, last = stage == 0, stage == pp - 1
    if first:
        dense += vocab_rows * h
    if last:
        dense += h  # final norm
        if not model.tie_word_embeddings or pp > 1:  # tied + pp>1: the last stage keeps its own copy
            dense += vocab_rows * h
            gemm += vocab_rows * h
    return StageParams(dense=dense, expert=expert, gemm=gemm)


def layer_activation_bytes(model: QwenArchitecture, layout: ParallelDims, work: Workload, tokens: float,
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
    h, heads = model.hidden_size, model.num_attention_heads
    if recompute == "full":
        return tokens * h * a / sp
    total = 4 * tokens * h * a / sp
    total += tokens * (2 * model.q_size + 2 * model.kv_size) * a / t
    total += tokens * heads / t * 4  # softmax log-sum-exp (fp32)
    if work.kernels == "unfused":
        total += 2 * tokens * h * a / sp  # torch RMSNorm keeps its normalized input too
        total += tokens * (model.q_size + 2 * model.kv_size) * a / t  # v is a view: the fused QKV output stays
        if recompute != "selective":
            seq = tokens / work.micro_batch_size
            total += work.micro_batch_size * heads / t * seq * seq * (2 * a + 1)  # probs, dropout copy, mask
    if model.moe:
        k, fe, et = model.moe.num_experts_per_token, model.moe.expert_ffn_hidden_size, layout.expert_tp
        total += 2 * tokens * k * h * a + 3 * tokens * k * fe * a / et + tokens * model.moe.num_experts * 4
        if work.kernels == "unfused":
            total += tokens * k * fe * a / et
    else:
        f = model.intermediate_size
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
    teacher_weights: float
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


def _stage_estimate(model: QwenArchitecture, layout: ParallelDims, work: Workload, stage: int) -> dict[str, float]:
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
    frozen_teacher = work.teacher_pass and work.teacher_weights == "frozen"
    reference = p.total * weight_b if work.reference_model or frozen_teacher else 0.0
    ema = work.teacher_pass and work.teacher_weights == "ema"
    teacher_weights = p.total * (weight_b + (0.0 if fp32 else 4.0)) if ema else 0.0

    tokens = work.micro_batch_size * work.seq_len / layout.cp
    layers = model.num_layers // layout.pp
    pp, vpp = layout.pp, layout.vpp or 1
    in_flight = min(pp - stage, work.microbatches(layout))
    if vpp > 1 and stage == 0:
        in_flight_layers = layers * in_flight * (1 + (pp - 1) / (pp * vpp))
    else:
        in_flight_layers = layers * in_flight
    edge = tokens * model.hidden_size * work.act_bytes / (layout.tp if layout.sequence_parallel else 1)

    def acts(recompute: str) -> float:
        stored = in_flight_layers * layer_activation_bytes(model, layout, work, tokens, recompute)
        if recompute == "full":  # one layer re-materialized during its backward
            stored += layer_activation_bytes(model, layout, work, tokens, "none")
        return stored + 2 * edge

    v_local = math.ceil(model.vocab_size / layout.tp)
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
                teacher_weights=teacher_weights, activations=acts(layout.recompute), activations_no_recompute=acts("none"),
                activations_full_recompute=acts("full"), logits=logits, teacher=teacher)


def estimate(model: QwenArchitecture, layout: ParallelDims, work: Workload, rollout: Rollout | None = None, *,
             name: str = "model", capacity_gib: float = H100_GIB, overhead_gib: float = 3.0) -> Estimate:
    """Per-GPU memory of the worst pipeline stage of ``model`` (named ``name`` in the report; see the
    module docstring for every term)."""
    rollout = rollout or Rollout()
    check_layout(model, layout)
    work.check(layout)
    rollout.check()
    stages = {0, layout.pp - 1}
    per_stage = {s: _stage_estimate(model, layout, work, s) for s in stages}

    def training(parts: dict[str, float]) -> float:
        static = (parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["reference"]
                  + parts["teacher_weights"])
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
        vllm_weights = total_params(model) / rollout.tp * (1.0 if rollout.fp8 else 2.0)
        vllm_kv = pool - vllm_weights - VLLM_WORKSPACE_GIB * GIB
        per_token = kv_bytes_per_token(model, 2.0, rollout.tp)
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
        model=name, layout=asdict(layout), stage=stage,
        params_billion=total_params(model) / 1e9,
        training=train_bytes / GIB, vllm_pool=pool / GIB, vllm_weights=vllm_weights / GIB,
        vllm_kv_cache=max(vllm_kv, 0.0) / GIB, vllm_kv_tokens=kv_tokens, overhead=overhead_gib,
        total=total / GIB, capacity=capacity_gib, fits=not problems, problems=problems, **g)


# --------------------------------------------------------------------------------------------
# runs: what ``python -m megatron_sdar.train <overrides>`` would run (the same composition)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The planner's inputs for one composed run."""

    name: str  # the recipe (or the model when no recipe is selected)
    model: str
    arch: QwenArchitecture
    layout: ParallelDims
    workload: Workload
    rollout: Rollout
    nodes: int
    gpus_per_node: int


def workload_for(seq_len: int, micro_batch_size: int, episodes: int, dp: int, precision: str, **rest: Any) -> Workload:
    """The workload of one step of ``episodes`` (tasks x group): one sample per turn, the number of
    turns unknown, so one step's episodes rounded up to a multiple of ``micro_batch_size * dp``."""
    step = micro_batch_size * dp
    return Workload(seq_len=seq_len, micro_batch_size=micro_batch_size,
                    global_batch_size=max(step, -(-episodes // step) * step), precision=precision, **rest)


def precision_of(run: "RunConfig") -> str:
    """``fp8`` / ``bf16`` / ``fp32`` of the run's training weights."""
    return "fp8" if run.model.fp8 else ("fp32" if run.model.dtype == "float32" else "bf16")


def run_inputs(run: "RunConfig", layout: ParallelDims) -> tuple[Workload, Rollout]:
    """One training step of ``run`` on ``layout``: its sequences (prompt + response tokens), micro-batches,
    episodes per step, precision, whether the objective runs a teacher pass and keeps a KL reference
    model; and its colocated vLLM engine. The dry run's memory plan is made from the same."""
    r, objective = run.rollout, run.objective()
    work = workload_for(r.max_prompt_tokens + r.max_response_tokens, run.trainer.micro_batch_size,
                        r.tasks_per_step * r.group_size, layout.dp, precision_of(run),
                        reference_model=objective.kl_coef > 0, teacher_pass=objective.needs_teacher,
                        teacher_weights=objective.teacher)
    return work, Rollout(gpu_memory_utilization=r.gpu_memory_utilization, tp=r.tp, fp8=run.model.fp8_rollout)


def compose_plan(overrides: Sequence[str], *, dp: int | None = None, name: str | None = None) -> Recipe:
    """The planner's inputs for ``python -m megatron_sdar.train <overrides>``: the run composed and
    validated by :func:`megatron_sdar.config.schema.compose_run` (without the downloads: the model's
    shape from its ``config.json`` when present, else from its YAML ``architecture:`` block), on the
    recipe's ``slurm.nodes x slurm.gpus_per_node`` GPUs, or ``tp*pp*cp*dp`` when ``dp`` is given.
    Configuration errors are :class:`PlanError` lines."""
    from megatron_sdar.config.schema import ConfigError, compose_run, model_architecture

    try:
        run = compose_run(list(overrides), need_files=False)
        arch = model_architecture(run.model, need_checkpoint=False)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    slurm = run.slurm or {}
    nodes, gpn = int(slurm.get("nodes", 1)), int(slurm.get("gpus_per_node", 8))
    p = run.parallel
    world = p.tp * p.pp * p.cp * dp if dp is not None else nodes * gpn
    try:
        layout = ParallelDims.from_config(p, world)
    except LayoutError as exc:
        raise PlanError(f"parallel: {exc}") from None
    work, rollout = run_inputs(run, layout)
    recipe = next((o.partition("=")[2] for o in overrides if o.partition("=")[0].lstrip("+~") == "experiment"), None)
    return Recipe(name=name or recipe or run.model.name, model=run.model.name, arch=arch, layout=layout,
                  workload=work, rollout=rollout, nodes=nodes, gpus_per_node=gpn)


def load_recipe(name: str, *overrides: str) -> Recipe:
    """``experiment=<name>`` (a recipe of ``config/experiment``) plus Hydra overrides."""
    return compose_plan([f"experiment={name}", *overrides])


def plan_recipe(name: str, **kwargs: Any) -> tuple[Recipe, Estimate]:
    recipe = load_recipe(name)
    return recipe, estimate(recipe.arch, recipe.layout, recipe.workload, recipe.rollout, name=recipe.model,
                            **kwargs)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
COLUMNS = ("weights", "gradients", "optimizer", "reference", "teacher_weights", "activations", "logits", "teacher",
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
        ("teacher weights (EMA)", est.teacher_weights),
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
    from megatron_sdar.config.schema import recipe_names

    for name in names or recipe_names():
        r, e = plan_recipe(name, **kwargs)
        lay = r.layout
        out.append(
            f"| {name} | {r.model} | {r.nodes}x{r.gpus_per_node} | {lay.tp} | {lay.pp} | {lay.cp} | {lay.ep} | "
            f"{lay.recompute} | {r.workload.precision} | {r.rollout.tp} / {r.rollout.gpu_memory_utilization:.2f} | "
            f"{e.training:.1f} | {e.vllm_pool:.1f} | {e.total:.1f} | {'yes' if e.fits else 'NO'} |")
    return "\n".join(out)
