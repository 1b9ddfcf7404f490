"""What a rollout produces: episodes made of turns, each turn one model call.

Training unit = one turn: the student sees ``prompt_ids`` (system prompt, task, the last k
turns, the current observation) and produced ``response_ids``. The teacher's sequence (the
episode's ``privileged_context`` in front of the same prompt, then the same ``response_ids``) is
not stored: the trainer renders it from the turn's ``messages``
(:class:`~megatron_sdar.trainer.teacher.TeacherBatch`). Every trained token of an episode shares
the episode's reward / advantage.

Token ids are never re-derived from decoded text: ``prompt_ids`` are exactly what vLLM saw, and
:class:`~megatron_sdar.rollout.agent_loop.ChatFormatter` rebuilds them, and the teacher's prompt
vLLM sees in HDPO's rescue episodes, bit-identically from the stored ``messages`` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class Turn:
    """One model call of an episode.

    ``prompt_ids``: [P] the student's prompt (the ids vLLM saw, except in a rescue episode, where
    vLLM saw the teacher's prompt: the same messages with the episode's privileged context);
    ``response_ids``: [R] sampled ids (including the stop token when generation stopped on it);
    ``rollout_logprobs``: [R] vLLM's log-probs of ``response_ids``; ``messages``: the chat
    messages ``prompt_ids`` was rendered from; ``action_mask``: [R] 1 on the tokens that spell the
    action (the action-choice tokens).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    messages: list[dict[str, str]]
    response_text: str = ""
    action: str | None = None
    invalid_action: bool = False
    finish_reason: str | None = None
    action_mask: list[int] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:
        """[P + R] the student's sequence."""
        return self.prompt_ids + self.response_ids

    @property
    def response_start(self) -> int:
        """Index of the first model-generated token in :attr:`input_ids` (turn boundary)."""
        return len(self.prompt_ids)

    @property
    def loss_mask(self) -> list[int]:
        """[P + R] 1 on model-generated tokens, 0 on prompt tokens."""
        return [0] * len(self.prompt_ids) + [1] * len(self.response_ids)


@dataclass
class Episode:
    """One episode of one task. ``group`` indexes the task: the G episodes of a task share it
    (GRPO's group); ``reward`` = environment return - penalty x invalid actions;
    ``first_choice_correct``: whether the first decisive action was the one the matching skill
    states (None where the environment judges no decisive choice,
    :meth:`~megatron_sdar.envs.base.TextEnv._decisive_choice`)."""

    group: int
    task: str
    task_type: str
    seed: int
    episode_id: int = 0
    turns: list[Turn] = field(default_factory=list)
    reward: float = 0.0
    env_return: float = 0.0
    won: bool = False
    invalid_actions: int = 0
    env_error: str | None = None
    truncated: bool = False
    overlong: bool = False
    privileged_context: str = ""
    skill_names: tuple[str, ...] = ()
    first_choice_correct: bool | None = None

    @property
    def num_turns(self) -> int:
        return len(self.turns)


@dataclass
class TrajectoryBatch:
    """All episodes of one rollout (this rank's share until the trainer gathers them)."""

    episodes: list[Episode]
    metrics: dict[str, float] = field(default_factory=dict)

    def turns(self) -> Iterator[tuple[int, Turn]]:
        """(episode index, turn) for every turn of every episode, in order."""
        for index, episode in enumerate(self.episodes):
            for turn in episode.turns:
                yield index, turn

    @property
    def num_turns(self) -> int:
        return sum(e.num_turns for e in self.episodes)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(t.response_ids) for _, t in self.turns())

    @staticmethod
    def merge(batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        """The episodes of several ranks (global group and episode ids) in (group, episode) order,
        so the result does not depend on how episodes were spread over ranks."""
        episodes = [e for batch in batches for e in batch.episodes]
        episodes.sort(key=lambda e: (e.group, e.episode_id))
        return TrajectoryBatch(episodes)

    def cliff_groups(self) -> list[int]:
        """The groups in which every episode failed (HDPO's "cliff" groups), in group order."""
        won: dict[int, bool] = {}
        for e in self.episodes:
            won[e.group] = won.get(e.group, False) or e.won
        return sorted(g for g, any_won in won.items() if not any_won)

    def summary(self) -> dict[str, Any]:
        """Rollout metrics: success per task type, reward, turns, invalid-action rate, the share
        of groups whose episodes differ in success (``rollout/success_contrast_groups``) and, where
        the environment judges a decisive choice, the share of episodes whose first decisive action
        was the one the matching skill states (``rollout/first_choice_correct[/<task type>]``)."""
        if not self.episodes:
            return {}
        n = len(self.episodes)
        metrics: dict[str, Any] = {
            "rollout/success_rate": sum(e.won for e in self.episodes) / n,
            "rollout/reward_mean": sum(e.reward for e in self.episodes) / n,
            "rollout/turns_mean": sum(e.num_turns for e in self.episodes) / n,
            "rollout/invalid_action_rate": (sum(e.invalid_actions for e in self.episodes)
                                            / max(1, sum(e.num_turns for e in self.episodes))),
            "rollout/env_errors": float(sum(e.env_error is not None for e in self.episodes)),
            "rollout/overlong": float(sum(e.overlong for e in self.episodes)),
            "rollout/episodes": float(n),
            "rollout/response_tokens": float(self.num_response_tokens),
        }
        by_group: dict[int, set[bool]] = {}
        for e in self.episodes:
            by_group.setdefault(e.group, set()).add(e.won)
        # groups whose episodes differ in success: the ones a group-relative advantage learns success from
        metrics["rollout/success_contrast_groups"] = sum(len(w) == 2 for w in by_group.values()) / len(by_group)
        by_type: dict[str, list[bool]] = {}
        for e in self.episodes:
            by_type.setdefault(e.task_type, []).append(e.won)
        for task_type, wins in sorted(by_type.items()):
            metrics[f"rollout/success_rate/{task_type}"] = sum(wins) / len(wins)
        judged = [e for e in self.episodes if e.first_choice_correct is not None]
        if judged:
            metrics["rollout/first_choice_correct"] = sum(e.first_choice_correct for e in judged) / len(judged)
            by_type_choice: dict[str, list[bool]] = {}
            for e in judged:
                by_type_choice.setdefault(e.task_type, []).append(e.first_choice_correct)
            for task_type, right in sorted(by_type_choice.items()):
                metrics[f"rollout/first_choice_correct/{task_type}"] = sum(right) / len(right)
        return metrics
