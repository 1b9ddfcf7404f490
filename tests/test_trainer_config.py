"""The main job's configuration: Hydra composition, validation before anything is built, clear errors."""
import json

import pytest

from megatron_sdar.train import main


def _compose(*overrides):
    from megatron_sdar.config.schema import compose_run

    return compose_run(list(overrides))


def test_default_is_the_tiny_cpu_run():
    run = _compose()
    assert run.model.hf_path is None and run.model.name == "tiny" and run.env.name == "household"
    # the preset at the settings chosen for it on this world (config/tuned/); without them, as released
    assert run.algo.name == "sdar" and run.objective().distill_coef == 1.0 and run.objective().gate == "gap"
    assert _compose("~tuned").objective().distill_coef == 0.01
    assert (run.parallel.tp, run.parallel.pp, run.parallel.cp) == (1, 1, 1)


@pytest.mark.parametrize("name", ["grpo", "opsd", "grpo_opsd", "sdar", "sdar_full", "skill_grpo", "rlsd", "skill_sd",
                                  "hdpo"])
def test_every_preset_composes(name):
    """``algo=<name>`` holds every field of the preset (one source: PRESETS), and a complete config
    whose ``algo`` names only the preset (an older config.json, its unset fields null) gets the same
    values."""
    import dataclasses

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.config.schema import config_dict, load_config
    from tests.configs import embedded_run

    objective = _compose(f"algo={name}", "~tuned").objective()  # the preset alone (no chosen settings)
    assert objective == preset(name)
    complete = config_dict(embedded_run())
    assert load_config({**complete, "algo": {"name": name}}).objective() == preset(name)
    nulls = {f.name: None for f in dataclasses.fields(objective)}
    assert load_config({**complete, "algo": {"name": name, **nulls}}).objective() == preset(name)


def test_algo_group_is_made_from_the_presets():
    from pathlib import Path

    import megatron_sdar.config as config_package
    from megatron_sdar.algo.objective import PRESETS

    assert not (Path(config_package.__file__).parent / "algo").exists()  # no second copy in YAML
    from hydra.core.config_store import ConfigStore

    assert {n.removesuffix(".yaml") for n in ConfigStore.instance().list("algo")} == set(PRESETS)


def test_overrides_reach_the_objective():
    assert _compose("algo=sdar", "algo.gate=entropy", "algo.distill_coef=0.05").objective().gate == "entropy"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.no_such_key=1"], "trainer.no_such_key"),
    (["algo=ppo"], "algo"),
    (["parallel.tp=3"], "parallel: tp=3 must divide heads=4 and kv_heads=2"),
    (["parallel.pp=3"], "parallel: pp=3 must divide layers=2"),
    (["parallel.sequence_parallel=true"], "parallel: sequence_parallel needs tp > 1"),
    (["parallel.recompute=some"], "parallel: recompute must be one of"),
    (["env.skills_dir=/nonexistent/skills"], "does not exist"),
    (["env.retrieval=telepathy"], "env.retrieval"),
    (["rollout.action_format=emoji"], "rollout: action_format must be"),
    (["rollout.context_position=middle"], "rollout: context_position must be"),
    (["model.hf_path=/nonexistent/model"], "no config.json"),
    (["model.dtype=float16"], "model.dtype"),
    (["model.fp8=delayed"], "bfloat16"),
    (["algo.gate=sometimes"], "gate"),
    (["algo.name=ppo"], "is not a preset"),
    (["algo=hdpo", "algo.rlsd_coef=0.5"], "cannot be combined with rlsd_coef"),
    (["rollout.group_size=0"], "rollout.group_size"),
    (["trainer.resume=/nonexistent/ckpt"], "no such checkpoint"),
])
def test_bad_config_fails_fast_with_a_clear_message(overrides, message, capsys):
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and message in err, err
    assert "Traceback" not in err


def _fails_in_one_line(overrides, capsys) -> str:
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("megatron-sdar: configuration error: "), err
    return err.strip()


