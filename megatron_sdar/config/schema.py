"""Typed configuration of a training run (the Hydra config groups of ``megatron_sdar/config``).

The values live in one place, the YAML files of the config groups (``model/``, ``env/``,
``parallel/``, ``rollout/``, ``trainer/``; the ``algo`` group is made from the objective's
:data:`~megatron_sdar.algo.objective.PRESETS`). The dataclasses below hold the types and the checks,
not a second set of defaults: a field that a group's YAML sets has no default here
(``tests/test_config_sources.py`` fails otherwise), so a config is built by Hydra composition
(:func:`compose_run`) or from a complete mapping (a run's ``config.json``, :func:`load_config`).

:func:`load_config` turns the composed config into :class:`RunConfig` and runs :func:`validate`
once: everything that can be checked before a model is built (ranges, option values, the layout
against the model's heads and layers, files, the skill set); :func:`check_layout` adds the checks
that need the world size where it is known (the trainer, ``--dry-run``). A bad config fails in a
second with one line naming the key, not in a collective ten minutes later.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from megatron_sdar.algo.objective import PRESETS, ObjectiveConfig, preset_fields


class ConfigError(ValueError):
    """The run configuration is invalid (raised before anything is built)."""


@dataclass(kw_only=True)
class TinyModelConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    init_std: float  # std of every weight matrix at initialization
    tie_embeddings: Optional[bool]  # null: the family's (qwen2 and qwen3_moe untied, qwen3 tied)


@dataclass(kw_only=True)
class ModelConfig:
    name: str
    hf_path: Optional[str]  # HF checkpoint directory; null: build the tiny model
    arch: str
    dtype: str
    fp8: Optional[str]
    fp8_rollout: bool
    tiny: Optional[TinyModelConfig]  # the tiny model's shape (null for an HF checkpoint)
    # the shape keys of the model's config.json under their own names (QwenArchitecture.from_architecture_block):
    # the memory planner's stand-in for a checkpoint not downloaded (the trainer reads config.json;
    # null for the tiny model)
    architecture: Optional[dict]


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


@dataclass(kw_only=True)
class EnvConfig:
    name: str
    max_turns: int  # the episode length: the environment's turn budget, and the agent loop's
    kwargs: dict  # the environment's own options (make(name, **kwargs))
    skills_dir: Optional[str]  # null: the environment's built-in skill set
    retrieval: str
    skills_top_k: int
    step_timeout_s: float


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int
    pp: int
    cp: int
    ep: int
    vpp: Optional[int]
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str


@dataclass(kw_only=True)
class RolloutConfig:
    tp: int
    group_size: int
    tasks_per_step: int
    history_window: int
    max_prompt_tokens: int
    max_response_tokens: int
    temperature: float
    eval_temperature: float
    action_pattern: Optional[str]
    invalid_action_penalty: float
    show_admissible_actions: bool
    action_format: str
    context_position: str
    restate_task: bool
    gpu_memory_utilization: float
    cpu_kv_cache_gib: float
    bucket_mb: float


@dataclass(kw_only=True)
class TrainerConfig:
    max_steps: int
    output_dir: str
    save_interval: int
    keep_last: int
    resume: Optional[str]  # null | auto | <checkpoint dir>
    verify_checkpoints: bool  # checksums + finite weights before a resume (false: skip)
    # distributed optimizer's state: fully_reshardable (resumes at any TP/PP/VPP/DP; gathers each
    # model-parallel shard's state over DP while saving) | dp_reshardable (no gather; DP changes only)
    optimizer_sharding: str
    seed: int
    lr: float
    min_lr: Optional[float]  # null: constant after warmup; a value: cosine decay to it over max_steps
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    clip_grad: float
    micro_batch_size: int
    # pack samples into micro-batches of at most this many tokens (null: micro_batch_size padded rows)
    micro_batch_tokens: Optional[int]
    eval_interval: int
    eval_tasks: int
    eval_split: str  # held-out tasks evaluated: test (reported) | validation (hyperparameter choice)
    eval_greedy: bool  # also evaluate greedily (eval/greedy/*)
    eval_before_rl: bool  # evaluate at step 0 (after SFT), with and without skills
    sft_steps: int  # 0: no warm start (RL from the model as it is)
    sft_lr: float
    sft_batch_size: int
    sft_episodes: int
    sft_skill_share: float  # share of demonstrations with a (randomly drawn) skill in the prompt
    sft_prompt_weight: float  # language-model loss on the prompt tokens, relative to the response's
    sft_skill_turn_repeats: int  # extra copies of each skill demonstration's deciding (first) turn
    export_hf: bool
    tensorboard: bool
    wandb_project: Optional[str]
    plot: bool


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    algo: AlgoConfig
    env: EnvConfig
    parallel: ParallelConfig
    rollout: RolloutConfig
    trainer: TrainerConfig
    slurm: Optional[dict] = None  # a recipe's cluster, read by slurm/ and tools/plan.py; ignored by the trainer

    def objective(self) -> ObjectiveConfig:
        return self.algo.objective()


CONFIG_DIR = Path(__file__).parent
#: keys that moved, for the one line that refuses an override of the old one
MOVED_KEYS = {"rollout.max_turns": "the episode length is env.max_turns: the environment's turn budget, where the "
                                   "agent loop also stops"}


def experiment_names() -> list[str]:
    """Every ``experiment=<name>``: the files of ``config/experiment/``."""
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def recipe_names() -> list[str]:
    """The cluster recipes: the experiments with a ``slurm:`` block (a released model, a GPU layout;
    ``tools/plan.py``, ``--rehearse``). The others (``twc_tiny``, ``cooking_tiny``) are CPU benchmarks
    of the tiny model, run as they are."""
    import yaml

    return [name for name in experiment_names()
            if "slurm" in (yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()) or {})]


def check_experiment(overrides: list[str]) -> None:
    """An ``experiment=<recipe>`` override must name a recipe of ``config/experiment/``: Hydra
    treats the group as optional and would silently run the default instead."""
    import difflib

    recipes = experiment_names()
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


def compose_run(overrides: list[str], *, need_files: bool = True) -> RunConfig:
    """The validated :class:`RunConfig` of ``python -m megatron_sdar.train <overrides>`` (the
    embedded default, a recipe, Hydra overrides); every configuration error is one
    :class:`ConfigError` line. ``need_files=False`` (the memory planner, ``tools/plan.py``): the
    run's downloads and directories are not read (the model's shape comes from the model YAML's
    ``architecture:`` block when ``model.hf_path`` has no ``config.json``; the skill set and the
    resume checkpoint are not checked); every other check runs."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException
    from yaml import YAMLError

    check_experiment(overrides)
    try:
        with initialize_config_module("megatron_sdar.config", version_base=None):
            cfg = compose("sdar", overrides=list(overrides))
    except YAMLError as exc:
        raise ConfigError(yaml_error_line(exc)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        key = getattr(exc.__cause__, "full_key", None)
        unknown_group = re.match(r"Could not override '([^']+)'", str(exc))
        if unknown_group and unknown_group.group(1).split(".")[0] not in {f.name for f in dataclasses.fields(RunConfig)}:
            key = unknown_group.group(1)  # a key under a group that does not exist (trainr.lr)
        if (isinstance(exc.__cause__, ConfigAttributeError) or unknown_group) and key:  # a key no group has
            close = close_keys(key)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            where = MOVED_KEYS.get(key, "the keys are those of the YAML groups in "
                                   f"{CONFIG_DIR.relative_to(CONFIG_DIR.parents[1])}")
            raise ConfigError(f"{key} is not a configuration key{hint} ({where})") from None
        raise ConfigError(" ".join(str(exc).split())) from None
    return load_config(cfg, need_files=need_files)


def configuration_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (``trainer.max_steps``, ``model.tiny.hidden``...): the fields of the
    dataclasses, nested ones expanded (free-form mappings such as ``env.kwargs`` stop at their name)."""
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)] or \
            ([kind] if dataclasses.is_dataclass(kind) else [])
        keys += configuration_keys(inner[0], f"{prefix}{f.name}.") if inner else [f"{prefix}{f.name}"]
    return keys


def close_keys(key: str) -> list[str]:
    """Configuration keys close to a misspelt ``key`` (``trainer.max_stpes`` -> ``trainer.max_steps``)."""
    import difflib

    keys = configuration_keys()
    group, _, rest = key.partition(".")
    in_group = {k.partition(".")[2]: k for k in keys if k.partition(".")[0] == group}
    if in_group:  # the group is right: compare the rest alone (a shared prefix is no likeness)
        return [in_group[k] for k in difflib.get_close_matches(rest, list(in_group), n=2, cutoff=0.7)]
    return difflib.get_close_matches(key, keys, n=2, cutoff=0.8)


def config_dict(run: RunConfig) -> dict:
    """``run`` as the plain JSON data a run's ``config.json`` holds."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(run)))


def load_config(cfg: Any, *, need_files: bool = True) -> RunConfig:
    """Hydra DictConfig / plain dict -> validated :class:`RunConfig` (unknown keys are errors;
    ``need_files``: see :func:`compose_run`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        schema = OmegaConf.structured(RunConfig)
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
        plain = {k: v for k, v in (plain or {}).items() if k not in ("hydra", "experiment")}
        if "algo" in plain:
            plain["algo"] = _complete_algo(plain["algo"])
        merged = OmegaConf.merge(schema, plain)
        run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except MissingMandatoryValue as exc:  # a mapping without some field: the YAML groups hold every value
        raise ConfigError(f"invalid configuration: {exc.full_key} is not set (build a config with compose_run, "
                          "or load a run's complete config.json)") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}".replace("\n", "; ")) from None
    heads, kv_heads, layers = model_shape(run.model, need_checkpoint=need_files)
    validate(run, num_heads=heads, num_kv_heads=kv_heads, num_layers=layers, need_files=need_files)
    return run


def model_shape(model: ModelConfig, *, need_checkpoint: bool = True) -> tuple[int, int, int]:
    """(attention heads, KV heads, layers) of the configured model, without building it (see
    :func:`model_architecture`)."""
    if model.hf_path is None:
        if model.tiny is None:
            raise ConfigError("model.hf_path and model.tiny are both null: set model.hf_path (an HF checkpoint) or "
                              "model.tiny (the built-in tiny model's shape, model=tiny)")
        return model.tiny.heads, model.tiny.kv_heads, model.tiny.layers
    arch = model_architecture(model, need_checkpoint=need_checkpoint)
    return arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers


def model_architecture(model: ModelConfig, *, need_checkpoint: bool = True):
    """:class:`QwenArchitecture` of ``model``: the ``config.json`` of ``model.hf_path``, which must
    parse and describe a supported Qwen model; when it is absent and ``need_checkpoint`` is false,
    the model YAML's ``architecture:`` block. :class:`ConfigError` naming the file otherwise."""
    from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError

    if model.hf_path is None:
        raise ConfigError("model.hf_path is null (the built-in tiny model, built at start-up): no architecture "
                          "to read before the run")
    path = Path(model.hf_path) / "config.json"
    if not path.is_file() and (need_checkpoint or model.architecture is None):
        raise ConfigError(f"model.hf_path={model.hf_path!r} has no config.json (download the checkpoint first)")
    try:
        if path.is_file():
            return QwenArchitecture.from_hf_config(path)
        return QwenArchitecture.from_architecture_block(model.arch, model.architecture)
    except ValueError as exc:  # json.JSONDecodeError and UnsupportedConfigError are ValueErrors
        if not path.is_file():
            raise ConfigError(f"model.architecture (model {model.name!r}): {exc}") from None
        kind = "is not a supported model" if isinstance(exc, UnsupportedConfigError) else "does not parse"
        raise ConfigError(f"model.hf_path: {path} {kind}: {exc}") from None


def skills_dir_of(env: "EnvConfig") -> Optional[Path]:
    """The skill directory the run uses: ``env.skills_dir`` (a directory, or the name of a built-in
    set, a bare name such as ``household_knowledge``), else the environment's built-in set (None when
    it has none)."""
    from megatron_sdar.skills import BUILTIN_SKILL_ROOT, builtin_skill_dir

    if env.skills_dir is not None:
        named = "/" not in env.skills_dir and (BUILTIN_SKILL_ROOT / env.skills_dir / "skill_mapping.json").is_file()
        return BUILTIN_SKILL_ROOT / env.skills_dir if named else Path(env.skills_dir)
    try:
        return builtin_skill_dir(env.name)
    except FileNotFoundError:
        return None


def _check_resume(resume: str) -> None:
    """``trainer.resume`` is null, ``auto`` or a complete checkpoint directory (cheap checks:
    marker, file sizes; checksums are verified when it is loaded)."""
    from megatron_sdar.checkpoint.resume import complete_checkpoints, is_complete_checkpoint, read_complete_checkpoint

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
    try:
        read_complete_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(f"trainer.resume: {exc}") from None


def check_output_dir(run: RunConfig) -> None:
    """``trainer.output_dir`` can take this run: not a file, and no run in it unless resuming.
    The state of the disk, not of the configuration: ``train`` (and its ``--dry-run``) call it
    after :func:`compose_run`, before anything is built; tools that only read a configuration
    (the planner, the tests, ``compare_algos``' staleness check) do not."""
    from megatron_sdar.checkpoint.resume import RunDirectoryError, check_run_directory

    try:
        check_run_directory(run.trainer.output_dir, run.trainer.resume)
    except RunDirectoryError as exc:
        raise ConfigError(str(exc)) from None


def check_model_files(run: RunConfig) -> None:
    """``model.hf_path``'s safetensors files are whole (headers and sizes; the dry run and ``--check`` need
    only its ``config.json``): a truncated download is one line, not a traceback after the model is built."""
    if run.model.hf_path is None:
        return
    from megatron_sdar.models.hf_loader import check_safetensors_files

    try:
        check_safetensors_files(run.model.hf_path)
    except ValueError as exc:
        raise ConfigError(f"model.hf_path: {exc}") from None


#: what a resume may not change (the checkpoint's weights and optimizer state are of this model):
#: keys, or key prefixes ending in "."
RESUME_FIXED = ("model.hf_path", "model.arch", "model.dtype", "model.tiny.")
#: what differs on every resume, or names the place rather than the run
_RESUME_UNREPORTED = ("trainer.resume", "trainer.output_dir", "slurm.")


def flat_dict(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping by dotted keys: ``{"trainer": {"lr": 1e-3}}`` -> ``{"trainer.lr": 1e-3}``
    (an empty mapping stays a value)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items()
                for k, v in flat_dict(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: data}


def resume_checkpoint(run: RunConfig) -> Optional[Path]:
    """The checkpoint ``trainer.resume`` will load: the given one, or under ``auto`` the newest complete
    one of the output directory (None: nothing to resume, the run starts from scratch)."""
    import warnings

    from megatron_sdar.checkpoint.resume import complete_checkpoints

    t = run.trainer
    if t.resume is None:
        return None
    if t.resume != "auto":
        return Path(t.resume)
    with warnings.catch_warnings():  # the trainer reports the checkpoints it skips, once
        warnings.simplefilter("ignore")
        return next(iter(complete_checkpoints(Path(t.output_dir) / "checkpoints")), None)


def resume_changes(run: RunConfig, checkpoint: Optional[Path] = None) -> list[str]:
    """What ``run`` changes in the run it resumes, against the configuration that made its checkpoint
    (:func:`~megatron_sdar.checkpoint.resume.saved_run_config`): ``["trainer.lr 0.001 -> 0.0005", ...]``
    (learning rate, schedule, Adam, clipping, the algorithm and its coefficients apply from the resumed
    step; the optimizer's moments are kept). What the checkpoint cannot carry is refused with
    :class:`ConfigError`, one line naming every differing key: the model (:data:`RESUME_FIXED`), the
    distributed optimizer's on/off, the model-parallel layout of a ``dp_reshardable`` optimizer state,
    expert parallelism on/off for an MoE model (megatron-core 0.19), an EMA teacher the checkpoint
    holds no weights of. Reads small JSON files only: run before anything is built. ``checkpoint``:
    the one loaded (default: :func:`resume_checkpoint`'s)."""
    from megatron_sdar.checkpoint.model import EMA_TEACHER_WEIGHTS, CheckpointFormatError
    from megatron_sdar.checkpoint.resume import RunDirectoryError, read_complete_checkpoint, saved_run_config

    checkpoint = checkpoint or resume_checkpoint(run)
    if checkpoint is None:
        return []
    try:
        found = saved_run_config(checkpoint)
        marker, _ = read_complete_checkpoint(checkpoint)
    except (RunDirectoryError, CheckpointFormatError) as exc:
        raise ConfigError(f"trainer.resume={run.trainer.resume}: {exc}") from None
    now = flat_dict(config_dict(run))
    if found is None:  # a checkpoint copied without its run's config: the marker alone speaks
        source, saved = checkpoint, {}
    else:
        source, saved = found[0], flat_dict(found[1])
    differing = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    fixed = {k: d for k, d in differing.items() if k in RESUME_FIXED or k.startswith(
        tuple(f for f in RESUME_FIXED if f.endswith(".")))}
    # the optimizer kind and the layout come from the checkpoint's own marker: it knows what it holds
    layout, optimizer = marker.get("layout", {}), marker.get("optimizer", {})
    p = run.parallel
    if "distributed" in optimizer and optimizer["distributed"] != p.distributed_optimizer:
        fixed["parallel.distributed_optimizer"] = (optimizer["distributed"], p.distributed_optimizer)
    ours = {"tensor_parallel": p.tp, "pipeline_parallel": p.pp, "virtual_pipeline": p.vpp or 1,
            "context_parallel": p.cp, "expert_parallel": p.ep}
    if optimizer.get("distributed") and optimizer.get("sharding") == "dp_reshardable":
        for name, key in zip(ours, ("tp", "pp", "vpp", "cp", "ep")):
            if name in layout and layout[name] != ours[name]:
                fixed[f"parallel.{key} (optimizer state saved dp_reshardable)"] = (layout[name], ours[name])
    if run.model.arch == "qwen3_moe" and "expert_parallel" in layout and (layout["expert_parallel"] > 1) != (p.ep > 1):
        fixed["parallel.ep (expert parallelism on/off)"] = (layout["expert_parallel"], p.ep)
    if run.algo.teacher == "ema" and EMA_TEACHER_WEIGHTS not in marker.get("extra_models", [EMA_TEACHER_WEIGHTS]):
        fixed["algo.teacher (the checkpoint holds no EMA teacher)"] = (saved.get("algo.teacher", "?"), "ema")
    if fixed:
        raise ConfigError(f"trainer.resume={run.trainer.resume}: {checkpoint} cannot be resumed with another "
                          + ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in fixed.items())
                          + f" (saved in {source}); resume with the saved values, or start a new run in a fresh "
                          "trainer.output_dir")
    return [f"{k} {a} -> {b}" for k, (a, b) in differing.items() if not k.startswith(_RESUME_UNREPORTED)]


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {value}")


def validate(run: RunConfig, num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
             num_layers: Optional[int] = None, need_files: bool = True) -> RunConfig:
    """Every check of ``run`` that needs neither the world size nor a built model: ranges, option
    values, the layout against the model's heads/layers (when given), files and the skill set.
    :func:`load_config` runs it once per composed config; :func:`check_layout` adds what depends on
    the world size. It imports no engine or model code (vLLM, Megatron), so an error is the only
    line printed. ``need_files=False``: the skill set and the resume checkpoint are not read.
    Whether ``trainer.output_dir`` already holds a run is :func:`check_output_dir`'s."""
    p, r, t, m, e = run.parallel, run.rollout, run.trainer, run.model, run.env
    _positive("parallel", p, "tp", "pp", "cp", "ep")
    if p.vpp is not None and p.vpp < 1:
        raise ConfigError(f"parallel.vpp must be >= 1 or null, got {p.vpp}")
    from megatron_sdar.utils.parallel_dims import LayoutError, ParallelDims

    try:  # the layout's own checks against the model's shape; dp needs the world size (check_layout)
        dims = ParallelDims.from_config(p, p.tp * p.pp * p.cp)
        shape = None if num_heads is None else SimpleNamespace(heads=num_heads, kv_heads=num_kv_heads,
                                                                 layers=num_layers)
        dims.check(shape, world_known=False)
    except LayoutError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    _positive("env", e, "max_turns", "skills_top_k")
    if not e.step_timeout_s > 0:
        raise ConfigError(f"env.step_timeout_s must be > 0, got {e.step_timeout_s}")
    _positive("rollout", r, "tp", "group_size", "tasks_per_step")
    if num_heads is not None and num_heads % r.tp:
        raise ConfigError(f"rollout.tp={r.tp} does not divide the {num_heads} attention heads")
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {r.temperature}")
    if not r.eval_temperature >= 0:
        raise ConfigError(f"rollout.eval_temperature must be >= 0 (0: greedy), got {r.eval_temperature}")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}")
    if not (r.cpu_kv_cache_gib >= 1 and float(r.cpu_kv_cache_gib).is_integer()):
        raise ConfigError("rollout.cpu_kv_cache_gib must be a whole number of GiB >= 1 (vLLM's CPU backend reads "
                          f"VLLM_CPU_KVCACHE_SPACE as an integer), got {r.cpu_kv_cache_gib}")
    if not r.bucket_mb > 0:
        raise ConfigError(f"rollout.bucket_mb must be > 0, got {r.bucket_mb}")
    from megatron_sdar.rollout.agent_loop import AgentLoopConfig

    try:  # the agent loop's own checks (history window, token budgets, formats, pattern, penalty)
        AgentLoopConfig.of_run(run)
    except ValueError as exc:
        raise ConfigError(f"rollout: {exc}") from None
    _positive("trainer", t, "save_interval", "keep_last", "micro_batch_size", "eval_interval", "sft_batch_size")
    from megatron_sdar.checkpoint.training import OPTIMIZER_SHARDINGS

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
    for name in ("lr", "sft_lr"):
        if not getattr(t, name) > 0:
            raise ConfigError(f"trainer.{name} must be > 0, got {getattr(t, name)}")
    if t.min_lr is not None and not 0.0 <= t.min_lr <= t.lr:
        raise ConfigError(f"trainer.min_lr must be in [0, trainer.lr={t.lr}], got {t.min_lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"trainer.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not t.weight_decay >= 0:
        raise ConfigError(f"trainer.weight_decay must be >= 0, got {t.weight_decay}")
    if not t.clip_grad > 0:
        raise ConfigError(f"trainer.clip_grad must be > 0 (the gradient norm is clipped to it), got {t.clip_grad}")
    if t.sft_steps > 0 and t.sft_episodes < 1:
        raise ConfigError(f"trainer.sft_episodes must be >= 1 when trainer.sft_steps > 0, got {t.sft_episodes}")
    from megatron_sdar.trainer.seeds import TEST, task_seed

    try:  # every task seed of the run comes from the seed layout, which holds a bounded trainer.seed
        task_seed(TEST, 0, t.seed)
    except ValueError as exc:
        raise ConfigError(f"{exc}, the range of the task-seed layout (trainer/seeds.py)") from None
    if need_files and t.resume not in (None, "auto"):
        _check_resume(t.resume)
    from megatron_sdar.models.precision import FP8ConfigError, resolve_precision

    try:  # the option values; the machine (TE, the GPU) is check_precision's, where the run starts
        resolve_precision(m.dtype, m.fp8, fp8_rollout=m.fp8_rollout, check_hardware=False)
    except FP8ConfigError as exc:
        raise ConfigError(str(exc)) from None
    from megatron_sdar.models.tiny import TINY_ARCHS

    if m.hf_path is None and m.arch not in TINY_ARCHS:
        raise ConfigError(f"the built-in tiny model is one of {', '.join(TINY_ARCHS)}, got model.arch={m.arch!r}")
    from megatron_sdar.skills import RETRIEVAL_MODES, SkillBank

    if e.retrieval not in RETRIEVAL_MODES:
        raise ConfigError(f"env.retrieval must be one of {RETRIEVAL_MODES}, got {e.retrieval!r}")
    from megatron_sdar.envs import available_envs

    if e.name not in available_envs():
        raise ConfigError(f"env.name={e.name!r} is not registered; available: {available_envs()}")
    from megatron_sdar.envs import EnvOptionError, check_options

    try:  # what the environment (its engine: TextWorldExpress's game_params) would refuse once built
        check_options(e.name, dict(e.kwargs))
    except EnvOptionError as exc:
        raise ConfigError(f"env.kwargs.{exc.option}: {exc.problem}" if exc.option else f"env.kwargs: {exc}") from None
    if need_files:  # the data of the splits the run draws: SFT and RL train tasks, evaluation eval_split's
        from megatron_sdar.envs.splits import data_problem

        used = {"train"} if t.max_steps > 0 or t.sft_steps > 0 else set()
        problem = data_problem(e.name, dict(e.kwargs), used | ({t.eval_split} if t.eval_tasks else set()))
        if problem is not None:
            raise ConfigError(problem)
    objective = run.objective()  # preset and option values
    if objective.pg_coef > 0 and r.group_size < 2:
        raise ConfigError(f"rollout.group_size={r.group_size} with algo={run.algo.name}: its policy gradient uses the "
                          "group-normalized advantage (reward minus the mean of the task's group), which is 0 in a "
                          "group of one episode; set rollout.group_size >= 2")
    if t.sft_steps > 0:
        from megatron_sdar.envs import has_demonstrations

        if has_demonstrations(e.name, **e.kwargs) is False:
            raise ConfigError(f"trainer.sft_steps={t.sft_steps}: the SFT warm start imitates demonstrations, and env "
                              f"{e.name!r} has none (no scripted or oracle plan); set trainer.sft_steps=0")
    skills = skills_dir_of(e)
    if skills is None and (objective.needs_teacher or objective.student_sees_skills):
        raise ConfigError(f"algo={run.algo.name} needs skills but env {e.name!r} has no built-in skill set: "
                          "set env.skills_dir")
    if skills is not None and need_files:
        try:
            SkillBank.from_dir(skills)
        except (OSError, ValueError) as exc:  # SkillBankError is a ValueError
            raise ConfigError(f"env.skills_dir: {exc}") from None
    return run


def check_layout(run: RunConfig, world_size: int) -> "ParallelDims":
    """The checks that need the world size, where it is known (the trainer's process group, the
    cluster ``--dry-run`` plans for): ``dp = world / (tp*pp*cp)`` whole, expert parallelism within
    it, ``rollout.tp`` dividing the world. Returns the layout. Everything else was checked once by
    :func:`validate` when the config was composed."""
    from megatron_sdar.utils.parallel_dims import LayoutError, ParallelDims

    try:
        dims = ParallelDims.from_config(run.parallel, world_size).check(world_known=True)
    except LayoutError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    if world_size % run.rollout.tp:
        raise ConfigError(f"rollout.tp={run.rollout.tp} does not divide the world size {world_size}")
    return dims


def dry_run_world_size(run: RunConfig) -> int:
    """The world size a dry run plans for: ``WORLD_SIZE`` when set (torchrun, srun), else the
    recipe's ``slurm.nodes x slurm.gpus_per_node``, else 1."""
    slurm = run.slurm or {}
    try:
        if os.environ.get("WORLD_SIZE"):
            world = int(os.environ["WORLD_SIZE"])
        else:
            world = int(slurm.get("nodes", 1)) * int(slurm.get("gpus_per_node", 1)) if slurm else 1
    except (TypeError, ValueError):
        raise ConfigError(f"--dry-run: WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} / slurm.nodes, slurm.gpus_per_node="
                          f"{slurm.get('nodes')!r}, {slurm.get('gpus_per_node')!r} must be integers") from None
    if world < 1:
        raise ConfigError(f"--dry-run: the world size must be >= 1, got {world}")
    return world


GROUPS_WITH_DEFAULTS = ("trainer", "rollout", "env")


def group_defaults(env_name: str) -> dict[str, dict]:
    """The values of the YAML group options a run starts from, before any recipe or override:
    ``trainer/default.yaml``, ``rollout/default.yaml`` and ``env/<env_name>.yaml`` (resolved)."""
    from omegaconf import OmegaConf

    files = {"trainer": CONFIG_DIR / "trainer" / "default.yaml", "rollout": CONFIG_DIR / "rollout" / "default.yaml",
             "env": CONFIG_DIR / "env" / f"{env_name}.yaml"}
    return {group: OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}
            for group, path in files.items()}


def settings_differing_from_defaults(run: RunConfig) -> dict[str, Any]:
    """Every ``trainer``, ``rollout`` and ``env`` value of ``run`` that differs from its YAML group's
    (:func:`group_defaults`): what a recipe or the command line changed, e.g.
    ``{"trainer.sft_steps": 0, "trainer.lr": 1e-06, ...}`` (nested mappings by their dotted keys)."""
    defaults = group_defaults(run.env.name)
    values = config_dict(run)
    out: dict[str, Any] = {}
    for group in GROUPS_WITH_DEFAULTS:
        given, default = flat_dict(values[group], group), flat_dict(defaults[group], group)
        out.update({key: value for key, value in given.items() if key not in default or default[key] != value})
    return out
