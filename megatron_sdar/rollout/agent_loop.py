"""The multi-turn agent loop: G episodes per task, all live episodes generated together.

Each turn, for every live episode:

1. :class:`ChatFormatter` renders the prompt with the tokenizer's chat template: a system
   prompt, then one user message = the episode's first observation (room + task), the last
   ``history_window`` (action, observation) pairs, the current observation, the admissible
   actions when the environment lists them, and the answer format. The teacher's prompt is the
   same messages with the privileged context (retrieved skills) in front of the user content.
2. The rollout engine generates one response per live episode (one call for the whole batch).
3. The action is parsed (``action_pattern``, default ``<action>...</action>``); an unparsable
   response is an invalid action (the environment is not stepped, the agent is told the format).
4. Environments step in parallel threads with a timeout (:class:`~megatron_sdar.envs.EnvBatch`):
   an environment that raises or hangs (at reset or at a step) ends its episode with
   ``Episode.env_error`` set, its own error message. Such an episode is counted
   (``rollout/env_errors``) and left out of the numbers and of training; too many of them stop the
   run (:mod:`megatron_sdar.rollout.trajectory`).
5. An episode ends on done, on the turn limit, or when its prompt cannot fit
   ``max_prompt_tokens`` even with the history window dropped (``rollout/overlong``).

Episode reward = environment return - ``invalid_action_penalty`` x invalid actions.

Several ranks: each rank runs its own episodes (the caller splits the tasks); the loop keeps
ranks in lockstep (vLLM's data-parallel replicas step together), so every rank calls the engine
once per turn until no rank has a live episode. Skill retrieval is done for all tasks of all
ranks in the same order on every rank, so every rank's retriever state stays identical.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from megatron_sdar.envs import EnvBatch, TextEnv
from megatron_sdar.rollout.trajectory import Episode, TrajectoryBatch, Turn

if TYPE_CHECKING:  # the engine imports vLLM: not needed to check or render a configuration
    from megatron_sdar.rollout.engine import RolloutEngine

DEFAULT_SYSTEM_PROMPT = "You are an agent acting in a text environment. Think briefly, then act."
FORMAT_REMINDER = "Reply with your next action inside <action>...</action>."
ACTION_FORMATS = ("text", "prefix", "words", "index")
INDEX_FORMAT_REMINDER = "Reply with the number of your next action inside <action>...</action>."
FORMAT_FEEDBACK = "Invalid response: put exactly one action inside <action>...</action>."
CONTEXT_HEADER = "Skills that may help:\n"
TASK_HEADER = "Task: "


@dataclass(kw_only=True)
class AgentLoopConfig:
    """The ``rollout`` knobs of the loop. The fields without a default are the run configuration's
    (:meth:`of_run`: ``env.max_turns``, ``env.step_timeout_s``, ``trainer.seed`` and the ``rollout``
    group); the others are the caller's.

    ``history_window``: (action, observation) pairs kept in the prompt. ``action_pattern``: a
    regex whose first group is the action (None: the whole stripped response is the action).
    ``overlong``: ``"truncate_history"`` drops the oldest pairs until the prompt fits, then
    ends the episode; ``"end"`` ends it at once. ``action_format``: ``"text"`` (the action itself)
    ``"prefix"`` (an admissible action or a word prefix of it: the first listed action with that
    prefix is taken, so ``go to drawer`` goes to drawer 1; demonstrations use the shortest prefix
    that names their action alone, or that only drops its number: ``take`` where one thing can be
    taken, ``go to drawer`` for drawer 1; a very small model spells only the words that choose),
    ``"words"`` (an admissible action, or its first word and some of its other words in order: the
    first listed action that holds them is taken; demonstrations use the first word and the shortest
    tail that names their action alone (no other action holds it), ``put drier`` for ``put wet blue pullover in clothes drier``:
    a very small model need not copy an object's name it has never seen, only the place a skill
    names), or ``"index"`` (the number of an
    admissible action in the numbered list the prompt shows). ``prefix``, ``words`` and ``index`` need
    environments that list their admissible actions. ``context_position``: where privileged context
    (the retrieved skills) goes in the user message: ``"start"``, or ``"end"`` (after the
    observation and the admissible actions, right before the reply instruction: at a fixed distance
    from the reply, where a very small model learns to use it in minutes). ``restate_task``: repeat
    the task (``info["task"]``) as the last line before the reply instruction, after any context
    (the goal at a fixed distance from the reply, for the same reason).
    """

    max_turns: int  # the episode length: env.max_turns
    history_window: int
    max_prompt_tokens: int
    max_response_tokens: int
    temperature: float  # 0: greedy
    action_pattern: str | None
    invalid_action_penalty: float
    show_admissible_actions: bool
    action_format: str
    context_position: str
    restate_task: bool
    step_timeout_s: float  # env.step_timeout_s
    seed: int  # trainer.seed
    top_p: float = 1.0
    overlong: str = "truncate_history"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    format_reminder: str = FORMAT_REMINDER
    skills_in_student_prompt: bool = False
    acts_with_privileged_context: bool = False
    progress: bool = True

    @classmethod
    def of_run(cls, run: Any, **fields: Any) -> "AgentLoopConfig":
        """The loop settings of a run configuration (a ``RunConfig``): the episode length
        ``env.max_turns``, ``env.step_timeout_s``, ``trainer.seed`` and the ``rollout`` group's
        fields; ``fields`` set the rest or replace one (``temperature=0.0`` for greedy evaluation)."""
        r = run.rollout
        values = dict(max_turns=run.env.max_turns, history_window=r.history_window,
                      max_prompt_tokens=r.max_prompt_tokens, max_response_tokens=r.max_response_tokens,
                      temperature=r.temperature, action_pattern=r.action_pattern,
                      invalid_action_penalty=r.invalid_action_penalty,
                      show_admissible_actions=r.show_admissible_actions, action_format=r.action_format,
                      context_position=r.context_position, restate_task=r.restate_task,
                      step_timeout_s=run.env.step_timeout_s, seed=run.trainer.seed)
        return cls(**{**values, **fields})

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.history_window < 0:
            raise ValueError(f"history_window must be >= 0, got {self.history_window}")
        if self.max_prompt_tokens < 8 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 8 and max_response_tokens >= 1")
        if self.action_format not in ACTION_FORMATS:
            raise ValueError(f"action_format must be one of {', '.join(ACTION_FORMATS)}, got {self.action_format!r}")
        if self.action_format != "text" and not self.show_admissible_actions:
            raise ValueError(f"action_format={self.action_format!r} needs show_admissible_actions=True (the list)")
        if self.context_position not in ("start", "end"):
            raise ValueError(f"context_position must be 'start' or 'end', got {self.context_position!r}")
        if self.overlong not in ("truncate_history", "end"):
            raise ValueError(f"overlong must be 'truncate_history' or 'end', got {self.overlong!r}")
        if self.acts_with_privileged_context and self.skills_in_student_prompt:
            raise ValueError("acts_with_privileged_context records the student's prompt without the skills; "
                             "it cannot be combined with skills_in_student_prompt")
        if self.invalid_action_penalty < 0:
            raise ValueError(f"invalid_action_penalty must be >= 0, got {self.invalid_action_penalty}")
        if self.action_pattern is not None:
            try:
                compiled = re.compile(self.action_pattern, re.DOTALL)
            except re.error as exc:
                raise ValueError(f"action_pattern {self.action_pattern!r} is not a valid regex: {exc}") from None
            if compiled.groups < 1:
                raise ValueError(f"action_pattern {self.action_pattern!r} needs one capture group (the action)")


def prompt_text(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The fixed text the loop puts into every prompt (roles, headers, reminders), for training a
    small tokenizer that renders prompts compactly."""
    return "\n".join([
        "system", "user", "assistant", system_prompt, FORMAT_REMINDER, INDEX_FORMAT_REMINDER, FORMAT_FEEDBACK,
        CONTEXT_HEADER, TASK_HEADER, "Recent steps:", "Current observation:", "Admissible actions:",
        "\n".join(f"{i}. go to" for i in range(1, 40)), "<action>1</action> <action>12</action>"])


