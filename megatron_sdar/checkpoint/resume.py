"""What a run resumes from, and what a run directory may receive. Cheap and not collective: reads
the small JSON files and stats the others (checksums are verified when a checkpoint is loaded, by
:func:`megatron_sdar.checkpoint.training.load_checkpoint`).

    marker, trainer_state = read_complete_checkpoint(path)  # or CheckpointFormatError saying why not
    latest = find_latest_checkpoint(root)                    # newest complete one under root, or None
    check_run_directory(output_dir, resume)                  # before anything is built
    moved_to = discard_run(output_dir)                       # resume=auto found no intact checkpoint

**A run directory is never overwritten.** ``trainer.output_dir`` holds one run. It *holds a run*
when it contains any of :data:`RUN_FILES` (``config.json``, ``metrics.jsonl``,
``sft_metrics.jsonl``, ``training.png``) or a non-empty one of :data:`RUN_DIRS`
(``checkpoints/``, ``sft_model/``, ``hf_export/``, ``tensorboard/``, ``wandb/``): what a run
writes. Other entries do not count: ``base_model/``
(the tiny start model, built once from the config and reused), ``discarded-*/`` (runs moved aside,
below), and anything a user or a scheduler put there (logs, ``hydra/``). So an empty directory,
or one left by a run that died while building, takes a new run.

* A new run (``trainer.resume=null``) into a directory that holds a run is refused by
  :func:`check_run_directory` (``train`` calls it through ``config.schema.check_output_dir``, before anything is built or written):
  the user continues it with ``trainer.resume=auto`` or picks a fresh directory.
* ``trainer.resume=auto`` continues from the newest intact checkpoint. When there is none (every
  checkpoint fails its checks, or the run died before its first one), the run starts from scratch,
  and :func:`discard_run` first moves the old run's entries into ``discarded-<UTC time>/`` beside
  them, so a restart never appends to the old ``metrics.jsonl`` nor overwrites its ``config.json``.
* ``trainer.resume=<checkpoint>`` continues that checkpoint (in its own run directory, or in a new
  one, e.g. at another layout).
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

from megatron_sdar.checkpoint.integrity import MarkerError, fsync_dir, read_marker
from megatron_sdar.checkpoint.model import TRAIN_FORMAT_NAME, TRAIN_FORMAT_VERSION, CheckpointFormatError

TRAINER_STATE_FILE = "trainer_state.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: What a run writes into its directory: files, and directories that count when non-empty.
RUN_FILES = ("config.json", "metrics.jsonl", "sft_metrics.jsonl", "training.png")
RUN_DIRS = ("checkpoints", "sft_model", "hf_export", "tensorboard", "wandb")
RESUMED_CONFIG_GLOB = "config.resume-*.json"  # the config of each resumed invocation
DISCARDED_PREFIX = "discarded-"


class RunDirectoryError(ValueError):
    """``trainer.output_dir`` cannot take this run (it is a file, or holds another run)."""


def checkpoint_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` directory under ``root``, lowest step first."""
    if not root.is_dir():
        return []
    return sorted((step, p) for p in root.iterdir() if p.is_dir() and (step := step_of(p)) is not None)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def read_complete_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """``(marker, trainer_state)`` of a complete training checkpoint, or
    :class:`~megatron_sdar.checkpoint.model.CheckpointFormatError` saying why ``path`` is not one.
    Cheap: reads the JSON files and checks every recorded file's size."""
    path = Path(path)
    try:
        marker = read_marker(path, {TRAIN_FORMAT_NAME: TRAIN_FORMAT_VERSION})
    except MarkerError as exc:
        raise CheckpointFormatError(str(exc)) from None
    try:
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointFormatError(f"{path / TRAINER_STATE_FILE} does not parse ({exc})") from exc
    return marker, trainer_state


def is_complete_checkpoint(path: str | Path) -> bool:
    """Cheap: ``path`` is a complete training checkpoint (marker, sizes, trainer state)."""
    try:
        read_complete_checkpoint(path)
    except CheckpointFormatError:
        return False
    return True


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Every complete checkpoint under ``root``, newest first; incomplete or corrupt ``step_*``
    directories are left out with a warning naming them and the reason. ``.tmp-`` directories
    (saves in progress or killed) are ignored."""
    found = []
    for _, path in reversed(step_dirs(Path(root))):
        try:
            read_complete_checkpoint(path)
        except CheckpointFormatError as exc:
            warn(f"skipping checkpoint {path}: {exc}")
            continue
        found.append(path)
    return found


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or ``None`` (incomplete or
    corrupt ones are skipped with a warning, so a run resumes from the previous good one)."""
    return next(iter(complete_checkpoints(root)), None)


