"""Checksums of the files of a checkpoint: recorded at save time, verified before a load.

A checkpoint's completion marker (``complete.json``) carries a manifest
``{relative path: {"bytes": n, "xxh3_64": hex digest}}`` of every other file in the directory.

* **Save** (:func:`collect_manifest`, collective): every rank hashes the files *it* wrote (torch
  distributed checkpoint shards ``__<rank>_<i>.distcp`` and this rank's RNG file), rank 0 also
  hashes everything no rank claims (``metadata.json``, ``common.pt``, JSON files). Each file is read
  once, by the rank whose data it holds, and hashing runs in parallel over the ranks.
* **Verify** (:func:`verify_manifest`, collective when a process group exists): the entries are
  split over the ranks, each re-hashes its share, and every rank gets the list of problems.

Why a content hash and not only sizes: a same-size corruption (a bad disk block, a partial
overwrite by a copy tool) passes a size check and loads as garbage weights (NaNs) without any
error. xxh3-64 (the ``xxhash`` package) runs at memory bandwidth, so verifying costs about as much
as reading the files once.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch.distributed as dist

HASH_NAME = "xxh3_64"
MARKER_FILE = "complete.json"
_READ_BYTES = 16 << 20
_DCP_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_RANK_FILE = re.compile(r"(?:^|/)rank_(\d+)\.pt$")


def file_digest(path: str | Path) -> str:
    """xxh3-64 of a file's bytes, as 16 hex digits."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _writer_rank(relative: str) -> int | None:
    """The rank that wrote a file, from its name (None: written by rank 0's bookkeeping)."""
    name = relative.rsplit("/", 1)[-1]
    match = _DCP_SHARD.match(name) or _RANK_FILE.search(relative)
    return int(match.group(1)) if match else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, HASH_NAME: file_digest(path)}


def collect_manifest(directory: str | Path, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """Collective: the manifest of every file under ``directory`` (except ``exclude``), on every
    rank. Call it after a barrier, when every rank's files are on disk."""
    directory = Path(directory)
    rank, world = _world()
    skip = set(exclude)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() and str(p.relative_to(directory)) not in skip)

    def mine(relative: str) -> bool:
        writer = _writer_rank(relative)
        return writer == rank or ((writer is None or writer >= world) and rank == 0)

    local = {relative: _entry(directory / relative) for relative in files if mine(relative)}
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[str, dict] = {}
    for part in parts:
        merged.update(part)
    return dict(sorted(merged.items()))


def _size_problem(directory: Path, relative: str, entry: dict) -> str | None:
    path = directory / relative
    if not path.is_file():
        return f"{relative} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{relative} has {path.stat().st_size} bytes, {entry['bytes']} were written"
    return None


def check_sizes(directory: str | Path, manifest: dict[str, dict]) -> list[str]:
    """Cheap and local: every listed file exists with its recorded size. Returns the problems."""
    directory = Path(directory)
    return [p for relative, entry in manifest.items() if (p := _size_problem(directory, relative, entry))]


def verify_manifest(directory: str | Path, manifest: dict[str, dict]) -> list[str]:
    """Sizes and checksums of every file in ``manifest``; the problems found (empty: intact).

    Collective when a process group exists (every rank calls it and gets the same list); the files
    are split over the ranks by size, so each reads a share."""
    directory = Path(directory)
    rank, world = _world()
    loads = [0] * world
    problems: list[str] = []
    for relative in sorted(manifest, key=lambda k: (-manifest[k]["bytes"], k)):  # largest first,
        target = loads.index(min(loads))                                          # least-loaded rank
        loads[target] += manifest[relative]["bytes"]
        if target != rank:
            continue
        entry = manifest[relative]
        problem = _size_problem(directory, relative, entry)
        if problem is None and entry.get(HASH_NAME) is None:
            problem = f"{relative} has no {HASH_NAME} checksum in the manifest"
        elif problem is None and file_digest(directory / relative) != entry[HASH_NAME]:
            problem = f"{relative} does not match its {HASH_NAME} checksum (same size, different bytes)"
        if problem is not None:
            problems.append(problem)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, problems)
        problems = [p for part in parts for p in part]
    return sorted(problems)


# ------------------------------------------------------------------------------------------------
# the completion marker
# ------------------------------------------------------------------------------------------------
class MarkerError(ValueError):
    """A directory has no readable completion marker of the expected format."""


def fsync_dir(path: Path) -> None:
    """Make a rename durable; some network file systems refuse directory fsync, which is fine."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_marker(directory: str | Path, fields: dict, manifest: dict[str, dict]) -> dict:
    """Write ``complete.json`` = ``fields`` + ``files: manifest``, durably (call it last)."""
    marker = dict(fields, files=manifest, checksum=HASH_NAME)
    write_text_durably(Path(directory) / MARKER_FILE, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return marker


def read_marker(directory: str | Path, formats: dict[str, int]) -> dict:
    """The completion marker of ``directory`` if its format is one of ``formats`` (name ->
    version) at that version, with every file present at its recorded size; :class:`MarkerError`
    saying what is wrong otherwise."""
    directory = Path(directory)
    path = directory / MARKER_FILE
    if not path.is_file():
        raise MarkerError(f"{directory} is not a complete checkpoint: no {MARKER_FILE} "
                          "(a save that did not finish, or a directory altered since)")
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MarkerError(f"{path} does not parse ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") not in formats:
        raise MarkerError(f"{path} is not a {' or '.join(formats)} marker")
    version = formats[marker["format"]]
    if marker.get("version") != version:
        raise MarkerError(f"{path} has format version {marker.get('version')!r}; this code reads version {version}")
    files = marker.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and "bytes" in e for e in files.values()):
        raise MarkerError(f"{path} has no file manifest")
    problems = check_sizes(directory, files)
    if problems:
        raise MarkerError(f"{directory} is corrupt: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return marker
