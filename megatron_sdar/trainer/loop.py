"""The SDAR training iteration and the run around it.

One iteration (every rank runs every line; collectives keep them in lockstep):

    weights -> vLLM (in place)                     rollout/weight_sync_*
    rollout: tasks_per_step x group_size episodes  rollout/*   (this rank's share, then gathered)
    HDPO only: cliff groups replayed with the skills in the prompt; successful replays kept
    samples: one per turn, GRPO advantage of its episode (+ HDPO's distillation-only rescue turns)
    teacher pass: skills + same prompt + same response, forward only      (needs_teacher)
    reference pass: frozen initial policy, forward only                   (kl_coef > 0)
    student pass: forward/backward of the SDAR objective (Megatron schedule)
    optimizer step (skipped on a non-finite loss)  actor/*, sdar/*
    metrics.jsonl / TensorBoard; eval every trainer.eval_interval; checkpoint every save_interval

Teacher weights (``algo.teacher``): by default the rollout-time weights, as the SDAR release: the
teacher pass runs before the update, with the weights vLLM sampled from (one update per rollout: they
are also the current weights); ``frozen`` runs it on the KL reference model (the policy at the start
of RL), ``ema`` on an exponential moving average of the policy (:class:`~megatron_sdar.trainer.teacher.TeacherWeights`). Old
log-probs are the student's own, detached (the PPO ratio starts at 1).

Determinism: task seeds, sampling seeds and environment seeds are functions of (seed, step), RNG
states and the skill bandit are checkpointed, so a resumed run repeats the uninterrupted one.
Wall-clock metrics live under ``perf/``.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sdar.config.schema import ConfigError, RunConfig, check_layout, config_dict, resume_checkpoint
from megatron_sdar.rollout import (AgentLoop, AgentLoopConfig, ChatFormatter, EpisodeSpec, MegatronWeightSource,
                                   RolloutEngine, TrajectoryBatch)
from megatron_sdar.trainer import seeds as task_seeds
from megatron_sdar.trainer.batch import rescue_samples, samples_from_trajectories
from megatron_sdar.trainer.interrupt import Preemption
from megatron_sdar.trainer.policy import Policy, build_policy
from megatron_sdar.trainer.teacher import TeacherBatch
from megatron_sdar.trainer.update import PolicyUpdate
from megatron_sdar.utils.logging import log, set_log_prefix

EVAL_EPISODE_ID = 10_000_000  # sampling seeds of evaluation episodes, apart from training's
RESCUE_EPISODE_ID = 20_000_000  # and of HDPO's rescue episodes


def build_env(env: Any, seed: int):
    """The environment of ``env`` (the run's ``EnvConfig``) with environment seed ``seed``."""
    from megatron_sdar.envs import make

    return make(env.name, seed=seed, max_turns=env.max_turns, **dict(env.kwargs))


def episode_specs(make_env, seeds: list[int], group_size: int, first_episode_id: int, replica: int = 0,
                  replicas: int = 1) -> list[EpisodeSpec]:
    """Replica ``replica``'s episodes of the tasks ``seeds`` (round-robin over the ``replicas`` rollout
    replicas), ``group_size`` each; every task is drawn from its seed's split (:func:`task_seeds.split_of`:
    evaluation seeds from the test or validation tasks, SFT and training seeds from the train tasks)."""
    specs = []
    for task_index, task_seed in enumerate(seeds):
        if task_index % replicas != replica:
            continue
        split = task_seeds.split_of(task_seed)
        for g in range(group_size):
            episode_id = first_episode_id + task_index * group_size + g
            specs.append(EpisodeSpec(make_env(seed=episode_id), group=task_index, task_seed=task_seed,
                                     episode_id=episode_id, split=split))
    return specs


def prepare_model_dir(run: RunConfig) -> Path:
    """The HF directory the run starts from: ``model.hf_path``, or the tiny model built once into
    ``<output_dir>/base_model`` (rank 0 builds, the others wait); its tokenizer is trained on the
    built-in world's text (``corpus_text``: the household world, TWC, CookingWorld), skills included, or
    on the skill set's."""
    if run.model.hf_path is not None:
        return Path(run.model.hf_path)
    out = Path(run.trainer.output_dir) / "base_model"
    # what the tiny model is built from: a new run rebuilds a base_model/ built otherwise (another
    # shape would otherwise be trained silently); a resume keeps it (its shape is checked against the
    # checkpoint's config by resume_changes, and without SFT it is the KL reference)
    values = config_dict(run)
    recipe = {"arch": run.model.arch, "tiny": values["model"]["tiny"], "seed": run.trainer.seed,
              "env": run.env.name, "env_kwargs": values["env"]["kwargs"]}
    record = out / BASE_MODEL_RECIPE
    built = (out / "model.safetensors").is_file()
    if built and resume_checkpoint(run) is None and dist.get_rank() == 0:
        try:
            same = json.loads(record.read_text()) == recipe
        except (OSError, ValueError):
            same = False
        if not same:
            log(f"{out} was built from other settings than this run's model.tiny / seed / env: rebuilding it")
            built = False
    if dist.get_rank() == 0 and not built:
        from megatron_sdar.models.tiny import build_tiny_qwen

        from megatron_sdar.rollout.agent_loop import prompt_text

        from megatron_sdar.envs import env_class

        extra = prompt_text()
        if hasattr(env_class(run.env.name, **run.env.kwargs), "corpus_text"):  # a built-in world's text, skills included
            env = build_env(run.env, 0)
            extra += "\n" + env.corpus_text(task_seeds.corpus_seeds(60))
            env.close()
        else:  # the skill set's text: the teacher's prompts are mostly skills
            from megatron_sdar.config.schema import skills_dir_of

            from megatron_sdar.skills import SkillBank

            skills = skills_dir_of(run.env)
            if skills is not None:
                extra += "\n" + "\n".join(skill.text for skill in SkillBank.from_dir(skills).skills.values())
        tiny, r = run.model.tiny, run.rollout
        options = {"head_dim": tiny.hidden // tiny.heads} if run.model.arch != "qwen2" else {}
        if tiny.tie_embeddings is not None:
            options["tie_word_embeddings"] = tiny.tie_embeddings
        build_tiny_qwen(out, run.model.arch, seed=run.trainer.seed, extra_text=extra, vocab_size=tiny.vocab,
                        hidden_size=tiny.hidden, num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                        num_key_value_heads=tiny.kv_heads, intermediate_size=tiny.ffn, init_std=tiny.init_std,
                        # room for the rollout's whole prompt + response budget
                        max_position_embeddings=max(2048, r.max_prompt_tokens + r.max_response_tokens), **options)
        record.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    dist.barrier()
    return out


class SDARTrainer:
    """Builds everything from a :class:`RunConfig` validated when it was composed (after the
    process group exists; the layout checks that need the world size run first)."""

    def __init__(self, run: RunConfig) -> None:
        from transformers import AutoTokenizer

        from megatron_sdar.trainer.launch import check_precision, launch_plan
        self.run_config = run
        set_log_prefix(run.algo.name)  # every line names the preset that runs
        t = run.trainer
        world = dist.get_world_size()
        # the checks that need this machine, before anything is built; the rest was validated with the config
        check_layout(run, world)
        precision = check_precision(run)
        self.output_dir = Path(t.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.objective = run.objective()
        self.model_dir = prepare_model_dir(run)
        # precision, optimizer, layout knobs and engine config: the objects a dry run prints
        self.plan = launch_plan(run, world, self.model_dir, precision=precision)
        self.arch = self.plan.arch
        self.plan.dims.initialize(seed=t.seed)
        self.optim = self.plan.optim
        self.policy: Policy = build_policy(self.arch, self.optim, hf_dir=self.model_dir, precision=self.plan.precision,
                                           **self.plan.transformer_overrides)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.updater = PolicyUpdate(self.policy, self.objective, t.micro_batch_size,
                                   int(self.tokenizer.pad_token_id or 0), self.reference_dir,
                                   micro_batch_tokens=t.micro_batch_tokens)
        self.retriever = self._build_retriever()
        r = run.rollout
        self.engine = RolloutEngine(self.model_dir, self.plan.engine)
        self.weight_source = MegatronWeightSource(self.policy.model, self.arch, bucket_mb=r.bucket_mb)
        from megatron_sdar import patches

        patches.start_checkpoint_write_queue()  # before the SIGINT handler: Ctrl-C must not kill its process
        self.preemption = Preemption()
        self._synced_updates = -1  # policy.steps_taken when vLLM last received the weights
        self.step = 0
        self.sft_done = t.sft_steps == 0
        self.sft_model: Path | None = None  # this run's SFT export, the KL reference once it exists
        self.resumed_from: Path | None = None
        self.logger = None

    # ------------------------------------------------------------------ setup helpers
    def _build_retriever(self):
        from megatron_sdar.config.schema import skills_dir_of
        from megatron_sdar.skills import SkillBank, SkillRetriever

        env = self.run_config.env
        skills_dir = skills_dir_of(env)  # validated with the config
        if skills_dir is None:
            return None
        return SkillRetriever(SkillBank.from_dir(skills_dir), mode=env.retrieval, top_k=env.skills_top_k,
                              seed=self.run_config.trainer.seed)

    def _make_env(self, seed: int):
        return build_env(self.run_config.env, seed)

    def _loop(self, temperature: float, with_skills: bool, student_sees_skills: bool | None = None,
              acts_with_context: bool = False) -> AgentLoop:
        """``with_skills``: retrieve skills (the teacher's context); ``student_sees_skills``: put
        them in the student's own prompt too (default: the objective's choice); ``acts_with_context``:
        generate from the teacher's prompt (HDPO's rescue)."""
        config = self._agent_config(temperature, student_sees_skills, acts_with_context)
        return AgentLoop(self.engine, self.tokenizer, config, self.retriever if with_skills else None)

    @functools.cached_property
    def formatter(self) -> ChatFormatter:
        """The rollout's prompt rendering (chat template, context placement): the teacher batch's
        prompts are rendered with it."""
        return ChatFormatter(self.tokenizer, self._agent_config(self.run_config.rollout.temperature))

    def _agent_config(self, temperature: float, student_sees_skills: bool | None = None,
                      acts_with_context: bool = False) -> AgentLoopConfig:
        student = self.objective.student_sees_skills if student_sees_skills is None else student_sees_skills
        return AgentLoopConfig.of_run(self.run_config, temperature=temperature,  # 0: greedy
                                      skills_in_student_prompt=student and not acts_with_context,
                                      acts_with_privileged_context=acts_with_context)

    # ------------------------------------------------------------------ rollout
    def _specs(self, seeds: list[int], group_size: int, first_episode_id: int) -> list[EpisodeSpec]:
        """This rank's episodes: tasks spread round-robin over the rollout replicas."""
        return episode_specs(self._make_env, seeds, group_size, first_episode_id, self.engine.dp_rank,
                             self.engine.dp_size)

    def _gather_episodes(self, batch: TrajectoryBatch) -> TrajectoryBatch:
        """Every replica's episodes on every rank (one copy per rollout replica)."""
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, batch if dist.get_rank() % self.engine.config.tp == 0 else None)
        merged = TrajectoryBatch.merge([p for p in parts if p is not None])
        merged.metrics = batch.metrics
        return merged

    def rollout(self, seeds: list[int], *, temperature: float, with_skills: bool, group_size: int,
                first_episode_id: int, student_sees_skills: bool | None = None, acts_with_context: bool = False,
                contexts: dict | None = None) -> TrajectoryBatch:
        loop = self._loop(temperature, with_skills, student_sees_skills, acts_with_context)
        self.engine.wake_up()
        batch = loop.run(self._specs(seeds, group_size, first_episode_id), contexts=contexts)
        self.engine.sleep()  # GPU: vLLM's weights and KV cache make room for the passes
        return self._gather_episodes(batch)

    def sync_weights(self, force: bool = False) -> dict[str, float]:
        """Push the policy's weights into vLLM unless it already has them (eval right before a
        step shares the sync) or ``force`` (a benchmark timing the sync); returns the last sync's stats."""
        if force or self._synced_updates != self.policy.steps_taken:
            self.engine.sync_weights(self.weight_source)
            self._synced_updates = self.policy.steps_taken
        return self.engine.last_sync.as_metrics()

    # ------------------------------------------------------------------ SFT warm start
    def sft(self) -> bool:
        """Demonstrations (:mod:`megatron_sdar.trainer.sft`) and cross-entropy. Adam's moments of SFT
        (another objective, another learning rate) are discarded before the first RL step (in
        :meth:`train`) so that RL is not steered by them. The policy after SFT is the frozen KL
        reference. Returns False when a preemption signal stopped it (SFT keeps no checkpoint:
        ``trainer.resume=auto`` starts the run again)."""
        from megatron_sdar.models.hf_export import export_hf
        from megatron_sdar.trainer.sft import build_sft_data, run_sft

        t = self.run_config.trainer
        loop = self._loop(1.0, False)
        data = build_sft_data(self._make_env, loop.formatter, self.tokenizer, loop.config,
                              task_seeds.sft_seeds(t.seed, t.sft_episodes), t.sft_skill_share, t.seed,
                              t.sft_skill_turn_repeats)
        log(f"SFT warm start: {t.sft_steps} steps on {data.describe()}")
        if not data.samples:
            raise ConfigError("trainer.sft_steps > 0 but the demonstrations gave no training turns")
        if not run_sft(self.updater, data, t.sft_steps, t.sft_batch_size, t.sft_lr, t.seed, self.logger.log_sft,
                       t.sft_prompt_weight, stop_requested=self.preemption.any_rank):
            return False
        export_hf(self.policy.unwrapped(), self.arch, self.output_dir / SFT_MODEL_DIR, assets_dir=self.model_dir)
        self.sft_done, self.sft_model = True, self.output_dir / SFT_MODEL_DIR
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, *, temperature: float, with_skills: bool, prefix: str = "eval") -> dict[str, float]:
        """Held-out tasks of ``trainer.eval_split`` (the same ones for every run), one episode each.
        ``with_skills``: the retrieved skills in the student's prompt (the teacher's view); otherwise
        none, except for skill-in-prompt presets (the student must have internalized them). Success
        comes with its 95% Wilson interval; where the environment judges a decisive choice,
        ``<prefix>/first_choice_correct[/<task type>]`` is the share of episodes whose first decisive
        action is the one the matching skill states (knowledge, whatever the success).

        Episodes that failed in the environment are counted (``<prefix>/env_errors``) and left out of
        every number, ``<prefix>/num_tasks`` and the interval included; more than
        :data:`~megatron_sdar.rollout.trajectory.MAX_ENV_ERROR_SHARE` of them stop the run
        (:class:`~megatron_sdar.envs.EnvironmentFailure`, raised on every rank alike: the episodes
        are gathered to every rank first)."""
        from megatron_sdar.rollout.trajectory import check_env_errors
        from megatron_sdar.utils.stats import wilson_interval

        t = self.run_config.trainer
        if t.eval_tasks == 0:
            return {}
        self.sync_weights()
        sees = with_skills or self.objective.student_sees_skills
        batch = self.rollout(task_seeds.eval_seeds(t.eval_tasks, t.eval_split), temperature=temperature, with_skills=sees,
                             group_size=1, first_episode_id=EVAL_EPISODE_ID, student_sees_skills=sees)
        warning = check_env_errors(batch, "evaluation episodes" + ("" if prefix == "eval" else f" ({prefix})"),
                                   self.run_config.env.name)
        if warning:
            log(warning)
        summary = batch.summary()
        out = {k.replace("rollout/", f"{prefix}/"): v for k, v in summary.items()
               if k.startswith(("rollout/success_rate", "rollout/first_choice_correct"))
               or k in ("rollout/reward_mean", "rollout/turns_mean", "rollout/invalid_action_rate", "rollout/env_errors")}
        wins, n = sum(e.won for e in batch.played), len(batch.played)
        low, high = wilson_interval(wins, n)
        out.update({f"{prefix}/num_tasks": float(n), f"{prefix}/success_rate_ci_low": low,
                    f"{prefix}/success_rate_ci_high": high})
        return out

    def evaluations(self, *, before_rl: bool = False) -> dict[str, float]:
        """``eval/*`` at ``rollout.eval_temperature``, ``eval/greedy/*`` (``trainer.eval_greedy``) and,
        before RL, ``eval/with_skills/*``: the teacher's edge over the student."""
        r, t = self.run_config.rollout, self.run_config.trainer
        out = self.evaluate(temperature=r.eval_temperature, with_skills=False)
        if t.eval_greedy:
            out.update(self.evaluate(temperature=0.0, with_skills=False, prefix="eval/greedy"))
        if before_rl and self.retriever is not None and not self.objective.student_sees_skills:
            out.update(self.evaluate(temperature=r.eval_temperature, with_skills=True, prefix="eval/with_skills"))
        return out

    # ------------------------------------------------------------------ one RL iteration
    def iteration(self, step: int) -> dict[str, float]:
        """One RL step (the module docstring). Episodes that failed in the environment count in
        ``rollout/env_errors`` and nowhere else (no sample, no group member, no skill-bandit reward);
        more than :data:`~megatron_sdar.rollout.trajectory.MAX_ENV_ERROR_SHARE` of the step's episodes
        (or of HDPO's rescue episodes) stop the run with :class:`~megatron_sdar.envs.EnvironmentFailure`
        on every rank alike (the episodes are gathered to every rank first)."""
        from megatron_sdar.rollout.trajectory import check_env_errors

        r = self.run_config.rollout
        started = time.perf_counter()
        metrics = self.sync_weights()
        seeds = task_seeds.train_seeds(self.run_config.trainer.seed, step, r.tasks_per_step)
        batch = self.rollout(seeds, temperature=r.temperature, with_skills=True, group_size=r.group_size,
                             first_episode_id=step * r.tasks_per_step * r.group_size)
        warning = check_env_errors(batch, f"episodes of RL step {step + 1}", self.run_config.env.name)
        if warning:
            log(warning)
        metrics.update(batch.summary())
        metrics["perf/rollout_tokens_per_s"] = batch.metrics.get("rollout/tokens_per_s", 0.0)
        if self.retriever is not None:
            for episode in batch.played:
                if episode.skill_names:
                    self.retriever.update(list(episode.skill_names), episode.reward, episode.task_type)
        samples = samples_from_trajectories(batch, self.objective.norm_adv_by_std,
                                            distill=not self.objective.cliff_rescue)
        if self.objective.cliff_rescue:
            rescue = self.rescue(batch, seeds, step)
            warning = check_env_errors(rescue, f"HDPO rescue episodes of RL step {step + 1}", self.run_config.env.name)
            if warning:
                log(warning)
            samples += rescue_samples(rescue)
            # the rescue episodes count in the rollout's work (episodes, tokens, time), not in its success rate
            metrics["rollout/episodes"] += len(rescue.episodes)
            metrics["rollout/response_tokens"] += rescue.num_response_tokens
            metrics["rollout/env_errors"] += rescue.env_errors
            metrics.update({"hdpo/cliff_groups": float(len(batch.cliff_groups())),
                            "hdpo/rescue_episodes": float(len(rescue.episodes)),
                            "hdpo/rescued": float(sum(e.won for e in rescue.episodes))})
        rollout_seconds = time.perf_counter() - started
        if not samples:  # every episode ended before its first turn; too many environment errors stopped above
            overlong = sum(e.overlong and not e.turns for e in batch.played)
            if overlong == len(batch.played):
                raise ConfigError(f"the rollout produced no trainable tokens: the first prompt of each of the "
                                  f"{overlong} episodes (no history yet) is longer than "
                                  f"rollout.max_prompt_tokens={r.max_prompt_tokens}; raise it")
            raise RuntimeError(f"the rollout produced no trainable tokens ({len(batch.episodes)} episodes, "
                               f"{batch.env_errors} failed in the environment, {overlong} too long for their first prompt)")
        train_started = time.perf_counter()
        teacher = TeacherBatch.from_messages(samples, self.objective, self.formatter)
        metrics.update(self.updater.train_on(samples, step, teacher=teacher))
        train_seconds = time.perf_counter() - train_started
        metrics.update(self.updater.pass_metrics())
        if self.objective.cliff_rescue:
            metrics["hdpo/distill_loss"] = metrics.get("sdar/distill_loss", 0.0)
        tokens = sum(len(s.input_ids) for s in samples)
        metrics.update({"perf/rollout_seconds": rollout_seconds, "perf/train_seconds": train_seconds,
                        "perf/train_tokens_per_s": tokens / max(train_seconds, 1e-9),
                        "perf/step_seconds": time.perf_counter() - started, "train/samples": float(len(samples)),
                        "train/tokens": float(tokens), "perf/student_tokens": float(tokens)})
        if self.objective.needs_teacher:
            metrics.update({"perf/teacher_tokens": float(teacher.num_tokens),
                            "perf/teacher_token_ratio": teacher.num_tokens / tokens})
        return metrics

    def rescue(self, batch: TrajectoryBatch, seeds: list[int], step: int) -> TrajectoryBatch:
        """HDPO (arXiv 2603.23871): every cliff group's task (every episode failed) is played again,
        ``group_size`` times, by the same weights with the group's retrieved skills in the prompt
        (generation only: the engine has no autograd). Each turn records the prompt without the
        skills as the student's and the one the engine saw as the teacher's; the caller keeps the
        episodes that succeed (:func:`~megatron_sdar.trainer.batch.rescue_samples`)."""
        r = self.run_config.rollout
        cliffs = batch.cliff_groups()
        if not cliffs:
            return TrajectoryBatch([])
        given = {e.group: (e.privileged_context, e.skill_names) for e in batch.episodes}
        return self.rollout([seeds[g] for g in cliffs], temperature=r.temperature, with_skills=True,
                            group_size=r.group_size, acts_with_context=True,
                            contexts={i: given[g] for i, g in enumerate(cliffs)},
                            first_episode_id=RESCUE_EPISODE_ID + step * r.tasks_per_step * r.group_size)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "sft_done": self.sft_done, "seed": self.run_config.trainer.seed,
                "reference": "sft_model" if self.sft_model is not None else "base",
                "retriever": self.retriever.state_dict() if self.retriever is not None else None}

    def save(self) -> Path:
        from megatron_sdar.checkpoint.training import save_checkpoint

        path = save_checkpoint(self.output_dir / "checkpoints", self.step, self.policy, self.trainer_state(),
                               keep_last=self.run_config.trainer.keep_last, hf_assets_source=self.model_dir,
                               optimizer_sharding=self.run_config.trainer.optimizer_sharding,
                               extra_models=self.updater.teacher_weights.checkpoint_models())
        log(f"checkpoint: {path}")
        return path

    def resume(self) -> None:
        """``trainer.resume=auto``: the newest intact checkpoint of this run (bad ones are skipped
        with the reason), or, when there is none, a start from scratch with the old run's files
        moved aside; a path: that checkpoint, which must be intact."""
        from megatron_sdar.checkpoint.model import CheckpointFormatError
        from megatron_sdar.checkpoint.resume import discard_run
        from megatron_sdar.checkpoint.training import load_checkpoint, load_latest_checkpoint

        t = self.run_config.trainer
        if t.resume is None:
            return
        extra = self.updater.teacher_weights.checkpoint_models()
        if t.resume == "auto":
            try:
                found = load_latest_checkpoint(self.output_dir / "checkpoints", self.policy, verify=t.verify_checkpoints,
                                               extra_models=extra)
            except CheckpointFormatError as exc:  # a checkpoint this layout cannot load (corrupt ones are skipped)
                raise ConfigError(f"trainer.resume=auto: {exc}") from None
            if found is None:
                moved = discard_run(self.output_dir) if dist.get_rank() == 0 else None
                dist.barrier()  # no rank writes into the run directory before the old run is out of the way
                log("trainer.resume=auto: no intact checkpoint, starting from scratch"
                    + (f"; the old run's files were moved to {moved}" if moved is not None else ""))
                return
            path, state = found
        else:
            path = Path(t.resume)
            try:
                state = load_checkpoint(path, self.policy, verify=t.verify_checkpoints, extra_models=extra)
            except CheckpointFormatError as exc:
                raise ConfigError(f"trainer.resume: {exc}") from None
        self.resumed_from = path
        self.updater.teacher_weights.loaded()
        self.step = int(state["step"])
        self.sft_done = bool(state.get("sft_done", True))
        self.sft_model = self._find_sft_model(path, state)
        if self.retriever is not None and state.get("retriever"):
            self.retriever.load_state_dict(state["retriever"])
        log(f"resumed from {path} at step {self.step}")
        from megatron_sdar.config.schema import resume_changes

        if changes := resume_changes(self.run_config, path):
            log("changed on resume: " + ", ".join(changes))

    def write_config(self) -> Path:
        """The run's config: ``config.json`` from its first invocation, never overwritten; a resumed
        invocation adds ``config.resume-<step>.json`` beside it."""
        first = self.output_dir / "config.json"
        path = first if self.resumed_from is None or not first.exists() else \
            self.output_dir / f"config.resume-{self.step}.json"
        if dist.get_rank() == 0:
            path.write_text(json.dumps(_as_dict(self.run_config), indent=2))
        return path

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        from megatron_sdar.utils.logging import MetricsLogger

        t = self.run_config.trainer
        self.resume()
        self.write_config()
        self.logger = MetricsLogger(self.output_dir, tensorboard=t.tensorboard, wandb_project=t.wandb_project,
                                    resume_step=self.step if t.resume else None)
        if self.step == 0 and not self.sft_done and not self.sft():
            log(f"{self.preemption.signal_name or 'signal'} received during SFT: stopped without a checkpoint "
                "(SFT keeps none; trainer.resume=auto starts the run again), exiting")
            return {"preempted": True, "step": self.step, "signal": self.preemption.signal_name}
        if self.step == 0 and self.resumed_from is None:
            if t.eval_before_rl:
                evaluation = self.evaluations(before_rl=True)
                self.logger.log(0, evaluation)
                log(f"step 0 ({'after SFT' if self.sft_model is not None else 'before RL'}): {_success_line(evaluation)}")
            if self.sft_model is not None:
                # the SFT warm start is kept; without one, step 0 is the base model, on disk already
                # (and Megatron's distributed optimizer cannot save a state it has not made yet, on CPU)
                self.save()
        if self.step == 0 and self.sft_done:
            # RL starts from a fresh Adam state (and an EMA teacher from the policy). Reset here, not at
            # the end of SFT, so that the step-0 checkpoint holds a complete optimizer state and a
            # resume from it resets the same way.
            self.policy.reset_optimizer()
            self.updater.teacher_weights.start()
        from megatron_sdar.utils.logging import progress

        bar = progress(total=t.max_steps, initial=self.step, desc=self.run_config.algo.name, unit="step")
        try:  # the bar closes before an error's line
            while self.step < t.max_steps:
                metrics = self.iteration(self.step)
                self.step += 1
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    metrics.update(self.evaluations())
                    log(f"step {self.step}: {_success_line(metrics)}")
                self.logger.log(self.step, metrics)
                warning = collapse_warning(metrics)
                if warning:
                    log(f"step {self.step}: {warning}")
                bar.update(1)
                bar.set_postfix(success=f"{metrics.get('rollout/success_rate', 0):.2f}",
                                reward=f"{metrics.get('rollout/reward_mean', 0):.2f}",
                                gate=f"{metrics.get('sdar/gate_mean', float('nan')):.2f}")
                preempted = self.preemption.any_rank()
                if preempted or self.step % t.save_interval == 0 or self.step == t.max_steps:
                    self.save()
                if preempted:
                    log(f"{self.preemption.signal_name or 'signal'} received: checkpoint written at step {self.step}, "
                        "exiting (trainer.resume=auto continues from it)")
                    self.logger.close()
                    return {"preempted": True, "step": self.step, "signal": self.preemption.signal_name}
        finally:
            bar.close()
        self.logger.close()
        if t.export_hf:
            from megatron_sdar.models.hf_export import export_hf

            export_hf(self.policy.unwrapped(), self.arch, self.output_dir / "hf_export", assets_dir=self.model_dir)
            log(f"HF export: {self.output_dir / 'hf_export'}")
        if t.plot and dist.get_rank() == 0:
            from megatron_sdar.utils.plots import plot_training

            plot_training(self.output_dir / "metrics.jsonl", self.output_dir / "training.png",
                          title=f"{self.run_config.algo.name} on {self.run_config.env.name}")
            log(f"plot: {self.output_dir / 'training.png'}")
        return {"preempted": False, "step": self.step}

    def _find_sft_model(self, checkpoint: Path, state: dict) -> Path | None:
        """The SFT export of the run ``checkpoint`` belongs to: in this output directory, else beside
        the checkpoint's own ``checkpoints/`` directory (a resume into a new output directory, e.g.
        at another layout). A checkpoint taken after SFT whose export is gone is refused: the KL
        reference would silently become the base model."""
        candidates = [self.output_dir / SFT_MODEL_DIR, checkpoint.resolve().parent.parent / SFT_MODEL_DIR]
        found = next((c for c in candidates if (c / "config.json").is_file()), None)
        if state.get("reference") == "sft_model" and found is None:
            raise ConfigError(f"trainer.resume: {checkpoint} was taken after SFT, and the SFT model (the KL "
                              f"reference) is in none of {[str(c) for c in candidates]}; copy the run's "
                              f"{SFT_MODEL_DIR}/ directory into trainer.output_dir")
        if state.get("reference") == "base":
            return None
        return found  # checkpoints older than the "reference" field: what exists

    def reference_dir(self) -> Path:
        """The frozen KL reference: the policy at the start of RL (the SFT model when there was SFT)."""
        return self.sft_model if self.sft_model is not None else self.model_dir

    def close(self) -> None:
        if not self.preemption.interrupts:  # after a Ctrl-C, a second one during teardown still exits at once
            self.preemption.restore()
        self.engine.shutdown()


