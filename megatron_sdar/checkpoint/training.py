"""Training checkpoints: model, optimizer, per-rank RNG states and the trainer's own state.

    path = save_checkpoint(root, step, policy, trainer_state, hf_assets_source=model_dir)  # collective
    latest = find_latest_checkpoint(root)     # checkpoint.resume: any process, no collectives
    trainer_state = load_checkpoint(latest, policy)               # collective, verifies checksums
    path, trainer_state = load_latest_checkpoint(root, policy)    # collective, skips bad ones

Layout of ``root`` (one training run per root)::

    root/step_00000120/            a complete checkpoint
        metadata.json, *.distcp    Megatron distributed checkpoint of {"model", "optimizer"}
        megatron_sdar_model.json   the HF config and layout, as :mod:`megatron_sdar.checkpoint.model`
                                   writes it (so tools/convert_checkpoint.py exports a training checkpoint)
        rng/rank_00000.pt ...      each rank's RNG states
        trainer_state.json         the trainer's dict (rank 0's copy)
                                   (``extra_models``: frozen weights kept beside the policy, such as an
                                   EMA teacher's, in the same distributed checkpoint under their name)
        hf_assets/                 tokenizer, chat template, generation config of the run's model
        complete.json              written last: layout, optimizer kind, size and xxh3-64 checksum
                                   of every file above (each rank hashes the files it wrote)
    root/.tmp-step_00000140/       a save in progress (or one that died): ignored, removed later

Why a marker and a rename: a job killed mid-save (Slurm preemption, node failure) must never leave
something that looks like the newest checkpoint. Everything is written into a ``.tmp-`` directory;
only after every rank has finished (barrier) does rank 0 write ``complete.json`` and rename the
directory into place. ``complete.json`` records each file's size and checksum: a truncated copy is
seen by :func:`~megatron_sdar.checkpoint.resume.find_latest_checkpoint` without reading the tensors (size), a same-size corruption by
:func:`load_checkpoint` (checksum, unless ``verify=False``), which also refuses non-finite weights;
:func:`load_latest_checkpoint` then falls back to the previous checkpoint.

What may change between save and load (checked, with a clear error where not supported):

* model weights: any TP/PP/VPP/DP layout (Megatron's distributed checkpoint reshards them);
* optimizer state (Adam moments, step, fp32 master weights) of the regular optimizer: any layout
  too, since each state tensor is stored with its parameter's own sharding;
* optimizer state of the distributed optimizer (``use_distributed_optimizer=True``) depends on
  ``optimizer_sharding`` at save time: ``"fully_reshardable"`` (our default, the main job's
  ``trainer.optimizer_sharding``) loads at any layout but gathers each TPxPP shard's whole optimizer
  state over DP while saving (memory: the non-distributed optimizer's size, per DP group);
  ``"dp_reshardable"`` (Megatron-LM's default: each rank writes its own flat buffer slices, no
  communication) loads at another DP size but the same TP/PP/VPP/CP/EP. Megatron's third format,
  ``fully_sharded_model_space``, cannot save in megatron-core 0.19
  ("ShardedTensor.flattened_range is not supported");
* RNG states are per rank: restored only when world size and TP/PP/VPP/CP/EP are unchanged,
  otherwise a warning says they were not (random draws then differ from an uninterrupted run);
* not supported (refused at load, naming the setting to use): another architecture, switching
  between the distributed and the regular optimizer, or between bf16 and fp32 parameters.

Tested on CPU: tests/test_trainer_checkpointing.py (exact resume at 1 rank, TP=2 and DP=2; TP=2 ->
TP=1 with the regular optimizer and with the distributed one; DP=2 -> DP=1 with ``dp_reshardable``)
and tests/test_checkpoint_reshard.py (the distributed optimizer, ``fully_reshardable``, through the
main job's SDAR step: DP=2 -> TP=2, TP=2 -> PP=2, PP=2 -> PP=2xVPP=2, each within 1e-5 of the
uninterrupted run). CP and EP changes go through the same Megatron machinery but are not exercised.

Models whose parameters mix dtypes (bf16 with the local layer spec, whose norms stay fp32) cannot be
checkpointed with megatron-core 0.19's optimizer state code; both functions say so up front.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdar import patches
from megatron_sdar.checkpoint.integrity import MARKER_FILE, collect_manifest, fsync_dir, write_marker
from megatron_sdar.checkpoint.model import (HF_ASSETS_DIR, METADATA_FILE as MODEL_METADATA_FILE, TRAIN_FORMAT_NAME,
                                            TRAIN_FORMAT_VERSION, CheckpointFormatError, copy_hf_assets, model_metadata,
                                            load_sharded_model_state, nonfinite_parameters, shape_fields,
                                            sharded_model_state, verify_checkpoint)
from megatron_sdar.checkpoint.resume import (TMP_PREFIX, TRAINER_STATE_FILE, checkpoint_dir_name, complete_checkpoints,
                                             is_complete_checkpoint, read_complete_checkpoint, step_dirs, warn)
from megatron_sdar.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_sdar.utils.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

RNG_DIR = "rng"
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
# What must match between save and load for per-rank state (RNG, dp_reshardable optimizer slices).
_MODEL_PARALLEL_KEYS = ParallelDims.model_parallel_names()


class IncompatibleCheckpointError(CheckpointFormatError):
    """A complete checkpoint that cannot be loaded into this policy or parallel layout."""


class CorruptCheckpointError(CheckpointFormatError):
    """A complete checkpoint whose files fail their checksums, or whose weights are not finite."""


# ------------------------------------------------------------------------------------------------
# layout and RNG
# ------------------------------------------------------------------------------------------------
def _parallel_layout() -> dict[str, int]:
    return ParallelDims.current().checkpoint_layout()


def _optimizer_kind(policy) -> dict[str, Any]:
    """What decides the layout of the optimizer's state in the checkpoint."""
    return {"distributed": bool(policy.optim_config.use_distributed_optimizer),
            "params_dtype": str(policy.config.params_dtype).replace("torch.", "")}


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank_{rank:05d}.pt"


