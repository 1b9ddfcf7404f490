"""What a run will use, computed from its configuration without building a model or an engine.

:func:`launch_plan` turns a validated :class:`RunConfig` (plus the world size and the model
directory's ``config.json``) into the precision settings, the optimizer settings, the
TransformerConfig layout knobs and the rollout engine's config. The trainer builds from exactly
these objects, and ``python -m megatron_sdar.train <overrides> --dry-run`` prints them
(:func:`dry_run_report`): the layout, the per-GPU memory plan and the exact TransformerConfig /
DDP / optimizer / vLLM arguments, for a login node before a job is submitted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sdar.config.schema import (ConfigError, RunConfig, check_layout, dry_run_world_size,
                                         settings_differing_from_defaults)
from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.megatron_model import transformer_engine_available
from megatron_sdar.models.precision import FP8ConfigError, PrecisionSettings, resolve_precision
from megatron_sdar.rollout.engine import RolloutEngineConfig
from megatron_sdar.trainer.policy import OptimConfig
from megatron_sdar.utils.parallel_dims import ParallelDims


@dataclass
class LaunchPlan:
    """Everything the trainer derives from the config before it builds anything."""

    run: RunConfig
    dims: ParallelDims  # the training layout on this world size
    model_dir: Path
    arch: QwenArchitecture
    precision: PrecisionSettings
    optim: OptimConfig
    transformer_overrides: dict[str, Any]  # layout knobs of the TransformerConfig
    engine: RolloutEngineConfig
    skipped_checks: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.dims.world

    @property
    def rollout_replicas(self) -> int:
        return self.dims.world // self.run.rollout.tp


def transformer_overrides(p: ParallelDims) -> dict[str, Any]:
    """The layout's TransformerConfig fields (sequence parallelism, recomputation, expert
    parallelism, virtual pipeline stages)."""
    overrides: dict[str, Any] = {"sequence_parallel": p.sequence_parallel}
    if p.recompute != "none":
        overrides["recompute_granularity"] = p.recompute
        if p.recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    if p.ep > 1:
        overrides["expert_model_parallel_size"] = p.ep
    if p.vpp:
        overrides["virtual_pipeline_model_parallel_size"] = p.vpp
    return overrides


def check_precision(run: RunConfig, *, check_hardware: bool = True,
                    **hardware_probes: Any) -> tuple[PrecisionSettings, list[str]]:
    """The run's precision settings, checked against this machine (Transformer Engine, the GPU's
    compute capability) unless ``check_hardware=False``; with the checks that were skipped.
    Needs no model directory: the trainer runs it before it builds anything. Raises
    :class:`ConfigError` naming what to change."""
    m, t, p = run.model, run.trainer, run.parallel
    try:
        precision = resolve_precision(m.dtype, m.fp8, fp8_rollout=m.fp8_rollout, check_hardware=check_hardware,
                                      **hardware_probes)
    except FP8ConfigError as exc:
        raise ConfigError(str(exc)) from None
    skipped = [] if check_hardware else ["Transformer Engine importable", "GPU compute capability for FP8",
                                         "bf16 needs Transformer Engine's layer spec"]
    te_available = hardware_probes.get("te_available")
    if check_hardware and precision.dtype == "bfloat16" and not (te_available or transformer_engine_available)():
        # the local spec builds its norms with torch.nn.RMSNorm in fp32, so a bf16 model mixes parameter
        # dtypes, and megatron-core 0.19 cannot checkpoint the optimizer state of such a model: refuse now,
        # not at the first checkpoint after the warm start
        raise ConfigError("model.dtype=bfloat16 needs Transformer Engine's layer spec: without it (CPU) the norm "
                          "weights stay float32 and megatron-core 0.19 cannot checkpoint the optimizer state of a "
                          "model with mixed parameter dtypes; use model.dtype=float32 here, bf16 on a GPU with TE")
    if check_hardware and t.micro_batch_tokens is not None and p.cp > 1 and (te_available or transformer_engine_available)():
        # with TE, packed rows go to its THD attention, whose context-parallel split (per sequence) is
        # not the row split the passes use
        raise ConfigError("trainer.micro_batch_tokens (sequence packing) with Transformer Engine and parallel.cp > 1 "
                          "is not supported: set trainer.micro_batch_tokens=null (padded micro-batches) or cp=1")
    return precision, skipped


def launch_plan(run: RunConfig, world_size: int, model_dir: str | Path, *, check_hardware: bool = True,
                precision: tuple[PrecisionSettings, list[str]] | None = None, **hardware_probes: Any) -> LaunchPlan:
    """The plan of ``run`` (validated when composed, its layout checked on ``world_size`` ranks by
    :func:`~megatron_sdar.config.schema.check_layout`) with the model of ``model_dir`` (only its
    ``config.json`` is read). ``precision``: what :func:`check_precision` gave (else it runs here,
    with ``check_hardware`` and ``hardware_probes``: ``te_available``, ``capability``, for tests).
    Raises :class:`ConfigError` naming what to change."""
    model_dir = Path(model_dir)
    arch = QwenArchitecture.from_hf_config(model_dir)
    m, t, p, r = run.model, run.trainer, run.parallel, run.rollout
    precision, skipped = precision or check_precision(run, check_hardware=check_hardware, **hardware_probes)
    optim = OptimConfig(lr=t.lr, min_lr=t.min_lr or 0.0, warmup_steps=t.warmup_steps,
                        decay_steps=t.max_steps if t.min_lr is not None else None,
                        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                        clip_grad=t.clip_grad, use_distributed_optimizer=p.distributed_optimizer)
    vllm = precision.vllm_kwargs()
    engine = RolloutEngineConfig(
        tp=r.tp, max_model_len=min(r.max_prompt_tokens + r.max_response_tokens, arch.max_position_embeddings),
        gpu_memory_utilization=r.gpu_memory_utilization, cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        dtype=vllm["dtype"], seed=t.seed, quantization=vllm["quantization"])
    dims = ParallelDims.from_config(p, world_size)
    return LaunchPlan(run=run, dims=dims, model_dir=model_dir, arch=arch, precision=precision,
                      optim=optim, transformer_overrides=transformer_overrides(dims), engine=engine,
                      skipped_checks=skipped)


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def memory_plan(plan: LaunchPlan) -> dict[str, Any]:
    """Per-GPU memory estimate (GiB) of the plan's worst pipeline stage on an 80 GB H100."""
    from megatron_sdar.utils.memory_plan import estimate, run_inputs

    work, rollout = run_inputs(plan.run, plan.dims)  # the inputs tools/plan.py estimates from
    est = estimate(plan.arch, plan.dims, work, rollout, name=plan.model_dir.name)
    keys = ("weights", "gradients", "optimizer", "reference", "teacher_weights", "activations", "logits", "teacher",
            "training", "vllm_pool", "overhead", "total", "capacity")
    return {**{k: round(getattr(est, k), 3) for k in keys}, "fits": est.fits, "problems": list(est.problems)}


