"""tools/compare_algos.py and tools/sweep.py: end to end on a 1-step budget (one shared SFT start,
variants x seeds, the summary with CIs, the plot; the sweep scored on the validation split), the
refusal of a run directory made with another configuration, and the pieces they share."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
ONE_STEP = [o for o in TINY_RUN_OVERRIDES if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=1"]


def _tool(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / name), *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=timeout)


@pytest.mark.multiproc
@pytest.mark.slow
def test_compare_two_variants_over_two_seeds(tmp_path):
    out = tmp_path / "cmp"
    args = ["--algos", "grpo", "sdar:env.retrieval=random", "--seeds", "0", "1", "--out", str(out), *ONE_STEP]
    proc = _tool("compare_algos.py", *args)
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
    assert random_cfg["trainer"]["eval_split"] == "test"
    table = (out / "summary.md").read_text()
    assert "| grpo | 2 |" in table and "| sdar:env.retrieval=random | 2 |" in table and "minus grpo at step 1" in table
    assert "±" in table
    assert (out / "comparison.png").stat().st_size > 1000

    again = _tool("compare_algos.py", *args, timeout=300)
    assert again.returncode == 0 and again.stdout.count("is complete, kept") == 5, again.stdout[-2000:]
    # the same directories with another budget: refused, naming the key, before anything runs
    stale = _tool("compare_algos.py", *args[:-1], "trainer.max_steps=2", timeout=300)
    errors = [line for line in stale.stderr.splitlines() if "compare_algos" in line]
    assert stale.returncode == 2 and len(errors) == 1 and "trainer.max_steps: 1 -> 2" in errors[0], stale.stderr[-2000:]
    assert "Traceback" not in stale.stderr


@pytest.mark.multiproc
@pytest.mark.slow
def test_sweep_scores_settings_on_the_validation_split(tmp_path):
    out = tmp_path / "sweep"
    proc = _tool("sweep.py", "--grid", "grpo", "trainer.lr=1e-4,3e-4", "--seeds", "5", "--out", str(out), *ONE_STEP)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "sweep.json").read_text())
    settings = ["grpo:trainer.lr=1e-4", "grpo:trainer.lr=3e-4"]
    assert list(result["scores"]["grpo"]) == settings and result["step"] == 1
    assert result["best"]["grpo"] in settings
    for spec in settings:
        run_dir = out / spec.replace(":", "__").replace("=", "-") / "seed5"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["trainer"]["eval_split"] == "validation" and config["trainer"]["lr"] == float(spec[-4:])
        final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        assert result["scores"]["grpo"][spec]["5"] == final["eval/success_rate"]
    # the shared SFT start was evaluated on validation tasks too: nothing of the test split was read
    assert json.loads((out / "sft" / "config.json").read_text())["trainer"]["eval_split"] == "validation"
    table = (out / "sweep.md").read_text()
    assert "validation success at step 1" in table and "**best**" in table and "| grpo | trainer.lr=1e-4 |" in table


def test_a_run_directory_of_another_configuration_is_refused(tmp_path):
    from megatron_sdar.trainer.comparison import MainJobRun, StaleRunError

    run = MainJobRun(tmp_path / "run", ["trainer.max_steps=3", "algo=grpo"])
    assert not run.check_reusable()  # nothing there yet
    run.run_dir.mkdir()
    expected = run.expected_config()
    assert expected["trainer"]["max_steps"] == 3 and expected["algo"]["name"] == "grpo"
    (run.run_dir / "config.json").write_text(json.dumps(expected))
    assert run.check_reusable() and not run.finished()  # the same run, not finished: it would resume
    (run.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval/success_rate": 0.5}) + "\n")
    assert run.finished()
    changed = json.loads(json.dumps(expected))
    changed["trainer"]["lr"] = 0.5
    changed["algo"]["distill_coef"] = 0.3
    changed["trainer"]["resume"] = "auto"  # how it was started: not a difference
    (run.run_dir / "config.json").write_text(json.dumps(changed))
    with pytest.raises(StaleRunError) as info:
        run.check_reusable()
    message = str(info.value)
    assert f"trainer.lr: 0.5 -> {expected['trainer']['lr']}" in message and "algo.distill_coef: 0.3 -> 0.0" in message
    assert "resume" not in message and str(run.run_dir) in message


def test_compare_refuses_a_stale_start_in_one_line(tmp_path):
    out = tmp_path / "cmp"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "config.json").write_text(json.dumps({"trainer": {"max_steps": 0, "lr": 9.0}}))
    proc = _tool("compare_algos.py", "--algos", "grpo", "--seeds", "0", "--out", str(out), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "compare_algos" in line]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("compare_algos: error: ")
    assert "Traceback" not in proc.stderr and "holds a run of another configuration (trainer.lr: 9.0 ->" in errors[0]
    assert not (out / "grpo").exists()


def test_start_rows_come_from_the_sft_run_of_the_same_split(tmp_path):
    from megatron_sdar.trainer.comparison import start_rows

    run = tmp_path / "run"
    (run / "sft_model").mkdir(parents=True)
    rows = [{"step": 0, "eval/success_rate": 0.065, "eval/num_tasks": 200.0, "eval/with_skills/success_rate": 0.87},
            {"step": 6, "eval/success_rate": 0.105, "eval/num_tasks": 200.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"trainer": {"eval_split": "test"}}))
    assert start_rows(run / "sft_model", "test") == [rows[0]]
    assert start_rows(run / "sft_model", "validation") == []  # another split's numbers are not a step 0
    assert start_rows(run / "hf_export", "test") == []  # not an SFT start: no step 0
    assert start_rows(tmp_path / "elsewhere" / "sft_model", "test") == []


def test_sweep_grid_and_choice():
    sys.path.insert(0, str(REPO / "tools"))
    from sweep import best_variant, expand_grid, score_table

    assert expand_grid("grpo", []) == ["grpo"]
    assert expand_grid("sdar", ["algo.distill_coef=0.1,1", "trainer.lr=1e-4,3e-4"]) == [
        "sdar:algo.distill_coef=0.1,trainer.lr=1e-4", "sdar:algo.distill_coef=0.1,trainer.lr=3e-4",
        "sdar:algo.distill_coef=1,trainer.lr=1e-4", "sdar:algo.distill_coef=1,trainer.lr=3e-4"]
    for bad in (["trainer.lr"], ["trainer.lr="], ["trainer.lr=1,2", "trainer.lr=3"]):
        with pytest.raises(ValueError):
            expand_grid("sdar", bad)
    # the highest lower end of the 95% interval wins: steady 0.70 beats 0.90 / 0.05 / 0.90 (mean 0.62)
    # and even a higher mean that collapses on one seed: 0.92 / 0.92 / 0.45 (mean 0.76)
    scores = {"grpo": {"grpo:lr=1": {"0": 0.90, "1": 0.05, "2": 0.90}, "grpo:lr=2": {"0": 0.70, "1": 0.65, "2": 0.75},
                       "grpo:lr=3": {"0": 0.92, "1": 0.92, "2": 0.45}, "grpo:lr=4": {"0": 0.2}}}
    assert best_variant(scores["grpo"]) == "grpo:lr=2"
    assert best_variant({"x:a=1": {"0": 0.3}, "x:a=2": {"0": 0.3}}) == "x:a=1"  # the first among equals
    table = score_table(scores, [0, 1, 2], 12)
    assert "| grpo | lr=2 | 0.700 | 0.650 | 0.750 | 0.700 ± 0.124 | 0.576 | **best** |" in table
    assert "| grpo | lr=4 | 0.200 | - | - | 0.200 | 0.200 |  |" in table


def test_summary_pairs_every_step_by_seed():
    from megatron_sdar.trainer.comparison import summarize

    def rows(*values):
        return [{"step": step, "eval/success_rate": v, "eval/num_tasks": 200.0} for step, v in zip((0, 6, 12), values)]

    summary = {"grpo": {"0": rows(0.2, 0.5, 0.8), "1": rows(0.2, 0.6, 0.8), "2": rows(0.2, 0.4, 0.9)},
               "sdar": {"0": rows(0.2, 0.7, 0.7), "1": rows(0.2, 0.8, 0.9), "2": rows(0.2, 0.6, 0.8)}}
    table = summarize(summary, "grpo")
    assert "| variant | seeds | step 0 | step 6 | step 12 | minus grpo at step 6 | minus grpo at step 12 |" in table
    # step 6: +0.2 on every seed (an interval of zero width excludes 0); step 12: -0.1, +0.1, -0.1
    assert "| sdar | 3 | 0.200 ± 0.000 | 0.700 ± 0.248 | 0.800 ± 0.248 | +0.200 ± 0.000 | -0.033 ± 0.287 (inside the noise) |" \
        in table
    assert "| grpo | 3 | 0.200 ± 0.000 | 0.500 ± 0.248 | 0.833 ± 0.143 | - | - |" in table
