"""Typed configuration of a training run (the Hydra config groups of ``megatron_sdar/config``).

The values come from the YAML files of the config groups; the defaults below mirror the embedded
default (tiny model, household world, CPU) for code that builds a config without Hydra.

``load_config(cfg)`` turns Hydra's DictConfig into :class:`RunConfig` and validates everything that
can be checked before a model is built (parallel layout vs heads/layers/world size, files,
option values): a bad config fails in a second with a message naming the key, not in a collective
ten minutes later.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from megatron_sdar.algo.objective import PRESETS, ObjectiveConfig, preset_fields


class ConfigError(ValueError):
    """The run configuration is invalid (raised before anything is built)."""


@dataclass
class TinyModelConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 384
    vocab: int = 768
    init_std: float = 0.02  # std of every weight matrix at initialization


@dataclass
class ModelConfig:
    name: str = "tiny"
    hf_path: Optional[str] = None  # HF checkpoint directory; None: build the tiny model
    arch: str = "qwen2"
    dtype: str = "float32"
    fp8: Optional[str] = None
    fp8_rollout: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # architecture numbers of the recipe's model, read by tools/plan.py (the trainer reads config.json)
    architecture: Optional[dict] = None


@dataclass
class AlgoConfig(ObjectiveConfig):
    """The ``algo`` group: every :class:`ObjectiveConfig` field plus the preset's ``name``. Hydra's
    ``algo=<preset>`` options are made from :data:`~megatron_sdar.algo.objective.PRESETS`
    (:func:`register_algo_presets`), so any field can be overridden: ``algo.gate=entropy``."""

    name: str = "sdar"

    def objective(self) -> ObjectiveConfig:
        if self.name not in PRESETS:
            raise ConfigError(f"algo.name={self.name!r} is not a preset; choose one of {sorted(PRESETS)}")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ObjectiveConfig)}
        try:
            return ObjectiveConfig(**values).validate()
        except ValueError as exc:
            raise ConfigError(f"algo: {exc}") from None

    @classmethod
    def of_preset(cls, name: str) -> "AlgoConfig":
        return cls(name=name, **preset_fields(name))


def register_algo_presets() -> None:
    """One Hydra option ``algo=<name>`` per preset, holding all of its fields (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="algo", name=name, node=AlgoConfig.of_preset(name))


def _complete_algo(algo: Any) -> Any:
    """A plain ``algo`` mapping given with only some fields (a dict, an older ``config.json`` whose
    unset fields are null) gets the rest from its preset."""
    if not isinstance(algo, dict):
        return algo
    name = algo.get("name", AlgoConfig.name)
    if name not in PRESETS:
        raise ConfigError(f"algo={name!r} is not a preset; choose one of {sorted(PRESETS)}")
    optional = {f.name for f in dataclasses.fields(ObjectiveConfig) if f.default is None}
    given = {k: v for k, v in algo.items() if v is not None or k in optional}
    return {**preset_fields(name), "name": name, **given}


def _embedded_world() -> dict:
    return {"rooms": ["kitchen"], "task_types": ["pick_and_place", "clean", "heat", "cool"],
            "num_receptacles": [6, 6], "num_distractors": [1, 2], "placement": "homes", "home_prob": 0.9,
            "closed_share": 0.75, "turn_slack": 1}


@dataclass
class EnvConfig:
    name: str = "household"
    max_turns: int = 10
    kwargs: dict = field(default_factory=_embedded_world)
    skills_dir: Optional[str] = None
    retrieval: str = "keyword"
    skills_top_k: int = 1
    step_timeout_s: float = 60.0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"


@dataclass
class RolloutConfig:
    tp: int = 1
    group_size: int = 8
    tasks_per_step: int = 4
    max_turns: int = 10
    history_window: int = 1
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 12
    temperature: float = 1.0
    eval_temperature: float = 1.0
    action_pattern: Optional[str] = "<action>(.*?)</action>"
    invalid_action_penalty: float = 0.1
    show_admissible_actions: bool = True
    action_format: str = "prefix"
    context_position: str = "start"
    restate_task: bool = False
    gpu_memory_utilization: float = 0.4
    cpu_kv_cache_gib: float = 1.0
    bucket_mb: float = 256.0


