"""Issue 33: the cases of the new-user probe of e6c1929 (``../shared/probes/new-user-probe-e6c1929.md``)
that concern the trainer's start-up, resume and interrupt, replayed. Each failed on e6c1929:

* A01: a misspelt key got no "did you mean";
* B04/B05: a changed learning rate (or preset) on resume crashed in megatron-core's parameter-group
  matching (also tests/test_trainer_checkpointing.py::test_changed_optimizer_settings_apply_on_resume_with_the_moments_kept);
* B06: a resume at another model size trained the old size silently;
* B07: an unwritable output directory gave a PermissionError traceback after the model was built;
* C02/C04: Ctrl-C ended in a KeyboardInterrupt traceback and lost the step in progress;
* D13/D14: a truncated safetensors file gave a SafetensorError after the model was built; a bad
  config.json was named by its directory;
* smaller: library notices before the one-line layout error; the corrupt-checkpoint warning twice;
  ``--rehearse`` silent about a data directory that does not exist.

The cases of compare_algos / sweep (T02, T03), Slurm submit (S03) and the environment's errors (E05,
E06, A28) are in tests/test_compare_algos.py, tests/test_slurm.py and tests/test_env_errors.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES as SMALL

TRAIN = [sys.executable, "-m", "megatron_sdar.train"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29700 + os.getpid() % 200))


def _refused(*overrides: str, timeout: float = 120) -> str:
    """``python -m megatron_sdar.train <overrides>``: exit 2, one line on stderr, nothing on stdout but
    notices of no library; that line."""
    started = time.monotonic()
    proc = subprocess.run([*TRAIN, *overrides], capture_output=True, text=True, timeout=timeout, env=_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert time.monotonic() - started < 60  # refused before anything is built
    assert lines[0].startswith("megatron-sdar: configuration error: "), lines
    return lines[0].removeprefix("megatron-sdar: configuration error: ")


# ----------------------------------------------------------------------------------------------
# A01: did you mean
# ----------------------------------------------------------------------------------------------
def test_a_misspelt_key_names_its_close_matches():
    from megatron_sdar.config.schema import ConfigError, close_keys, compose_run

    for wrong, right in (("trainer.max_stpes", "trainer.max_steps"), ("algo.distil_coef", "algo.distill_coef"),
                         ("trainr.lr", "trainer.lr"), ("model.tiny.hiden", "model.tiny.hidden")):
        with pytest.raises(ConfigError, match=rf"^{wrong} is not a configuration key; did you mean {right}[ ?]"):
            compose_run([f"{wrong}=1"], need_files=False)
    assert close_keys("trainer.zzz") == []  # nothing close: no guess
    with pytest.raises(ConfigError) as err:
        compose_run(["trainer.zzz=1"], need_files=False)
    assert "did you mean" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# B04-B06: what a resume may change, and what it may not
# ----------------------------------------------------------------------------------------------
def _saved_run(out: Path, overrides: list[str], marker: dict | None = None, step: int = 1) -> None:
    """A run directory as a finished run leaves it for the resume checks: its ``config.json`` (the
    composed configuration of ``overrides``) and a complete checkpoint whose marker records the layout
    and optimizer (``marker`` overrides fields); no weights (the checks read the JSON files only)."""
    from megatron_sdar.checkpoint.model import TRAIN_FORMAT_NAME, TRAIN_FORMAT_VERSION
    from megatron_sdar.config.schema import compose_run, config_dict

    run = compose_run([*overrides, f"trainer.output_dir={out}"], need_files=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict(run)))
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    p = run.parallel
    fields = {"format": TRAIN_FORMAT_NAME, "version": TRAIN_FORMAT_VERSION, "files": {}, "step": step,
              "layout": {"tensor_parallel": p.tp, "pipeline_parallel": p.pp, "virtual_pipeline": p.vpp or 1,
                         "context_parallel": p.cp, "expert_parallel": p.ep, "data_parallel": 1, "world_size": 1},
              "optimizer": {"distributed": p.distributed_optimizer, "params_dtype": run.model.dtype,
                            "sharding": run.trainer.optimizer_sharding},
              "extra_models": ["teacher_ema"] if run.algo.teacher == "ema" else []}
    (ckpt / "complete.json").write_text(json.dumps({**fields, **(marker or {})}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))


def _resume(out: Path, *overrides: str):
    from megatron_sdar.config.schema import compose_run

    return compose_run([*overrides, f"trainer.output_dir={out}", "trainer.resume=auto"], need_files=False)


def test_resume_lists_what_changes_and_refuses_what_cannot(tmp_path):
    """Optimizer, schedule and algorithm settings may change (one line lists them); the model, the
    optimizer kind and what the checkpoint's layout cannot carry are refused in one line naming each
    key, before anything is built."""
    from megatron_sdar.config.schema import ConfigError, resume_changes

    out = tmp_path / "run"
    _saved_run(out, [])
    base = _resume(out)
    assert resume_changes(base) == []
    new = {"trainer.lr": 5e-4, "trainer.min_lr": 1e-5, "trainer.warmup_steps": 7, "trainer.weight_decay": 0.1,
           "trainer.adam_beta2": 0.95, "trainer.clip_grad": 0.5, "algo.distill_coef": 0.5, "trainer.max_steps": 20}
    changed = resume_changes(_resume(out, *(f"{k}={v}" for k, v in new.items())))

    def old(key: str):
        group, name = key.split(".")
        return getattr(getattr(base, group), name)

    assert sorted(changed) == sorted(f"{k} {old(k)} -> {v}" for k, v in new.items()), changed
    preset = resume_changes(_resume(out, "algo=grpo"))  # another preset: its own coefficients and tuned lr
    assert "algo.name sdar -> grpo" in preset and "algo.distill_coef 1.0 -> 0.0" in preset, preset

    refused = {
        ("model.tiny.hidden=64",): r"another model\.tiny\.hidden \(128 -> 64\)",
        ("model.tiny.layers=4", "model.tiny.ffn=256"): r"model\.tiny\.layers \(2 -> 4\), model\.tiny\.ffn \(\d+ -> 256\)",
        ("model.arch=qwen3",): r"model\.arch \(qwen2 -> qwen3\)",
        ("model.dtype=bfloat16",): r"model\.dtype \(float32 -> bfloat16\)",
        ("parallel.distributed_optimizer=true",): r"parallel\.distributed_optimizer \(False -> True\)",
        ("algo.teacher=ema",): r"algo\.teacher \(the checkpoint holds no EMA teacher\) \(shared -> ema\)",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=rf"^trainer\.resume=auto: .*step_00000001 cannot be resumed with "
                                              rf".*{message}.* \(saved in .*config\.json\); resume with the saved"):
            resume_changes(_resume(out, *overrides))

    # a dp_reshardable distributed-optimizer state reshards over DP only: TP may not change
    sharded = tmp_path / "sharded"
    _saved_run(sharded, ["parallel.distributed_optimizer=true", "trainer.optimizer_sharding=dp_reshardable"])
    with pytest.raises(ConfigError, match=r"parallel\.tp \(optimizer state saved dp_reshardable\) \(1 -> 2\)"):
        resume_changes(_resume(sharded, "parallel.distributed_optimizer=true", "parallel.tp=2"))
    # fully_reshardable (the default) carries any layout
    full = tmp_path / "full"
    _saved_run(full, ["parallel.distributed_optimizer=true"])
    assert resume_changes(_resume(full, "parallel.distributed_optimizer=true", "parallel.tp=2")) == ["parallel.tp 1 -> 2"]


def test_the_config_of_a_resumed_invocation_is_the_one_compared(tmp_path):
    """A checkpoint saved after a resume at step 1 was made by ``config.resume-1.json``: a resume from
    it compares against that file (its lr), not the first invocation's."""
    from megatron_sdar.config.schema import compose_run, config_dict, resume_changes

    out = tmp_path / "run"
    _saved_run(out, [], step=3)
    second = compose_run(["trainer.lr=5e-4", f"trainer.output_dir={out}"], need_files=False)
    (out / "config.resume-1.json").write_text(json.dumps(config_dict(second)))
    (out / "config.resume-3.json").write_text("{not json")  # the invocation resumed from step 3: not this one's
    assert resume_changes(_resume(out, "trainer.lr=2e-4")) == ["trainer.lr 0.0005 -> 0.0002"]


