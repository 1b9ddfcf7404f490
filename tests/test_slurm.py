"""The Slurm launcher without Slurm: syntax, the dry run's per-rank commands, job-array selection,
the configuration check before anything is queued (``submit.sh`` with a stand-in ``sbatch`` on PATH)
and the preemption path (USR1 -> forwarded to the step -> checkpoint -> ``scontrol requeue``)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# every test here starts bash (the Slurm scripts) and most of them python
pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])
RECIPE = "alfworld_qwen2_5_7b"


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDAR_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="sdar", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
               SDAR_GPUS_PER_NODE="8", SDAR_OUTPUT_ROOT=str(tmp_path / "out"))
    env.update(extra)
    return env


def _dry_run(tmp_path: Path, *overrides: str, **env: str) -> str:
    proc = subprocess.run(["bash", str(SLURM / "sdar.sbatch"), "--dry-run", *overrides], cwd=tmp_path,
                          env=_env(tmp_path, **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_scripts_parse_with_bash_n():
    assert {p.name for p in SCRIPTS} >= {"sdar.sbatch", "rank_env.sh", "submit.sh"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_srun_dry_run_two_nodes_eight_gpus(tmp_path):
    out = _dry_run(tmp_path, f"experiment={RECIPE}", "algo.distill_coef=0.02")
    rows = re.findall(r"host=(\S+) RANK=(\d+) LOCAL_RANK=(\d+) WORLD_SIZE=(\d+) MASTER_ADDR=(\S+) "
                      r"MASTER_PORT=(\d+) cmd: (.*)", out)
    assert [int(r[1]) for r in rows] == list(range(16))
    for host, rank, local, world, master, port, cmd in rows:
        assert host == ("gpu07" if int(rank) < 8 else "gpu08")
        assert int(local) == int(rank) % 8 and world == "16" and master == "gpu07"
        assert port == str(20000 + 4242)
        assert cmd.startswith("python -m megatron_sdar.train ")
        run_dir = tmp_path / "out" / "sdar-4242"
        assert f"experiment={RECIPE} algo.distill_coef=0.02 trainer.output_dir={run_dir} trainer.resume=auto" in cmd
    # the configuration was checked first, on the job's world size
    assert out.startswith(f"configuration ok: algo=sdar, env=alfworld, model=models/Qwen2.5-7B-Instruct, 16 rank(s), "
                          f"output_dir={tmp_path / 'out' / 'sdar-4242'}\n"), out[:500]
    step = re.search(r"\[dry-run\] step: (.*)", out).group(1)
    assert step.startswith("srun ") and "--nodes=2 --ntasks=16 --ntasks-per-node=8" in step
    assert "rank_env.sh python -m megatron_sdar.train" in step
    assert (tmp_path / "out" / "sdar-4242" / "logs" / "launcher.log").is_file()


def test_torchrun_dry_run_two_nodes_eight_gpus(tmp_path):
    out = _dry_run(tmp_path, f"experiment={RECIPE}", SDAR_LAUNCHER="torchrun")
    nodes = re.findall(r"host=(\S+) node_rank=(\d) MASTER_ADDR=(\S+) MASTER_PORT=\d+ cmd: (.*)", out)
    assert [(h, n) for h, n, _, _ in nodes] == [("gpu07", "0"), ("gpu08", "1")]
    for _, node_rank, master, cmd in nodes:
        assert master == "gpu07"
        assert cmd.startswith("torchrun --nnodes=2 --nproc-per-node=8 ")
        assert f"--node-rank={node_rank} --master-addr=gpu07 --master-port=24242" in cmd
        assert "SIGUSR1" in cmd and f"-m megatron_sdar.train experiment={RECIPE}" in cmd
    workers = re.findall(r"host=(\S+) torchrun worker RANK=(\d+) LOCAL_RANK=(\d+) WORLD_SIZE=16", out)
    assert [int(r) for _, r, _ in workers] == list(range(16))
    assert all(int(lr) == int(r) % 8 and h == ("gpu07" if int(r) < 8 else "gpu08") for h, r, lr in workers)
    step = re.search(r"\[dry-run\] step: (.*)", out).group(1)
    assert "--ntasks=2 --ntasks-per-node=1" in step and "--node-rank=$NODE_RANK" in step


def test_container_options_and_nodelist_expansion(tmp_path):
    out = _dry_run(tmp_path, SLURM_JOB_NODELIST="a[1-2,09],b3", SLURM_NNODES="4", SDAR_GPUS_PER_NODE="1",
                   SDAR_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3", SDAR_CONTAINER_MOUNTS="/data:/data")
    hosts = re.findall(r"host=(\S+) RANK=", out)
    assert hosts == ["a1", "a2", "a09", "b3"]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in out and "--container-mounts=/data:/data" in out


def test_job_array_selects_sweep_line(tmp_path):
    sweep = SLURM / "sweeps" / "seeds.txt"
    out = _dry_run(tmp_path, f"experiment={RECIPE}", SDAR_SWEEP=str(sweep), SLURM_ARRAY_JOB_ID="900",
                   SLURM_ARRAY_TASK_ID="4", SLURM_JOB_ID="905")
    cmd = re.search(r"RANK=0 .* cmd: (.*)", out).group(1)
    assert f"experiment={RECIPE} algo=grpo trainer.seed=1 trainer.output_dir=" in cmd
    assert "sdar-900_4" in cmd  # run dir keyed by array job and task
    proc = subprocess.run(["bash", str(SLURM / "sdar.sbatch"), "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, env=_env(tmp_path, SDAR_SWEEP=str(sweep), SLURM_ARRAY_TASK_ID="6"))
    assert proc.returncode == 2 and "has 6 entries" in proc.stderr


def test_submit_reads_recipe_slurm_block(tmp_path):
    proc = subprocess.run(["bash", str(SLURM / "submit.sh"), "--array=0-1", "--", "experiment=alfworld_qwen2_5_72b"],
                          env=dict(os.environ, SDAR_DRY_RUN="1"), capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=8 --gpus-per-node=8 --ntasks-per-node=8 --time=72:00:00 --array=0-1" in proc.stdout
    bad = subprocess.run(["bash", str(SLURM / "submit.sh"), "experiment=nope"], capture_output=True, text=True,
                         env=dict(os.environ, SDAR_DRY_RUN="1"))
    assert bad.returncode == 2 and "no recipe" in bad.stderr


def _fake_sbatch(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose PATH starts with a stand-in ``sbatch`` that records its arguments (one a
    line) in the returned file, and a fresh working directory for ``logs/``."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch.args"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {record}\necho 'Submitted batch job 7'\n")
    (bin_dir / "sbatch").chmod(0o755)
    (tmp_path / "cwd").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDAR_", "WORLD_SIZE"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, record


def _submit(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / "submit.sh"), *args], cwd=tmp_path / "cwd", env=env,
                          capture_output=True, text=True, timeout=120)


def test_submit_refuses_a_misspelt_key_before_anything_is_queued(tmp_path):
    """Probe S03: a misspelt key is the trainer's one line and exit 2, on the login node: sbatch is not
    called (nor its command printed in a dry run), and no folder is written."""
    env, record = _fake_sbatch(tmp_path)
    proc = _submit(tmp_path, {**env, "SDAR_DRY_RUN": "1"}, f"experiment={RECIPE}", "trainer.max_stpes=5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "megatron-sdar: configuration error: trainer.max_stpes is not a configuration key; did you mean "
        "trainer.max_steps? (the keys are those of the YAML groups in megatron_sdar/config)"]
    assert "sbatch" not in proc.stdout and not record.exists() and list((tmp_path / "cwd").iterdir()) == []


def test_submit_without_sbatch_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDAR_"))}
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "sbatch").exists())
    (tmp_path / "cwd").mkdir()
    proc = _submit(tmp_path, env, f"experiment={RECIPE}")
    assert proc.returncode == 127 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "submit.sh: sbatch is not on PATH: submit from a Slurm login node (SDAR_DRY_RUN=1 checks the configuration "
        "and prints the sbatch command instead); nothing was submitted"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_submit_queues_a_checked_configuration(tmp_path):
    """A configuration the trainer accepts (on the world size the sbatch options give: --nodes=2 after
    the recipe's 1 node x 8 GPUs) is handed to sbatch with the recipe's geometry and the options."""
    env, record = _fake_sbatch(tmp_path)
    proc = _submit(tmp_path, env, "--nodes=2", "--array=0-1", "--", f"experiment={RECIPE}", "trainer.max_steps=5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cwd = tmp_path / "cwd"
    assert proc.stdout.splitlines() == [
        f"configuration ok: algo=sdar, env=alfworld, model=models/Qwen2.5-7B-Instruct, 16 rank(s), "
        f"output_dir={cwd / 'outputs' / f'sdar-{RECIPE}-%j'}", "Submitted batch job 7"]
    assert record.read_text().splitlines() == [
        f"--job-name=sdar-{RECIPE}", "--nodes=1", "--gpus-per-node=8", "--ntasks-per-node=8", "--time=36:00:00",
        "--nodes=2", "--array=0-1", str(SLURM / "sdar.sbatch"), f"experiment={RECIPE}", "trainer.max_steps=5"]


def test_submit_checks_every_line_of_a_sweep(tmp_path):
    """With SDAR_SWEEP each array task adds one line: every line is checked; the refused one is named.
    A sweep without a job array is refused at once."""
    env, record = _fake_sbatch(tmp_path)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two tasks\nalgo=grpo trainer.seed=1\n\nalgo=grpo trainer.sed=2\n")
    proc = _submit(tmp_path, {**env, "SDAR_SWEEP": str(sweep)}, "--array=0-1", "--", f"experiment={RECIPE}")
    assert proc.returncode == 2 and proc.stdout.startswith("SDAR_SWEEP entry 0 (algo=grpo trainer.seed=1): "
                                                           "configuration ok: algo=grpo,"), proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "SDAR_SWEEP entry 1 (algo=grpo trainer.sed=2): megatron-sdar: configuration error: trainer.sed is not a "
        "configuration key; did you mean trainer.seed? (the keys are those of the YAML groups in megatron_sdar/config)"]
    assert not record.exists() and list((tmp_path / "cwd").iterdir()) == []
    no_array = _submit(tmp_path, {**env, "SDAR_SWEEP": str(sweep)}, f"experiment={RECIPE}")
    assert no_array.returncode == 2 and "SDAR_SWEEP needs a job array" in no_array.stderr and not record.exists()


def test_dry_run_refuses_a_misspelt_key_before_printing_the_ranks(tmp_path):
    proc = subprocess.run(["bash", str(SLURM / "sdar.sbatch"), "--dry-run", f"experiment={RECIPE}", "trainer.max_stpes=5"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("megatron-sdar: configuration error: trainer.max_stpes is not a configuration key")
    assert not (tmp_path / "out").exists()  # no run directory, no launcher.log


def test_submit_rehearse_runs_the_rehearsal_locally(tmp_path):
    """``submit.sh --rehearse`` hands the recipe to ``python -m megatron_sdar.train --rehearse`` here
    (no sbatch): the trainer's own refusal of a recipe-less rehearsal comes back, exit 2 (the whole
    rehearsal runs in tests/test_rehearsal.py)."""
    proc = subprocess.run(["bash", str(SLURM / "submit.sh"), "--rehearse", "trainer.max_steps=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "megatron-sdar: configuration error: --rehearse rehearses a recipe: pass experiment=<name> "
        "(megatron_sdar/config/experiment/)")


# A stand-in for the trainer's preemption contract (finish the step, checkpoint, exit 0 on
# SIGUSR1/SIGTERM): a process that starts in milliseconds, so every signal path of the script is
# checked quickly; test_usr1_with_the_real_trainer runs the same path with megatron_sdar.train.
STAND_IN = r"""
import os, signal, sys, time
from pathlib import Path
run = Path(os.environ["SDAR_RUN_DIR"])
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
(run / "stand_in.ready").write_text("ready")
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)                      # "training steps"
if not got:
    sys.exit(3)