@dataclass
class TrainerConfig:
    max_steps: int = 8
    output_dir: str = "outputs/sdar"
    save_interval: int = 4
    keep_last: int = 2
    resume: Optional[str] = None
    verify_checkpoints: bool = True  # checksums + finite weights before a resume (false: skip)
    # distributed optimizer's state: fully_reshardable (resumes at any TP/PP/VPP/DP; gathers each
    # model-parallel shard's state over DP while saving) | dp_reshardable (no gather; DP changes only)
    optimizer_sharding: str = "fully_reshardable"
    seed: int = 0
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 2
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    micro_batch_size: int = 8
    # pack samples into micro-batches of at most this many tokens (null: micro_batch_size padded rows)
    micro_batch_tokens: Optional[int] = 4096
    eval_interval: int = 4
    eval_tasks: int = 200
    eval_split: str = "test"  # held-out tasks evaluated: test (reported) | validation (hyperparameter choice)
    eval_greedy: bool = True  # also evaluate greedily (eval/greedy/*)
    eval_before_rl: bool = True  # evaluate at step 0 (after SFT), with and without skills
    sft_steps: int = 120
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    sft_episodes: int = 400
    sft_skill_share: float = 0.5  # share of demonstrations with a (randomly drawn) skill in the prompt
    sft_prompt_weight: float = 0.5  # language-model loss on the prompt tokens, relative to the response's
    sft_skill_turn_repeats: int = 2  # extra copies of each skill demonstration's deciding (first) turn
    export_hf: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    plot: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    slurm: Optional[dict] = None  # read by slurm/ and tools/plan.py; ignored by the trainer

    def objective(self) -> ObjectiveConfig:
        return self.algo.objective()


CONFIG_DIR = Path(__file__).parent