def test_misspelt_recipe_is_refused_with_close_matches(capsys):
    err = _fails_in_one_line(["experiment=alfworld_qwen2_5_7"], capsys)
    assert "'alfworld_qwen2_5_7' is not a recipe" in err and "did you mean alfworld_qwen2_5_7b" in err
    err = _fails_in_one_line(["experiment=nonexistent"], capsys)
    assert "recipes: alfworld_qwen2_5_14b" in err  # no close match: the whole list


def _skill_dir(tmp_path, name, mapping: str, files=("general_skills.md", "heat.md")):
    root = tmp_path / name
    root.mkdir()
    for f in files:
        (root / f).write_text(f"### {f} ###\nadvice\n")
    (root / "skill_mapping.json").write_text(mapping)
    return root


@pytest.mark.parametrize("name, mapping, message", [
    ("bad_json", '{"skill_files": {', "not valid JSON"),
    ("missing_md", '{"skill_files": {"general_skills": "general_skills.md", "heat": "nothere.md"}, '
                   '"task_to_skill": {"heat": "heat"}}', "points to missing file 'nothere.md'"),
    ("empty", "{}", "missing required key 'skill_files'"),
    ("dangling", '{"skill_files": {"general_skills": "general_skills.md", "heat": "heat.md"}, '
                 '"task_to_skill": {"heat": "cool"}}', "task_to_skill['heat'] = 'cool' is not in skill_files"),
])
def test_malformed_skill_directory_fails_before_anything_is_built(tmp_path, capsys, name, mapping, message):
    root = _skill_dir(tmp_path, name, mapping)
    err = _fails_in_one_line([f"env.skills_dir={root}"], capsys)
    assert message in err and str(root / "skill_mapping.json") in err, err


def test_yaml_syntax_error_in_a_recipe_is_one_line(capsys):
    """A user's own recipe beside the shipped ones, with a syntax error."""
    import megatron_sdar.config as config_pkg
    from pathlib import Path

    recipe = Path(config_pkg.__file__).parent / "experiment" / "zz_test_broken_recipe.yaml"
    recipe.write_text("model:\n  dtype: [bfloat16\ntrainer:\n  lr: 1.0e-6\n")
    try:
        err = _fails_in_one_line(["experiment=zz_test_broken_recipe"], capsys)
    finally:
        recipe.unlink()
    assert f"YAML syntax error in {recipe}, line 3" in err, err


def test_resume_pointed_at_a_run_directory_names_the_checkpoint(tmp_path, capsys):
    from megatron_sdar.checkpoint.model import TRAIN_FORMAT_NAME, TRAIN_FORMAT_VERSION

    run = tmp_path / "run"
    for step in (4, 8):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "complete.json").write_text(json.dumps({"format": TRAIN_FORMAT_NAME, "version": TRAIN_FORMAT_VERSION, "files": {}}))
        (ckpt / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "step_00000012").mkdir()  # a save that did not finish
    err = _fails_in_one_line([f"trainer.resume={run}"], capsys)
    assert f"is a run directory, not a checkpoint: pass trainer.resume={run}/checkpoints/step_00000008" in err, err
    assert f"trainer.resume=auto with trainer.output_dir={run}" in err
    err = _fails_in_one_line([f"trainer.resume={run / 'checkpoints'}"], capsys)
    assert "step_00000008" in err and f"trainer.output_dir={run}" in err
    err = _fails_in_one_line([f"trainer.resume={run / 'checkpoints' / 'step_00000012'}"], capsys)
    assert "not a complete checkpoint: no complete.json" in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "does not parse"),
    ('{"model_type": "llama", "hidden_size": 8}', "is not a supported model"),
])
def test_bad_model_directory_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(content)
    err = _fails_in_one_line([f"model.hf_path={tmp_path}"], capsys)
    assert message in err and str(tmp_path / "config.json") in err, err


