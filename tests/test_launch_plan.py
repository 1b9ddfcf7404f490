"""The launch plan: the trainer's complete configuration for every recipe with FP8 on (the
TransformerConfig, DDP, optimizer and vLLM arguments the trainer builds from), with the hardware
probes replaced at their boundary; the login-node dry run for every recipe, FP8 on and off; and
the CPU trainer refusing FP8 with a clear message instead of a crash."""
import json

import pytest

from megatron_sdar.train import main
from tests.recipes import recipe_model_dir, recipe_names

DRY_RUN_KEYS = {"layout", "transformer_config", "ddp_config", "optimizer_config", "vllm_engine_args", "memory_plan_gib"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Per recipe: the Hydra overrides that point it at a config.json-only model and a skill set."""
    from tests.skill_sets import write_release_format_sets

    root = tmp_path_factory.mktemp("recipes")
    skills = write_release_format_sets(root / "skills")
    return {r: [f"experiment={r}", f"model.hf_path={recipe_model_dir(r, root)}",
                f"env.skills_dir={skills[r.split('_')[0]]}"] for r in recipe_names()}


def _compose(*overrides):
    from megatron_sdar.config.schema import compose_run

    return compose_run(list(overrides))


def test_fp8_reaches_transformer_ddp_optimizer_and_vllm_for_every_recipe(stand_ins, monkeypatch):
    import megatron.core.transformer.transformer_config as transformer_config_module
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_sdar.models.megatron_model import build_transformer_config
    from megatron_sdar.rollout.engine import engine_args
    from megatron_sdar.trainer.launch import dry_run_world_size, launch_plan
    from megatron_sdar.trainer.policy import ddp_config_kwargs, optimizer_config_kwargs

    h100 = dict(te_available=lambda: True, capability=lambda: (9, 0))  # the probes, replaced
    # megatron-core's own probe: MoE + FP8 needs Transformer Engine >= 1.7 (CPU: none installed)
    monkeypatch.setattr(transformer_config_module, "is_te_min_version", lambda version, *a, **k: True)
    assert len(stand_ins) >= 10
    for recipe, overrides in stand_ins.items():
        run = _compose(*overrides, "model.fp8=tensorwise", "model.fp8_rollout=true")
        plan = launch_plan(run, dry_run_world_size(run), run.model.hf_path, **h100)
        p = run.parallel
        # the objects the trainer builds (build_policy, RolloutEngine) from the plan
        config = build_transformer_config(plan.arch, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep,
                                          params_dtype=plan.precision.params_dtype, initialize_weights=False,
                                          **plan.precision.transformer_config_kwargs(), **plan.transformer_overrides)
        assert (config.fp8, config.fp8_recipe, config.fp8_param, config.bf16) == ("hybrid", "tensorwise", False, True)
        assert config.sequence_parallel == p.sequence_parallel, recipe
        assert config.recompute_granularity == (None if p.recompute == "none" else p.recompute), recipe
        assert config.virtual_pipeline_model_parallel_size == p.vpp, recipe
        ddp = DistributedDataParallelConfig(**ddp_config_kwargs(plan.optim, plan.precision))
        assert ddp.fp8_param_gather is False and ddp.grad_reduce_in_fp32
        assert ddp.use_distributed_optimizer == p.distributed_optimizer
        optimizer = OptimizerConfig(**optimizer_config_kwargs(plan.optim, plan.precision))
        assert optimizer.bf16 and optimizer.lr == run.trainer.lr
        vllm = engine_args(plan.model_dir, plan.engine, plan.rollout_replicas, on_gpu=True)
        assert (vllm["quantization"], vllm["dtype"], vllm["tensor_parallel_size"]) == ("fp8", "bfloat16", run.rollout.tp)
        assert vllm["data_parallel_size"] * run.rollout.tp == plan.world_size

    from megatron_sdar.config.schema import ConfigError

    overrides = stand_ins["alfworld_qwen2_5_7b"]
    run = _compose(*overrides, "model.fp8=mxfp8")
    with pytest.raises(ConfigError, match="needs compute capability >= 10.0.*use tensorwise or delayed on H100"):
        launch_plan(run, 8, run.model.hf_path, **h100)
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        launch_plan(run, 8, run.model.hf_path, te_available=lambda: False, capability=lambda: (10, 0))


def _dry_run(capsys, *overrides):
    assert main([*overrides, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    return out, json.loads(out[-1])


@pytest.mark.parametrize("fp8", [None, "tensorwise"])
def test_dry_run_prints_the_plan_for_every_recipe(stand_ins, capsys, fp8):
    for recipe, overrides in stand_ins.items():
        extra = [f"model.fp8={fp8}"] if fp8 else []
        lines, report = _dry_run(capsys, *overrides, *extra)
        assert DRY_RUN_KEYS <= set(report), recipe
        layout, run = report["layout"], _compose(*overrides)
        world = run.slurm["nodes"] * run.slurm["gpus_per_node"]
        assert layout["world_size"] == world
        assert layout["dp"] == world // (layout["tp"] * layout["pp"] * layout["cp"]), recipe
        assert (layout["tp"], layout["pp"], layout["vpp"], layout["ep"], layout["sp"]) == (
            run.parallel.tp, run.parallel.pp, run.parallel.vpp, run.parallel.ep, run.parallel.sequence_parallel)
        assert layout["rollout_replicas"] == world // run.rollout.tp
        tc = report["transformer_config"]
        assert tc["tensor_model_parallel_size"] == run.parallel.tp and tc["params_dtype"] == "bfloat16"
        assert tc.get("fp8_recipe") == fp8 and (tc.get("fp8") == "hybrid") == (fp8 is not None), recipe
        assert report["ddp_config"].get("fp8_param_gather", False) is False
        assert report["vllm_engine_args"]["data_parallel_size"] == layout["rollout_replicas"]
        assert report["memory_plan_gib"]["total"] > 0 and isinstance(report["memory_plan_gib"]["fits"], bool)
        assert any("skipped" in line and "Transformer Engine" in line for line in lines)


def test_dry_run_prints_the_settings_that_differ_from_the_defaults(stand_ins, capsys):
    """``--dry-run`` names every trainer, rollout and env value that differs from its YAML group's
    default (config/trainer/default.yaml, rollout/default.yaml, env/<env>.yaml): a recipe's warm
    start (no SFT: RL from the released model), learning rate, command-line overrides; the JSON
    line holds them too. SFT on search (no demonstrations) is refused in one line."""
    from megatron_sdar.config.schema import config_dict, group_defaults

    overrides = stand_ins["search_qwen2_5_7b"]
    lines, report = _dry_run(capsys, *overrides, "rollout.temperature=0.7")
    (line,) = [x for x in lines if x.startswith("settings that differ from the defaults")]
    changed = report["settings_differing_from_defaults"]
    assert "trainer.sft_steps=0" in line and changed["trainer.sft_steps"] == 0
    assert changed["trainer.lr"] == 1e-6 and "trainer.lr=1e-06" in line
    assert changed["rollout.temperature"] == 0.7 and changed["rollout.action_format"] == "text"
    assert changed["env.skills_dir"] == overrides[2].split("=", 1)[1]
    run = config_dict(_compose(*overrides, "rollout.temperature=0.7"))
    for group, defaults in group_defaults("search").items():  # exactly the values that differ
        for key, value in run[group].items():
            assert (f"{group}.{key}" in changed) == (defaults[key] != value), (group, key)
    assert "trainer.sft_lr" not in changed and "env.max_turns" not in changed  # as in the groups
    assert main([*overrides, "trainer.sft_steps=5", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "megatron-sdar: configuration error: trainer.sft_steps=5: the SFT warm start imitates demonstrations, and "
        "env 'search' has none (no scripted or oracle plan); set trainer.sft_steps=0"]


def test_dry_run_says_what_the_teacher_weights_cost(stand_ins, capsys):
    overrides = stand_ins["alfworld_qwen2_5_7b"]
    seen = {}
    for teacher in ("shared", "frozen", "ema"):
        lines, report = _dry_run(capsys, *overrides, f"algo.teacher={teacher}")
        (line,) = [x for x in lines if x.startswith("teacher weights: ")]
        seen[teacher] = (line, report["memory_plan_gib"])
    assert "no copy" in seen["shared"][0] and seen["shared"][1]["teacher_weights"] == 0
    assert "the reference model, the KL term's copy" in seen["frozen"][0]
    assert seen["frozen"][1]["total"] == seen["shared"][1]["total"]
    ema_line, ema_mem = seen["ema"]
    assert ema_line.startswith("teacher weights: ema (decay 0.9") and f"{ema_mem['teacher_weights']:.1f} GiB" in ema_line
    assert ema_mem["teacher_weights"] > 0 and ema_mem["total"] > seen["shared"][1]["total"]
    lines, _ = _dry_run(capsys, *overrides, "algo=grpo", "algo.teacher=ema")
    assert "teacher weights: none (algo=grpo has no teacher term)" in lines


def test_dry_run_follows_world_size_and_refuses_bad_input(stand_ins, capsys, monkeypatch, tmp_path):
    overrides = stand_ins["alfworld_qwen2_5_7b"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    _, report = _dry_run(capsys, *overrides)
    assert report["layout"]["world_size"] == 16 and report["layout"]["dp"] == 8
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert main([*overrides, "parallel.tp=4", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "world size 6 is not divisible by tp*pp*cp" in err and "Traceback" not in err
    monkeypatch.setenv("WORLD_SIZE", "eight")
    assert main([*overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE='eight'" in err and "must be integers" in err and "Traceback" not in err
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*overrides, "algo.kernel=cuda", "--dry-run"]) == 2  # not one of the objective's kernels
    err = capsys.readouterr().err
    assert err.strip() == ("megatron-sdar: configuration error: algo: objective.kernel must be one of "
                           "('eager', 'compile', 'triton'), got 'cuda'"), err
    # the embedded default has no model directory to plan (an output directory that holds no run)
    assert main(["--dry-run", f"trainer.output_dir={tmp_path / 'run'}"]) == 2
    assert "--dry-run plans a recipe's model: set model.hf_path" in capsys.readouterr().err


@pytest.mark.multiproc
def test_trainer_refuses_fp8_without_transformer_engine(tmp_path):
    """The crash at start-up (an attribute that did not exist) is now a one-line refusal."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "model.dtype=bfloat16", "model.fp8=tensorwise",
                           f"trainer.output_dir={tmp_path}", "trainer.sft_steps=0", "trainer.max_steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "model.fp8=tensorwise needs Transformer Engine" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_bf16_without_transformer_engine_is_refused_before_anything_runs(tmp_path):
    """bf16 on the local spec would train through SFT and then fail at the first checkpoint (mixed
    fp32 norm / bf16 parameter dtypes); it is refused at start-up with the config to use."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "model.dtype=bfloat16",
                           f"trainer.output_dir={tmp_path}", "trainer.max_steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.dtype=bfloat16 needs Transformer Engine's layer spec" in proc.stderr
    assert "use model.dtype=float32 here" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything is built (not even the base model)


def test_min_lr_null_keeps_the_rate_constant_and_a_value_decays_to_it(stand_ins):
    """``trainer.min_lr``: null (the default) keeps the learning rate constant after warmup; any
    value, 0 included, is where the cosine over ``trainer.max_steps`` ends."""
    from megatron_sdar.trainer.launch import dry_run_world_size, launch_plan

    recipe = next(iter(stand_ins.values()))
    h100 = dict(te_available=lambda: True, capability=lambda: (9, 0))
    schedules = {}
    for min_lr in ("null", "0", "1e-7"):
        run = _compose(*recipe, "trainer.lr=1e-6", "trainer.warmup_steps=0", "trainer.max_steps=10",
                       f"trainer.min_lr={min_lr}")
        optim = launch_plan(run, dry_run_world_size(run), run.model.hf_path, **h100).optim
        schedules[min_lr] = [optim.lr_at(step) for step in (0, 5, 10)]
    assert schedules["null"] == [1e-6, 1e-6, 1e-6]
    assert schedules["0"] == pytest.approx([1e-6, 0.5e-6, 0.0], abs=1e-18)
    assert schedules["1e-7"] == pytest.approx([1e-6, 0.55e-6, 1e-7], rel=1e-12)
