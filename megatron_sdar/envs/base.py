"""The text-environment interface every SDAR environment implements.

The convention is Gymnasium's (without depending on gymnasium):

    observation, info = env.reset(seed=None, split="train")
    observation, reward, terminated, truncated, info = env.step(action)

``split`` is one of :data:`SPLITS` (``train``, ``validation``, ``test``): the pool of tasks the
seed draws from. Each environment maps the three names onto its own disjoint task pools
(:mod:`megatron_sdar.envs.splits`); an environment that generates its tasks from the seed (the
household world) accepts the argument and has one pool. Training and SFT draw ``train`` tasks,
evaluation ``trainer.eval_split`` (``test``, or ``validation`` for hyperparameter choice); the
trainer derives the split from the task seed (:func:`megatron_sdar.trainer.seeds.split_of`).

Observations and actions are plain strings. ``info`` always carries the keys in
:data:`REQUIRED_INFO_KEYS`:

- ``won`` (bool): the task is solved.
- ``task_type`` (str): the task family, used for per-type metrics and by the skill
  retriever's ``task_to_skill`` mapping.
- ``task`` (str): the task text shown to the agent (what keyword retrieval matches).
- ``invalid_action`` (bool): the last action could not be parsed or was not applicable;
  the environment answered :data:`INVALID_ACTION_FEEDBACK` (or its own equivalent) and the
  state did not change. The rollout loop applies the reward penalty, not the environment.
- ``turn`` (int): number of ``step`` calls since the last ``reset``.

and, when the environment can enumerate them, ``admissible_actions`` (list of str). ``reset``'s
``info`` also carries ``seed`` (the task seed) and ``split``.

**The decisive choice.** An environment whose episodes turn on one choice that a skill states (where
the household world's goal object usually is, where TWC puts an object, which appliance CookingWorld
cooks with) implements :meth:`TextEnv._decisive_choice`; the ``info`` of every episode that has such
a choice then carries ``first_choice_correct`` (bool): whether the episode's first decisive action was
the one the matching skill states (False until one is made). It measures knowledge directly, whatever the
episode's success (``eval/first_choice_correct``).

``terminated`` means the episode reached an end state (success, or a final action such
as WebShop's purchase or Search-QA's answer); ``truncated`` means the turn budget
``max_turns`` ran out first.
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field
from typing import Any

INVALID_ACTION_FEEDBACK = "Nothing happens."
REQUIRED_INFO_KEYS = ("won", "task_type", "task", "invalid_action", "turn")
#: the task splits, the same names in every environment and in the trainer (``trainer.eval_split``)
SPLITS = ("train", "validation", "test")


class EnvError(RuntimeError):
    """An environment could not be built or used (bad configuration, missing data)."""


class EnvOptionError(EnvError):
    """An option of ``make(name, **options)`` the environment (or its engine) refuses, found by
    :meth:`TextEnv.check_options` before anything is built. ``option``: the option's name (None when
    the refusal concerns several); ``problem``: one line saying what is wrong."""

    def __init__(self, option: str | None, problem: str) -> None:
        self.option, self.problem = option, problem
        super().__init__(f"{option}: {problem}" if option else problem)


class EnvironmentFailure(EnvError):
    """Too many episodes of one rollout ended in an environment error (the environment raised or
    exceeded its step timeout: a server that refuses connections, an engine that crashed). Their
    numbers would measure the environment, not the policy, so the trainer stops the run
    (:func:`~megatron_sdar.rollout.trajectory.check_env_errors`). ``str()`` is the one line the user
    sees: ``errors`` of ``episodes`` ``what`` failed in environment ``env``, and the environment's own
    first error (``first``)."""

    def __init__(self, env: str, what: str, errors: int, episodes: int, first: str) -> None:
        self.env, self.what, self.errors, self.episodes, self.first = env, what, errors, episodes, first
        super().__init__(f"{errors} of {episodes} {what} failed in the environment ({env}); first: {first}")

    def __reduce__(self):  # picklable with its fields (the default passes only the message)
        return type(self), (self.env, self.what, self.errors, self.episodes, self.first)


@dataclass
class StepResult:
    """One environment transition, as returned by ``step`` (and by batched stepping).

    ``error`` is set only by :class:`~megatron_sdar.envs.batch.EnvBatch` when the
    environment raised or exceeded its step timeout; the episode then ends as failed
    (``terminated=True``, ``reward=0``, ``info["won"]=False``).
    """

    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def as_tuple(self) -> tuple[str, float, bool, bool, dict[str, Any]]:
        return self.observation, self.reward, self.terminated, self.truncated, self.info


@dataclass
class Demonstration:
    """One scripted episode for the SFT warm start (an environment's ``demonstrations(seeds,
    skill_share, seed)``): the first observation and admissible actions, then ``(action,
    observation, admissible actions)`` per step; ``context`` is the skill text the prompt carries
    ("" for none)."""

    observation: str
    admissible: list[str]
    steps: list[tuple[str, str, list[str]]]
    context: str
    task_type: str
    won: bool
    start_kind: str  # household: receptacle kind where the (first) goal object started ("" elsewhere)
    task: str = ""  # the task text (info["task"])
    decisive: tuple[int, ...] = (0,)  # the steps the skill decides (SFT repeats them: trainer.sft_skill_turn_repeats)


class TextEnv(abc.ABC):
    """Base class: turn counting, truncation at ``max_turns`` and seeding.

    Subclasses implement :meth:`_reset` (start the task selected by ``rng`` among the tasks of
    ``self.split``, the split ``reset`` was given) and :meth:`_step` (apply one action); this class
    fills ``turn``/``truncated`` and checks that the step was called on a live episode.
    """

    #: registry name, set by subclasses
    name: str = "text"

    def __init__(self, max_turns: int = 50, seed: int | None = None) -> None:
        if int(max_turns) < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = int(max_turns)
        # Draws the task when reset() gets no seed; seeded so a whole run is reproducible.
        self._rng = random.Random(seed)
        self.split = "train"  # the split of the current episode's task (set by reset)
        self._turn = 0
        self._episode_over = True
        self._last_info: dict[str, Any] = {}
        self._first_choice: bool | None = None  # the verdict on the episode's first decisive action
        self._judged = False  # whether this episode's decisive choice is judged

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None, *,
              split: str = "train") -> tuple[str, dict[str, Any]]:
        """Start a new episode on a task of ``split`` (one of :data:`SPLITS`). The same ``seed`` and
        ``split`` always give the same task."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        task_seed = seed if seed is not None else self._rng.randrange(2**31)
        self._turn = 0
        self._episode_over = False
        self.split = split
        observation, info = self._reset(random.Random(task_seed), dict(options or {}))
        info.setdefault("invalid_action", False)
        info.setdefault("won", False)
        info["turn"] = 0
        info["seed"] = task_seed
        info["split"] = split
        self._first_choice = None
        self._judged = self.has_decisive_choice and self._episode_has_decisive_choice()
        if self._judged:
            info["first_choice_correct"] = False
        self._last_info = info
        return observation, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._episode_over:
            raise EnvError(f"{type(self).__name__}.step() called before reset() or after the episode ended")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        self._turn += 1
        observation, reward, terminated, info = self._step(action)
        info.setdefault("invalid_action", False)
        info.setdefault("won", False)
        if self._judged:
            if self._first_choice is None and not info["invalid_action"]:
                self._first_choice = self._decisive_choice(normalize_command(action))
            info["first_choice_correct"] = bool(self._first_choice)
        info["turn"] = self._turn
        truncated = (not terminated) and self._turn >= self.max_turns
        self._episode_over = terminated or truncated
        self._last_info = info
        return observation, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        """Release external resources (processes, sockets). Default: nothing."""

    @property
    def task(self) -> str:
        """Task text of the current episode (what skill retrieval matches against)."""
        return str(self._last_info.get("task", ""))

    @property
    def task_type(self) -> str:
        return str(self._last_info.get("task_type", ""))

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Refuse, before anything is built, an option of ``make(name, **options)`` that the environment
        (or its engine) would refuse only once built, or that would make every episode fail (a
        malformed server URL): raise :class:`EnvOptionError`. The configuration check runs it when a
        run is composed (:func:`~megatron_sdar.envs.registry.check_options`), so it must be cheap and
        read no data (missing files are :func:`~megatron_sdar.envs.splits.data_problem`'s). ``options``
        are the environment's own (``env.kwargs``), without ``seed`` and ``max_turns``, which the
        trainer sets. Default: nothing to check."""

    @property
    def has_decisive_choice(self) -> bool:
        """Whether this environment judges a decisive choice (it overrides :meth:`_decisive_choice`)."""
        return type(self)._decisive_choice is not TextEnv._decisive_choice

    # ------------------------------------------------------- subclass hooks
    def _decisive_choice(self, command: str) -> bool | None:
        """After the valid action ``command`` (normalized) was applied: None when it is no decisive
        choice, else whether it is the choice the matching skill states."""
        return None

    def _episode_has_decisive_choice(self) -> bool:
        """After ``_reset``: whether this episode has a decisive choice at all (default: yes)."""
        return True

    @abc.abstractmethod
    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Start the task chosen with ``rng`` among the tasks of ``self.split``; return (observation, info)."""

    @abc.abstractmethod
    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply ``action``; return (observation, reward, terminated, info)."""


def check_http_url(option: str, url: Any) -> None:
    """Refuse ``url`` (the value of ``option``) unless it is an absolute http(s) URL with a host:
    anything else (``127.0.0.1:3000`` without its scheme) makes urllib refuse every request, which
    would end every episode in an environment error only once the run has started."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url))
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in 0-65535)
    except ValueError as exc:
        raise EnvOptionError(option, f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnvOptionError(option, f"{url!r} is not an http(s) URL with a host (e.g. http://127.0.0.1:3000)")


def normalize_command(text: str) -> str:
    """Lower-case, trim, collapse whitespace and drop one trailing period: the form in
    which text-game commands are compared (``"Go to  Desk 1."`` -> ``"go to desk 1"``)."""
    text = " ".join(str(text).strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text