SFT_MODEL_DIR = "sft_model"
BASE_MODEL_RECIPE = "megatron_sdar_tiny.json"  # in base_model/: the settings the tiny model was built from
COLLAPSE_ENTROPY = 0.1  # nats per action-choice token; below it the sampled actions hardly vary


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """A warning when the policy is turning deterministic with nothing to learn from: the entropy of
    its action-choice tokens below :data:`COLLAPSE_ENTROPY` while no group of the step differs in
    success (so no advantage points at a success) and most episodes fail. Such a run rarely recovers:
    it no longer samples the actions that would succeed."""
    entropy = metrics.get("actor/action_entropy")
    if entropy is None or entropy >= COLLAPSE_ENTROPY or metrics.get("rollout/success_contrast_groups", 1.0) > 0 \
            or metrics.get("rollout/success_rate", 1.0) >= 0.5:
        return None
    return (f"warning: the policy is collapsing: action-token entropy {entropy:.3f} < {COLLAPSE_ENTROPY} with no "
            f"group that differs in success (rollout success {metrics['rollout/success_rate']:.2f}); it may no "
            "longer sample what succeeds (lower trainer.lr, raise algo.entropy_coef, or start from a better SFT)")


def _success_line(metrics: dict[str, float]) -> str:
    """``eval success 0.410 [0.345, 0.478] on 200 tasks (greedy 0.43, with skills 0.78; first choice right
    0.35, with skills 0.81)``"""
    if "eval/success_rate" not in metrics:
        return "no evaluation (trainer.eval_tasks=0)"
    line = (f"eval success {metrics['eval/success_rate']:.3f} [{metrics['eval/success_rate_ci_low']:.3f}, "
            f"{metrics['eval/success_rate_ci_high']:.3f}] on {metrics['eval/num_tasks']:.0f} tasks")
    extra = [f"{name} {metrics[key]:.3f}" for name, key in (("greedy", "eval/greedy/success_rate"),
                                                            ("with skills", "eval/with_skills/success_rate"))
             if key in metrics]
    choice = [f"{name} {metrics[key]:.3f}" for name, key in (("first choice right", "eval/first_choice_correct"),
                                                             ("with skills", "eval/with_skills/first_choice_correct"))
              if key in metrics]
    shown = ", ".join(extra) + ("; " if extra and choice else "") + ", ".join(choice)
    errors = metrics.get("eval/env_errors", 0.0)
    return line + (f" ({shown})" if shown else "") + (f"; {errors:.0f} episode(s) failed in the environment, left "
                                                        "out" if errors else "")


def _as_dict(obj) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def run_training(run: RunConfig) -> dict[str, Any]:
    """Process group, trainer, train, teardown. The entry point of ``python -m megatron_sdar.train``."""
    from megatron_sdar.utils.distributed import destroy, init_process_group

    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    init_process_group()
    trainer = None
    try:
        trainer = SDARTrainer(run)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        destroy()