@pytest.mark.multiproc
def test_resume_at_another_model_size_is_refused_before_anything_is_built(tmp_path):
    """Probe B06: exit 0 and a run trained at the old size; now one line, exit 2, nothing written."""
    out = tmp_path / "run"
    _saved_run(out, list(SMALL))
    before = sorted(p.name for p in out.rglob("*"))
    line = _refused(*SMALL, "model.tiny.hidden=64", "trainer.resume=auto", f"trainer.output_dir={out}")
    assert "cannot be resumed with another model.tiny.hidden (128 -> 64)" in line, line
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.multiproc
def test_a_new_run_rebuilds_a_base_model_of_other_settings(tmp_path):
    """A directory holding only ``base_model/`` (a run that died while building) takes a new run; at
    another ``model.tiny`` the model is rebuilt, not reused at its old size."""
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.testing import run_distributed

    out = tmp_path / "run"
    runs = [compose_run([*SMALL, *overrides, f"trainer.output_dir={out}"], need_files=False)
            for overrides in ([], [], ["model.tiny.hidden=64", "model.tiny.ffn=128"])]
    built = run_distributed(_prepare_model_dirs, world_size=1, args=(runs,), timeout=240, init="process_group")[0]
    assert [hidden for hidden, _ in built] == [128, 128, 64]
    assert built[0][1] == built[1][1] != built[2][1]  # the second run reused the first one's files