# ------------------------------------------------------------------------------------------------
# sharded state (model + optimizer)
# ------------------------------------------------------------------------------------------------
def _content_metadata(policy, optimizer_sharding: str) -> dict[str, Any]:
    """The flags that steer how Megatron builds the sharded state dicts (set as Megatron-LM does)."""
    md: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if policy.optim_config.use_distributed_optimizer:
        md["distrib_optim_sharding_type"] = optimizer_sharding
    return md


def _sharded_train_state(policy, optimizer_sharding: str, is_loading: bool, extra_models: dict | None = None) -> dict:
    """``{"model": ..., "optimizer": ...}`` (``model0``, ``model1``... for virtual pipeline chunks), plus
    each of ``extra_models`` (name -> frozen model chunks) under its name."""
    from megatron.core import parallel_state as ps

    state = sharded_model_state(policy.model)  # the same model keys as a model-only checkpoint
    for name, chunks in (extra_models or {}).items():
        state.update(sharded_model_state(chunks, name))
    if is_loading:
        patches.materialize_distributed_optimizer_state(policy.optimizer)
    metadata = dict(_content_metadata(policy, optimizer_sharding),
                    dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
    state["optimizer"] = policy.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


# ------------------------------------------------------------------------------------------------
# file helpers (rank 0)
# ------------------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------
def save_checkpoint(root: str | Path, step: int, policy, trainer_state: dict, keep_last: int | None = 2, *,
                    optimizer_sharding: str = "fully_reshardable", hf_assets_source: str | Path | None = None,
                    extra_models: dict[str, list] | None = None) -> Path:
    """Collective: save ``policy`` (model + optimizer), every rank's RNG states and ``trainer_state``
    as ``root/step_{step:08d}``; return that path on every rank.

    ``trainer_state`` must be JSON-serialisable without NaN/inf; rank 0's copy is written (every rank
    checks its own before any collective, so a bad one fails everywhere instead of hanging). The
    save is atomic (module docstring); a checkpoint of the same step is replaced. Afterwards all but
    the newest ``keep_last`` complete checkpoints (this one included) of earlier steps are deleted
    (``None`` keeps all), as are leftover ``.tmp-`` directories. Checkpoints of *later* steps (left
    by a run resumed from an older one) are kept but reported: ``find_latest_checkpoint`` would
    prefer them. ``optimizer_sharding`` only matters for the distributed optimizer (module
    docstring). ``hf_assets_source``: the HF directory whose tokenizer, chat template and
    generation config are copied into the checkpoint (so it exports to a complete HF directory).
    ``extra_models``: frozen model chunks saved beside the policy under their name (the EMA teacher's:
    ``{"teacher_ema": chunks}``), resharded at load like the policy's.
    """
    from megatron.core import dist_checkpointing

    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), got {keep_last}")
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, got {optimizer_sharding!r}")
    try:
        trainer_json = json.dumps(trainer_state, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer_state must be JSON-serialisable without NaN/inf: {exc}") from exc

    patches.check_uniform_param_dtype(policy)
    root = Path(root)
    final = root / checkpoint_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    _on_rank0(_prepare_empty_dir, root, tmp)

    dist_checkpointing.save(_sharded_train_state(policy, optimizer_sharding, False, extra_models), str(tmp),
                            content_metadata=_content_metadata(policy, optimizer_sharding))
    rng_file = _rng_file(tmp, dist.get_rank())
    rng_file.parent.mkdir(exist_ok=True)  # only now: Megatron warns when saving into a non-empty dir
    torch.save(capture_rng_state(), rng_file)
    layout = _parallel_layout()
    marker = {"format": TRAIN_FORMAT_NAME, "version": TRAIN_FORMAT_VERSION, "step": step,
              "policy_steps_taken": policy.steps_taken, "layout": layout,
              "optimizer": dict(_optimizer_kind(policy), sharding=optimizer_sharding),
              "extra_models": sorted(extra_models or {})}
    model_meta = model_metadata(policy.arch, {k: layout[k] for k in ("tensor_parallel", "pipeline_parallel")})
    _on_rank0(_write_metadata, tmp, trainer_json, model_meta, hf_assets_source)
    dist.barrier()  # every rank's shards and RNG file are on disk
    manifest = collect_manifest(tmp, exclude=[MARKER_FILE])  # each rank hashes the files it wrote
    _on_rank0(_publish, tmp, final, marker, manifest, keep_last)
    return final


def _on_rank0(fn, *args) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank, or make every rank raise.

    Why: rank 0 does the file-system bookkeeping alone; an error there must not leave the other
    ranks waiting forever in the next collective. Rank 0 re-raises the original exception, the
    others an equivalent one (same type where it travels, else :class:`RuntimeError`).
    """
    outcome: list[Any] = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn(*args))]
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
            shareable = isinstance(exc, (OSError, ValueError, TypeError, NotImplementedError))
            outcome = [("error", exc if shareable else RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}"))]
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise error if error is not None else value
    return value


def _prepare_empty_dir(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _remove(tmp)  # a save of this step that died earlier
    tmp.mkdir()


def _write_metadata(tmp: Path, trainer_json: str, model_meta: dict, hf_assets_source: str | Path | None) -> None:
    """Rank 0: the JSON files and the HF assets (tokenizer, chat template)."""
    (tmp / TRAINER_STATE_FILE).write_text(trainer_json)
    (tmp / MODEL_METADATA_FILE).write_text(json.dumps(model_meta, indent=2, sort_keys=True) + "\n")
    if hf_assets_source is not None:
        copy_hf_assets(hf_assets_source, tmp / HF_ASSETS_DIR)


def _publish(tmp: Path, final: Path, marker: dict, manifest: dict, keep_last: int | None) -> None:
    """Rank 0, once every rank has written and hashed its part: the marker (last, with every
    file's size and checksum), the rename into place, then pruning."""
    write_marker(tmp, marker, manifest)
    root = final.parent
    displaced = root / f"{TMP_PREFIX}replaced-{final.name}"
    if final.exists():  # rename(2) cannot replace a non-empty directory: move it aside first
        _remove(displaced)
        os.rename(final, displaced)
    os.rename(tmp, final)
    fsync_dir(root)
    _prune(root, marker["step"], keep_last)
    logger.info("saved checkpoint %s", final)


def _prune(root: Path, step: int, keep_last: int | None) -> None:
    """Rank 0, after a save: remove ``.tmp-`` leftovers (one run per root, so no other save is in
    flight) and complete checkpoints of earlier steps beyond ``keep_last``."""
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        _remove(leftover)
    complete = [(s, p) for s, p in step_dirs(root) if (p / MARKER_FILE).is_file()]
    later = [p.name for s, p in complete if s > step and is_complete_checkpoint(p)]
    if later:
        logger.warning("%s holds complete checkpoints of later steps than %d (%s): trainer.resume=auto "
                       "would pick the newest of them, not the one just saved", root, step, ", ".join(later))
    if keep_last is None:
        return
    earlier = [p for s, p in complete if s < step]
    for old in earlier[: max(0, len(earlier) - (keep_last - 1))]:
        _remove(old)
        logger.info("deleted old checkpoint %s (keep_last=%d)", old, keep_last)


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _check_compatible(path: Path, marker: dict, policy) -> bool:
    """Raise :class:`IncompatibleCheckpointError` for what cannot be resharded; return whether the
    per-rank RNG states apply (same world size and model-parallel layout)."""
    from megatron_sdar.models.architecture import QwenArchitecture

    try:
        hf_config = json.loads((path / MODEL_METADATA_FILE).read_text())["hf_config"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointFormatError(f"{path / MODEL_METADATA_FILE} is unreadable ({exc})") from exc
    saved_shape, ours = shape_fields(QwenArchitecture.from_hf_config(hf_config)), shape_fields(policy.arch)
    if saved_shape != ours:
        diffs = {k: (v, ours[k]) for k, v in saved_shape.items() if ours[k] != v}
        raise IncompatibleCheckpointError(f"{path} holds a different model (checkpoint vs policy: {diffs})")
    saved, now = marker["layout"], _parallel_layout()
    saved_opt, our_opt = marker["optimizer"], _optimizer_kind(policy)
    if {k: saved_opt[k] for k in our_opt} != our_opt:
        raise IncompatibleCheckpointError(
            f"{path} holds the state of another optimizer (checkpoint {saved_opt}, policy {our_opt}): "
            "resume with the saved parallel.distributed_optimizer and model.dtype "
            f"(distributed_optimizer={str(saved_opt['distributed']).lower()}, dtype={saved_opt['params_dtype']})")
    same_model_parallel = all(saved[k] == now[k] for k in _MODEL_PARALLEL_KEYS)
    if our_opt["distributed"] and saved_opt["sharding"] == "dp_reshardable" and not same_model_parallel:
        raise IncompatibleCheckpointError(
            f"{path} holds distributed-optimizer state saved with optimizer_sharding='dp_reshardable', "
            "which reshards across data-parallel ranks only: saved with "
            f"{ {k: saved[k] for k in _MODEL_PARALLEL_KEYS} }, this run has "
            f"{ {k: now[k] for k in _MODEL_PARALLEL_KEYS} }. Resume with the saved parallel.tp/pp/cp/ep, or "
            "resume at the saved layout once and save again with trainer.optimizer_sharding=fully_reshardable "
            "(the default)")
    return same_model_parallel and saved["world_size"] == now["world_size"]


def _validate_for_load(path: Path, policy) -> tuple[dict, dict, bool]:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    marker, trainer_state = read_complete_checkpoint(path)
    return marker, trainer_state, _check_compatible(path, marker, policy)


def load_checkpoint(path: str | Path, policy, *, load_rng: bool = True, verify: bool = True,
                    extra_models: dict[str, list] | None = None) -> dict:
    """Collective: restore the model weights, the optimizer (Adam moments, step counts, fp32 master
    weights), this rank's RNG states and ``policy.steps_taken`` from a checkpoint written by
    :func:`save_checkpoint`; return its ``trainer_state``.

    ``verify``: check every file against its checksum first (the ranks share the reading), and the
    loaded weights for NaN/inf after; either failure raises :class:`CorruptCheckpointError`
    (the policy's weights are then undefined: load another checkpoint into it).

    Model and optimizer state load at another TP/PP/DP layout as the module docstring says. RNG
    states are restored only when the world size and model-parallel layout are those of the save
    (and ``load_rng``): with another layout rank ``r``'s saved stream has no counterpart, so the
    current states are kept and a warning says so. ``extra_models``: the frozen model chunks saved
    beside the policy by :func:`save_checkpoint` to load too (:class:`IncompatibleCheckpointError`
    when the checkpoint lacks one).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    patches.check_uniform_param_dtype(policy)
    # Rank 0 validates (stats every file once, not once per rank); every rank gets the verdict.
    marker, trainer_state, same_layout = _on_rank0(_validate_for_load, path, policy)
    if verify:
        try:
            verify_checkpoint(path)
        except CheckpointFormatError as exc:
            raise CorruptCheckpointError(str(exc)) from None

    if missing := sorted(set(extra_models or {}) - set(marker.get("extra_models", []))):
        raise IncompatibleCheckpointError(f"{path} holds no {', '.join(missing)} weights (saved by a run without "
                                          "them, e.g. another algo.teacher): resume with the run's own settings")
    sharded = _sharded_train_state(policy, marker["optimizer"].get("sharding", "dp_reshardable"), True, extra_models)
    state = dist_checkpointing.load(sharded, str(path))
    load_sharded_model_state(policy.model, state)
    for name, chunks in (extra_models or {}).items():
        load_sharded_model_state(chunks, state, name)
    try:
        patches.load_optimizer_state(policy.optimizer, state["optimizer"])
    except patches.OptimizerLayoutError as exc:
        raise IncompatibleCheckpointError(f"{path}: {exc}") from None
    policy.steps_taken = int(marker["policy_steps_taken"])
    if verify and (bad := nonfinite_parameters(policy.model)):
        raise CorruptCheckpointError(f"{path} holds non-finite weights (NaN/inf in {len(bad)} parameter(s), "
                                     f"e.g. {bad[0]})")

    if load_rng and same_layout:
        restore_rng_state(torch.load(_rng_file(path, dist.get_rank()), weights_only=True))
    elif load_rng and dist.get_rank() == 0:
        message = (f"RNG states of {path} not restored: saved with layout {marker['layout']}, resumed with "
                   f"{_parallel_layout()}; random draws will differ from an uninterrupted run")
        warnings.warn(message, stacklevel=2)  # not also a logger record: one line, not two
    dist.barrier()
    return trainer_state


def load_latest_checkpoint(root: str | Path, policy, *, verify: bool = True,
                           extra_models: dict[str, list] | None = None) -> tuple[Path, dict] | None:
    """Collective: load the newest checkpoint under ``root`` that is complete and intact;
    ``(path, trainer_state)``, or ``None`` when there is none. A checkpoint that fails its checks
    (incomplete, corrupt, non-finite weights) is skipped with a warning that says why, and the
    previous one is tried."""
    candidates = _on_rank0(complete_checkpoints, Path(root))
    for path in candidates:
        try:
            return path, load_checkpoint(path, policy, verify=verify, extra_models=extra_models)
        except CorruptCheckpointError as exc:
            if dist.get_rank() == 0:
                warn(f"skipping checkpoint {path}: {exc}")
    return None