def parse_action(response: str, pattern: str | None) -> str | None:
    """The action in ``response`` (last match of ``pattern``'s first group), or None."""
    if pattern is None:
        action = response.strip()
        return action or None
    matches = re.findall(pattern, response, flags=re.DOTALL)
    if not matches:
        return None
    action = matches[-1] if isinstance(matches[-1], str) else matches[-1][0]
    action = " ".join(action.split())
    return action or None


def action_token_mask(tokenizer, token_ids: Sequence[int], pattern: str | None) -> list[int]:
    """[R] 1 on the response tokens that spell the action (the first group of ``pattern``'s last
    match; everything but trailing special tokens when ``pattern`` is None), 0 elsewhere: the
    action-choice tokens, whose entropy and teacher gap say more than the format tokens around them.

    Character spans come from decoding each token alone (exact for the byte-level BPEs of Qwen on
    ASCII text; a token straddling the span counts as an action token)."""
    pieces = tokenizer.batch_decode([[t] for t in token_ids], skip_special_tokens=True)
    text = "".join(pieces)
    if pattern is None:
        start, end = 0, len(text.rstrip())
    else:
        matches = list(re.finditer(pattern, text, flags=re.DOTALL))
        if not matches:
            return [0] * len(token_ids)
        start, end = matches[-1].span(1)
    mask, position = [], 0
    for piece in pieces:
        begin, position = position, position + len(piece)
        mask.append(int(bool(piece) and begin < end and position > start))
    return mask