def dry_run_report(plan: LaunchPlan) -> dict[str, Any]:
    """The dry run's JSON: ``layout``, ``transformer_config``, ``ddp_config``, ``optimizer_config``,
    ``vllm_engine_args``, ``memory_plan_gib`` (plus ``skipped_checks``), for the GPU the job will
    run on (CUDA fusions on, vLLM's GPU arguments)."""
    from megatron_sdar.models.megatron_model import transformer_config_kwargs
    from megatron_sdar.rollout.engine import engine_args
    from megatron_sdar.trainer.policy import ddp_config_kwargs, optimizer_config_kwargs

    d = plan.dims
    config_class, fields = transformer_config_kwargs(
        plan.arch, tp=d.tp, pp=d.pp, cp=d.cp, ep=d.ep,
        params_dtype=plan.precision.params_dtype, initialize_weights=False, on_cpu=False,
        **plan.precision.transformer_config_kwargs(), **plan.transformer_overrides)
    layout = {"world_size": d.world, "tp": d.tp, "pp": d.pp, "vpp": d.vpp, "cp": d.cp, "ep": d.ep,
              "dp": d.dp, "sp": d.sequence_parallel, "distributed_optimizer": d.distributed_optimizer,
              "recompute": d.recompute, "rollout_tp": plan.run.rollout.tp, "rollout_replicas": plan.rollout_replicas}
    return _jsonable({
        "layout": layout,
        "transformer_config": {"class": config_class.__name__, **fields},
        "ddp_config": ddp_config_kwargs(plan.optim, plan.precision),
        "optimizer_config": optimizer_config_kwargs(plan.optim, plan.precision),
        "vllm_engine_args": engine_args(plan.model_dir, plan.engine, plan.rollout_replicas, on_gpu=True),
        "memory_plan_gib": memory_plan(plan),
        "skipped_checks": plan.skipped_checks,
    })


