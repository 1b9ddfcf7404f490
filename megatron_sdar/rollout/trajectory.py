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

**Environment errors.** An episode whose environment raised or hung (``Episode.env_error``, set by
the agent loop from :class:`~megatron_sdar.envs.EnvBatch`) says nothing about the policy: it is
counted (``rollout/env_errors``) and left out of every task measure (success, reward, turns, the
first decisive choice), of GRPO's groups (:func:`~megatron_sdar.trainer.batch.samples_from_trajectories`)
and of HDPO's cliff groups. A rollout where more than :data:`MAX_ENV_ERROR_SHARE` of the episodes
failed in the environment stops the run (:func:`check_env_errors`): the rest would be a biased sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator

from megatron_sdar.envs.base import EnvironmentFailure

#: the largest share of a rollout's episodes that may fail in the environment (exact: 1 of 10 passes, 2 of 19 stops)
MAX_ENV_ERROR_SHARE = Fraction(1, 10)


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

    @property
    def failed_in_env(self) -> bool:
        """Whether the environment raised or hung in this episode (it then says nothing about the policy)."""
        return self.env_error is not None


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

    @property
    def played(self) -> list[Episode]:
        """The episodes the environment did not fail (:attr:`Episode.failed_in_env`): the ones that measure the policy."""
        return [e for e in self.episodes if not e.failed_in_env]

    @property
    def env_errors(self) -> int:
        return sum(e.failed_in_env for e in self.episodes)

    def cliff_groups(self) -> list[int]:
        """The groups in which every played episode failed (HDPO's "cliff" groups), in group order; a
        group whose episodes all failed in the environment is none (nothing was tried)."""
        won: dict[int, bool] = {}
        for e in self.played:
            won[e.group] = won.get(e.group, False) or e.won
        return sorted(g for g, any_won in won.items() if not any_won)

    def summary(self) -> dict[str, Any]:
        """Rollout metrics: the episodes that failed in the environment (``rollout/env_errors``), and
        over the others (:attr:`played`; none: these keys are absent) success, per task type too,
        reward, turns, invalid-action rate, the share of groups whose episodes differ in success
        (``rollout/success_contrast_groups``) and, where the environment judges a decisive choice,
        the share of episodes whose first decisive action was the one the matching skill states
        (``rollout/first_choice_correct[/<task type>]``). An episode without a task type (none is
        known before the environment's reset succeeds) has no per-type key."""
        if not self.episodes:
            return {}
        metrics: dict[str, Any] = {
            "rollout/env_errors": float(self.env_errors),
            "rollout/overlong": float(sum(e.overlong for e in self.episodes)),
            "rollout/episodes": float(len(self.episodes)),
            "rollout/response_tokens": float(self.num_response_tokens),
        }
        played = self.played
        if not played:
            return metrics
        n = len(played)
        metrics.update({
            "rollout/success_rate": sum(e.won for e in played) / n,
            "rollout/reward_mean": sum(e.reward for e in played) / n,
            "rollout/turns_mean": sum(e.num_turns for e in played) / n,
            "rollout/invalid_action_rate": (sum(e.invalid_actions for e in played)
                                            / max(1, sum(e.num_turns for e in played))),
        })
        by_group: dict[int, set[bool]] = {}
        for e in played:
            by_group.setdefault(e.group, set()).add(e.won)
        # groups whose episodes differ in success: the ones a group-relative advantage learns success from
        metrics["rollout/success_contrast_groups"] = sum(len(w) == 2 for w in by_group.values()) / len(by_group)
        metrics.update(_share_by_type("rollout/success_rate", [(e.task_type, e.won) for e in played]))
        judged = [(e.task_type, e.first_choice_correct) for e in played if e.first_choice_correct is not None]
        if judged:
            metrics["rollout/first_choice_correct"] = sum(right for _, right in judged) / len(judged)
            metrics.update(_share_by_type("rollout/first_choice_correct", judged))
        return metrics


def _share_by_type(key: str, outcomes: list[tuple[str, bool]]) -> dict[str, float]:
    """``{<key>/<task type>: share of True}`` over ``outcomes`` ((task type, outcome) pairs), task types
    in sorted order; an empty task type has no key (``<key>/`` would name no type)."""
    by_type: dict[str, list[bool]] = {}
    for task_type, outcome in outcomes:
        if task_type:
            by_type.setdefault(task_type, []).append(bool(outcome))
    return {f"{key}/{task_type}": sum(values) / len(values) for task_type, values in sorted(by_type.items())}


def check_env_errors(batch: TrajectoryBatch, what: str, env: str,
                     max_share: Fraction = MAX_ENV_ERROR_SHARE) -> str | None:
    """Stop when more than ``max_share`` of ``batch``'s episodes failed in the environment: raise
    :class:`~megatron_sdar.envs.EnvironmentFailure` naming the count and the first failed episode's
    error (in (group, episode) order: the same on every rank, whose batches are gathered copies, so
    every rank raises together and none waits in a collective). Below the share: a warning line (the
    failed episodes are left out of the numbers), or None when no episode failed. ``what`` names the
    episodes (``"evaluation episodes"``), ``env`` the environment."""
    failed = [e for e in batch.episodes if e.failed_in_env]
    if not failed:
        return None
    n = len(batch.episodes)
    first = " ".join(str(failed[0].env_error).split())  # one line (a JVM's error comes with its stack trace)
    first = first if len(first) <= 500 else first[:497] + "..."
    if len(failed) > max_share * n:
        raise EnvironmentFailure(env, what, len(failed), n, first)
    return (f"warning: {len(failed)} of {n} {what} failed in the environment ({env}) and are left out of its "
            f"numbers; first: {first}")