def _words_matches(text: str, options: Sequence[str]) -> list[int]:
    """Indices of the (lower-case) ``options`` that start with the first word of ``text`` and hold its
    other words in order; an exact match wins on its own."""
    words = text.lower().split()
    if " ".join(words) in options:
        return [options.index(" ".join(words))]

    def holds(option_words: list[str]) -> bool:
        rest = iter(option_words[1:])
        return option_words[:1] == words[:1] and all(word in rest for word in words[1:])

    return [i for i, option in enumerate(options) if words and holds(option.split())]


def _prefix_matches(prefix: str, options: Sequence[str]) -> list[int]:
    """Indices of the (lower-case) ``options`` whose words start with the words of ``prefix``;
    an exact match wins on its own."""
    words = prefix.lower().split()
    if " ".join(words) in options:
        return [options.index(" ".join(words))]
    return [i for i, option in enumerate(options) if option.split()[:len(words)] == words]


@dataclass
class EpisodeState:
    """What the prompt of the next turn is built from."""

    first_observation: str
    observation: str
    admissible_actions: list[str] | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # (action text, observation)
    task: str = ""  # info["task"], for AgentLoopConfig.restate_task

    def advance(self, action: str, observation: str, admissible: list[str] | None = None) -> None:
        """Record one step (the rollout and the expert demonstrations build prompts the same way)."""
        self.history.append((action, observation))
        self.observation = observation
        if admissible is not None:
            self.admissible_actions = admissible


