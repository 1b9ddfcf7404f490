"""One source for every configuration value, one episode length, and the checks that refuse a
run in one line before anything is built (issue 24)."""
import dataclasses
import inspect
import subprocess
import sys

import pytest
import yaml

from megatron_sdar.config import schema
from megatron_sdar.config.schema import CONFIG_DIR, ConfigError

#: the YAML config groups whose files hold values, and the dataclass that types each
GROUP_SCHEMAS = {"model": schema.ModelConfig, "env": schema.EnvConfig, "parallel": schema.ParallelConfig,
                 "rollout": schema.RolloutConfig, "trainer": schema.TrainerConfig}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _nested_dataclass(f: dataclasses.Field):
    """The dataclass a field holds (``Optional[TinyModelConfig]`` -> TinyModelConfig), else None."""
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(schema))  # noqa: S307 (our own annotations)
    for candidate in (hint, *getattr(hint, "__args__", ())):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _defined_twice(cls, data: dict, where: str) -> list[str]:
    """What ``data`` (one YAML file of a group) sets that ``cls`` also defaults, what it sets that
    ``cls`` has no field for, and the fields of ``cls`` it does not set."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{where}: {key} is not a field of {cls.__name__}" for key in data if key not in fields]
    problems += [f"{where}: does not set {name}" for name in fields if name not in data]
    for key, value in data.items():
        if key not in fields:
            continue
        f = fields[key]
        if _has_default(f):
            problems.append(f"{where}: {key} is set here and defaulted by {cls.__name__}.{key}")
        nested = _nested_dataclass(f)
        if nested is not None and isinstance(value, dict):
            problems += _defined_twice(nested, value, f"{where}: {key}")
    return problems


def test_every_value_is_defined_in_one_place():
    """A field that a config group's YAML sets has no dataclass default (the dataclasses hold types
    and checks; the values live in the YAML), every group file sets every field of its dataclass,
    and the composed embedded default sets every field of every section."""
    problems = []
    for group, cls in GROUP_SCHEMAS.items():
        files = sorted((CONFIG_DIR / group).glob("*.yaml"))
        assert files, group
        for path in files:
            problems += _defined_twice(cls, yaml.safe_load(path.read_text()) or {}, f"{group}/{path.name}")
    assert not problems, "\n".join(problems)

    # every dataclass of schema.py is one of the groups', the run's, a nested one, or the algo
    # group's (whose values come from PRESETS: algo/objective.py)
    nested = {_nested_dataclass(f) for cls in GROUP_SCHEMAS.values() for f in dataclasses.fields(cls)} - {None}
    declared = {obj for _, obj in inspect.getmembers(schema, dataclasses.is_dataclass)
                if inspect.isclass(obj) and obj.__module__ == schema.__name__}
    assert declared == {*GROUP_SCHEMAS.values(), *nested, schema.RunConfig, schema.AlgoConfig}, declared
    run_defaults = {f.name for f in dataclasses.fields(schema.RunConfig) if _has_default(f)}
    assert run_defaults == {"slurm"}  # a recipe's cluster: no group sets it

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("megatron_sdar.config", version_base=None):
        composed = OmegaConf.to_container(compose("sdar"), resolve=True)
    for group, cls in GROUP_SCHEMAS.items():
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in composed[group]]
        assert not missing, (group, missing)
    assert set(composed["algo"]) == {f.name for f in dataclasses.fields(schema.AlgoConfig)}


def test_a_config_without_every_value_is_refused():
    """Code cannot build a partial config and get values from a second set of defaults: the
    dataclasses need every field, and ``load_config`` of an incomplete mapping names what is unset."""
    with pytest.raises(TypeError, match="missing"):
        schema.TrainerConfig(max_steps=4)
    with pytest.raises(ConfigError, match=r"^invalid configuration: model is not set \(build a config with compose_run"):
        schema.load_config({"algo": {"name": "grpo"}})
    from tests.configs import embedded_run

    complete = schema.config_dict(embedded_run())
    del complete["trainer"]["lr"]
    with pytest.raises(ConfigError, match="trainer.lr is not set"):
        schema.load_config(complete)


def test_the_episode_length_is_env_max_turns(tmp_path):
    """One episode length: ``env.max_turns`` (the environment's budget and the loop's limit); the
    rollout group has none, the agent loop takes it from the config, and each recipe keeps its
    length (ALFWorld 50, WebShop 15, search 4; the embedded default 12)."""
    from megatron_sdar.rollout.agent_loop import AgentLoopConfig
    from tests.configs import embedded_run
    from tests.recipes import recipe_model_dir, recipe_names
    from tests.skill_sets import write_release_format_sets

    assert "max_turns" not in {f.name for f in dataclasses.fields(schema.RolloutConfig)}
    loop_fields = {f.name: f for f in dataclasses.fields(AgentLoopConfig)}
    for name in ("max_turns", "history_window", "max_prompt_tokens", "max_response_tokens", "action_format",
                 "context_position", "restate_task", "temperature", "seed"):
        assert not _has_default(loop_fields[name]), name  # no second set of defaults in the loop
    run = embedded_run()
    assert run.env.max_turns == 12 and AgentLoopConfig.of_run(run).max_turns == 12
    assert AgentLoopConfig.of_run(run).history_window == run.rollout.history_window == 1
    skills = write_release_format_sets(tmp_path / "skills")
    expected = {"alfworld": 50, "webshop": 15, "search": 4}
    for recipe in recipe_names():
        env = recipe.split("_")[0]
        recipe_run = schema.compose_run([f"experiment={recipe}", f"model.hf_path={recipe_model_dir(recipe, tmp_path)}",
                                         f"env.skills_dir={skills[env]}"])
        assert recipe_run.env.max_turns == expected[env] == AgentLoopConfig.of_run(recipe_run).max_turns, recipe
    with pytest.raises(ConfigError, match=r"^rollout.max_turns is not a configuration key \(the episode length is "
                                          r"env.max_turns"):
        schema.compose_run(["rollout.max_turns=3"])


REFUSED = [  # (overrides, the one line after "megatron-sdar: configuration error: ")
    (["trainer.lr=-1"], "trainer.lr must be > 0, got -1.0"),
    (["trainer.sft_lr=0"], "trainer.sft_lr must be > 0, got 0.0"),
    (["trainer.seed=5000"], "trainer.seed=5000 is outside [0, 1024), the range of the task-seed layout "
                            "(trainer/seeds.py)"),
    (["trainer.seed=-1"], "trainer.seed=-1 is outside [0, 1024), the range of the task-seed layout (trainer/seeds.py)"),
    (["algo=grpo", "rollout.group_size=1"],
     "rollout.group_size=1 with algo=grpo: its policy gradient uses the group-normalized advantage (reward minus the "
     "mean of the task's group), which is 0 in a group of one episode; set rollout.group_size >= 2"),
    (["env=search", "trainer.sft_steps=10"],
     "trainer.sft_steps=10: the SFT warm start imitates demonstrations, and env 'search' has none (no scripted or "
     "oracle plan); set trainer.sft_steps=0"),
]


@pytest.mark.multiproc
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tmp_path):
    """Each of these used to pass validation and fail after the model (and vLLM) were built, or to
    train silently on a zero advantage; now ``python -m megatron_sdar.train`` exits 2 with the one
    line on stderr (no import notice before it) and creates no output directory. The processes run
    side by side."""
    runs = []
    for i, (overrides, message) in enumerate(REFUSED):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen([sys.executable, "-m", "megatron_sdar.train", f"trainer.output_dir={out}", *overrides],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((overrides, message, out, proc))
    for overrides, message, out, proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (overrides, stderr[-3000:])
        assert stderr.strip().splitlines() == [f"megatron-sdar: configuration error: {message}"], (overrides, stderr)
        assert stdout == "" and not out.exists(), overrides


@pytest.mark.parametrize("overrides, message", [
    (["trainer.min_lr=0.5"], "trainer.min_lr must be in [0, trainer.lr=0.001], got 0.5"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay must be >= 0, got -0.1"),
    (["trainer.clip_grad=0"], "trainer.clip_grad must be > 0 (the gradient norm is clipped to it), got 0.0"),
    (["trainer.warmup_steps=-1"], "trainer.warmup_steps must be >= 0, got -1"),
    (["rollout.eval_temperature=-0.5"], "rollout.eval_temperature must be >= 0 (0: greedy), got -0.5"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["env.max_turns=0"], "env.max_turns must be >= 1, got 0"),
    (["rollout.cpu_kv_cache_gib=0.5"], "rollout.cpu_kv_cache_gib must be a whole number of GiB >= 1 (vLLM's CPU "
                                       "backend reads VLLM_CPU_KVCACHE_SPACE as an integer), got 0.5"),
    (["algo=opsd", "rollout.group_size=1"], None),  # no policy gradient: a group of one is fine
])
def test_ranges_are_checked_with_the_config(tmp_path, overrides, message):
    out = tmp_path / "run"
    if message is None:
        assert schema.compose_run([f"trainer.output_dir={out}", *overrides]).rollout.group_size == 1
        return
    with pytest.raises(ConfigError) as info:
        schema.compose_run([f"trainer.output_dir={out}", *overrides])
    assert str(info.value) == message
    assert not out.exists()


@pytest.mark.multiproc
def test_composing_a_config_imports_no_engine_or_model_code(tmp_path):
    """Validation imports neither vLLM nor Megatron nor Transformer Engine, so no import notice
    ("Triton is installed, but ...") comes before a configuration error."""
    code = ("import sys\n"
            "from megatron_sdar.config.schema import compose_run\n"
            f"compose_run(['trainer.output_dir={tmp_path / 'run'}', 'algo=hdpo', 'trainer.sft_steps=3'])\n"
            "print(sorted(m for m in ('vllm', 'megatron.core', 'transformer_engine', 'triton', 'transformers') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]" and proc.stderr == "", (proc.stdout, proc.stderr[-3000:])


def test_every_recipe_states_its_warm_start():
    """RL starts from the released model, as in the paper: every recipe says trainer.sft_steps: 0
    itself (the embedded default's 1000-step SFT of a tiny model is not a recipe's)."""
    from tests.recipes import recipe_names

    for recipe in recipe_names():
        data = yaml.safe_load((CONFIG_DIR / "experiment" / f"{recipe}.yaml").read_text())
        assert data["trainer"]["sft_steps"] == 0, recipe
        assert "max_turns" not in data["rollout"] and data["env"]["max_turns"] >= 1, recipe


def test_a_recipe_runs_the_preset_it_is_given():
    """A recipe names SDAR but sets none of a preset's own values: ``algo=grpo`` on a recipe is
    GRPO (no teacher pass), and the recipe's default is the released SDAR (lambda 0.01, beta 5)."""
    from megatron_sdar.algo.objective import preset_fields
    from tests.recipes import recipe_names

    for recipe in recipe_names():
        sdar = schema.compose_run([f"experiment={recipe}"], need_files=False).objective()
        grpo = schema.compose_run([f"experiment={recipe}", "algo=grpo"], need_files=False).objective()
        assert (sdar.distill_coef, sdar.gate, sdar.gate_beta) == (0.01, "gap", 5.0), recipe
        assert grpo.distill_coef == 0.0 and not grpo.needs_teacher, recipe
        expected_kl = 0.001 if recipe.startswith("search") else preset_fields("grpo")["kl_coef"]
        assert sdar.kl_coef == grpo.kl_coef == expected_kl, recipe
