"""MetricsLogger (metrics.jsonl, TensorBoard, resume truncation, non-finite values, rank != 0
writes nothing), the console's progress bars and log prefix, and the training / comparison plots."""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time

import pytest

from megatron_sdar.utils.logging import (METRICS_FILE, PROGRESS_INTERVAL_S, MetricsLogger, log, progress,
                                         read_metrics, set_log_prefix)
from megatron_sdar.utils.plots import plot_comparison, plot_training


def _log_steps(out, steps, **kwargs) -> None:
    with MetricsLogger(out, **kwargs) as logger:
        for step in steps:
            logger.log(step, {"rollout/success_rate": step / 10, "rollout/reward_mean": step - 0.5,
                              "sdar/gate_mean": 0.5 + step / 100})


def test_jsonl_one_flushed_line_per_step_and_tensorboard_events(tmp_path):
    import torch

    logger = MetricsLogger(tmp_path)
    logger.log(1, {"actor/pg_loss": torch.tensor(0.25), "rollout/turns": 7, "note": "warmup"})
    # flushed: readable while the logger is still open
    assert read_metrics(tmp_path / METRICS_FILE) == [
        {"step": 1, "actor/pg_loss": 0.25, "rollout/turns": 7, "note": "warmup"}]
    logger.log(2, {"actor/pg_loss": 0.5})
    logger.close()
    logger.close()  # idempotent
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert list(json.loads(lines[0]))[0] == "step"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(3, {"x": 1.0})
    with pytest.raises(ValueError, match="'step'"):
        MetricsLogger(tmp_path / "b", tensorboard=False).log(1, {"step": 3})
    with pytest.raises(TypeError, match="not a number"):
        MetricsLogger(tmp_path / "c", tensorboard=False).log(1, {"bad": [1, 2]})


def test_non_finite_values_stay_valid_json_and_read_back(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(0, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5})
    line = (tmp_path / METRICS_FILE).read_text().strip()
    json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    row = read_metrics(tmp_path)[0]
    assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf and row["d"] == 1.5


def test_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    _log_steps(tmp_path, range(1, 8), tensorboard=False)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "rollout/succ')  # the killed run died mid-line
    (tmp_path / "x.jsonl").write_text((tmp_path / METRICS_FILE).read_text() + '\n{"step": 9}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:8 is not valid JSON"):  # mid-file: an error
        read_metrics(tmp_path / "x.jsonl")
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 8))

    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=4)
    assert logger.dropped_rows == 4  # steps 5, 6, 7 and the torn line
    logger.log(5, {"rollout/success_rate": 0.99})
    logger.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1] == {"step": 5, "rollout/success_rate": 0.99}


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed", whether it is or not
    with pytest.raises(ImportError, match="wandb_project='p' needs the wandb package"):
        MetricsLogger(tmp_path, wandb_project="p")
    assert not (tmp_path / METRICS_FILE).exists()  # failed before writing anything


def test_ranks_other_than_zero_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # no process group: the RANK variable decides
    with MetricsLogger(tmp_path / "r1", wandb_project="not-even-checked") as logger:
        logger.log(1, {"x": 1.0})
    assert not (tmp_path / "r1").exists()


def test_plots_training_and_comparison(tmp_path):
    _log_steps(tmp_path / "sdar", range(0, 40), tensorboard=False)
    with MetricsLogger(tmp_path / "sdar", tensorboard=False) as logger:  # sparse eval, with a NaN
        for step in range(0, 40, 10):
            logger.log(step, {"eval/success_rate": math.nan if step == 20 else step / 50})
    with MetricsLogger(tmp_path / "grpo", tensorboard=False) as logger:  # no gate statistics, no eval
        for step in range(0, 40):
            logger.log(step, {"rollout/success_rate": step / 80, "rollout/reward_mean": step / 40})

    out = plot_training(tmp_path / "sdar" / METRICS_FILE, tmp_path / "png" / "sdar.png", title="SDAR")
    sparse = plot_training(tmp_path / "grpo", tmp_path / "png" / "grpo.png")
    both = plot_comparison({"grpo": tmp_path / "grpo", "sdar": tmp_path / "sdar" / METRICS_FILE},
                           tmp_path / "png" / "cmp.png")
    for png in (out, sparse, both):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (png, len(data))
    with pytest.raises(ValueError, match="at least one run"):
        plot_comparison({}, tmp_path / "png" / "none.png")


