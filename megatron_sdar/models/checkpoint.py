"""Megatron distributed checkpoints of Qwen models, with what is needed to go back to HF.

A checkpoint directory written by :func:`save_model_checkpoint` holds

* Megatron's distributed checkpoint (``metadata.json``, ``common.pt``, ``*.distcp``) of
  ``{"model": model.sharded_state_dict()}`` (``model0``, ``model1``, ... for virtual pipeline
  chunks, as Megatron-LM does): loadable at any TP/PP layout;
* ``megatron_sdar_model.json``: the HF ``config.json`` the model was built from and the layout it
  was saved at;
* ``hf_assets/``: the tokenizer files and generation config of the source HF directory, so the
  checkpoint converts back to a complete HF directory on its own.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.hf_writer import GENERATION_CONFIG, TOKENIZER_FILES

METADATA_FILE = "megatron_sdar_model.json"
HF_ASSETS_DIR = "hf_assets"
FORMAT_NAME = "megatron-sdar/qwen-dist-checkpoint"
FORMAT_VERSION = 1
_DIST_CKPT_MARKER = "metadata.json"  # written by megatron.core.dist_checkpointing


class CheckpointFormatError(ValueError):
    """A directory is not (or not a complete) checkpoint of the expected kind."""


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


def _sharded_state_dict(model_chunks) -> dict:
    from megatron_sdar.models.weight_mapping import unwrap_model

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    chunks = [unwrap_model(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_checkpoint(model_chunks, arch: QwenArchitecture, out_dir: str | Path,
                          hf_assets_source: str | Path | None = None) -> Path:
    """Collective: every rank calls it. Writes the checkpoint described in the module docstring."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model_chunks), str(out_dir))
    if dist.get_rank() == 0:
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hf_config": dict(arch.hf_config),
            "saved_with": {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
                           "pipeline_parallel": ps.get_pipeline_model_parallel_world_size()},
        }
        (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if hf_assets_source is not None:
            assets = out_dir / HF_ASSETS_DIR
            assets.mkdir(exist_ok=True)
            for name in (*TOKENIZER_FILES, GENERATION_CONFIG, "config.json"):
                if (Path(hf_assets_source) / name).is_file():
                    shutil.copyfile(Path(hf_assets_source) / name, assets / name)
    dist.barrier()
    return out_dir


def load_model_checkpoint(model_chunks, ckpt_dir: str | Path) -> None:
    """Collective: load the weights of a distributed checkpoint into this rank's model (any layout)."""
    from megatron.core import dist_checkpointing

    from megatron_sdar.models.weight_mapping import unwrap_model

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(ckpt_dir))
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        unwrap_model(chunk).load_state_dict(state[key], strict=True)


@dataclass(frozen=True)
class CheckpointModelInfo:
    """The architecture a checkpoint holds and where its HF assets (tokenizer, ...) live."""

    arch: QwenArchitecture
    assets_dir: Path | None  # directory with tokenizer / generation config files, if any
    saved_with: dict


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
        if stored is not None and _shape_fields(stored) != _shape_fields(given):
            diffs = {k: (v, _shape_fields(given)[k]) for k, v in _shape_fields(stored).items()
                     if _shape_fields(given)[k] != v}
            raise CheckpointFormatError(
                f"--hf-config {hf_config_dir} describes a different model than {ckpt_dir} "
                f"(checkpoint vs given: {diffs})")
        return CheckpointModelInfo(given, Path(hf_config_dir), meta["saved_with"] if meta else {})
    if stored is None:
        raise CheckpointFormatError(
            f"{ckpt_dir} has no {METADATA_FILE} (not written by megatron-sdar): pass --hf-config DIR "
            "with the HF config.json and tokenizer of the model")
    assets = ckpt_dir / HF_ASSETS_DIR
    return CheckpointModelInfo(stored, assets if assets.is_dir() else None, meta["saved_with"])


def _shape_fields(arch: QwenArchitecture) -> dict:
    """The fields that decide the checkpoint's tensors (names and shapes)."""
    return {k: getattr(arch, k) for k in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm")}
