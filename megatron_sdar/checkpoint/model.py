"""Model checkpoints (Megatron distributed checkpoints of Qwen models, with what is needed to go
back to HF), and what training checkpoints share with them: formats, metadata, HF assets,
verification.

A checkpoint directory written by :func:`save_model_checkpoint` holds

* Megatron's distributed checkpoint (``metadata.json``, ``common.pt``, ``*.distcp``) of
  ``{"model": model.sharded_state_dict()}`` (``model0``, ``model1``, ... for virtual pipeline
  chunks, as Megatron-LM does): loadable at any TP/PP layout;
* ``megatron_sdar_model.json``: the HF ``config.json`` the model was built from and the layout it
  was saved at;
* ``hf_assets/``: the tokenizer files, chat template and generation config of the source HF
  directory, so the checkpoint converts back to a complete HF directory on its own;
* ``complete.json``, written last: the checksum manifest of every other file
  (:mod:`megatron_sdar.checkpoint.integrity`), verified before a conversion.

Training checkpoints (:mod:`megatron_sdar.checkpoint.training`) hold the same model keys,
metadata file and assets, so everything here reads them too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_sdar.checkpoint.integrity import MARKER_FILE, MarkerError, collect_manifest, read_marker, write_marker
from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.hf_writer import GENERATION_CONFIG, TOKENIZER_FILES

METADATA_FILE = "megatron_sdar_model.json"
HF_ASSETS_DIR = "hf_assets"
EMA_TEACHER_WEIGHTS = "teacher_ema"  # a training checkpoint's extra model: algo.teacher=ema's averaged weights
FORMAT_NAME = "megatron-sdar/qwen-dist-checkpoint"
FORMAT_VERSION = 1
# The completion markers of the two checkpoint kinds (model only; model + optimizer + trainer state).
MODEL_MARKER_VERSION = 1
TRAIN_FORMAT_NAME = "megatron-sdar/train-checkpoint"
TRAIN_FORMAT_VERSION = 2  # 2: the manifest holds checksums
MARKER_FORMATS = {FORMAT_NAME: MODEL_MARKER_VERSION, TRAIN_FORMAT_NAME: TRAIN_FORMAT_VERSION}
_DIST_CKPT_MARKER = "metadata.json"  # written by megatron.core.dist_checkpointing


class CheckpointFormatError(MarkerError):
    """A directory is not (or not a complete, intact) checkpoint of the expected kind."""


# Files that make a tokenizer loadable (one of them is enough); the chat template travels with them.
_TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def copy_hf_assets(source: str | Path, assets_dir: str | Path) -> list[str]:
    """Copy the tokenizer files, chat template, generation config and ``config.json`` of the HF
    directory ``source`` into ``assets_dir``; returns the names copied."""
    source, assets_dir = Path(source), Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG, "config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, assets_dir / name)
            copied.append(name)
    return copied


def has_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and any((Path(directory) / n).is_file() for n in _TOKENIZER_VOCAB_FILES)


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / _DIST_CKPT_MARKER).is_file()


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` itself, or the iteration it points at (Megatron-LM's ``latest_checkpointed_iteration.txt``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"checkpoint directory {path} does not exist")
    tracker = path / "latest_checkpointed_iteration.txt"
    if not is_distributed_checkpoint(path) and tracker.is_file():
        iteration = tracker.read_text().strip()
        path = path / (f"iter_{int(iteration):07d}" if iteration.isdigit() else iteration)
    if not is_distributed_checkpoint(path):
        raise CheckpointFormatError(
            f"{path} is not a Megatron distributed checkpoint (no {_DIST_CKPT_MARKER})")
    return path


def sharded_model_state(model_chunks, name: str = "model") -> dict:
    """``{"model": ...}`` (``model0``, ``model1``... for virtual pipeline chunks) of Megatron's sharded
    state. Another ``name`` (a second set of weights in the same checkpoint, such as an EMA teacher's)
    prefixes its tensors' checkpoint keys with ``<name>.``."""
    from megatron_sdar.models.weight_mapping import unwrap_model

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    chunks = [unwrap_model(c) for c in chunks]
    prefix = "" if name == "model" else f"{name}."
    if len(chunks) == 1:
        return {name: chunks[0].sharded_state_dict(prefix=prefix)}
    return {f"{name}{i}": c.sharded_state_dict(prefix=prefix) for i, c in enumerate(chunks)}


def load_sharded_model_state(model_chunks, state: dict, name: str = "model") -> None:
    """Load what :func:`sharded_model_state` described (read back by ``dist_checkpointing.load``)
    into ``model_chunks``."""
    from megatron_sdar.models.weight_mapping import unwrap_model

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    keys = [name] if len(chunks) == 1 else [f"{name}{i}" for i in range(len(chunks))]
    prefix = "" if name == "model" else f"{name}."
    for chunk, key in zip(chunks, keys, strict=True):
        values = {k.removeprefix(prefix): v for k, v in state[key].items()}
        unwrap_model(chunk).load_state_dict(values, strict=True)


def save_model_checkpoint(model_chunks, arch: QwenArchitecture, out_dir: str | Path,
                          hf_assets_source: str | Path | None = None) -> Path:
    """Collective: every rank calls it. Writes the checkpoint described in the module docstring."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER_FILE).unlink(missing_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_model_state(model_chunks), str(out_dir))
    if dist.get_rank() == 0:
        (out_dir / METADATA_FILE).write_text(json.dumps(model_metadata(arch, _saved_with(ps)), indent=2,
                                                        sort_keys=True) + "\n")
        if hf_assets_source is not None:
            copy_hf_assets(hf_assets_source, out_dir / HF_ASSETS_DIR)
    dist.barrier()
    manifest = collect_manifest(out_dir, exclude=[MARKER_FILE])
    if dist.get_rank() == 0:
        write_marker(out_dir, {"format": FORMAT_NAME, "version": MODEL_MARKER_VERSION}, manifest)
    dist.barrier()
    return out_dir


def _saved_with(ps) -> dict:
    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size()}


def model_metadata(arch: QwenArchitecture, saved_with: dict) -> dict:
    """The content of ``megatron_sdar_model.json`` (model and training checkpoints alike)."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "hf_config": dict(arch.hf_config),
            "saved_with": saved_with}