def _prepare_model_dirs(runs) -> list[tuple[int, int]]:
    """(hidden size, weights' modification time) of ``base_model/`` after each run's preparation."""
    from megatron_sdar.trainer.loop import prepare_model_dir

    out = []
    for run in runs:
        path = prepare_model_dir(run)
        out.append((json.loads((path / "config.json").read_text())["hidden_size"],
                    (path / "model.safetensors").stat().st_mtime_ns))
    return out


# ----------------------------------------------------------------------------------------------
# B07, D13, D14, the layout error: one line before anything is built
# ----------------------------------------------------------------------------------------------
def _unwritable(path: Path):
    """Make ``path`` refuse new entries (chmod for a user; root passes permission bits, so chattr +i);
    returns the undo, or None when neither works here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.multiproc
def test_an_unwritable_output_dir_is_one_line(tmp_path):
    """Probe B07: a PermissionError traceback after 13-19 s; now one line, exit 2, in seconds."""
    locked = tmp_path / "ro"
    undo = _unwritable(locked)
    if undo is None:
        pytest.skip("no way to make a directory unwritable here (root without chattr)")
    try:
        probe = locked / "x"
        with pytest.raises(OSError):
            probe.mkdir()  # the directory really refuses new entries
        line = _refused(*SMALL, f"trainer.output_dir={locked / 'run'}")
        assert line == (f"trainer.output_dir={locked / 'run'} is not writable (its parent {locked} takes no "
                        "new directory); choose a writable trainer.output_dir"), line
        line = _refused(*SMALL, f"trainer.output_dir={locked}")
        assert line == f"trainer.output_dir={locked} is not writable; choose a writable trainer.output_dir", line
        assert list(locked.iterdir()) == []
    finally:
        undo()


@pytest.mark.multiproc
def test_a_truncated_safetensors_file_or_a_bad_config_json_is_one_line(tmp_path):
    """Probe D13/D14: a SafetensorError after the model was built; a bad config.json named by its
    directory. Now one line naming the file, exit 2, for the converter and for ``model.hf_path``."""
    from megatron_sdar.models.hf_loader import check_safetensors_files
    from megatron_sdar.models.tiny import build_tiny_qwen

    hf = build_tiny_qwen(tmp_path / "hf", "qwen2", seed=0)
    weights = hf / "model.safetensors"
    assert check_safetensors_files(hf) == [weights]
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    convert = [sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "mg")]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(convert, capture_output=True, text=True, timeout=120, cwd=root, env=_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"convert_checkpoint: error: --hf: {weights} has {size - 1000} bytes where its header describes {size} "
        "(truncated: download or copy it again)"]
    assert not (tmp_path / "mg").exists()
    line = _refused(*SMALL, f"model.hf_path={hf}", f"trainer.output_dir={tmp_path / 'run'}")
    assert line == (f"model.hf_path: {weights} has {size - 1000} bytes where its header describes {size} "
                    "(truncated: download or copy it again)")
    with open(weights, "r+b") as f:
        f.truncate(100)  # shorter than its header
    with pytest.raises(ValueError, match="is truncated: 100 bytes, its header alone needs"):
        check_safetensors_files(hf)
    (hf / "config.json").write_text("{bad json")
    proc = subprocess.run(convert, capture_output=True, text=True, timeout=120, cwd=root, env=_env())
    assert proc.returncode == 2 and f"{hf / 'config.json'} does not parse as JSON" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.multiproc
def test_a_layout_error_comes_before_any_library_notice():
    """Probe: 11 lines of library notices came before the one-line error of ``parallel.tp=2`` on one
    process; now the line is all the job prints."""
    proc = subprocess.run([*TRAIN, "parallel.tp=2"], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megatron-sdar: configuration error: parallel: world size 1 is not divisible by tp*pp*cp = 2*1*1"]
    assert proc.stdout == ""


@pytest.mark.multiproc
def test_a_skipped_checkpoint_is_warned_of_once(tmp_path):
    """Probe B03: the warning that a corrupt checkpoint is skipped was printed twice (a logger record
    and a warning); now once."""
    script = ("from megatron_sdar.checkpoint.resume import find_latest_checkpoint\n"
              f"print(find_latest_checkpoint({str(tmp_path / 'run' / 'checkpoints')!r}))\n")
    _saved_run(tmp_path / "run", [])
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    (ckpt / "shard.distcp").write_bytes(b"x" * 10)
    marker = json.loads((ckpt / "complete.json").read_text())
    marker["files"] = {"shard.distcp": {"bytes": 20, "xxh3_64": "0"}}
    (ckpt / "complete.json").write_text(json.dumps(marker))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.stdout.strip() == "None"
    mentions = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(mentions) == 1 and "shard.distcp has 10 bytes, 20 were written" in mentions[0], proc.stderr


def test_rehearse_says_when_the_given_data_dir_does_not_exist(tmp_path):
    """Probe A24: ``--rehearse`` replaced a missing ``env.kwargs.data_dir`` by the shipped games without
    saying that the given one does not exist."""
    from megatron_sdar.trainer.rehearsal import plan_rehearsal

    def why(data_dir: Path) -> str:
        plan = plan_rehearsal(["experiment=alfworld_qwen2_5_3b", f"+env.kwargs.data_dir={data_dir}",
                               f"trainer.output_dir={tmp_path / 'reh'}"])
        return next(c.why for c in plan.changes if c.key == "env.kwargs.data_dir")

    assert "the given directory does not exist" in why(tmp_path / "no_alfworld")
    (tmp_path / "games").mkdir()
    assert "does not exist" not in why(tmp_path / "games")


# ----------------------------------------------------------------------------------------------
# C02/C04 and B04/B05 end to end: Ctrl-C and a resume at other settings, through the real main job
# ----------------------------------------------------------------------------------------------
def _start(out: Path, *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen([*TRAIN, f"trainer.output_dir={out}", *SMALL, *extra], stdout=log,
                            stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _wait_for(text: str, out: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    log, start = out.parent / f"{out.name}.log", time.monotonic()
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {text!r}: {log}")
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {text!r}")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.slow
@pytest.mark.multiproc
def test_ctrl_c_finishes_the_step_and_a_second_one_exits_at_once(tmp_path):
    """Probe C02/C04: SIGINT gave a KeyboardInterrupt traceback and no checkpoint. Now, as SIGTERM: in
    SFT it stops (SFT keeps no checkpoint), in RL it finishes the step and writes its checkpoint; one
    line, exit 130. A second SIGINT exits at once with one line, also 130. Then a resume at another
    learning rate and preset (probe B04/B05) continues from the checkpoint and names what changed."""
    from megatron_sdar.checkpoint.resume import find_latest_checkpoint

    sft = tmp_path / "sft"
    proc = _start(sft, "trainer.sft_steps=400")
    _wait_for("SFT warm start", sft, proc)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    assert _finish(proc) == 130
    log = (tmp_path / "sft.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "SIGINT received during SFT: stopped without a checkpoint" in log
    assert not (sft / "checkpoints").exists()

    sft_twice = tmp_path / "sft_twice"
    proc = _start(sft_twice, "trainer.sft_steps=400")
    _wait_for("SFT warm start", sft_twice, proc)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # SFT may have stopped already (it polls every 10 steps): the job is then shutting down
    os.killpg(proc.pid, signal.SIGINT)
    assert _finish(proc, timeout=60) == 130
    log = (tmp_path / "sft_twice.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "megatron-sdar: second SIGINT: stopped at once" in log

    rl = tmp_path / "rl"
    proc = _start(rl, "trainer.max_steps=3", "trainer.save_interval=10")
    _wait_for("step 0 (after SFT)", rl, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert _finish(proc) == 130
    log = (tmp_path / "rl.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "SIGINT received: checkpoint written at step 1, exiting" in log
    assert find_latest_checkpoint(rl / "checkpoints").name == "step_00000001"  # not a save_interval step

    twice = tmp_path / "twice"
    proc = _start(twice, "trainer.max_steps=3")
    _wait_for("step 0 (after SFT)", twice, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    assert _finish(proc, timeout=60) == 130
    log = (tmp_path / "twice.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "megatron-sdar: second SIGINT: stopped at once" in log

    proc = _start(rl, "trainer.max_steps=2", "trainer.resume=auto", "algo=grpo", "trainer.lr=5e-4")
    assert _finish(proc) == 0
    log = (tmp_path / "rl.log").read_text()
    assert f"resumed from {rl / 'checkpoints' / 'step_00000001'} at step 1" in log
    changed = next(line for line in log.splitlines() if "changed on resume: " in line)
    assert "algo.name sdar -> grpo" in changed and "trainer.lr 0.001 -> 0.0005" in changed, changed
    rows = [json.loads(line)["step"] for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]
