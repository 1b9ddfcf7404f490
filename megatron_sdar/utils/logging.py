"""Per-step training metrics: ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases.

    logger = MetricsLogger(out_dir, resume_step=resumed_from)    # every rank; only rank 0 writes
    logger.log(step, {"rollout/success_rate": 0.4, "sdar/gate_mean": 0.7})
    logger.close()
    rows = read_metrics(out_dir / "metrics.jsonl")

Console output: :func:`log` prints one ``[<preset>] message`` line on rank 0 (the prefix names
the algorithm that runs, :func:`set_log_prefix`); :func:`progress` is the one progress bar of the
trainer loop, the SFT warm start, rollouts and evaluation, and of weight loading/writing. On a
terminal it is a redrawn tqdm bar; on anything else (a log file, a pipe) it writes whole lines,
at most one every :data:`PROGRESS_INTERVAL_S` seconds plus the final one, never a ``\\r`` redraw.

``metrics.jsonl`` is the record of truth (plots and comparisons read it): one JSON object per
line, ``{"step": step, **metrics}``, flushed after every line so a killed job loses nothing it
logged. Non-finite values are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON
has no NaN) and read back as floats by :func:`read_metrics`.

On resume from the checkpoint of step ``s`` the killed run may already have logged steps after
``s``; they are about to be recomputed, so ``resume_step=s`` drops every line with ``step > s``
(the file is rewritten atomically) and the new lines continue from there.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

from tqdm import tqdm as _tqdm

METRICS_FILE = "metrics.jsonl"
SFT_METRICS_FILE = "sft_metrics.jsonl"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


PROGRESS_INTERVAL_S = 10.0  # seconds between two progress lines when the stream is not a terminal
_prefix = "sdar"


def set_log_prefix(name: str) -> None:
    """The prefix of :func:`log`'s lines from now on: the preset that runs (``algo.name``)."""
    global _prefix
    _prefix = str(name)


