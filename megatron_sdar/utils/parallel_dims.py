"""The parallel layout of a training job, in one object (in the spirit of torchtitan's ``ParallelDims``).

    dims = ParallelDims.from_config(run_config.parallel, world_size)   # validated sizes and flags
    dims.initialize(seed)                                             # Megatron's parallel state
    dims = ParallelDims.current()                                     # the same dims, flags included
    groups = ProcessGroups.current()                                  # this rank's groups and ranks

Everything else derives from it: the Hydra ``parallel`` group is its user-facing form
(:class:`megatron_sdar.config.schema.ParallelConfig`), the memory planner estimates one, the test
launcher starts processes for one, the checkpoint marker records one (:meth:`checkpoint_layout`),
the TransformerConfig's layout fields are made from one
(:func:`megatron_sdar.trainer.launch.transformer_overrides`), the passes plan their micro-batches
from :meth:`ParallelDims.current` (sequence parallelism, virtual pipeline stages) and they and the
objective reduce over :class:`ProcessGroups`.

``world = tp * pp * cp * dp``. Experts are split over ``ep * etp`` ranks inside ``tp * cp * dp``
(``etp``: the expert tensor-parallel size, Megatron's default ``tp``). ``vpp``: virtual pipeline
chunks per rank (``None``: not interleaved).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

RECOMPUTE = ("none", "selective", "full")
# Megatron's names for the sizes, as the checkpoint marker has always stored them.
_CHECKPOINT_NAMES = {"tp": "tensor_parallel", "pp": "pipeline_parallel", "vpp": "virtual_pipeline",
                     "cp": "context_parallel", "ep": "expert_parallel", "dp": "data_parallel"}


class LayoutError(ValueError):
    """A parallel layout that cannot run (with the reason)."""


# The layout ParallelDims.initialize set up in this process, and the TP group Megatron made for it
# (a parallel state destroyed and made again has another group: the record is then stale).
_initialized: tuple["ParallelDims", Any] | None = None


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_world(cls, world: int, *, tp: int = 1, pp: int = 1, cp: int = 1, **rest: Any) -> "ParallelDims":
        """The layout with ``dp = world / (tp * pp * cp)``; :class:`LayoutError` when that does not divide."""
        for name, size in (("world size", world), ("tp", tp), ("pp", pp), ("cp", cp)):
            if int(size) < 1:
                raise LayoutError(f"{name} must be >= 1, got {size}")
        if world % (tp * pp * cp):
            raise LayoutError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
        return cls(tp=tp, pp=pp, cp=cp, dp=world // (tp * pp * cp), **rest)

    @classmethod
    def from_config(cls, parallel, world: int) -> "ParallelDims":
        """From the ``parallel`` config group (a ``ParallelConfig`` or a mapping with its fields)."""
        get = parallel.get if isinstance(parallel, dict) else lambda key, default: getattr(parallel, key, default)
        vpp = get("vpp", None)
        return cls.for_world(world, tp=int(get("tp", 1)), pp=int(get("pp", 1)), cp=int(get("cp", 1)),
                             ep=int(get("ep", 1)), vpp=int(vpp) if vpp else None,
                             sequence_parallel=bool(get("sequence_parallel", False)),
                             distributed_optimizer=bool(get("distributed_optimizer", False)),
                             recompute=str(get("recompute", "none")))

    @classmethod
    def current(cls) -> "ParallelDims":
        """The layout of Megatron's initialized parallel state: the dims :meth:`initialize` set it up
        from, flags included (``sequence_parallel``, ``recompute``, ``distributed_optimizer``);
        for a state set up otherwise (``initialize_megatron_parallel`` directly), its sizes with the
        flags at their defaults."""
        from megatron.core import parallel_state as ps

        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        sizes = cls(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                    cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                    ep=ps.get_expert_model_parallel_world_size(), vpp=vpp if vpp and vpp > 1 else None)
        if _initialized is not None:
            dims, tp_group = _initialized
            if tp_group is ps.get_tensor_model_parallel_group() and dims.sizes() == sizes.sizes():
                return dims
        return sizes

    def sizes(self) -> tuple[int, ...]:
        """``(tp, pp, cp, dp, ep, chunks)``: what Megatron's parallel state holds of the layout."""
        return self.tp, self.pp, self.cp, self.dp, self.ep, self.chunks

    # ------------------------------------------------------------------ derived sizes
    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def chunks(self) -> int:
        """Model chunks per rank."""
        return self.vpp or 1

    # ------------------------------------------------------------------ checks
    def check(self, model=None, *, world_known: bool = True) -> "ParallelDims":
        """Raise :class:`LayoutError` for a layout that cannot run, at all or for ``model`` (anything
        with ``heads``, ``kv_heads``, ``layers`` and, to check experts, ``is_moe``, ``num_experts``);
        return ``self``. ``world_known=False``: ``dp`` is not known yet (skip what depends on it)."""
        for key in ("tp", "pp", "cp", "dp", "ep"):
            if getattr(self, key) < 1:
                raise LayoutError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.recompute not in RECOMPUTE:
            raise LayoutError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if model is not None and (model.kv_heads % self.tp or model.heads % self.tp):
            raise LayoutError(f"tp={self.tp} must divide heads={model.heads} and kv_heads={model.kv_heads}")
        if model is not None and model.layers % self.pp:
            raise LayoutError(f"pp={self.pp} must divide layers={model.layers}")
        if self.vpp and (self.pp < 2 or (model is not None and model.layers % (self.pp * self.vpp))):
            raise LayoutError(f"vpp={self.vpp} needs pp >= 2 and pp*vpp to divide layers"
                              + (f"={model.layers}" if model is not None else ""))
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("sequence_parallel needs tp > 1")
        if self.ep > 1 or self.etp is not None:
            is_moe = getattr(model, "is_moe", None)
            if is_moe is False:
                raise LayoutError("ep/etp > 1 needs a mixture-of-experts model")
            if is_moe and model.num_experts % self.ep:
                raise LayoutError(f"ep={self.ep} must divide num_experts={model.num_experts}")
            if world_known and (self.tp * self.cp * self.dp) % (self.ep * self.expert_tp):
                raise LayoutError(f"ep*etp={self.ep * self.expert_tp} must divide tp*cp*dp="
                                  f"{self.tp * self.cp * self.dp}")
        return self

    # ------------------------------------------------------------------ Megatron and checkpoints
    def initialize(self, seed: int = 1234) -> None:
        """Megatron's parallel state for this layout (the process group must exist, of size ``world``)."""
        import torch.distributed as dist

        from megatron_sdar.utils.distributed import initialize_megatron_parallel

        if dist.get_world_size() != self.world:
            raise LayoutError(f"the layout needs {self.world} processes (tp*pp*cp*dp = "
                              f"{self.tp}*{self.pp}*{self.cp}*{self.dp}), the process group has {dist.get_world_size()}")
        initialize_megatron_parallel(tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, vpp=self.vpp, seed=seed)
        from megatron.core import parallel_state as ps

        global _initialized
        _initialized = (self, ps.get_tensor_model_parallel_group())

    def checkpoint_layout(self) -> dict[str, int]:
        """The sizes as a checkpoint's marker records them (``virtual_pipeline`` 1 when not interleaved)."""
        sizes = {"world_size": self.world}
        sizes.update({name: (self.chunks if key == "vpp" else getattr(self, key))
                      for key, name in _CHECKPOINT_NAMES.items()})
        return sizes

    @staticmethod
    def model_parallel_names() -> tuple[str, ...]:
        """The marker's keys that shape per-rank state (everything but DP)."""
        return tuple(name for key, name in _CHECKPOINT_NAMES.items() if key != "dp")


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's place in the layout: its process groups and ranks, read once from Megatron."""

    dims: ParallelDims
    tp_group: Any
    cp_group: Any
    dp_cp_group: Any  # every rank that holds other tokens
    cp_rank: int
    dp_rank: int
    last_stage: bool

    @classmethod
    def current(cls) -> "ProcessGroups":
        from megatron.core import parallel_state as ps

        return cls(dims=ParallelDims.current(), tp_group=ps.get_tensor_model_parallel_group(),
                   cp_group=ps.get_context_parallel_group(),
                   dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
                   cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                   last_stage=ps.is_pipeline_last_stage())

    def reduction(self, group) -> Any:
        """``group`` when it spans more than this rank, else ``None`` (nothing to reduce)."""
        import torch.distributed as dist

        return group if group is not None and dist.get_world_size(group) > 1 else None
