"""The main job end to end (tiny model, household world, real vLLM, CPU): a run killed with SIGKILL
and resumed, or stopped with SIGTERM and resumed, logs exactly what an uninterrupted run logs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES as SMALL


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", MASTER_PORT=str(29600 + os.getpid() % 300))
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={out}", *SMALL, *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not finish in {timeout}s; log: {out.parent / (out.name + '.log')}")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 400) -> None:
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before the expected point")
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _rows(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if not k.startswith("perf/")}  # wall clock differs
    return rows


def _assert_same(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step, row in want.items():
        assert row.keys() == got[step].keys(), (step, set(row) ^ set(got[step]))
        for key, value in row.items():
            other = got[step][key]
            if isinstance(value, float) and isinstance(other, float):
                assert abs(value - other) <= 1e-6 * max(1.0, abs(value)), (step, key, value, other)
            else:
                assert value == other, (step, key, value, other)


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigkill_and_sigterm_resume_equal_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert _finish(_start(straight), straight) == 0
    expected = _rows(straight)
    assert [s for s in sorted(expected) if s > 0] == [1, 2, 3, 4]
    spec_metrics = ["sdar/gate_mean", "sdar/gate_active_ratio", "sdar/gap_mean", "sdar/gap_std", "actor/pg_loss",
                    "actor/pg_clipfrac", "actor/ppo_kl", "actor/kl_ref", "actor/entropy", "actor/grad_norm",
                    "rollout/success_rate", "rollout/reward_mean", "rollout/turns_mean",
                    "rollout/invalid_action_rate", "rollout/train_infer_logprob_diff_mean",
                    "rollout/train_infer_logprob_diff_max", "eval/success_rate"]
    raw = json.loads([line for line in (straight / "metrics.jsonl").read_text().splitlines()
                      if line.startswith('{"step": 4,')][0])
    missing = [k for k in spec_metrics + ["perf/rollout_tokens_per_s", "perf/train_tokens_per_s"] if k not in raw]
    assert not missing, missing
    assert any(k.startswith("rollout/success_rate/") for k in raw)  # per task type
    assert expected[4]["rollout/train_infer_logprob_diff_max"] < 1e-3

    # SIGKILL once the step-2 checkpoint is complete; 4 KiB of it overwritten in place (same size);
    # resume=auto skips it for the step-0 checkpoint, naming the failed checksum, and resumes to step 4
    killed = tmp_path / "killed"
    proc = _start(killed)
    _wait_for(lambda: (killed / "checkpoints" / "step_00000002").is_dir(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_config = (killed / "config.json").read_text()
    shard = max((killed / "checkpoints" / "step_00000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096
    shard.write_bytes(bytes(data))
    assert _finish(_start(killed, "trainer.resume=auto"), killed) == 0
    _assert_same(_rows(killed), expected)
    log = (tmp_path / "killed.log").read_text()
    assert "step_00000002 is corrupt: " + shard.name + " does not match its xxh3_64 checksum" in log
    assert "resumed from " + str(killed / "checkpoints" / "step_00000000") in log
    # the first invocation's config stays; the resumed one is stored beside it
    assert (killed / "config.json").read_text() == first_config
    assert json.loads(first_config)["trainer"]["resume"] is None
    assert json.loads((killed / "config.resume-0.json").read_text())["trainer"]["resume"] == "auto"

    # SIGTERM in the middle of a step: the job checkpoints that step and exits 0; resume finishes
    stopped = tmp_path / "stopped"
    proc = _start(stopped)
    _wait_for(lambda: (stopped / "metrics.jsonl").is_file() and '"step": 1,' in (stopped / "metrics.jsonl").read_text(),
              proc)
    os.kill(proc.pid, signal.SIGTERM)  # the trainer process, as Slurm signals the job step
    assert _finish(proc, stopped) == 0
    from megatron_sdar.trainer.checkpointing import find_latest_checkpoint

    latest = find_latest_checkpoint(stopped / "checkpoints")
    state = json.loads((latest / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 4, state  # the step in flight when the signal came was finished and saved
    assert _finish(_start(stopped, "trainer.resume=auto"), stopped) == 0
    _assert_same(_rows(stopped), expected)