def check_experiment(overrides: list[str]) -> None:
    """An ``experiment=<recipe>`` override must name a recipe of ``config/experiment/``: Hydra
    treats the group as optional and would silently run the default instead."""
    import difflib

    recipes = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+~") != "experiment" or value in ("", "null"):
            continue
        if value not in recipes:
            close = difflib.get_close_matches(value, recipes, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"recipes: {', '.join(recipes)}"
            raise ConfigError(f"experiment={value!r} is not a recipe of {CONFIG_DIR / 'experiment'}; {hint}")


def yaml_error_line(exc: Exception) -> str:
    """One line for a YAML syntax error: file, line, column and what is wrong."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a YAML file"
    return f"YAML syntax error in {where}: {problem}"


def compose_run(overrides: list[str]) -> RunConfig:
    """The validated :class:`RunConfig` of ``python -m megatron_sdar.train <overrides>`` (the
    embedded default, a recipe, Hydra overrides); every configuration error is one
    :class:`ConfigError` line."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    check_experiment(overrides)
    try:
        with initialize_config_module("megatron_sdar.config", version_base=None):
            cfg = compose("sdar", overrides=list(overrides))
    except YAMLError as exc:
        raise ConfigError(yaml_error_line(exc)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        raise ConfigError(str(exc)) from None
    return load_config(cfg)


def config_dict(run: RunConfig) -> dict:
    """``run`` as the plain JSON data a run's ``config.json`` holds."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(run)))


def load_config(cfg: Any) -> RunConfig:
    """Hydra DictConfig / plain dict -> validated :class:`RunConfig` (unknown keys are errors)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        schema = OmegaConf.structured(RunConfig)
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        plain = {k: v for k, v in (plain or {}).items() if k not in ("hydra", "experiment")}
        if "algo" in plain:
            plain["algo"] = _complete_algo(plain["algo"])
        merged = OmegaConf.merge(schema, plain)
        run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", "; ")) from None
    heads, kv_heads, layers = model_shape(run.model)
    validate(run, num_heads=heads, num_kv_heads=kv_heads, num_layers=layers)
    return run


def model_shape(model: ModelConfig) -> tuple[int, int, int]:
    """(attention heads, KV heads, layers) of the configured model, without building it; the
    model directory's ``config.json`` must parse and describe a supported Qwen model."""
    if model.hf_path is None:
        return model.tiny.heads, model.tiny.kv_heads, model.tiny.layers
    arch = hf_architecture(model.hf_path)
    return arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers


def hf_architecture(hf_path: str):
    """:class:`QwenArchitecture` of ``model.hf_path``, or :class:`ConfigError` naming the file."""
    from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError

    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.hf_path={hf_path!r} has no config.json (download the checkpoint first)")
    try:
        return QwenArchitecture.from_hf_config(path)
    except ValueError as exc:  # json.JSONDecodeError and UnsupportedConfigError are ValueErrors
        kind = "is not a supported model" if isinstance(exc, UnsupportedConfigError) else "does not parse"
        raise ConfigError(f"model.hf_path: {path} {kind}: {exc}") from None


def skills_dir_of(env: "EnvConfig") -> Optional[Path]:
    """The skill directory the run uses: ``env.skills_dir``, else the environment's built-in set
    (None when it has none)."""
    if env.skills_dir is not None:
        return Path(env.skills_dir)
    from megatron_sdar.skills import builtin_skill_dir

    try:
        return builtin_skill_dir(env.name)
    except FileNotFoundError:
        return None


def _check_resume(resume: str) -> None:
    """``trainer.resume`` is null, ``auto`` or a complete checkpoint directory (cheap checks:
    marker, file sizes; checksums are verified when it is loaded)."""
    from megatron_sdar.trainer.checkpointing import complete_checkpoints, is_complete_checkpoint

    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"trainer.resume={resume!r}: no such checkpoint directory")
    if is_complete_checkpoint(path):
        return
    for root in (path / "checkpoints", path):  # a run directory, or its checkpoints/ folder
        if root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = complete_checkpoints(root)
            hint = f"trainer.resume={found[0]} (its newest complete checkpoint)" if found else \
                "a complete checkpoint (it holds none)"
            raise ConfigError(f"trainer.resume={resume!r} is a run directory, not a checkpoint: pass {hint}, or "
                              f"trainer.resume=auto with trainer.output_dir={path if root != path else path.parent}")
    from megatron_sdar.trainer.checkpointing import _read_complete_checkpoint

    try:
        _read_complete_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(f"trainer.resume: {exc}") from None


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {value}")


def validate(run: RunConfig, world_size: Optional[int] = None, num_heads: Optional[int] = None,
             num_kv_heads: Optional[int] = None, num_layers: Optional[int] = None) -> RunConfig:
    """Checks that need no model. ``world_size``/heads/layers, when known, check the layout."""
    p, r, t, m, e = run.parallel, run.rollout, run.trainer, run.model, run.env
    _positive("parallel", p, "tp", "pp", "cp", "ep")
    if p.vpp is not None and p.vpp < 1:
        raise ConfigError(f"parallel.vpp must be >= 1 or null, got {p.vpp}")
    from megatron_sdar.utils.parallel_dims import LayoutError, ParallelDims

    try:  # the layout's own checks; with the world size and the model's shape when they are known
        dims = ParallelDims.from_config(p, world_size if world_size is not None else p.tp * p.pp * p.cp)
        shape = None if num_heads is None else SimpleNamespace(heads=num_heads, kv_heads=num_kv_heads,
                                                                 layers=num_layers)
        dims.check(shape, world_known=world_size is not None)
    except LayoutError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    _positive("rollout", r, "tp", "group_size", "tasks_per_step", "max_turns", "max_prompt_tokens",
              "max_response_tokens")
    if r.history_window < 0:
        raise ConfigError(f"rollout.history_window must be >= 0, got {r.history_window}")
    if r.temperature <= 0 or r.eval_temperature < 0:
        raise ConfigError("rollout.temperature must be > 0 and rollout.eval_temperature >= 0")
    from megatron_sdar.rollout.agent_loop import AgentLoopConfig

    try:  # the agent loop's own checks (formats, patterns, penalty), before anything is built
        AgentLoopConfig(action_pattern=r.action_pattern, invalid_action_penalty=r.invalid_action_penalty,
                        show_admissible_actions=r.show_admissible_actions, action_format=r.action_format,
                        context_position=r.context_position)
    except ValueError as exc:
        raise ConfigError(f"rollout: {exc}") from None
    _positive("trainer", t, "save_interval", "keep_last", "micro_batch_size", "eval_interval", "sft_batch_size")
    from megatron_sdar.trainer.checkpointing import OPTIMIZER_SHARDINGS

    if t.optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ConfigError(f"trainer.optimizer_sharding must be one of {', '.join(OPTIMIZER_SHARDINGS)}, "
                          f"got {t.optimizer_sharding!r}")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < 1:
        raise ConfigError(f"trainer.micro_batch_tokens must be >= 1 or null, got {t.micro_batch_tokens}")
    if t.max_steps < 0:
        raise ConfigError(f"trainer.max_steps must be >= 0 (0: SFT warm start only), got {t.max_steps}")
    if t.sft_steps < 0 or t.eval_tasks < 0:
        raise ConfigError("trainer.sft_steps and trainer.eval_tasks must be >= 0")
    from megatron_sdar.trainer.seeds import EVAL_SPLITS

    if t.eval_split not in EVAL_SPLITS:
        raise ConfigError(f"trainer.eval_split must be one of {', '.join(EVAL_SPLITS)}, got {t.eval_split!r}")
    if not 0.0 <= t.sft_skill_share <= 1.0:
        raise ConfigError(f"trainer.sft_skill_share must be in [0, 1], got {t.sft_skill_share}")
    if t.sft_prompt_weight < 0:
        raise ConfigError(f"trainer.sft_prompt_weight must be >= 0, got {t.sft_prompt_weight}")
    if t.sft_skill_turn_repeats < 0:
        raise ConfigError(f"trainer.sft_skill_turn_repeats must be >= 0, got {t.sft_skill_turn_repeats}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"trainer.{name} must be in [0, 1), got {getattr(t, name)}")
    if t.resume not in (None, "auto"):
        _check_resume(t.resume)
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {m.dtype!r}")
    if m.fp8 is not None:
        from megatron_sdar.models.precision import FP8_RECIPES

        if m.fp8 not in FP8_RECIPES:
            raise ConfigError(f"model.fp8 must be null or one of {sorted(FP8_RECIPES)}, got {m.fp8!r}")
        if m.dtype != "bfloat16":
            raise ConfigError("model.fp8 needs model.dtype=bfloat16 (FP8 GEMMs with BF16 master weights)")
    if m.hf_path is None and m.arch not in ("qwen2", "qwen3"):
        raise ConfigError(f"the built-in tiny model is qwen2 or qwen3, got model.arch={m.arch!r}")
    from megatron_sdar.skills import RETRIEVAL_MODES, SkillBank

    if e.retrieval not in RETRIEVAL_MODES:
        raise ConfigError(f"env.retrieval must be one of {RETRIEVAL_MODES}, got {e.retrieval!r}")
    from megatron_sdar.envs import available_envs

    if e.name not in available_envs():
        raise ConfigError(f"env.name={e.name!r} is not registered; available: {available_envs()}")
    objective = run.objective()  # preset and option values
    skills = skills_dir_of(e)
    if skills is None and (objective.needs_teacher or objective.student_sees_skills):
        raise ConfigError(f"algo={run.algo.name} needs skills but env {e.name!r} has no built-in skill set: "
                          "set env.skills_dir")
    if skills is not None:
        try:
            SkillBank.from_dir(skills)
        except (OSError, ValueError) as exc:  # SkillBankError is a ValueError
            raise ConfigError(f"env.skills_dir: {exc}") from None
    if world_size is not None and world_size % r.tp:
        raise ConfigError(f"rollout.tp={r.tp} does not divide the world size {world_size}")
    if num_heads is not None and num_heads % r.tp:
        raise ConfigError(f"rollout.tp={r.tp} does not divide the {num_heads} attention heads")
    return run
