"""The policy: this rank's Megatron model chunks wrapped in Megatron DDP, and Megatron's optimizer.

    policy = build_policy(arch, OptimConfig(lr=1e-6), hf_dir=...)   # after parallel init
    ... forward/backward through policy.model ...
    update = policy.step()        # grad sync, clip, optimizer step; skipped on non-finite grads

On GPU the distributed optimizer shards fp32 master weights and Adam states over data-parallel
ranks (``use_distributed_optimizer``); on CPU the same code runs over gloo (the CPU shims make
Megatron's type checks pass).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.precision import PrecisionSettings


@dataclass
class OptimConfig:
    """Adam with warmup + cosine decay to ``min_lr``; gradient clipping by global norm."""

    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        import math

        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.decay_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    applied: bool
    grad_norm: float
    lr: float


class Policy:
    """Model chunks (Megatron DDP) + optimizer for this rank."""

    def __init__(self, arch: QwenArchitecture, model: list, optimizer, optim_config: OptimConfig,
                 precision: PrecisionSettings) -> None:
        self.arch = arch
        self.model = model
        self.optimizer = optimizer
        self.optim_config = optim_config
        self.precision = precision
        self.steps_taken = 0

    @functools.cached_property
    def uses_transformer_engine(self) -> bool:
        """Built with Transformer Engine's layer spec (its attention takes THD packed sequences,
        not the local spec's block-diagonal masks)."""
        return any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
                   for chunk in self.model for m in chunk.modules())

    def reset_optimizer(self) -> None:
        """A fresh optimizer over the same model: Adam's moments and step counts start from zero
        (the first step after it is a first Adam step). ``steps_taken`` keeps counting: it tracks
        weight versions, not optimizer state."""
        self.optimizer = _megatron_optimizer(self.model, self.optim_config, self.precision)

    @property
    def config(self):
        return self.model[0].config

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finish_grad_sync(self) -> None:
        """Megatron's gradient finalization: the DP all-reduce / reduce-scatter, and the TP all-reduce
        of replicated weights that saw different tokens or heads (norms under sequence parallelism,
        Qwen3's q/k norms), the embedding all-reduce between the first and last pipeline stage."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        finalize_model_grads(self.model)

    def step(self, lr: float | None = None) -> StepResult:
        """Data-parallel grad sync, clipping and one optimizer step at ``lr`` (default: the
        schedule's lr for ``steps_taken``).

        Megatron's optimizer checks the gradients for inf/NaN across all ranks; on a non-finite
        gradient it skips the update (``applied=False``) and the weights stay as they were.
        """
        self.finish_grad_sync()
        lr = self.optim_config.lr_at(self.steps_taken) if lr is None else lr
        # Megatron groups the parameters with lr_mult / wd_mult (norms and biases: wd_mult 0) and
        # applies them in its own scheduler only; we drive the schedule, so we apply them here.
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim_config.weight_decay * group.get("wd_mult", 1.0)
        applied, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if applied:
            self.steps_taken += 1
        return StepResult(bool(applied), grad_norm, lr)

    def unwrapped(self) -> list:
        return [chunk.module for chunk in self.model]

    def frozen_copy(self, hf_dir: str | Path | None = None) -> list:
        """Model chunks built as the policy's (same architecture, TransformerConfig: layout and
        precision; the same virtual-pipeline chunks) with ``hf_dir``'s weights (None: a copy of the
        policy's current weights), in eval mode, no gradients, no DDP wrapper or optimizer (the KL
        reference, the frozen or EMA teacher)."""
        import dataclasses

        config = dataclasses.replace(self.config, perform_initialization=False)
        chunks = _build_chunks(self.arch, config, len(self.model), hf_dir)
        if hf_dir is None:
            copy_weights(self.unwrapped(), chunks)
        for chunk in chunks:
            chunk.eval()
            for param in chunk.parameters():
                param.requires_grad_(False)
        return chunks


def copy_weights(source: list, target: list) -> None:
    """Copy the weights of model chunks ``source`` into ``target`` (same architecture and layout)."""
    import torch

    with torch.no_grad():
        for src, dst in zip(source, target, strict=True):
            for (name, a), (other, b) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
                if name != other or a.shape != b.shape:
                    raise ValueError(f"model chunks differ: {name} {tuple(a.shape)} vs {other} {tuple(b.shape)}")
                b.copy_(a)


def ddp_config_kwargs(optim_config: OptimConfig, precision: PrecisionSettings) -> dict[str, Any]:
    """The ``DistributedDataParallelConfig`` fields of the policy (printed by the dry run)."""
    return dict(overlap_grad_reduce=False, use_distributed_optimizer=optim_config.use_distributed_optimizer,
                **precision.ddp_config_kwargs())


def optimizer_config_kwargs(optim_config: OptimConfig, precision: PrecisionSettings) -> dict[str, Any]:
    """The megatron-core ``OptimizerConfig`` fields of the policy (printed by the dry run)."""
    return dict(optimizer="adam", lr=optim_config.lr, min_lr=optim_config.min_lr,
                weight_decay=optim_config.weight_decay, adam_beta1=optim_config.adam_beta1,
                adam_beta2=optim_config.adam_beta2, adam_eps=optim_config.adam_eps, clip_grad=optim_config.clip_grad,
                use_distributed_optimizer=optim_config.use_distributed_optimizer,
                **precision.optimizer_config_kwargs())


def build_policy(arch: QwenArchitecture, optim_config: OptimConfig, *, hf_dir: str | Path | None = None,
                 precision: PrecisionSettings | None = None, **config_overrides: Any) -> Policy:
    """Build this rank's model (virtual-pipeline chunks when vpp is set), load ``hf_dir``'s
    weights if given, wrap it in Megatron DDP and create Megatron's optimizer. ``precision``
    (default: the checkpoint's dtype, no FP8) reaches the TransformerConfig, the DDP config and the
    optimizer config; ``config_overrides`` go to the TransformerConfig (layout knobs)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_sdar.models.megatron_model import build_transformer_config

    precision = precision or PrecisionSettings(dtype=str(arch.torch_dtype_object()).removeprefix("torch."))
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    config = build_transformer_config(arch, params_dtype=precision.params_dtype, initialize_weights=hf_dir is None,
                                      **precision.transformer_config_kwargs(), **config_overrides)
    chunks = _build_chunks(arch, config, vpp, hf_dir)
    ddp_config = DistributedDataParallelConfig(**ddp_config_kwargs(optim_config, precision))
    model = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    return Policy(arch, model, _megatron_optimizer(model, optim_config, precision), optim_config, precision)


def _build_chunks(arch: QwenArchitecture, config, vpp: int, hf_dir: str | Path | None) -> list:
    """This rank's model chunks (one per virtual-pipeline stage), with ``hf_dir``'s weights if given."""
    from megatron_sdar.models.hf_loader import load_hf_weights
    from megatron_sdar.models.megatron_model import build_model

    chunks = [build_model(arch, config, vp_stage=i) for i in range(vpp)] if vpp > 1 else [build_model(arch, config)]
    if hf_dir is not None:
        load_hf_weights(chunks, arch, hf_dir)
    return chunks


def _megatron_optimizer(model: list, optim_config: OptimConfig, precision: PrecisionSettings):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(OptimizerConfig(**optimizer_config_kwargs(optim_config, precision)), model)