def load_model_checkpoint(model_chunks, ckpt_dir: str | Path) -> None:
    """Collective: load the weights of a distributed checkpoint into this rank's model (any layout)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    state = dist_checkpointing.load(sharded_model_state(model_chunks), str(ckpt_dir))
    load_sharded_model_state(model_chunks, state)


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Collective: check the completion marker and every file's checksum; raise
    :class:`CheckpointFormatError` naming the first problem. Only for checkpoints written by
    megatron-sdar (a marker is required)."""
    from megatron_sdar.checkpoint.integrity import verify_manifest

    ckpt_dir = Path(ckpt_dir)
    try:
        marker = read_marker(ckpt_dir, MARKER_FORMATS)
    except MarkerError as exc:
        raise CheckpointFormatError(str(exc)) from None
    problems = verify_manifest(ckpt_dir, marker["files"])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointFormatError(f"{ckpt_dir} is corrupt: {problems[0]}{more}")


def nonfinite_parameters(model_chunks) -> list[str]:
    """Collective over all ranks: names of parameters holding NaN or inf anywhere (any rank's shard)."""
    import torch

    from megatron_sdar.models.weight_mapping import unwrap_model

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    bad = sorted({name for chunk in chunks for name, p in unwrap_model(chunk).named_parameters()
                  if not bool(torch.isfinite(p.detach()).all())})
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, bad)
        bad = sorted({name for part in parts for name in part})
    return bad


@dataclass(frozen=True)
class CheckpointModelInfo:
    """The architecture a checkpoint holds and where its HF assets (tokenizer, ...) live."""

    arch: QwenArchitecture
    assets_dir: Path | None  # directory with tokenizer / generation config files, if any
    saved_with: dict
    written_by_us: bool  # has megatron-sdar's metadata (then a completion marker is required)


def read_checkpoint_model_info(ckpt_dir: str | Path, hf_config_dir: str | Path | None = None
                               ) -> CheckpointModelInfo:
    """Architecture from the checkpoint's metadata, or from ``hf_config_dir`` (which then also
    supplies the tokenizer files). When both exist they must describe the same model."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    meta_path = ckpt_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and meta.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    stored = QwenArchitecture.from_hf_config(meta["hf_config"]) if meta else None
    if hf_config_dir is not None:
        given = QwenArchitecture.from_hf_config(hf_config_dir)
        if stored is not None and shape_fields(stored) != shape_fields(given):
            diffs = {k: (v, shape_fields(given)[k]) for k, v in shape_fields(stored).items()
                     if shape_fields(given)[k] != v}
            raise CheckpointFormatError(
                f"--hf-config {hf_config_dir} describes a different model than {ckpt_dir} "
                f"(checkpoint vs given: {diffs})")
        return CheckpointModelInfo(given, Path(hf_config_dir), meta["saved_with"] if meta else {}, meta is not None)
    if stored is None:
        raise CheckpointFormatError(
            f"{ckpt_dir} has no {METADATA_FILE} (not written by megatron-sdar): pass --hf-config DIR "
            "with the HF config.json and tokenizer of the model")
    assets = ckpt_dir / HF_ASSETS_DIR
    return CheckpointModelInfo(stored, assets if assets.is_dir() else None, meta["saved_with"], True)


def shape_fields(arch: QwenArchitecture) -> dict:
    """The fields that decide the checkpoint's tensors (names and shapes)."""
    return {k: getattr(arch, k) for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm")}