class ChatFormatter:
    """Renders prompts with the tokenizer's chat template; the trainer rebuilds the same ids."""

    def __init__(self, tokenizer, config: AgentLoopConfig) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; agent prompts need one")
        self.tokenizer = tokenizer
        self.config = config

    def user_content(self, state: EpisodeState, history_window: int) -> str:
        parts = [state.first_observation]
        history = state.history[-history_window:] if history_window > 0 else []
        if history:
            lines = [f"> {action}\n{observation}" for action, observation in history]
            parts.append("Recent steps:\n" + "\n".join(lines))
        if state.history and not history:  # else the last history entry already shows it
            parts.append(f"Current observation: {state.observation}")
        index = self.config.action_format == "index"
        if self.config.show_admissible_actions and state.admissible_actions:
            if index:
                parts.append("Admissible actions:\n" + "\n".join(
                    f"{i}. {action}" for i, action in enumerate(state.admissible_actions, start=1)))
            else:
                parts.append("Admissible actions: " + ", ".join(state.admissible_actions))
        if self.config.restate_task and state.task:
            parts.append(TASK_HEADER + state.task)
        reminder = INDEX_FORMAT_REMINDER if index and self.config.format_reminder == FORMAT_REMINDER \
            else self.config.format_reminder
        if reminder:
            parts.append(reminder)
        return "\n\n".join(parts)

    def answer(self, action: str, state: EpisodeState) -> str | None:
        """The response text that takes ``action`` (expert demonstrations); None if ``action``
        is not admissible in index or prefix format."""
        if self.config.action_format != "text":
            options = [a.lower() for a in state.admissible_actions or []]
            if action.lower() not in options:
                return None
            if self.config.action_format == "index":
                action = str(options.index(action.lower()) + 1)
            elif self.config.action_format == "words":
                target = options.index(action.lower())
                words = state.admissible_actions[target].split()
                action = next(text for n in range(len(words))
                              if _words_matches(text := " ".join(words[:1] + words[len(words) - n:]), options)
                              == [target])
            else:
                target = options.index(action.lower())
                words = state.admissible_actions[target].split()

                def names_it(n: int) -> bool:  # alone, or the first of several that differ in their number
                    matches = _prefix_matches(" ".join(words[:n]), options)
                    return matches == [target] or (matches[:1] == [target] and len(words) == n + 1
                                                   and words[n].isdigit())
                action = " ".join(words[:next(n for n in range(1, len(words) + 1) if names_it(n))])
        return f"<action>{action}</action>"

    def resolve(self, parsed: str | None, state: EpisodeState) -> str | None:
        """The environment action of a parsed answer: the numbered option (index format), the first
        admissible action it is a word prefix of (prefix format; none: the text as written, which
        the environment rejects), or the text itself."""
        if parsed is None or self.config.action_format == "text":
            return parsed
        options = state.admissible_actions or []
        if self.config.action_format in ("prefix", "words"):
            match = _prefix_matches if self.config.action_format == "prefix" else _words_matches
            matches = match(parsed, [a.lower() for a in options])
            return options[matches[0]] if matches else parsed
        if parsed.isdigit() and 1 <= int(parsed) <= len(options):
            return options[int(parsed) - 1]
        return None

    def _with_context(self, user_content: str, privileged_context: str) -> str:
        if not privileged_context:
            return user_content
        block = CONTEXT_HEADER + privileged_context.strip()
        if self.config.context_position == "start":
            return block + "\n\n" + user_content
        # before the restated task and the reply instruction, which stay last
        parts = user_content.split("\n\n")
        tail = 0
        if parts and parts[-1] in (self.config.format_reminder, INDEX_FORMAT_REMINDER):
            tail = 1
        if len(parts) > tail and parts[-1 - tail].startswith(TASK_HEADER):
            tail += 1
        return "\n\n".join(parts[:len(parts) - tail] + [block] + parts[len(parts) - tail:])

    def messages(self, user_content: str, privileged_context: str = "") -> list[dict[str, str]]:
        messages = [{"role": "user", "content": self._with_context(user_content, privileged_context)}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return messages

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids (generation prompt appended), exactly as the rollout and the trainer use them."""
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """:meth:`encode` of each conversation, tokenized as one batch (about 2x faster for a step's
        turns; the template renders each alone, so the ids are the same)."""
        if not conversations:
            return []
        ids = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [[int(i) for i in row] for row in ids]

    def teacher_messages(self, student_messages: list[dict[str, str]], privileged_context: str) -> list[dict[str, str]]:
        """The teacher's messages: the privileged context in front of the student's user content."""
        out = [dict(m) for m in student_messages]
        out[-1]["content"] = self._with_context(out[-1]["content"], privileged_context)
        return out


@dataclass
class EpisodeSpec:
    """One episode to run: its environment, the task's group id (global across ranks), the
    task seed (same for the G episodes of a task), a global episode id (sampling seed), and the
    split the task is drawn from (the trainer's: :func:`megatron_sdar.trainer.seeds.split_of`)."""

    env: TextEnv
    group: int
    task_seed: int
    episode_id: int
    split: str = "train"


def reset_episodes(batch: EnvBatch, specs: Sequence[EpisodeSpec]) -> list:
    """Reset every spec's environment (``batch.envs[i]`` is ``specs[i].env``) on its task: ``task_seed``
    drawn from the tasks of ``split``."""
    return batch.reset([s.task_seed for s in specs], [s.split for s in specs])


def _all_ranks_any(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _all_ranks_gather(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class AgentLoop:
    """Runs episodes with a :class:`RolloutEngine`. ``retriever``: a
    :class:`~megatron_sdar.skills.SkillRetriever` (or None: no privileged context)."""

    def __init__(self, engine: RolloutEngine, tokenizer, config: AgentLoopConfig, retriever=None) -> None:
        self.engine = engine
        self.config = config
        self.formatter = ChatFormatter(tokenizer, config)
        self.tokenizer = tokenizer
        self.retriever = retriever

    def _retrieve(self, tasks: dict[int, tuple[str, str]]) -> dict[int, tuple[str, tuple[str, ...]]]:
        """Skills per group, chosen identically on every rank (all ranks' tasks, group order)."""
        merged: dict[int, tuple[str, str]] = {}
        for part in _all_ranks_gather(tasks):
            merged.update(part)
        out: dict[int, tuple[str, tuple[str, ...]]] = {}
        for group in sorted(merged):
            if self.retriever is None:
                out[group] = ("", ())
                continue
            task, task_type = merged[group]
            retrieval = self.retriever.retrieve(task, task_type)
            out[group] = (retrieval.context, tuple(retrieval.skill_names))
        return out

    def _prompt(self, state: EpisodeState, episode: Episode) -> tuple[list[dict[str, str]], list[int], list[int]] | None:
        """Messages and ids of the next prompt and the ids the engine generates from (the same, or
        the teacher's prompt with ``acts_with_privileged_context``), within ``max_prompt_tokens``
        (None: cannot fit)."""
        config = self.config
        student_context = episode.privileged_context if config.skills_in_student_prompt else ""
        window = config.history_window
        while True:
            messages = self.formatter.messages(self.formatter.user_content(state, window), student_context)
            ids = self.formatter.encode(messages)
            engine_ids = ids
            if config.acts_with_privileged_context:
                engine_ids = self.formatter.encode(self.formatter.teacher_messages(messages, episode.privileged_context))
            if len(engine_ids) <= config.max_prompt_tokens:
                return messages, ids, engine_ids
            if config.overlong != "truncate_history" or window <= 0 or not state.history:
                return None  # nothing left to cut (before, a first turn that did not fit looped forever)
            window = min(window, len(state.history)) - 1

    def run(self, specs: Sequence[EpisodeSpec], step_callback: Callable[[dict], None] | None = None,
            contexts: dict[int, tuple[str, tuple[str, ...]]] | None = None) -> TrajectoryBatch:
        """Run every episode of ``specs`` to its end; return this rank's trajectories. ``contexts``:
        the privileged context and skill names of every group (of all ranks) instead of retrieving
        them (HDPO's rescue replays the skills its group was given)."""
        config = self.config
        batch = EnvBatch([s.env for s in specs], step_timeout_s=config.step_timeout_s) if specs else None
        episodes: list[Episode] = []
        states: list[EpisodeState | None] = []
        live: list[bool] = []
        if batch is not None:
            for spec, result in zip(specs, reset_episodes(batch, specs)):
                info = result.info
                episode = Episode(group=spec.group, task=str(info.get("task", "")),
                                  task_type=str(info.get("task_type", "")), seed=spec.task_seed,
                                  episode_id=spec.episode_id, first_choice_correct=info.get("first_choice_correct"))
                if result.error is not None:
                    episode.env_error = result.error
                episodes.append(episode)
                states.append(EpisodeState(result.observation, result.observation, info.get("admissible_actions"),
                                           task=str(info.get("task", ""))))
                live.append(result.error is None)
        if contexts is None:
            contexts = self._retrieve({e.group: (e.task, e.task_type) for e in episodes})
        for episode in episodes:
            episode.privileged_context, episode.skill_names = contexts[episode.group]

        from megatron_sdar.rollout.engine import SamplingConfig

        sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                                  max_tokens=config.max_response_tokens)
        progress = self._progress_bar(len(episodes))
        started, tokens, env_steps = time.perf_counter(), 0, 0
        turn = 0
        while _all_ranks_any(any(live)) and turn < config.max_turns:
            prompts: list[tuple[int, list[dict[str, str]], list[int], list[int]]] = []
            for i, episode in enumerate(episodes):
                if not live[i]:
                    continue
                built = self._prompt(states[i], episode)
                if built is None:
                    episode.overlong, live[i] = True, False
                    continue
                prompts.append((i, *built))
            seeds = [self._sampling_seed(specs[i].episode_id, turn) for i, _, _, _ in prompts]
            generations = self.engine.generate([engine_ids for _, _, _, engine_ids in prompts], sampling, seeds=seeds)
            actions: list[str | None] = [None] * len(episodes)
            for (i, messages, ids, engine_ids), gen in zip(prompts, generations):
                episode = episodes[i]
                text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                action = self.formatter.resolve(parse_action(text, config.action_pattern), states[i])
                # a rescue episode generated from the teacher's prompt; its student prompt is ``ids``
                student_ids = ids if config.acts_with_privileged_context else list(gen.prompt_ids)
                episode.turns.append(Turn(prompt_ids=student_ids, response_ids=gen.token_ids,
                                          rollout_logprobs=gen.logprobs, messages=messages, response_text=text,
                                          action=action, finish_reason=gen.finish_reason,
                                          action_mask=action_token_mask(self.tokenizer, gen.token_ids,
                                                                        config.action_pattern)))
                tokens += len(gen.token_ids)
                if action is None:
                    self._record(episode, states[i], "(no action)", FORMAT_FEEDBACK, invalid=True)
                else:
                    actions[i] = action
            results = batch.step(actions) if batch is not None and any(a is not None for a in actions) else []
            for i, result in enumerate(results):
                if result is None:
                    continue
                env_steps += 1
                episode = episodes[i]
                episode.env_return += result.reward
                info = result.info
                if result.error is not None:
                    episode.env_error = result.error
                invalid = bool(info.get("invalid_action", False))
                self._record(episode, states[i], actions[i], result.observation, invalid=invalid,
                             admissible=info.get("admissible_actions"))
                episode.won = bool(info.get("won", False))
                if "first_choice_correct" in info:
                    episode.first_choice_correct = bool(info["first_choice_correct"])
                if result.done:
                    live[i] = False
                    episode.truncated = result.truncated
            turn += 1
            if progress is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(1)
                progress.set_postfix(live=sum(live), tok_s=f"{tokens / elapsed:.0f}",
                                     env_s=f"{env_steps / elapsed:.1f}")
            if step_callback is not None:
                step_callback({"turn": turn, "live": sum(live)})
        for i, episode in enumerate(episodes):
            if live[i]:
                episode.truncated = True  # turn limit of the loop
            episode.reward = episode.env_return - config.invalid_action_penalty * episode.invalid_actions
        if progress is not None:
            progress.close()
        if batch is not None:
            batch.close()
        elapsed = max(time.perf_counter() - started, 1e-9)
        out = TrajectoryBatch(episodes)
        out.metrics = {"rollout/seconds": elapsed, "rollout/tokens_per_s": tokens / elapsed,
                       "rollout/env_steps_per_s": env_steps / elapsed, "rollout/loop_turns": float(turn)}
        return out

    @staticmethod
    def _record(episode: Episode, state: EpisodeState, action: str, observation: str, *, invalid: bool,
                admissible: list[str] | None = None) -> None:
        turn = episode.turns[-1]
        turn.invalid_action = invalid
        episode.invalid_actions += int(invalid)
        state.advance(action, observation, admissible)

    def _sampling_seed(self, episode_id: int, turn: int) -> int:
        return (self.config.seed * 1_000_003 + episode_id * 10_007 + turn) % (2**31 - 1)

    def _progress_bar(self, episodes: int):
        import torch.distributed as dist

        if not self.config.progress or (dist.is_initialized() and dist.get_rank() != 0):
            return None
        from megatron_sdar.utils.logging import progress

        return progress(total=self.config.max_turns, desc=f"rollout ({episodes} episodes/rank)", unit="turn",
                        leave=False, disable=False)