def test_recipes_compose_and_validate(tmp_path):
    """Every shipped recipe composes and passes validation, layout included. The checkpoints are
    not downloaded here: a config.json with the recipe's architecture numbers stands in for each."""
    from megatron_sdar.config.schema import ConfigError
    from tests.recipes import recipe_model_dir, recipe_names
    from tests.skill_sets import write_release_format_sets

    skills = write_release_format_sets(tmp_path / "skills")
    recipes = recipe_names()
    assert len(recipes) >= 10
    for recipe in recipes:
        with pytest.raises(ConfigError, match="no config.json"):  # without the checkpoint: a clear error
            _compose(f"experiment={recipe}")
        env = recipe.split("_")[0]
        with pytest.raises(ConfigError, match=f"skills/{env}.* does not exist"):  # nor the skill set
            _compose(f"experiment={recipe}", f"model.hf_path={recipe_model_dir(recipe, tmp_path)}")
        run = _compose(f"experiment={recipe}", f"model.hf_path={recipe_model_dir(recipe, tmp_path)}",
                       f"env.skills_dir={skills[env]}")
        assert run.rollout.action_format == "text" and run.model.dtype == "bfloat16", recipe


def test_preset_sweep_lists_every_preset():
    from pathlib import Path

    from megatron_sdar.algo.objective import PRESETS

    sweep = Path(__file__).parents[1] / "slurm" / "sweeps" / "presets.txt"
    lines = [line for line in sweep.read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(line.removeprefix("algo=") for line in lines) == sorted(PRESETS)
    assert f"--array=0-{len(lines) - 1}" in sweep.read_text()


def _flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_each_preset_runs_at_its_chosen_settings_on_the_embedded_default(tmp_path):
    """config/tuned/tiny-<env>-<preset>.yaml (chosen on the validation split) is what the main job and
    compare_algos run for that preset on the embedded default (household) and on the laptop
    benchmarks (experiment=twc_tiny, cooking_tiny); overrides still win; a recipe (another model and
    environment) with the same preset never reads it."""
    from pathlib import Path

    import yaml

    from megatron_sdar.algo.objective import PRESETS
    from megatron_sdar.config.schema import config_dict
    from tests.recipes import recipe_model_dir
    from tests.skill_sets import write_release_format_sets

    tuned_dir = Path(__file__).parents[1] / "megatron_sdar" / "config" / "tuned"
    files = sorted(tuned_dir.glob("tiny-*.yaml"))
    experiment_of = {"household": [], "twc": ["experiment=twc_tiny"], "cookingworld": ["experiment=cooking_tiny"],
                     "household_knowledge": ["experiment=household_knowledge_tiny"]}
    for env in experiment_of:
        assert {f.stem.removeprefix(f"tiny-{env}-") for f in files
                if f.stem.startswith(f"tiny-{env}-")} >= {"grpo", "sdar", "sdar_full"}, env
    recipe = "alfworld_qwen3_1_7b"
    skills = write_release_format_sets(tmp_path / "skills")
    recipe_overrides = [f"experiment={recipe}", f"model.hf_path={recipe_model_dir(recipe, tmp_path)}",
                        f"env.skills_dir={skills['alfworld']}"]
    for path in files:
        env, _, preset = path.stem.removeprefix("tiny-").partition("-")
        assert env in experiment_of and preset in PRESETS, path
        chosen = _flat(yaml.safe_load(path.read_text()))
        assert chosen, path
        run = _flat(config_dict(_compose(*experiment_of[env], f"algo={preset}")))
        for key, value in chosen.items():
            assert run[key] == value, (path.name, key)
        key, value = next(iter(chosen.items()))
        other = 0.123 if isinstance(value, float) else value
        if other != value:  # a command-line override wins over the chosen value
            assert _flat(config_dict(_compose(*experiment_of[env], f"algo={preset}", f"{key}={other}")))[key] == other
        recipe_run = _flat(config_dict(_compose(*recipe_overrides, f"algo={preset}")))
        assert recipe_run["trainer.lr"] <= 1e-5, (preset, recipe_run["trainer.lr"])  # the recipe's own value
