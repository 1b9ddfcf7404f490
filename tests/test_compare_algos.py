"""tools/compare_algos.py end to end on a 1-step budget: one shared SFT start, two variants (one
with an override) x two seeds, the summary, the markdown table with CIs and the plot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
@pytest.mark.slow
def test_compare_two_variants_over_two_seeds(tmp_path):
    out = tmp_path / "cmp"
    overrides = [o for o in TINY_RUN_OVERRIDES if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=1"]
    command = [sys.executable, str(REPO / "tools" / "compare_algos.py"), "--algos", "grpo", "sdar:env.retrieval=random",
               "--seeds", "0", "1", "--out", str(out), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["grpo", "sdar:env.retrieval=random"]
    for variant, runs in summary.items():
        assert sorted(runs) == ["0", "1"]
        for seed, rows in runs.items():
            assert [r["step"] for r in rows] == [0, 1], (variant, seed, rows)
            assert all(0.0 <= r["eval/success_rate"] <= 1.0 and r["eval/num_tasks"] == 2 for r in rows)
            assert "eval/with_skills/success_rate" in rows[0]  # the shared start's teacher edge
            assert rows[0] == summary["grpo"]["0"][0]  # every run starts from the same SFT model
    # the variant's override reached its runs, and each seed is its own run from the shared start
    random_cfg = json.loads((out / "sdar__env.retrieval-random" / "seed1" / "config.json").read_text())
    assert random_cfg["env"]["retrieval"] == "random" and random_cfg["trainer"]["seed"] == 1
    assert random_cfg["model"]["hf_path"] == str(out / "sft" / "sft_model") and random_cfg["algo"]["name"] == "sdar"
    table = (out / "summary.md").read_text()
    assert "| grpo | 2 |" in table and "| sdar:env.retrieval=random | 2 |" in table and "minus grpo at step 1" in table
    assert "±" in table
    assert (out / "comparison.png").stat().st_size > 1000

    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
    assert again.returncode == 0 and again.stdout.count("is complete, kept") == 5, again.stdout[-2000:]


def test_init_from_a_runs_sft_model_reuses_its_step0_evaluation(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from compare_algos import init_start_rows

    run = tmp_path / "run"
    (run / "sft_model").mkdir(parents=True)
    rows = [{"step": 0, "eval/success_rate": 0.065, "eval/num_tasks": 200.0, "eval/with_skills/success_rate": 0.87},
            {"step": 6, "eval/success_rate": 0.105, "eval/num_tasks": 200.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert init_start_rows(run / "sft_model") == [rows[0]]
    assert init_start_rows(run / "hf_export") == []  # not an SFT start: no step 0
    assert init_start_rows(tmp_path / "elsewhere" / "sft_model") == []
