"""The SFT warm start before RL: demonstrations rendered exactly like rollout turns, then
cross-entropy on their responses.

What the warm start teaches on the built-in household world, and what it must not:

* the answer format and how to search a room, with misses and recoveries: episodes of a scripted
  searcher without privileged knowledge, in worlds whose objects are placed uniformly;
* how to use privileged context: episodes whose prompt carries a skill that states a *randomly
  drawn* home, in a world that obeys it, and a searcher that looks there first.

Neither teaches the world's true homes (:data:`megatron_sdar.envs.household.DEFAULT_HOMES`),
which the built-in skills state. So after SFT the student without skills searches, the same
weights with skills in the prompt go straight to the home (the teacher's edge), and RL has
something to learn. TWC and CookingWorld build theirs the same way from the engine's gold paths
(:meth:`megatron_sdar.envs.textworld_express.TextWorldExpressEnv.demonstrations`). Other
environments fall back to the environment's oracle (``env.expert_actions()``), one demonstration
per task seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sdar.rollout.agent_loop import AgentLoopConfig, ChatFormatter, EpisodeState
from megatron_sdar.trainer.batch import TrainingSample


@dataclass
class SFTData:
    """The rendered demonstrations and what they are made of (logged before training)."""

    samples: list[TrainingSample]
    episodes: int
    skill_episodes: int  # episodes whose prompts carry a skill
    won: int  # demonstrations that reached the goal within the turn budget

    def describe(self) -> str:
        return (f"{len(self.samples)} turns from {self.episodes} demonstrations ({self.skill_episodes} with a skill "
                f"in the prompt, {self.won} reaching the goal)")


def _render(formatter: ChatFormatter, tokenizer, config: AgentLoopConfig, observation: str, admissible,
            steps, context: str, episode: int, task: str = "") -> list[TrainingSample | None]:
    """One demonstration's turns as training samples (prompts exactly as the rollout renders them), one
    per step (None for a step whose action the format cannot answer or whose prompt is too long)."""
    eos = tokenizer.eos_token_id
    state = EpisodeState(observation, observation, admissible, task=task)
    samples: list[TrainingSample | None] = []
    for action, next_observation, next_admissible in steps[: config.max_turns]:
        messages = formatter.messages(formatter.user_content(state, config.history_window), context)
        prompt = formatter.encode(messages)
        answer = formatter.answer(action, state)
        sample = None
        if answer is not None and len(prompt) <= config.max_prompt_tokens:
            response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            sample = TrainingSample(prompt + response, len(prompt), [0.0] * len(response), episode=episode)
        samples.append(sample)
        state.advance(action, next_observation, next_admissible)
    return samples


def build_sft_data(make_env, formatter: ChatFormatter, tokenizer, config: AgentLoopConfig, seeds: list[int],
                   skill_share: float, seed: int, skill_turn_repeats: int = 0) -> SFTData:
    """Demonstrations for ``seeds`` (one episode each) from the environment ``make_env(seed)`` builds:
    its own ``demonstrations(seeds, skill_share, seed)`` (the household world's searcher, TextWorldExpress's
    gold paths with randomized decisions), else its oracle ``expert_actions()`` without skills.
    ``skill_turn_repeats``: extra copies of each skill demonstration's decisive turns, the ones its
    skill decides (``Demonstration.decisive``: one turn in several otherwise, too rare for a small model
    to learn to read the skill in a few hundred steps)."""
    env = make_env(seeds[0] if seeds else 0)
    samples: list[TrainingSample] = []
    if hasattr(env, "demonstrations"):
        demos = env.demonstrations(seeds, skill_share, seed=seed)
        for k, demo in enumerate(demos):
            turns = _render(formatter, tokenizer, config, demo.observation, demo.admissible, demo.steps,
                            demo.context, k, demo.task)
            repeats = [turns[i] for i in demo.decisive if i < len(turns)] * skill_turn_repeats if demo.context else []
            samples += [t for t in turns + repeats if t is not None]
        env.close()
        return SFTData(samples, len(demos), sum(bool(d.context) for d in demos), sum(d.won for d in demos))
    if not hasattr(env, "expert_actions"):
        from megatron_sdar.config.schema import ConfigError

        raise ConfigError(f"trainer.sft_steps > 0 needs demonstrations; env {env.name!r} has none")
    from megatron_sdar.trainer.seeds import split_of

    for k, task_seed in enumerate(seeds):
        env = make_env(task_seed)
        observation, first_info = env.reset(seed=task_seed, split=split_of(task_seed))  # SFT seeds: train tasks
        steps = []
        for action in env.expert_actions()[: config.max_turns]:
            next_observation, _, terminated, truncated, info = env.step(action)
            steps.append((action, next_observation, info.get("admissible_actions")))
            if terminated or truncated:
                break
        samples += [t for t in _render(formatter, tokenizer, config, observation, first_info.get("admissible_actions"),
                                       steps, "", k, str(first_info.get("task", ""))) if t is not None]
    return SFTData(samples, len(seeds), 0, len(seeds))


def run_sft(updater, data: SFTData, steps: int, batch_size: int, lr: float, seed: int, log_metrics=None,
            prompt_weight: float = 0.0, stop_requested=None) -> bool:
    """``steps`` cross-entropy steps on batches drawn without replacement (reshuffled each epoch), the
    learning rate decaying from ``lr`` to 0 by a half cosine; ``prompt_weight``: weight of the
    language-model loss on the prompt tokens. ``stop_requested``: polled every 10 steps on every rank
    (it may be collective); when it says so, SFT stops there. Returns whether all steps ran."""
    from megatron_sdar.algo.objective import scheduled
    from megatron_sdar.utils.logging import progress

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    bar = progress(range(steps), desc="sft", unit="step")
    for sft_step in bar:
        if stop_requested is not None and sft_step % 10 == 0 and stop_requested():
            bar.close()
            return False
        if len(order) < batch_size:
            order += torch.randperm(len(data.samples), generator=gen).tolist()
        batch = [data.samples[i] for i in order[:batch_size]]
        del order[:batch_size]
        metrics = updater.sft_on(batch, scheduled(lr, "cosine_decay", steps, sft_step), prompt_weight)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
        if log_metrics is not None and (sft_step % 10 == 0 or sft_step == steps - 1):
            log_metrics(sft_step, metrics)
    return True
