"""Write an HF checkpoint directory from a stream of ``(hf_name, tensor)`` pairs in bounded memory.

Since every tensor's name, shape and dtype is known before the first byte arrives (they follow
from ``config.json``), the safetensors shards are laid out up front: each file gets its final
header and size immediately, and each tensor's bytes go straight to their offset when the tensor
arrives. Nothing is buffered, in whatever order the tensors come.

Format written (the public safetensors layout): 8-byte little-endian header length N, N bytes of
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes back to back.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Tokenizer and generation files copied next to the weights (whichever exist in the source).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class _Slot:
    file_index: int
    offset: int  # absolute byte offset of the tensor's data in its file
    nbytes: int
    shape: tuple[int, ...]


class StreamingSafetensorsWriter:
    """Shards laid out from ``shapes`` (name -> shape, in file order) with one ``dtype``.

    ``write(name, tensor)`` puts a tensor's bytes in place (casting to ``dtype``); ``close()``
    checks that every planned tensor arrived and writes the index for multi-file checkpoints.
    """

    def __init__(self, out_dir: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot write dtype {dtype} to safetensors here")
        self.out_dir = Path(out_dir)
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        # group tensors into shards of at most max_shard_bytes (a bigger tensor gets its own)
        groups: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        group_bytes = 0
        for name, shape in shapes.items():
            nbytes = itemsize * _numel(shape)
            if groups[-1] and group_bytes + nbytes > max_shard_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, tuple(shape), nbytes))
            group_bytes += nbytes
        n = len(groups)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._slots: dict[str, _Slot] = {}
        self._handles = []
        self.total_bytes = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for file_index, group in enumerate(groups):
            header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
            cursor = 0
            for name, shape, nbytes in group:
                header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                                "data_offsets": [cursor, cursor + nbytes]}
                cursor += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            handle = open(self.out_dir / self.file_names[file_index], "wb+")
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(data_start + cursor)
            self._handles.append(handle)
            for name, shape, nbytes in group:
                begin = header[name]["data_offsets"][0]
                self._slots[name] = _Slot(file_index, data_start + begin, nbytes, shape)
            self.total_bytes += cursor
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not part of this checkpoint's layout")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: got shape {tuple(tensor.shape)}, planned {slot.shape}")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()  # shares memory with ``data``
        handle = self._handles[slot.file_index]
        handle.seek(slot.offset)
        handle.write(raw)
        self._written.add(name)

    def abort(self) -> None:
        """Close the files without checks (an incomplete checkpoint stays on disk)."""
        for handle in self._handles:
            handle.close()
        self._handles = []

    def close(self) -> list[str]:
        """Finish; returns the file names written. Raises if a planned tensor never arrived."""
        for handle in self._handles:
            handle.close()
        self._handles = []
        missing = sorted(set(self._slots) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[:3]}")
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.file_names[s.file_index] for name, s in self._slots.items()}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def write_hf_metadata(out_dir: str | Path, hf_config: dict, source_dir: str | Path | None,
                      dtype: torch.dtype) -> list[str]:
    """``config.json`` (with ``dtype`` set to what was written), generation config and tokenizer.

    Tokenizer/generation files are copied from ``source_dir`` when it has them; a generation
    config is derived from the token ids in ``hf_config`` otherwise. Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    dtype_name = str(dtype).replace("torch.", "")
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written = ["config.json"]
    source = Path(source_dir) if source_dir is not None else None
    if source is not None:
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
                written.append(name)
    if GENERATION_CONFIG not in written:
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if config.get(k) is not None}
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        written.append(GENERATION_CONFIG)
    return written


def write_hf_checkpoint(pairs: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                        out_dir: str | Path, dtype: torch.dtype, *,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> list[str]:
    """Consume ``pairs`` (e.g. :func:`~megatron_sdar.models.exporter.iter_hf_weights`) into shards."""
    writer = StreamingSafetensorsWriter(out_dir, shapes, dtype, max_shard_bytes)
    bar = None
    if progress:
        from megatron_sdar.utils.logging import progress as progress_bar

        bar = progress_bar(total=len(shapes), desc="writing HF tensors", unit="tensor", disable=False)
    try:
        for name, tensor in pairs:
            writer.write(name, tensor)
            del tensor  # release it before the exporter gathers the next one
            if bar is not None:
                bar.update(1)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return writer.close()