def warn(message: str) -> None:
    """One warning line, on this process (the callers warn on rank 0 only). Through :mod:`warnings`
    alone: a logger record as well would print the same line twice (logging's last-resort handler),
    and the warnings filter shows a message once per place."""
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------------
def run_entries(output_dir: str | Path) -> list[str]:
    """The entries of ``output_dir`` that show it holds a run (module docstring), sorted; empty
    when it holds none (or does not exist)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [name for name in RUN_FILES if (root / name).is_file()]
    found += [f"{name}/" for name in RUN_DIRS if (root / name).is_dir() and any((root / name).iterdir())]
    return sorted(found)


def check_run_directory(output_dir: str | Path, resume: str | None) -> None:
    """``output_dir`` can take this run: it is (or can be made as) a directory, and, unless
    ``resume`` continues a run, holds no run. :class:`RunDirectoryError` in one line otherwise."""
    path = Path(output_dir)
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)  # itself or the nearest parent
    if existing is not None and not existing.is_dir():
        what = ("a file, not a directory" if existing.is_file() else
                "a symbolic link to nothing" if existing.is_symlink() else "not a directory")
        where = f"is {what}" if existing == path else f"cannot be made: {existing} is {what}"
        raise RunDirectoryError(f"trainer.output_dir={output_dir} {where}; choose a fresh trainer.output_dir")
    _check_writable(output_dir, path if existing == path else existing)
    if resume is not None:
        return
    found = run_entries(path)
    if found:
        raise RunDirectoryError(
            f"trainer.output_dir={output_dir} holds a run ({', '.join(found)}), which a new run would overwrite: "
            "continue it with trainer.resume=auto, or choose a fresh trainer.output_dir")


def _check_writable(output_dir: str | Path, directory: Path | None) -> None:
    """``directory`` (the output directory, or its nearest existing parent) takes new entries. Asked of
    the kernel (``access(2)``: permission bits, ACLs, read-only mounts, immutable directories, for root
    too), so the check itself changes nothing on disk."""
    if directory is None or os.access(directory, os.W_OK | os.X_OK):
        return
    where = "" if Path(output_dir) == directory else f" (its parent {directory} takes no new directory)"
    raise RunDirectoryError(f"trainer.output_dir={output_dir} is not writable{where}; choose a writable "
                            "trainer.output_dir")


def saved_run_config(checkpoint: str | Path) -> tuple[Path, dict] | None:
    """The configuration that made ``checkpoint`` (``<run>/checkpoints/step_N``): the run's
    ``config.resume-<M>.json`` with the largest ``M < N`` (the invocation that saved it), else its
    ``config.json``; ``(file, its JSON)``, or None when the run directory holds neither. A file that
    does not parse raises :class:`RunDirectoryError` naming it."""
    checkpoint = Path(checkpoint).resolve()
    run_dir, step = checkpoint.parent.parent, step_of(checkpoint)
    resumed = sorted(((int(m.group(1)), p) for p in run_dir.glob(RESUMED_CONFIG_GLOB)
                      if (m := re.fullmatch(r"config\.resume-(\d+)\.json", p.name))), reverse=True)
    candidates = [p for m, p in resumed if step is None or m < step] + [run_dir / "config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirectoryError(f"{path} (the configuration of the run being resumed) does not parse: {exc}") from None


def discard_run(output_dir: str | Path) -> Path | None:
    """Move the entries of the run in ``output_dir`` (:data:`RUN_FILES`, :data:`RUN_DIRS` and the
    resumed invocations' configs) into a new ``output_dir/discarded-<UTC time>/``; return it, or
    ``None`` when there was nothing to move. For a restart from scratch under
    ``trainer.resume=auto``; one process calls it (rank 0)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    names = [n for n in (*RUN_FILES, *RUN_DIRS) if os.path.lexists(root / n)]
    names += sorted(p.name for p in root.glob(RESUMED_CONFIG_GLOB))
    if not names:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = root / f"{DISCARDED_PREFIX}{stamp}"
    suffix = 1
    while os.path.lexists(target):
        target = root / f"{DISCARDED_PREFIX}{stamp}-{suffix}"
        suffix += 1
    target.mkdir()
    for name in names:
        os.rename(root / name, target / name)
    fsync_dir(target)
    fsync_dir(root)
    return target