def log(message: str) -> None:
    """``[<preset>] message`` on stdout, flushed, from rank 0 only."""
    if _is_rank_zero():
        print(f"[{_prefix}] {message}", flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _WholeLines:
    """A stream that drops tqdm's bare ``\\r`` / ``\\n`` writes (clearing or ending a redrawn bar)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text.replace("\r", ""))

    def flush(self) -> None:
        self.stream.flush()


class _LineProgress(_tqdm):
    """tqdm for a stream that is not a terminal: a refresh is one whole line, written only when
    ``mininterval`` seconds have passed since the last one (the first one ``mininterval`` seconds
    after the start), plus the final line of a bar that is left (``leave=True``) when it closes
    (unless the last line already showed its final count). ``set_postfix`` and friends refresh on
    every call; here they cannot write more often."""

    _LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    _OPEN_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_line: float | None = None
        self._last_n: float | None = None  # the count the last line showed
        self._closing = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: ARG002
        if msg == "":  # tqdm clearing a bar that is not left: nothing to clear in a file
            return True
        now = self._time()
        if self._last_line is None:  # the refresh at construction: the clock starts here
            self._last_line = now
            if not self._closing:
                return True
        if not self._closing and now - self._last_line < self.mininterval:
            return True
        if self._closing and self._last_n == self.n:  # the final count is already on the last line
            return True
        self._last_line, self._last_n = now, self.n
        if msg is None:
            self.bar_format = self._LINE_FORMAT if self.total else self._OPEN_FORMAT
            msg = self.__str__()
        self.fp.write(msg + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        self._closing = True
        super().close()


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             initial: float = 0, leave: bool = True, disable: bool | None = None, file: IO[str] | None = None,
             interval: float = PROGRESS_INTERVAL_S) -> _tqdm:
    """A tqdm progress bar (over ``iterable``, or updated by hand up to ``total``) on ``file``
    (default stderr), on rank 0 only unless ``disable`` says otherwise. On a terminal: tqdm's
    redrawn bar. Otherwise: whole lines, at most one per ``interval`` seconds and the final one
    (when ``leave``): a bar shorter than ``interval`` that is not left writes nothing."""
    file = sys.stderr if file is None else file
    disable = not _is_rank_zero() if disable is None else disable
    common = dict(desc=desc, total=total, unit=unit, initial=initial, leave=leave, disable=disable)
    if _isatty(file):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=file, dynamic_ncols=True, **common)
    return _LineProgress(iterable, file=_WholeLines(file), mininterval=interval, maxinterval=0, **common)


def _is_rank_zero() -> bool:
    """Rank 0 of the default process group; a process without one counts as rank 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _encode(value: Any) -> Any:
    """A JSON-safe value: tensor/numpy scalars become Python numbers, NaN/inf the strings of
    :data:`_NON_FINITE`; ints, floats, bools, strings and None pass; anything else is a TypeError
    (a list or dict as a "metric" is almost always a bug in the caller)."""
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    raise TypeError(f"metric value {value!r} ({type(value).__name__}) is not a number")


def _decode(value: Any) -> Any:
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` for every line of a metrics file. A torn last line (the job died while
    writing it) is dropped; a malformed line elsewhere raises, naming it."""
    lines = path.read_text().splitlines()
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((line, json.loads(line)))
        except ValueError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({exc})") from exc
    return parsed


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (the file, or a directory holding one), NaN/inf restored."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [{key: _decode(value) for key, value in row.items()} for _, row in _parse_lines(path)]


def _truncate_after(path: Path, step: float) -> int:
    """Keep only the rows with ``step <= step`` (dropping a torn last line); return how many rows
    were dropped. Written to a temporary file and renamed, so a crash keeps the old file."""
    text = path.read_text()
    total = sum(1 for line in text.splitlines() if line.strip())
    kept = [line for line, row in _parse_lines(path) if row.get("step") is None or row["step"] <= step]
    if len(kept) == total and text.endswith("\n") or not text:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return total - len(kept)


class MetricsLogger:
    """Writes each step's metrics to ``output_dir/metrics.jsonl``, TensorBoard and W&B (rank 0).

    Every rank may construct it and call :meth:`log`; ranks other than 0 do nothing, so the trainer
    needs no rank checks. ``tensorboard`` writes event files under ``output_dir/tensorboard``.
    ``wandb_project`` enables Weights & Biases (``wandb`` is not a dependency of this project:
    install it yourself); with ``resume_step`` the W&B run of the same ``run_name`` is resumed.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str | None = None, resume_step: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.active = _is_rank_zero()
        self._file = None
        self._tb = None
        self._wandb_run = None
        self.dropped_rows = 0  # rows removed from metrics.jsonl on opening (after resume_step, torn)
        if not self.active:
            return
        wandb = None
        if wandb_project is not None:  # fail before touching any file
            try:
                import wandb
            except ImportError as exc:
                raise ImportError(
                    f"wandb_project={wandb_project!r} needs the wandb package, which is not installed "
                    "(pip install wandb), or leave wandb_project unset") from exc
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # also drops a torn last line, which appending would bury mid-file
            self.dropped_rows = _truncate_after(self.path, math.inf if resume_step is None else resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard hide the killed run's events after the resume step.
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)
        if wandb is not None:
            self._wandb_run = wandb.init(project=wandb_project, name=run_name, id=run_name,
                                         dir=str(self.output_dir),
                                         resume="allow" if resume_step is not None else None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for ``step``: one JSON line (flushed), TensorBoard scalars for the
        numeric values, and a W&B log call. Non-numeric values go to the JSON line only."""
        if not self.active:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        if "step" in metrics:
            raise ValueError("'step' is passed as the argument, not as a metric")
        row = {"step": int(step)}
        row.update({str(key): _encode(value) for key, value in metrics.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        numeric = {key: _decode(value) for key, value in row.items()
                   if key != "step" and isinstance(_decode(value), (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=int(step))

    def log_sft(self, sft_step: int, metrics: Mapping[str, Any]) -> None:
        """SFT warm-start progress: one JSON line ``{"sft_step": ..., ...}`` in ``sft_metrics.jsonl``
        (kept apart from the RL steps of ``metrics.jsonl``)."""
        if not self.active:
            return
        row = {"sft_step": int(sft_step), **{str(k): _encode(v) for k, v in metrics.items()}}
        with open(self.output_dir / SFT_METRICS_FILE, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
