"""The run's precision: ``model.dtype``, ``model.fp8`` and ``model.fp8_rollout`` -> one
:class:`PrecisionSettings`, built once (:func:`resolve_precision`) and read by the three places that
need it: megatron-core's ``TransformerConfig`` (:meth:`~PrecisionSettings.transformer_config_kwargs`),
its ``DistributedDataParallelConfig`` and ``OptimizerConfig`` (:meth:`~PrecisionSettings.ddp_config_kwargs`,
:meth:`~PrecisionSettings.optimizer_config_kwargs`) and the vLLM engine
(:meth:`~PrecisionSettings.vllm_kwargs`). Nothing else derives precision fields.

``model.fp8`` names a scaling recipe (megatron-core 0.19 ``TransformerConfig.fp8_recipe``):

* ``delayed``: per-tensor scales from an amax history (``fp8_amax_history_len``, ``max``).
* ``tensorwise``: per-tensor *current* scaling (scale from this tensor's amax, no history).
* ``blockwise``: 1x128 / 128x128 block scales (DeepSeek-V3 style); Hopper.
* ``mxfp8``: MX block scaling (32-element blocks, e8m0 scales); Blackwell (compute capability 10.0).

FP8 applies only to the GEMMs inside Transformer Engine layers (format ``hybrid``: e4m3 forward,
e5m2 gradients). Parameters stay BF16 (``fp8_param=False``, ``fp8_param_gather=False``); the
optimizer keeps FP32 master weights and moments as in BF16 training. The rollout engine stays BF16
unless ``model.fp8_rollout`` asks vLLM for its own ``quantization="fp8"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# minimum CUDA compute capability of each recipe (Ada/Hopper FP8 tensor cores; MX on Blackwell)
MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


class FP8ConfigError(ValueError):
    """A precision / FP8 setting that cannot run here (with what to change)."""


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class PrecisionSettings:
    """The validated precision of one run: parameter / activation dtype and the FP8 choices."""

    dtype: str = "float32"  # parameters and activations (the optimizer keeps fp32 master weights)
    recipe: str | None = None  # FP8 GEMM recipe; None: no FP8 GEMMs
    rollout_fp8: bool = False
    amax_history_len: int = 1024
    margin: int = 0

    @property
    def enabled(self) -> bool:
        """FP8 GEMMs in training."""
        return self.recipe is not None

    @property
    def params_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Fields for megatron-core's ``TransformerConfig`` (empty when FP8 is off)."""
        if not self.enabled:
            return {}
        kwargs: dict[str, Any] = dict(fp8="hybrid", fp8_recipe=self.recipe, fp8_margin=self.margin,
                                      fp8_param=False, fp8_wgrad=True)
        if self.recipe == "delayed":
            kwargs.update(fp8_amax_history_len=self.amax_history_len, fp8_amax_compute_algo="max")
        else:  # current / block scaling has no history
            kwargs.update(fp8_amax_history_len=1, fp8_amax_compute_algo="most_recent")
        return kwargs

    def ddp_config_kwargs(self) -> dict[str, Any]:
        """Fields for ``DistributedDataParallelConfig``: gradients reduced in fp32; with FP8, BF16
        params are gathered, not FP8 ones."""
        return {"grad_reduce_in_fp32": True, **({"fp8_param_gather": False} if self.enabled else {})}

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """Fields for megatron-core's ``OptimizerConfig`` (fp32 master weights for bf16 params)."""
        return {"bf16": self.dtype == "bfloat16", "fp16": False, "params_dtype": self.params_dtype}

    def vllm_kwargs(self) -> dict[str, Any]:
        """Arguments for ``vllm.LLM(...)`` of the rollout engine: the training dtype (so train and
        inference log-probs agree) and FP8 weights when ``model.fp8_rollout``."""
        return {"dtype": self.dtype, "quantization": "fp8" if self.rollout_fp8 else None}


def _gpu_capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _te_available() -> bool:
    from megatron_sdar.models.megatron_model import transformer_engine_available

    return transformer_engine_available()


def resolve_precision(
    dtype: str = "bfloat16",
    fp8: str | None = None,
    *,
    fp8_rollout: bool = False,
    check_hardware: bool = True,
    te_available: Callable[[], bool] = _te_available,
    capability: Callable[[], tuple[int, int] | None] = _gpu_capability,
) -> PrecisionSettings:
    """Validate ``model.dtype`` / ``model.fp8`` / ``model.fp8_rollout`` and return the settings.

    ``check_hardware=False`` skips the Transformer Engine and GPU checks (config tooling, the
    planner). Raises :class:`FP8ConfigError` with the reason and the fix.
    """
    if dtype not in DTYPES:
        raise FP8ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fp8 in (None, "", "null", "none", False):
        fp8 = None
    if fp8 is not None and fp8 not in FP8_RECIPES:
        raise FP8ConfigError(f"model.fp8={fp8!r} is not a recipe; use one of {', '.join(FP8_RECIPES)} or null")
    if fp8 is not None and dtype != "bfloat16":
        raise FP8ConfigError(f"model.fp8={fp8} needs model.dtype=bfloat16 (FP8 GEMMs with BF16 weights and "
                             f"activations), got model.dtype={dtype}")
    if fp8 is not None and check_hardware:
        if not te_available():
            raise FP8ConfigError(f"model.fp8={fp8} needs Transformer Engine, which is not importable here; "
                                 "install transformer-engine[pytorch] (GPU image) or set model.fp8=null")
        cap = capability()
        if cap is None:
            raise FP8ConfigError(f"model.fp8={fp8} needs a CUDA GPU; none is visible. Set model.fp8=null on CPU")
        need = MIN_CAPABILITY[fp8]
        if cap < need:
            hint = " (MXFP8 is Blackwell-only: use tensorwise or delayed on H100)" if fp8 == "mxfp8" else \
                " (FP8 tensor cores start with Ada / Hopper: H100, L40S)"
            raise FP8ConfigError(f"model.fp8={fp8} needs compute capability >= {need[0]}.{need[1]}, this GPU has "
                                 f"{cap[0]}.{cap[1]}{hint}")
    if fp8_rollout and check_hardware:
        cap = capability()
        if cap is not None and cap < (8, 9):
            raise FP8ConfigError(f"model.fp8_rollout=true: vLLM's FP8 kernels need compute capability >= 8.9, "
                                 f"this GPU has {cap[0]}.{cap[1]}")
    return PrecisionSettings(dtype=dtype, recipe=fp8, rollout_fp8=bool(fp8_rollout))
