"""Load an HF Qwen safetensors checkpoint into this rank's Megatron model shard.

Each rank opens the safetensors files one at a time and reads, with ``safe_open(...).get_slice``,
only the row/column ranges of the tensors its TP shard and pipeline stage own: a rank never holds
more of the checkpoint than its own parameters (plus the slices of one fused parameter being
assembled). For MoE models a rank reads only its own experts (expert-parallel rank) and, inside
them, its expert-tensor-parallel slice.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.weight_mapping import (
    LocalParam,
    QwenWeightMapping,
    ShardKind,
    SliceRead,
    iter_local_params,
)

# HF tensors that carry no trainable state and are ignored when present (old checkpoints).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """The HF checkpoint does not hold the tensors the config describes."""


INDEX_FILE = "model.safetensors.index.json"


def safetensors_file_names(directory: Path) -> list[str]:
    """The weight files of an HF directory: its index's, else every ``*.safetensors``, sorted."""
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    return sorted(p.name for p in directory.glob("*.safetensors"))


def check_safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors files of an HF directory (its index's, else ``*.safetensors``), each checked
    from its header alone: the 8-byte header length, the JSON header, and the file's size against the
    end of its last tensor (a truncated download or copy). Reads a few KiB per file, so a bad file is
    one line before a model is built. Returns the files; :class:`CheckpointMismatchError` names the
    first bad one."""
    import struct

    directory = Path(directory)
    try:
        names = safetensors_file_names(directory)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatchError(f"{directory / INDEX_FILE} does not parse: {exc}") from None
    if not names:
        raise CheckpointMismatchError(f"{directory} holds no *.safetensors weights")
    files = []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointMismatchError(f"{directory / INDEX_FILE} names {name}, which is missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or 8 + length > size:
                raise CheckpointMismatchError(f"{path} is truncated: {size} bytes, its header alone needs "
                                              f"{'8' if length is None else 8 + length} (download or copy it again)")
            try:
                header = json.loads(f.read(length))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise CheckpointMismatchError(f"{path} has a header that does not parse ({exc})") from None
        if 8 + length + end != size:
            raise CheckpointMismatchError(f"{path} has {size} bytes where its header describes {8 + length + end} "
                                          f"({'truncated' if size < 8 + length + end else 'trailing bytes'}: "
                                          "download or copy it again)")
        files.append(path)
    return files


@dataclass(frozen=True)
class HFCheckpointIndex:
    """Which safetensors file holds each tensor of an HF checkpoint directory, and its shape."""

    directory: Path
    file_of: dict[str, str]  # tensor name -> file name within ``directory``
    shape_of: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, directory: str | Path) -> "HFCheckpointIndex":
        from safetensors import safe_open

        directory = Path(directory)
        index_file = directory / INDEX_FILE
        files = safetensors_file_names(directory)
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {directory}")
        file_of: dict[str, str] = {}
        shape_of: dict[str, tuple[int, ...]] = {}
        for file_name in files:
            path = directory / file_name
            if not path.is_file():
                raise FileNotFoundError(f"{index_file} names {file_name}, which is missing")
            with safe_open(str(path), framework="pt") as f:  # reads the header only
                for name in f.keys():
                    file_of[name] = file_name
                    shape_of[name] = tuple(f.get_slice(name).get_shape())
        return cls(directory, file_of, shape_of)

    def check_against(self, mapping: QwenWeightMapping) -> None:
        """Raise :class:`CheckpointMismatchError` unless names and shapes match ``mapping``."""
        expected = mapping.hf_tensor_shapes()
        present = {n for n in self.file_of if not n.endswith(_IGNORED_SUFFIXES)}
        if mapping.arch.tie_word_embeddings:
            present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        wrong = sorted(n for n in set(expected) & present if self.shape_of[n] != expected[n])
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
            if wrong:
                parts.append("wrong shapes: " + ", ".join(
                    f"{n} {self.shape_of[n]} != {expected[n]}" for n in wrong[:3]))
            raise CheckpointMismatchError(
                f"{self.directory} does not match its config.json: " + "; ".join(parts))


@dataclass(frozen=True)
class LoadReport:
    """What this rank read: number of parameters filled and bytes read from disk."""

    params_loaded: int
    bytes_read: int
    files_opened: int


def load_hf_weights(model_chunks, arch: QwenArchitecture, hf_dir: str | Path, *,
                    progress: bool = False) -> LoadReport:
    """Fill this rank's parameters from the HF checkpoint in ``hf_dir`` (in place).

    Works for any TP/PP/EP layout (reads Megatron's parallel state) and either layer spec. Raises
    :class:`CheckpointMismatchError` when the files do not match ``arch``.
    """
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    mapping = QwenWeightMapping(arch)
    index = HFCheckpointIndex.open(hf_dir)
    index.check_against(mapping)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if arch.moe is not None:
        etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()

    params = iter_local_params(model_chunks, mapping)
    plans: list[tuple[LocalParam, list[SliceRead]]] = []
    reads_by_file: dict[str, list[SliceRead]] = defaultdict(list)
    for lp in params:
        padded = lp.tensor.shape[0] * tp if lp.rule.kind is ShardKind.VOCAB else None
        if lp.rule.expert:
            plan = mapping.read_plan(lp.rule, lp.layer, etp_rank, etp, expert=lp.expert)
        else:
            plan = mapping.read_plan(lp.rule, lp.layer, tp_rank, tp, padded)
        plans.append((lp, plan))
        for read in plan:
            reads_by_file[index.file_of[read.hf_name]].append(read)

    pieces: dict[SliceRead, torch.Tensor] = {}
    remaining = list(plans)
    bytes_read = 0
    files = sorted(reads_by_file)
    iterator = files
    if progress:
        from megatron_sdar.utils.logging import progress as progress_bar

        iterator = progress_bar(files, desc="loading HF shards", unit="file", disable=False)
    for file_name in iterator:
        with safe_open(str(index.directory / file_name), framework="pt", device="cpu") as f:
            for read in reads_by_file[file_name]:
                if read in pieces:  # the same slice feeds two parameters (tied embedding)
                    continue
                sl = f.get_slice(read.hf_name)
                piece = sl[read.start:read.stop] if read.dim == 0 else sl[:, read.start:read.stop]
                pieces[read] = piece
                bytes_read += piece.numel() * piece.element_size()
        # assemble every parameter whose slices are all in memory now, then drop the slices
        still_waiting = []
        for lp, plan in remaining:
            if all(r in pieces for r in plan):
                with torch.no_grad():
                    lp.tensor.data.copy_(mapping.assemble(lp.rule, [pieces[r] for r in plan], lp.tensor.shape))
            else:
                still_waiting.append((lp, plan))
        remaining = still_waiting
        needed = {r for _, plan in remaining for r in plan}
        for read in [r for r in pieces if r not in needed]:
            del pieces[read]
    if remaining:  # cannot happen after check_against; guards against mapping bugs
        raise CheckpointMismatchError(f"parameters left unloaded: {[lp.name for lp, _ in remaining][:5]}")
    return LoadReport(params_loaded=len(plans), bytes_read=bytes_read, files_opened=len(files))