time.sleep(0.3)                           # finish the current step
ckpt = run / "checkpoints" / "iter_0000007"
ckpt.mkdir(parents=True)
(ckpt / "done").write_text("ok")
print("stand-in: checkpoint written after signal", got[0], flush=True)
sys.exit(0)
"""


@pytest.mark.parametrize("sig, requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["usr1", "term"])
def test_signal_forwarded_checkpoint_then_requeue(tmp_path, sig, requeue):
    """The sbatch script runs in dry-run mode with a real (stand-in) training step process. USR1
    (time limit near) must be forwarded, the checkpoint awaited, then ``scontrol requeue <jobid>``
    issued (logged, not executed, in dry-run); TERM (cancel) checkpoints without requeueing."""
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    env = _env(tmp_path, SDAR_DRY_RUN_STEP=f"{sys.executable} {stand_in}", SLURM_JOB_NODELIST="n1",
               SLURM_NNODES="1", SDAR_GPUS_PER_NODE="2")
    proc = subprocess.Popen(["bash", str(SLURM / "sdar.sbatch"), "--dry-run", f"experiment={RECIPE}"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_dir = tmp_path / "out" / "sdar-4242"
    try:
        deadline = time.time() + 30
        while not (run_dir / "stand_in.ready").exists():
            assert proc.poll() is None and time.time() < deadline, "the stand-in step never started"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    log = (run_dir / "logs" / "launcher.log").read_text()
    name = sig.name
    events = [f"received {name}; forwarding it to the training step", "training step exited with status 0",
              f"checkpoint written: {run_dir}/checkpoints/iter_0000007"]
    if requeue:
        events.append("[dry-run] would run: scontrol requeue 4242")
    else:
        events.append("not requeueing")
        assert "scontrol requeue" not in log
    positions = [log.find(e) for e in events]
    assert all(p >= 0 for p in positions), (events, log)
    assert positions == sorted(positions), log
    assert "stand-in: checkpoint written after signal" in out


def _signal_once(cmd: list[str], cwd, env: dict, console: Path, sig: int, ready, wait: float) -> str:
    """Start ``cmd`` (its output into ``console``: a pipe would fill with progress bars), send ``sig``
    once ``ready()`` holds (within 5 minutes), assert it exits 0 within ``wait`` seconds; its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=console.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ready():
            assert proc.poll() is None and time.time() < deadline, console.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, sig)
        proc.wait(timeout=wait)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = console.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.multiproc
