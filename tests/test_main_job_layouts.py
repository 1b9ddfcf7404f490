"""The main job itself at the recipes' layouts: ``torchrun --nproc-per-node 2 -m megatron_sdar.train``
with TP=2 + sequence parallelism, PP=2 x VPP=2 and full recomputation (at DP=2) logs the same
step-1 loss, grad norm and gate metrics as one process (tiny model, real vLLM, household world);
a run saved at DP=2 with the distributed optimizer resumes at TP=2, one saved at TP=2 at PP=2, and
each logs the uninterrupted run's step 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES

LAYOUTS = {
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "dp2_recompute_full": ["parallel.recompute=full"],
}
COMPARED = ["actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "sdar/gate_mean", "sdar/gap_mean",
            "sdar/distill_loss", "rollout/success_rate", "rollout/reward_mean"]


def _run(out: Path, model_dir: Path, nproc: int, extra: list[str], step: int = 1) -> dict:
    overrides = [*TINY_RUN_OVERRIDES, "trainer.max_steps=1", "trainer.eval_tasks=0", "trainer.save_interval=1",
                 "rollout.tasks_per_step=2", f"model.hf_path={model_dir}", f"trainer.output_dir={out}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        command = [sys.executable, "-m", "megatron_sdar.train", *overrides]
    else:
        port = str(29700 + os.getpid() % 200)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", port, "-m", "megatron_sdar.train", *overrides]
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    assert code == 0, f"{out.name} exited {code}; log: {log}\n" + log.read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == step)


@pytest.mark.multiproc
@pytest.mark.slow
def test_main_job_at_recipe_layouts_equals_one_process(tmp_path):
    model_dir = _model(tmp_path)  # 4 layers: PP=2 x VPP=2 needs one layer per virtual stage
    reference = _run(tmp_path / "one", model_dir, 1, [])
    assert reference["actor/grad_norm"] > 0 and 0 < reference["sdar/gate_mean"] < 1
    for name, extra in LAYOUTS.items():
        got = _run(tmp_path / name, model_dir, 2, extra)
        for key in COMPARED:
            want = reference[key]
            assert abs(got[key] - want) <= 1e-4 * max(1.0, abs(want)), f"{name} {key}: {got[key]} vs {want}"


def _model(tmp_path: Path) -> Path:
    from megatron_sdar.models.tiny import build_tiny_qwen

    return build_tiny_qwen(tmp_path / "model", "qwen2", num_hidden_layers=4, hidden_size=128,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)


RESUME_COMPARED = [*COMPARED, "actor/kl_ref", "actor/lr", "rollout/response_tokens"]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("saved_at,resumed_at", [
    (["parallel.distributed_optimizer=true"], ["parallel.distributed_optimizer=true", "parallel.tp=2"]),
    (["parallel.distributed_optimizer=true", "parallel.tp=2"], ["parallel.distributed_optimizer=true", "parallel.pp=2"]),
], ids=["dp2_to_tp2", "tp2_to_pp2"])
def test_main_job_resumes_at_another_layout(tmp_path, saved_at, resumed_at):
    """Two steps straight, checkpoint after each; then ``trainer.resume=<step 1>`` at the other layout
    (a new output directory) takes step 2: the same rollouts (seeded by step) and the same update."""
    model_dir = _model(tmp_path)
    straight = _run(tmp_path / "straight", model_dir, 2, [*saved_at, "trainer.max_steps=2"], step=2)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_00000001"
    resumed = _run(tmp_path / "resumed", model_dir, 2,
                   [*resumed_at, "trainer.max_steps=2", f"trainer.resume={checkpoint}"], step=2)
    assert straight["actor/grad_norm"] > 0
    for key in RESUME_COMPARED:
        want = straight[key]
        assert abs(resumed[key] - want) <= 1e-5 * max(1.0, abs(want)), f"{key}: {resumed[key]} vs {want}"
