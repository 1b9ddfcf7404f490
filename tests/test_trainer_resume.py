"""The main job end to end (tiny model, household world, real vLLM, CPU): a run killed with SIGKILL
and resumed, or stopped with SIGTERM and resumed, logs exactly what an uninterrupted run logs; a run
directory is never overwritten (a second run into it is refused, a restart from scratch under
``trainer.resume=auto`` moves the old run aside)."""
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
    from megatron_sdar.checkpoint.resume import find_latest_checkpoint

    latest = find_latest_checkpoint(stopped / "checkpoints")
    state = json.loads((latest / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 4, state  # the step in flight when the signal came was finished and saved
    assert _finish(_start(stopped, "trainer.resume=auto"), stopped) == 0
    _assert_same(_rows(stopped), expected)


# ----------------------------------------------------------------------------------------------
# a run directory is never overwritten
# ----------------------------------------------------------------------------------------------
def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (``root`` too): kind, size and modification time in ns."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def _refused(*overrides: str, timeout: float = 300) -> str:
    """``python -m megatron_sdar.train <overrides>`` exits 2 with one line on stderr; that line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29600 + os.getpid() % 300))
    proc = subprocess.run([sys.executable, "-m", "megatron_sdar.train", *SMALL, *overrides], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("megatron-sdar: configuration error: trainer.output_dir="), lines
    return lines[0]


def _a_finished_run(run: Path) -> None:
    """What a run leaves in its directory (the files, not their training content)."""
    from megatron_sdar.checkpoint.model import TRAIN_FORMAT_NAME, TRAIN_FORMAT_VERSION

    ckpt = run / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"format": TRAIN_FORMAT_NAME, "version": TRAIN_FORMAT_VERSION,
                                                    "files": {}}))
    (ckpt / "trainer_state.json").write_text('{"step": 4}')
    (run / "config.json").write_text('{"trainer": {"max_steps": 4}}')
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/success_rate": 0.5}) + "\n"
                                               for s in range(5)))
    (run / "sft_model").mkdir()
    (run / "sft_model" / "config.json").write_text("{}")


@pytest.mark.multiproc
def test_a_second_run_into_a_run_directory_is_refused_and_nothing_changes(tmp_path):
    run = tmp_path / "run"
    _a_finished_run(run)
    before = _listing(tmp_path)
    line = _refused(f"trainer.output_dir={run}")
    assert line == (f"megatron-sdar: configuration error: trainer.output_dir={run} holds a run (checkpoints/, "
                    "config.json, metrics.jsonl, sft_model/), which a new run would overwrite: continue it with "
                    "trainer.resume=auto, or choose a fresh trainer.output_dir"), line
    assert _listing(tmp_path) == before


@pytest.mark.multiproc
def test_an_output_dir_that_is_a_file_is_refused_and_nothing_is_written(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    before = _listing(tmp_path)
    line = _refused(f"trainer.output_dir={afile}")
    assert line.endswith(f"trainer.output_dir={afile} is a file, not a directory; choose a fresh trainer.output_dir")
    line = _refused(f"trainer.output_dir={afile / 'run'}")
    assert line.endswith(f"trainer.output_dir={afile / 'run'} cannot be made: {afile} is a file, not a directory; "
                         "choose a fresh trainer.output_dir")
    assert _listing(tmp_path) == before and afile.read_text() == "not a directory\n"


def test_what_holds_a_run(tmp_path):
    """Each entry a run writes makes a directory hold one; what else may be there does not; a resume
    is not refused; ``check_output_dir`` (what ``train`` runs after composing) applies it."""
    from megatron_sdar.config.schema import ConfigError, check_output_dir, compose_run

    def composes(path: Path, *extra: str) -> bool:
        try:
            check_output_dir(compose_run([f"trainer.output_dir={path}", *extra]))
        except ConfigError as exc:
            assert "holds a run" in str(exc) and "trainer.resume=auto" in str(exc), exc
            return False
        return True

    assert composes(tmp_path / "not_yet")
    fine = tmp_path / "fine"
    for name in ("hydra", "base_model", "discarded-20250101T000000Z", "checkpoints", "tensorboard"):
        (fine / name).mkdir(parents=True)  # checkpoints/, tensorboard/: empty
    (fine / "base_model" / "model.safetensors").write_bytes(b"x")
    (fine / "discarded-20250101T000000Z" / "metrics.jsonl").write_text("{}\n")
    (fine / "slurm-123.out").write_text("log\n")
    assert composes(fine)
    for entry in ("config.json", "metrics.jsonl", "sft_metrics.jsonl", "training.png", "checkpoints/step_00000002",
                  "sft_model/config.json", "hf_export/config.json", "tensorboard/events", "wandb/run"):
        one = tmp_path / entry.replace("/", "_").replace(".", "_")
        (one / entry).parent.mkdir(parents=True, exist_ok=True)
        (one / entry).write_text("{}")
        assert not composes(one), entry
        assert composes(one, "trainer.resume=auto"), entry


def test_discard_run_moves_only_the_run_aside(tmp_path):
    from megatron_sdar.checkpoint.resume import discard_run

    run = tmp_path / "run"
    _a_finished_run(run)
    (run / "config.resume-2.json").write_text("{}")
    (run / "base_model").mkdir()
    (run / "base_model" / "model.safetensors").write_bytes(b"weights")
    (run / "slurm-7.out").write_text("log\n")
    old = {p: (run / p).read_bytes() for p in ("config.json", "metrics.jsonl", "config.resume-2.json",
                                                "checkpoints/step_00000004/trainer_state.json")}
    moved = discard_run(run)
    assert moved is not None and moved.parent == run and moved.name.startswith("discarded-")
    assert sorted(p.name for p in run.iterdir()) == sorted(["base_model", "slurm-7.out", moved.name])
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "config.json", "config.resume-2.json",
                                                       "metrics.jsonl", "sft_model"]
    assert {p: (moved / p).read_bytes() for p in old} == old
    assert discard_run(run) is None  # nothing left to move: no empty discarded-*/ directory
    _a_finished_run(run)
    again = discard_run(run)  # within the same second: a directory of its own
    assert again is not None and again != moved and (again / "metrics.jsonl").is_file()


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_auto_with_every_checkpoint_bad_moves_the_old_run_aside(tmp_path):
    """A real run's directory: a second run into it is refused and changes nothing; with its only
    checkpoint corrupt, ``trainer.resume=auto`` starts from scratch, its old files moved aside
    untouched, and ``metrics.jsonl`` holds the new run alone."""
    run = tmp_path / "run"
    short = ("trainer.max_steps=0", "trainer.sft_steps=1")  # SFT, step-0 evaluation and checkpoint only
    assert _finish(_start(run, *short), run) == 0
    assert sorted(_rows(run)) == [0]
    before = _listing(tmp_path)
    line = _refused(f"trainer.output_dir={run}", *short)
    assert "holds a run (checkpoints/, config.json, metrics.jsonl, sft_metrics.jsonl, sft_model/)" in line, line
    assert _listing(tmp_path) == before

    shard = max((run / "checkpoints" / "step_00000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096  # same size: only the checksum sees it
    shard.write_bytes(bytes(data))
    old = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
           if p.is_file() and not p.relative_to(run).parts[0] == "base_model"}
    assert _finish(_start(run, *short, "trainer.resume=auto"), run) == 0
    log = (tmp_path / "run.log").read_text()
    moved = [p for p in run.iterdir() if p.name.startswith("discarded-")]
    assert len(moved) == 1, sorted(p.name for p in run.iterdir())
    assert f"trainer.resume=auto: no intact checkpoint, starting from scratch; the old run's files were moved to " \
           f"{moved[0]}" in log, log[-3000:]
    assert {str(p.relative_to(moved[0])): p.read_bytes() for p in sorted(moved[0].rglob("*")) if p.is_file()} == old
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0]  # the new run's row alone
    assert json.loads((run / "config.json").read_text())["trainer"]["resume"] == "auto"
    from megatron_sdar.checkpoint.resume import find_latest_checkpoint

    assert find_latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000000"