def test_usr1_with_the_real_trainer(tmp_path):
    """The real main job (tiny model, CPU) as the dry-run training step: USR1 to the job script ->
    forwarded -> the trainer finishes its step, checkpoints, exits 0 -> requeue is issued."""
    from megatron_sdar.testing import TINY_RUN_OVERRIDES

    run_dir = tmp_path / "out" / "sdar-4242"
    step = " ".join([sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={run_dir}",
                     *TINY_RUN_OVERRIDES, "trainer.max_steps=50"])
    env = _env(tmp_path, SDAR_DRY_RUN_STEP=step, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SDAR_GPUS_PER_NODE="1",
               OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    console = tmp_path / "console.log"
    metrics = run_dir / "metrics.jsonl"
    out = _signal_once(["bash", str(SLURM / "sdar.sbatch"), "--dry-run"], tmp_path, env, console, signal.SIGUSR1,
                       lambda: metrics.exists() and '"step": 1,' in metrics.read_text(), wait=300)
    log = (run_dir / "logs" / "launcher.log").read_text()
    events = ["received SIGUSR1; forwarding it to the training step", "training step exited with status 0",
              f"checkpoint written: {run_dir}/checkpoints/step_", "[dry-run] would run: scontrol requeue 4242"]
    positions = [log.find(e) for e in events]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), log
    assert "SIGUSR1 received: checkpoint written at step" in out


@pytest.mark.multiproc
def test_signal_during_sft_stops_the_real_trainer(tmp_path):
    """SIGTERM while the SFT warm start runs: the trainer stops within ten SFT steps and exits 0,
    saying that nothing was checkpointed; a run with trainer.resume=auto may start again."""
    from megatron_sdar.testing import TINY_RUN_OVERRIDES

    run_dir = tmp_path / "out"
    console = tmp_path / "console.log"
    cmd = [sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={run_dir}", *TINY_RUN_OVERRIDES,
           "trainer.sft_steps=100000"]
    sft_log = run_dir / "sft_metrics.jsonl"
    out = _signal_once(cmd, ROOT, {**os.environ, "OMP_NUM_THREADS": "2"}, console, signal.SIGTERM,  # once SFT
                       lambda: sft_log.exists() and sft_log.read_text().count("\n") >= 2, wait=120)  # steps 0, 10 ran
    assert "SIGTERM received during SFT: stopped without a checkpoint" in out, out[-3000:]
    sft_steps = [json.loads(line)["sft_step"] for line in sft_log.read_text().splitlines()]
    assert 10 <= sft_steps[-1] < 100, sft_steps  # stopped at the next poll, far from the 100,000 steps
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "sft_model").exists()
