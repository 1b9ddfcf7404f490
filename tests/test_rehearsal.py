"""``python -m megatron_sdar.train experiment=<recipe> --rehearse``: every recipe end to end on two CPU
processes (a tiny model of its family, its layout features at size 2, rollout TP 2 where the recipe's
is at least 2, two RL steps, test-split evaluation, checkpoint, resume at the second layout, HF
export), and what the rehearsal changes in each recipe."""
import json
import os
import subprocess
import sys

import pytest

from megatron_sdar.trainer.rehearsal import LOGPROB_BOUND, plan_rehearsal
from tests.recipes import recipe_names

#: the layout features each recipe's rehearsal runs, phase 1 then phase 2 (tp, pp, vpp, ep, sp)
EXPECTED_LAYOUTS = {
    "alfworld_qwen2_5_72b": [(2, 1, None, 1, True), (1, 2, 2, 1, False)],
    "alfworld_qwen3_30b_a3b": [(1, 1, None, 2, False), (1, 1, None, 2, False)],  # + a note: PP not rehearsed
}


def _layout(values: dict) -> tuple:
    return values["tp"], values["pp"], values["vpp"], values["ep"], values["sequence_parallel"]


@pytest.mark.parametrize("recipe", recipe_names())
def test_rehearsal_plan_of_every_recipe(recipe, tmp_path):
    """The rehearsal keeps the recipe but for the model, the sizes, the data and the layout sizes: its
    layout features (TP with SP, PP with VPP, EP) at size 2, rollout TP 2 where the recipe's is >= 2,
    the recipe's tied embeddings and family; both phases compose into valid configurations."""
    from megatron_sdar.config.schema import compose_run

    recipe_run = compose_run([f"experiment={recipe}"], need_files=False)
    plan = plan_rehearsal([f"experiment={recipe}", f"trainer.output_dir={tmp_path / 'out'}"])
    changed = {c.key: c.rehearsal for c in plan.changes}
    assert changed["model.hf_path"] is None and changed["model.dtype"] == "float32"
    assert changed["model.tiny"]["tie_embeddings"] == recipe_run.model.architecture["tie_word_embeddings"]
    assert changed.get("rollout.tp", recipe_run.rollout.tp) == (2 if recipe_run.rollout.tp >= 2 else 1)
    assert plan.rollout_tp == (2 if recipe_run.rollout.tp >= 2 else 1)
    # nothing of the algorithm, the rollout's formats or the learning rate is touched
    assert not [k for k in changed if k.startswith("algo.") or k in (
        "trainer.lr", "rollout.action_format", "rollout.context_position", "rollout.history_window",
        "rollout.temperature", "rollout.max_prompt_tokens", "trainer.micro_batch_size")]
    p = recipe_run.parallel
    features = {("tp" if lay["tp"] > 1 else "pp" if lay["pp"] > 1 else "ep" if lay["ep"] > 1 else "dp")
                for lay in plan.layouts}
    wanted = ({"tp"} if p.tp > 1 else set()) | ({"pp"} if p.pp > 1 else set()) | ({"ep"} if p.ep > 1 else set())
    if p.ep > 1 and len(wanted) > 1:  # MoE: EP in both phases, the other feature named as not rehearsed
        assert features == {"ep"} and len(plan.notes) == 1 and "PP=2 is not rehearsed" in plan.notes[0]
    else:
        assert features == (wanted or {"dp"}) and not plan.notes
    if recipe in EXPECTED_LAYOUTS:
        assert [_layout(lay) for lay in plan.layouts] == EXPECTED_LAYOUTS[recipe]
    for phase in (1, 2):
        run = compose_run(plan.phase_overrides(phase))
        assert run.model.arch == recipe_run.model.arch and run.trainer.max_steps == phase
        assert run.parallel.distributed_optimizer == p.distributed_optimizer
        assert run.parallel.recompute == p.recompute
        assert run.algo == recipe_run.algo and run.trainer.eval_split == "test"
        assert run.trainer.export_hf == (phase == 2)


def test_rehearsal_refuses_a_directory_that_is_not_a_rehearsal(tmp_path, capsys):
    from megatron_sdar.train import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert main(["experiment=webshop_qwen2_5_3b", "--rehearse", f"trainer.output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megatron-sdar: configuration error: --rehearse: trainer.output_dir={run_dir} holds files that "
                   "are not a rehearsal's; choose another trainer.output_dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert main(["experiment=webshop_qwen2_5_3b", "--rehearse", "--dry-run"]) == 2
    assert main(["--rehearse"]) == 2  # no recipe
    assert "pass experiment=<name>" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("recipe", recipe_names())
def test_rehearsal_of_every_recipe_passes(recipe, tmp_path):
    """The whole rehearsal, as a user runs it. With the SDAR release's skill sets at hand (CI keeps
    them), the recipe's own skill set is used, as on a cluster."""
    env = dict(os.environ)
    reference = os.environ.get("MEGATRON_SDAR_REFERENCE_SKILLS")
    if reference:
        env["SDAR_SKILLS_DIR"] = reference
    out = tmp_path / "rehearsal"
    proc = subprocess.run([sys.executable, "-m", "megatron_sdar.train", f"experiment={recipe}", "--rehearse",
                           f"trainer.output_dir={out}"], capture_output=True, text=True, env=env, timeout=1500)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, "\n".join(lines[-20:]) + proc.stderr[-3000:]
    assert lines[-1].startswith(f"rehearsal passed: {recipe} in "), lines[-1]
    assert "recipe -> rehearsal" in proc.stdout and "model.hf_path" in proc.stdout
    record = json.loads((out / "rehearsal.json").read_text())
    found = record["found"]
    plan = plan_rehearsal([f"experiment={recipe}", f"trainer.output_dir={out}"])
    assert record["status"] == "passed" and found["eval"]["split"] == "test"
    for step in ("step1", "step2"):
        assert found[step]["rollout/train_infer_logprob_diff_max"] <= LOGPROB_BOUND
        assert found[step]["rollout/weight_sync_bytes"] > 0 and found[step]["rollout/episodes"] == 4
    assert {k: found["resumed_layout"][k] for k in plan.layouts[1]} == plan.layouts[1]
    assert sorted(found["checkpoints"]) == [1, 2]
    if reference:  # the release's skills were used, not the shipped sample
        assert not any(c["key"] == "env.skills_dir" for c in record["changes"])
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["hf_path"] is None and (out / "base_model" / "config.json").is_file()  # the tiny model