def _bar_loop(bar, updates: int, sleep_s: float = 0.0) -> None:
    """What the rollout bar does every turn: an update and a postfix (which asks tqdm to redraw)."""
    for i in range(updates):
        bar.update(1)
        bar.set_postfix(live=updates - i, tok_s=f"{1000 + i}")
        if sleep_s:
            time.sleep(sleep_s)
    bar.close()


def test_progress_to_a_file_is_a_line_every_interval_not_every_redraw():
    from tqdm import tqdm

    # tqdm itself, as the bars were: every set_postfix is a \r redraw into the file
    raw = io.StringIO()
    _bar_loop(tqdm(total=2000, desc="rollout", file=raw, dynamic_ncols=True), 2000)
    assert raw.getvalue().count("\r") >= 2000 and len(raw.getvalue()) > 100_000
    # the helper, 2000 fast updates (well inside one interval): the final line only
    out = io.StringIO()
    _bar_loop(progress(total=2000, desc="rollout", unit="turn", file=out), 2000)
    assert PROGRESS_INTERVAL_S >= 5
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") == 1 and len(out.getvalue()) < 200
    assert out.getvalue().startswith("rollout: 100% 2000/2000 [") and "live=1" in out.getvalue()
    # a bar that is not left and ends within an interval (a short rollout) writes nothing
    out = io.StringIO()
    _bar_loop(progress(total=500, desc="rollout", file=out, leave=False), 500)
    assert out.getvalue() == ""
    # a longer loop: one line per interval at most, plus the final one
    out = io.StringIO()
    start = time.monotonic()
    _bar_loop(progress(total=60, desc="sft", unit="step", file=out, interval=0.1), 60, sleep_s=0.01)
    elapsed = time.monotonic() - start
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    assert 2 <= len(lines) <= elapsed / 0.1 + 1, (elapsed, lines)
    assert [line.split()[2] for line in lines][-1] == "60/60"
    assert [line.split()[2] for line in lines].count("60/60") == 1  # the final count once
    counts = [int(line.split()[2].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and counts[0] < 60  # progress shown on the way, not only at the end


def test_progress_on_a_terminal_is_a_redrawn_bar():
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    with os.fdopen(slave, "w") as tty:
        _bar_loop(progress(total=3, desc="sft", file=tty), 3)
    chunks = []  # read until the pty is drained: one read may return only part of what was written
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the slave side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    written = b"".join(chunks).decode()
    assert written.count("\rsft:") >= 2 and "sft: 100%" in written and "3/3" in written  # redrawn in place


def test_progress_iterates_and_is_silent_off_rank_zero(monkeypatch):
    out = io.StringIO()
    assert list(progress(range(5), desc="sft", file=out)) == list(range(5))
    assert out.getvalue().startswith("sft: 100% 5/5 [")
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    assert list(progress(range(5), desc="sft", file=out)) == list(range(5)) and out.getvalue() == ""


def test_log_lines_name_the_preset(capsys, monkeypatch, tmp_path):
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.testing import TINY_RUN_OVERRIDES

    for preset in ("grpo", "hdpo"):
        set_log_prefix(compose_run([*TINY_RUN_OVERRIDES, f"algo={preset}", f"trainer.output_dir={tmp_path}"]).algo.name)
        log("step 3: success 0.50")
        assert capsys.readouterr().out == f"[{preset}] step 3: success 0.50\n"
    monkeypatch.setenv("RANK", "1")  # no process group: the RANK variable decides
    log("only rank 0 prints")
    assert capsys.readouterr().out == ""
    set_log_prefix("sdar")
