"""The main job's configuration: Hydra composition, validation before anything is built, clear errors."""
import pytest

from megatron_sdar.train import main


def _compose(*overrides):
    from hydra import compose, initialize_config_module

    from megatron_sdar.config.schema import load_config

    with initialize_config_module("megatron_sdar.config", version_base=None):
        return load_config(compose("sdar", overrides=list(overrides)))


def test_default_is_the_tiny_cpu_run():
    run = _compose()
    assert run.model.hf_path is None and run.model.name == "tiny" and run.env.name == "household"
    assert run.algo.name == "sdar" and run.objective().distill_coef == 0.01 and run.objective().gate == "gap"
    assert (run.parallel.tp, run.parallel.pp, run.parallel.cp) == (1, 1, 1)


@pytest.mark.parametrize("name", ["grpo", "opsd", "grpo_opsd", "sdar", "skill_grpo", "rlsd", "skill_sd"])
def test_every_preset_composes(name):
    from megatron_sdar.algo.objective import PRESETS

    objective = _compose(f"algo={name}").objective()
    for key, value in PRESETS[name].items():
        assert getattr(objective, key) == value


def test_overrides_reach_the_objective():
    assert _compose("algo=sdar", "algo.gate=entropy", "algo.distill_coef=0.05").objective().gate == "entropy"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.no_such_key=1"], "trainer.no_such_key"),
    (["algo=ppo"], "algo"),
    (["parallel.tp=3"], "does not divide the 4 attention heads"),
    (["parallel.pp=3"], "does not divide the 4 layers"),
    (["parallel.sequence_parallel=true"], "sequence_parallel needs parallel.tp > 1"),
    (["env.skills_dir=/nonexistent/skills"], "skill_mapping.json"),
    (["env.retrieval=telepathy"], "env.retrieval"),
    (["model.hf_path=/nonexistent/model"], "no config.json"),
    (["model.dtype=float16"], "model.dtype"),
    (["model.fp8=delayed"], "bfloat16"),
    (["algo.gate=sometimes"], "gate"),
    (["rollout.group_size=0"], "rollout.group_size"),
    (["trainer.resume=/nonexistent/ckpt"], "no such checkpoint"),
])
def test_bad_config_fails_fast_with_a_clear_message(overrides, message, capsys):
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and message in err, err
    assert "Traceback" not in err


def test_recipes_compose_and_validate(tmp_path):
    """Every shipped recipe composes and passes validation, layout included. The checkpoints are
    not downloaded here: a config.json with the recipe's architecture numbers stands in for each."""
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_module

    import megatron_sdar.config as config_pkg
    from megatron_sdar.config.schema import ConfigError

    recipes = sorted(p.stem for p in (Path(config_pkg.__file__).parent / "experiment").glob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        with pytest.raises(ConfigError, match="no config.json"):  # without the checkpoint: a clear error
            _compose(f"experiment={recipe}")
        with initialize_config_module("megatron_sdar.config", version_base=None):
            arch = compose("sdar", overrides=[f"experiment={recipe}"]).model.architecture
        model_dir = tmp_path / recipe
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({
            "num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads, "num_hidden_layers": arch.layers}))
        run = _compose(f"experiment={recipe}", f"model.hf_path={model_dir}")
        assert run.rollout.action_format == "text" and run.model.dtype == "bfloat16", recipe
