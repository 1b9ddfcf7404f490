"""tools/compare_algos.py and tools/sweep.py: end to end on a 1-step budget (one shared SFT start,
variants x seeds, the summary with CIs, the plot; the sweep scored on the validation split), the
checks made before anything runs (every run's configuration, the settings the tools set
themselves), the refusal of a run directory made with another configuration, and the pieces they
share."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sdar.testing import TINY_RUN_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
# the shared SFT start is sized by --sft-steps; the overrides of every run are the variants' budget
SFT_STEPS = next(o for o in TINY_RUN_OVERRIDES if o.startswith("trainer.sft_steps=")).partition("=")[2]
ONE_STEP = [o for o in TINY_RUN_OVERRIDES if not o.startswith(("trainer.max_steps", "trainer.sft_steps"))] + [
    "trainer.max_steps=1"]


def _tool(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / name), *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=timeout)


@pytest.mark.multiproc
@pytest.mark.slow
def test_compare_two_variants_over_two_seeds(tmp_path):
    out = tmp_path / "cmp"
    args = ["--algos", "grpo", "sdar:env.retrieval=random", "--seeds", "0", "1", "--out", str(out),
            "--sft-steps", SFT_STEPS, *ONE_STEP]
    proc = _tool("compare_algos.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("SFT warm start") == 1  # the shared start's, no variant's

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
    assert random_cfg["trainer"]["eval_split"] == "test" and random_cfg["trainer"]["sft_steps"] == 0
    sft_cfg = json.loads((out / "sft" / "config.json").read_text())["trainer"]
    assert sft_cfg["max_steps"] == 0 and sft_cfg["sft_steps"] == int(SFT_STEPS)  # no RL step in the shared start
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
    proc = _tool("sweep.py", "--grid", "grpo", "trainer.lr=1e-4,3e-4", "--seeds", "5", "--out", str(out),
                 "--sft-steps", SFT_STEPS, *ONE_STEP)
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


@pytest.mark.multiproc
def test_compare_refuses_a_stale_start_in_one_line(tmp_path):
    out = tmp_path / "cmp"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "config.json").write_text(json.dumps({"trainer": {"max_steps": 0, "lr": 9.0}}))
    proc = _tool("compare_algos.py", "--algos", "grpo", "--seeds", "0", "--out", str(out), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "compare_algos" in line]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("compare_algos: error: ")
    assert "Traceback" not in proc.stderr and "holds a run of another configuration (trainer.lr: 9.0 ->" in errors[0]
    assert not (out / "grpo").exists()


def _main(tool: str):
    """The ``main`` of ``tools/<tool>.py``, imported here (in this process: nothing is launched
    unless the tool starts a run of the main job)."""
    spec = importlib.util.spec_from_file_location(f"tools_{tool}", REPO / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class Launched(Exception):
    """A tool started a run of the main job."""


@pytest.fixture
def launches(monkeypatch):
    """The commands the tools start (the subprocess boundary): each is recorded and stops the tool."""
    commands = []

    def launch(command, **kwargs):
        commands.append(command)
        raise Launched(" ".join(command[1:]))

    monkeypatch.setattr("megatron_sdar.trainer.comparison.subprocess.run", launch)
    return commands


# (tool, options, overrides of every run, what the one line says): each refused before anything runs
REFUSED = [
    # probe T02: a typo in a variant's override, found only after the shared SFT and the grpo run had run
    ("compare_algos", ["--algos", "grpo", "sdar:algo.distil_coef=1", "--seeds", "0", "--sft-steps", "2"],
     ["trainer.max_steps=1", "trainer.eval_tasks=2", "rollout.tasks_per_step=2", "rollout.group_size=2"],
     "algo.distil_coef is not a configuration key"),
    ("compare_algos", ["--algos", "grpo", "sdar:trainer.lr=-1"], [], "trainer.lr must be > 0, got -1.0"),
    ("compare_algos", [], ["rollout.group_size=0"], "rollout.group_size must be >= 1, got 0"),
    # probe T03: global settings the comparison sets itself, each naming the tool's own option
    ("compare_algos", [], ["trainer.sft_steps=2", "trainer.max_steps=1"],
     "trainer.sft_steps=2 (an override of every run): the comparison sets trainer.sft_steps itself; --sft-steps 2 "
     "sizes the shared SFT run"),
    ("compare_algos", ["--algos", "grpo", "sdar:trainer.sft_steps=5"], [],
     "trainer.sft_steps=5 (variant sdar:trainer.sft_steps=5): the comparison sets trainer.sft_steps itself; "
     "--sft-steps 5"),
    ("compare_algos", [], ["trainer.seed=3"], "--seeds 3 sets the variants' seeds, --sft-seed 3 the shared SFT run's"),
    ("compare_algos", [], ["+trainer.seed=3"], "--seeds 3 sets the variants' seeds"),
    ("compare_algos", [], ["model.hf_path=some/model"], "--init some/model is the start every run takes"),
    ("compare_algos", [], ["trainer.eval_split=validation"],
     "the comparison sets trainer.eval_split itself; --split validation chooses it"),
    ("compare_algos", [], ["trainer.output_dir=elsewhere"], "--out elsewhere holds every run"),
    ("compare_algos", [], ["algo=sdar"], "--algos sdar[:key=value,...] names each variant's preset"),
    ("compare_algos", [], ["trainer.resume=auto"], "an unfinished run resumes by itself"),
    # the shared start must be made, and every run evaluated
    ("compare_algos", ["--sft-steps", "0"], [], "the shared SFT run would make no start (trainer.sft_steps=0)"),
    ("compare_algos", ["--init", "no/such/model"], [], "model.hf_path='no/such/model' has no config.json"),
    ("compare_algos", [], ["trainer.eval_tasks=0"], "trainer.eval_tasks=0: a comparison scores held-out success"),
    # probe T04: the sweep's grid, which ran the shared SFT first without --init
    ("sweep", ["--grid", "grpo", "trainer.lrr=1e-3,3e-4", "--seeds", "0"], ["trainer.max_steps=1"],
     "trainer.lrr is not a configuration key"),
    ("sweep", ["--grid", "grpo", "trainer.lr=1e-3"], ["trainer.eval_split=test"],
     "trainer.eval_split=test (an override of every run): the comparison sets trainer.eval_split itself; the sweep "
     "scores the validation split (tools/compare_algos.py --split test reports the test split)"),
    ("sweep", ["--grid", "grpo", "trainer.seed=1,2"], [], "trainer.seed=1 (variant grpo:trainer.seed=1)"),
    ("sweep", ["--grid", "grpo", "trainer.lr=1e-3"], ["trainer.sft_steps=4"],
     "trainer.sft_steps=4 (an override of every run): the comparison sets trainer.sft_steps itself; --sft-steps 4"),
]


@pytest.mark.parametrize("tool, options, overrides, expected", REFUSED,
                         ids=[f"{t}-{' '.join(o + g)[:50]}" for t, o, g, _ in REFUSED])
def test_a_configuration_error_is_one_line_before_anything_runs(tmp_path, capsys, launches, tool, options, overrides,
                                                                 expected):
    out = tmp_path / "out"
    start = time.monotonic()
    code = _main(tool)([*options, "--out", str(out), *overrides])
    seconds = time.monotonic() - start
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert code == 2 and len(errors) == 1, captured.err
    assert errors[0].startswith(f"{tool}: configuration error: ") and expected in errors[0], errors[0]
    assert launches == [] and not out.exists() and seconds < 30


@pytest.mark.multiproc
def test_the_probe_command_is_refused_at_once(tmp_path):
    """Probe T02 as given (a global trainer.sft_steps, a misspelt variant key): exit 2 in seconds with
    one line, no run directory; the same with --sft-steps names the misspelt key."""
    tiny = ["trainer.max_steps=1", "trainer.eval_tasks=2", "rollout.tasks_per_step=2", "rollout.group_size=2"]
    out = tmp_path / "cmp1"
    for args, expected in ((["trainer.sft_steps=2", *tiny], "--sft-steps 2 sizes the shared SFT run"),
                           (["--sft-steps", "2", *tiny], "algo.distil_coef is not a configuration key; did you mean "
                                                         "algo.distill_coef?")):
        start = time.monotonic()
        proc = _tool("compare_algos.py", "--algos", "grpo", "sdar:algo.distil_coef=1", "--seeds", "0", "--out", str(out),
                     *args, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if "compare_algos" in line]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
        assert errors[0].startswith("compare_algos: configuration error: ") and "Traceback" not in proc.stderr
        assert not out.exists() and time.monotonic() - start < 60 and "[compare] -m megatron_sdar" not in proc.stdout


def test_the_shared_start_trains_no_rl_step_and_the_variants_no_sft(tmp_path, capsys, launches):
    """A global trainer.max_steps is the variants' RL budget: the shared SFT run, launched first once
    every run is checked, trains none (max_steps=0 after the overrides) for --sft-steps; each variant
    starts from its model with trainer.sft_steps=0 and the seed of --seeds."""
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.trainer.comparison import Comparison

    out = tmp_path / "cmp"
    with pytest.raises(Launched):
        _main("compare_algos")(["--algos", "grpo", "sdar", "--seeds", "0", "1", "--sft-steps", "3", "--out", str(out),
                                "trainer.max_steps=1", "trainer.eval_tasks=2"])
    assert "the configuration of 6 runs checked" in capsys.readouterr().out  # SFT, start, 2 x 2 variants
    [sft] = launches
    assert sft[3] == f"trainer.output_dir={out / 'sft'}"
    config = compose_run(sft[3:]).trainer
    assert (config.max_steps, config.sft_steps, config.seed, config.eval_split) == (0, 3, 0, "test")

    comparison = Comparison(out, ["sdar"], [1], ["trainer.max_steps=1"], "test", sft_steps=3)
    run = comparison.variant_run("sdar", 1)
    assert run.overrides[-4:] == [f"model.hf_path={out / 'sft' / 'sft_model'}", "trainer.sft_steps=0",
                                  "trainer.seed=1", "trainer.eval_split=test"]
    variant = run.configuration(start_pending=comparison.start).trainer  # the start is not made yet
    assert (variant.max_steps, variant.sft_steps, variant.seed) == (1, 0, 1)


def test_init_and_sft_steps_exclude_each_other(tmp_path, launches):
    with pytest.raises(SystemExit) as info:
        _main("compare_algos")(["--out", str(tmp_path / "out"), "--init", str(tmp_path), "--sft-steps", "2"])
    assert info.value.code == 2 and launches == []


def test_a_run_the_trainer_refuses_exits_2(capsys):
    """A run that exits 2 (the trainer's configuration error, a check only a launch makes) ends the tool
    with 2; any other failure with 1."""
    from megatron_sdar.trainer.comparison import RunFailedError, exit_code_of_errors

    def fails(code):
        def body():
            raise RunFailedError(f"run failed (exit {code}): ...", code)
        return body

    assert exit_code_of_errors("compare_algos", fails(2)) == 2 and exit_code_of_errors("sweep", fails(1)) == 1
    assert capsys.readouterr().err.splitlines() == ["compare_algos: run failed (exit 2): ...",
                                                    "sweep: run failed (exit 1): ..."]


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
    # a run that ends below the start counts against its setting before the interval does: lr=1 has the
    # higher lower end (0.792 against 0.748), but its 0.85 ends below a start of 0.86
    close = {"x:lr=1": {"0": 0.92, "1": 0.93, "2": 0.85}, "x:lr=2": {"0": 0.87, "1": 0.99, "2": 0.88}}
    assert best_variant(close) == "x:lr=1" and best_variant(close, start=0.86) == "x:lr=2"
    assert best_variant(close, start=0.5) == "x:lr=1"  # both above the start: the interval decides
    table = score_table(scores, [0, 1, 2], 12)
    assert "| grpo | lr=2 | 0.700 | 0.650 | 0.750 | 0.700 ± 0.124 | 0.576 | - | **best** |" in table
    assert "| grpo | lr=4 | 0.200 | - | - | 0.200 | 0.200 | - |  |" in table
    table = score_table(scores, [0, 1, 2], 12, start=0.5)
    assert "runs below the start (0.500)" in table and "| grpo | lr=1 | 0.900 | 0.050 | 0.900 |" in table
    assert "| 0.617 ± 1.219 | -0.602 | 1 |  |" in table and "| 0.576 | 0 | **best** |" in table


def test_summary_pairs_every_step_by_seed():
    from megatron_sdar.trainer.comparison import summarize

    def rows(*values):
        return [{"step": step, "eval/success_rate": v, "eval/num_tasks": 200.0} for step, v in zip((0, 6, 12), values)]

    summary = {"grpo": {"0": rows(0.2, 0.5, 0.8), "1": rows(0.2, 0.6, 0.8), "2": rows(0.2, 0.4, 0.9)},
               "sdar": {"0": rows(0.2, 0.7, 0.7), "1": rows(0.2, 0.8, 0.9), "2": rows(0.2, 0.6, 0.8)}}
    table = summarize(summary, "grpo")
    assert "| variant | seeds | step 0 | step 6 | step 12 | minus grpo at step 6 | minus grpo at step 12 |" in table
    # step 6: +0.2 on every seed (an interval of zero width excludes 0); step 12: -0.1, +0.1, -0.1
    assert "| sdar | 3 | 0.200 ± 0.000 | 0.700 ± 0.248 | 0.800 ± 0.248 | +0.200 ± 0.000 | -0.033 ± 0.287 (inside the noise) " \
        "| 0 of 3 | 0 of 3 |" in table
    assert "| grpo | 3 | 0.200 ± 0.000 | 0.500 ± 0.248 | 0.833 ± 0.143 | - | - | 0 of 3 | 0 of 3 |" in table


def test_summary_counts_runs_below_their_start_and_pairs_random_skill_controls():
    """A run that ends below the start and one that warned of a collapse are counted; each variant is
    paired with its random-skill control (the same variant with env.retrieval=random) by seed; the
    first-choice table pairs the same way."""
    from megatron_sdar.trainer.comparison import control_of, summarize

    def rows(success, choice, warned=()):
        out = [{"step": s, "eval/success_rate": v, "eval/first_choice_correct": c, "eval/num_tasks": 200.0}
               for s, v, c in zip((0, 12), success, choice)]
        out[-1]["collapse_warnings"] = list(warned)
        return out

    summary = {"grpo": {"0": rows((0.1, 0.3), (0.1, 0.2)), "1": rows((0.1, 0.0), (0.1, 0.0), warned=(9, 10))},
               "sdar:algo.teacher=frozen": {"0": rows((0.1, 0.8), (0.1, 0.9)), "1": rows((0.1, 0.6), (0.1, 0.7))},
               "sdar:algo.teacher=frozen,env.retrieval=random": {"0": rows((0.1, 0.2), (0.1, 0.1)),
                                                                  "1": rows((0.1, 0.05), (0.1, 0.2))}}
    assert control_of("sdar:algo.teacher=frozen", summary) == "sdar:algo.teacher=frozen,env.retrieval=random"
    assert control_of("sdar:env.retrieval=random", summary) is None and control_of("grpo", summary) is None
    table = summarize(summary, "grpo")
    assert "minus its random-skill control at step 12 | runs ending below their start | runs that warned" in table
    assert "| grpo | 2 | 0.100 ± 0.000 | 0.150 ± 1.906 | - | - | 1 of 2 | 1 of 2 |" in table
    # frozen minus grpo: +0.5, +0.6 -> +0.550 +- 0.635; minus its control: +0.60, +0.55 -> +0.575 +- 0.318
    assert "| sdar:algo.teacher=frozen | 2 | 0.100 ± 0.000 | 0.700 ± 1.271 | +0.550 ± 0.635 (inside the noise) " \
        "| +0.575 ± 0.318 | 0 of 2 | 0 of 2 |" in table
    assert "| sdar:algo.teacher=frozen,env.retrieval=random | 2 | 0.100 ± 0.000 | 0.125 ± 0.953 | -0.025 ± 0.953 " \
        "(inside the noise) | - | 1 of 2 | 0 of 2 |" in table
    choice = summarize(summary, "grpo", "eval/first_choice_correct")
    assert "`eval/first_choice_correct`" in choice and "runs ending below" not in choice
    # first choice, frozen minus grpo: +0.7, +0.7; minus its control: +0.8, +0.5
    assert "| sdar:algo.teacher=frozen | 2 | 0.100 ± 0.000 | 0.800 ± 1.271 | +0.700 ± 0.000 | +0.650 ± 1.906 " \
        "(inside the noise) |" in choice


def test_regime_reads_contrast_at_step_one_and_the_paired_final_difference(tmp_path):
    """tools/regime.py: per level, GRPO's contrast share at step 1 over its seeds and SDAR minus GRPO at
    the last step paired by seed, each with its 95% interval; a missing directory or variant is one line."""
    sys.path.insert(0, str(REPO / "tools"))
    from regime import level_point, main

    def write_level(directory: Path, contrasts, grpo_final, sdar_final):
        summary = {"grpo": {}, "sdar:algo.teacher=frozen": {}}
        for seed, (c, g, s) in enumerate(zip(contrasts, grpo_final, sdar_final)):
            run = directory / "grpo" / f"seed{seed}"
            run.mkdir(parents=True)
            rows = [{"step": 1, "rollout/success_contrast_groups": c}, {"step": 2, "rollout/success_contrast_groups": 1.0}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            summary["grpo"][str(seed)] = [{"step": 0, "eval/success_rate": 0.1}, {"step": 12, "eval/success_rate": g}]
            summary["sdar:algo.teacher=frozen"][str(seed)] = [{"step": 0, "eval/success_rate": 0.1},
                                                             {"step": 12, "eval/success_rate": s}]
        (directory / "summary.json").write_text(json.dumps(summary))

    write_level(tmp_path / "scarce", [0.25, 0.0, 0.5], [0.1, 0.2, 0.0], [0.6, 0.7, 0.5])
    write_level(tmp_path / "rich", [1.0, 0.75, 1.0], [0.8, 0.7, 0.9], [0.8, 0.8, 0.8])
    point = level_point("scarce", tmp_path / "scarce", "grpo", "sdar:algo.teacher=frozen")
    assert point["contrast_step1"] == [0.25, 0.0, 0.5] and point["x"] == 0.25 and point["step"] == 12
    assert point["differences"] == pytest.approx([0.5, 0.5, 0.5]) and point["y_half"] == pytest.approx(0.0)
    out = tmp_path / "regime"
    assert main(["--level", "scarce", str(tmp_path / "scarce"), "--level", "rich", str(tmp_path / "rich"),
                 "--sdar", "sdar:algo.teacher=frozen", "--out", str(out)]) == 0
    table = (out / "regime.md").read_text()
    assert "| scarce | 3 | 0.250 ± 0.621 | +0.500 ± 0.000 (step 12) |" in table
    assert "| rich | 3 | 0.917 ± 0.359 | +0.000 ± 0.248 (inside the noise) (step 12) |" in table
    assert (out / "regime.png").stat().st_size > 1000
    assert main(["--level", "x", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert main(["--level", "scarce", str(tmp_path / "scarce"), "--sdar", "hdpo", "--out", str(out)]) == 2