def teacher_weights_line(run: RunConfig, mem: dict[str, Any]) -> str:
    """What ``algo.teacher`` costs in the plan: no weights (shared), the KL reference copy (frozen), or
    a copy of its own (ema)."""
    objective = run.objective()
    if not objective.needs_teacher:
        return f"none (algo={run.algo.name} has no teacher term)"
    if objective.teacher == "shared":
        return "shared (the policy's own weights at rollout time; no copy)"
    if objective.teacher == "frozen":
        kl = "the KL term's" if objective.kl_coef > 0 else "kept for the teacher alone (algo.kl_coef=0)"
        return f"frozen (the reference model, {kl} copy: {mem['reference']:.1f} GiB)"
    shadow = "" if run.model.dtype == "float32" else " and its fp32 average"
    return f"ema (decay {objective.teacher_ema_decay}; a copy of its own{shadow}: {mem['teacher_weights']:.1f} GiB)"


def _override(value: Any) -> str:
    """``value`` as a Hydra override writes it (null, true/false, lists)."""
    return json.dumps(value) if value is None or isinstance(value, (bool, list, dict)) else str(value)


def dry_run(run: RunConfig) -> dict[str, Any]:
    """Check ``run``'s layout for its cluster without the hardware, print the plan readably (with
    every ``trainer``, ``rollout`` and ``env`` setting that differs from its YAML group's default:
    the recipe's warm start, learning rate, episode length...) and, as the last line, one JSON
    object (:func:`dry_run_report` plus ``settings_differing_from_defaults``). Builds no model,
    starts no engine."""
    if run.model.hf_path is None:
        raise ConfigError("--dry-run plans a recipe's model: set model.hf_path (a directory with its config.json)")
    world = dry_run_world_size(run)
    check_layout(run, world)
    plan = launch_plan(run, world, run.model.hf_path, check_hardware=False)
    report = dry_run_report(plan)
    changed = settings_differing_from_defaults(run)
    report["settings_differing_from_defaults"] = _jsonable(changed)
    lay, mem = report["layout"], report["memory_plan_gib"]
    print(f"dry run: {run.model.hf_path} on {world} GPU(s); algo={run.algo.name}, dtype={run.model.dtype}, "
          f"fp8={run.model.fp8}, fp8_rollout={run.model.fp8_rollout}")
    print("layout: " + " ".join(f"{k}={v}" for k, v in lay.items()))
    print(f"memory per GPU (GiB, worst stage): training {mem['training']:.1f} + vLLM {mem['vllm_pool']:.1f} "
          f"+ overhead {mem['overhead']:.1f} = {mem['total']:.1f} of {mem['capacity']:.1f} "
          f"({'fits' if mem['fits'] else 'DOES NOT FIT: ' + '; '.join(mem['problems'])})")
    print(f"teacher weights: {teacher_weights_line(run, mem)}")
    for key in ("transformer_config", "ddp_config", "optimizer_config", "vllm_engine_args"):
        print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in report[key].items()))
    print("skipped (need the GPU node): " + ", ".join(plan.skipped_checks))
    print("settings that differ from the defaults (config/trainer/default.yaml, config/rollout/default.yaml, "
          f"config/env/{run.env.name}.yaml): " + (", ".join(f"{k}={_override(v)}" for k, v in changed.items())
                                                  or "none"))
    print(json.dumps(report, sort_keys=True))
    return report
