"""ALFWorld (text) through the real ``alfworld`` and ``textworld`` packages.

Games are the ``game.tw-pddl`` files that ``alfworld-download`` places under
``$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/`` next to a
``traj_data.json`` (task type, goal parameters, annotations). Like alfworld's own
``AlfredTWEnv`` the adapter skips trials whose path contains ``movable`` or ``Sliced``,
games without ``"solvable": true`` and task types not asked for.

Splits (:mod:`megatron_sdar.envs.splits`): ``reset(seed, split=...)`` draws from ``train/`` for
``train``, ``valid_unseen/`` for ``validation`` and ``valid_seen/`` for ``test`` (the split the SDAR
release reports); ``split_dirs=`` maps them otherwise. A split's games are read at its first draw
and kept for the process (every environment of a rollout shares them).

Each game is played by textworld's ``PddlEnv`` (fast-downward applies the PDDL actions)
wrapped by alfworld's ``AlfredDemangler`` (object ids -> "apple 1") and ``AlfredInfos``.
A game file may omit ``pddl_domain`` and ``grammar``: they are then taken from the
installed alfworld package (``alfred.pddl``, ``alfred.twl2``) with the goal text from
``traj_data.json`` (first annotation). That is how the shipped sample games
(``megatron_sdar/envs/data/alfworld``, ``data_dir="builtin"``: one hand-written game in each of
``train``, ``valid_seen`` and ``valid_unseen``) are stored.

Actions are ALFWorld 0.4's (``move O to R`` for placing); ``put O in/on R``, ``put O in R``
and ``put O on R`` are accepted as spellings of it, so agents trained on the built-in
household world speak the same language. ``help`` is removed from the admissible actions.
Reward 1.0 when the goal holds. ``expert_actions()`` asks fast-downward for a plan from
the current state.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sdar.envs.base import INVALID_ACTION_FEEDBACK, EnvError, EnvOptionError, TextEnv, normalize_command
from megatron_sdar.envs.splits import alfworld_split_dirs

BUILTIN_DATA_DIR = Path(__file__).parent / "data" / "alfworld"
DIRECTORIES = {"train": "train", "valid_seen": "valid_seen", "valid_unseen": "valid_unseen",
               # alfworld's own names for the evaluation directories
               "eval_in_distribution": "valid_seen", "eval_out_of_distribution": "valid_unseen"}
ALFWORLD_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                       "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
_TASK_LINE = re.compile(r"Your task is to:\s*(.+?)\s*$", re.MULTILINE)
_PUT = re.compile(r"^put (?P<o>.+?) (?:in/on|in|on|into|onto) (?P<r>.+)$")
# textworld 1.7's PDDL environment is not thread-safe: its grammar parser and planner state are
# process-global, and two games loaded at once from EnvBatch's threads fail ("IndexError: pop from
# empty list", tatsu "FailedParse") or mix their states. Every call into it holds this lock. The
# failures differed between processes, so the two ranks of a rollout-TP group played different
# episodes and vLLM deadlocked (found by the recipes' rehearsal).
_TEXTWORLD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ALFWorldGame:
    game_file: Path
    task_type: str
    goal_text: str  # from traj_data.json; used when the game file has no grammar


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    if data_dir == "builtin":
        return BUILTIN_DATA_DIR
    if data_dir is None:
        env_dir = os.environ.get("ALFWORLD_DATA")
        if not env_dir:
            raise EnvError("alfworld: no data_dir given and $ALFWORLD_DATA is not set; run `alfworld-download` "
                           "(it fills ~/.cache/alfworld) and set ALFWORLD_DATA, or pass data_dir=... "
                           "(data_dir='builtin' plays the shipped sample game)")
        data_dir = env_dir
    return Path(os.path.expandvars(str(data_dir))).expanduser()


def _check_task_types(task_types: tuple[str, ...]) -> None:
    unknown = [t for t in task_types if t not in ALFWORLD_TASK_TYPES]
    if unknown:
        raise ValueError(f"alfworld: unknown task types {unknown}; known: {ALFWORLD_TASK_TYPES}")


def collect_games(data_dir: str | Path | None, split: str, task_types: tuple[str, ...] = ALFWORLD_TASK_TYPES
                  ) -> list[ALFWorldGame]:
    """Solvable games of ALFWorld's directory ``split`` (train / valid_seen / valid_unseen, or
    alfworld's names eval_in_distribution / eval_out_of_distribution), sorted by path."""
    if split not in DIRECTORIES:
        raise ValueError(f"alfworld directory must be one of {sorted(DIRECTORIES)}, got {split!r}")
    _check_task_types(task_types)
    root = resolve_data_dir(data_dir)
    split_dir = root / "json_2.1.1" / DIRECTORIES[split]
    if not split_dir.is_dir():
        raise EnvError(f"alfworld: split directory {split_dir} does not exist (expected "
                       f"<data_dir>/json_2.1.1/{DIRECTORIES[split]}/ as written by `alfworld-download`)")
    games = []
    for traj_path in sorted(split_dir.rglob("traj_data.json")):
        trial = traj_path.parent
        game_file = trial / "game.tw-pddl"
        if "movable" in str(trial) or "Sliced" in str(trial) or not game_file.is_file():
            continue
        try:
            traj = json.loads(traj_path.read_text())
            solvable = json.loads(game_file.read_text()).get("solvable", False)
        except json.JSONDecodeError as exc:
            raise EnvError(f"alfworld: {traj_path.parent}: unreadable JSON ({exc})") from None
        if not solvable or traj.get("task_type") not in task_types:
            continue
        anns = traj.get("turk_annotations", {}).get("anns", [])
        goal = anns[0]["task_desc"].strip().rstrip(".") if anns else ""
        games.append(ALFWorldGame(game_file, traj["task_type"], goal))
    if not games:
        raise EnvError(f"alfworld: no solvable games of types {task_types} under {split_dir}")
    return games


@functools.lru_cache(maxsize=16)
def _shared_games(root: str, split: str, task_types: tuple[str, ...]) -> tuple[ALFWorldGame, ...]:
    # one scan per process and split: the trainer builds an environment per episode
    return tuple(collect_games(root, split, task_types))


def _load_game_data(game: ALFWorldGame) -> dict[str, Any]:
    data = json.loads(game.game_file.read_text())
    if "pddl_problem" not in data:
        raise EnvError(f"alfworld: {game.game_file} has no 'pddl_problem'")
    if "pddl_domain" not in data or "grammar" not in data:
        from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

        if not game.goal_text:
            raise EnvError(f"alfworld: {game.game_file} has no grammar and its traj_data.json no task_desc")
        data.setdefault("pddl_domain", Path(ALFRED_PDDL_PATH).read_text())
        data.setdefault("grammar", Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", game.goal_text))
    return data


class ALFWorldEnv(TextEnv):
    """``make("alfworld", data_dir=None)``; ``reset(seed, split=...)`` draws a game of the split's
    sorted list with ``Random(seed)`` (``options={"game_index": i}`` picks the split's game ``i``).
    ``split_dirs``: ALFWorld directory of each split (default
    :data:`~megatron_sdar.envs.splits.ALFWORLD_SPLIT_DIRS`)."""

    name = "alfworld"

    def __init__(self, data_dir: str | Path | None = None,
                 task_types: tuple[str, ...] | list[str] = ALFWORLD_TASK_TYPES, max_turns: int = 50,
                 seed: int | None = None, split_dirs: dict[str, str] | None = None) -> None:
        super().__init__(max_turns=max_turns, seed=seed)
        self.data_dir = resolve_data_dir(data_dir)
        self.split_dirs = alfworld_split_dirs(split_dirs)
        self.task_types = tuple(task_types)
        _check_task_types(self.task_types)
        self._tw_env = None
        self._state = None
        self.game: ALFWorldGame | None = None
        self._task_text = ""

    @classmethod
    def check_options(cls, task_types: tuple[str, ...] | list[str] = ALFWORLD_TASK_TYPES,
                      split_dirs: dict[str, str] | None = None, **_: Any) -> None:
        """The task types and the split directories' names (the data directory itself is
        :func:`~megatron_sdar.envs.splits.data_problem`'s)."""
        for option, check in (("task_types", lambda: _check_task_types(tuple(task_types))),
                              ("split_dirs", lambda: alfworld_split_dirs(split_dirs))):
            try:
                check()
            except (TypeError, ValueError) as exc:
                raise EnvOptionError(option, str(exc)) from None

    def games(self, split: str) -> tuple[ALFWorldGame, ...]:
        """The solvable games of ``split`` (train / validation / test), sorted by path."""
        return _shared_games(str(self.data_dir), self.split_dirs[split], self.task_types)

    def _make_tw_env(self):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        from textworld.envs.pddl import PddlEnv

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        return AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))

    def _info(self, invalid: bool) -> dict[str, Any]:
        admissible = [c for c in self._state["admissible_commands"] if c != "help"]
        return {"admissible_actions": admissible, "won": bool(self._state["won"]), "task_type": self.game.task_type,
                "task": self._task_text, "invalid_action": invalid, "game_file": str(self.game.game_file)}

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        games = self.games(self.split)
        index = options.get("game_index", rng.randrange(len(games)))
        self.game = games[index]
        data = _load_game_data(self.game)
        with _TEXTWORLD_LOCK:
            if self._tw_env is None:
                self._tw_env = self._make_tw_env()
            self._tw_env.load(data)
            self._state = self._tw_env.reset()
        observation = self._state.feedback
        match = _TASK_LINE.search(observation)
        self._task_text = match.group(1).rstrip(".") if match else self.game.goal_text
        return observation, self._info(False)

    def _to_command(self, action: str) -> str:
        command = normalize_command(action)
        match = _PUT.match(command)
        if match:
            command = f"move {match['o']} to {match['r']}"
        return command

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        command = self._to_command(action)
        if command not in self._state["admissible_commands"] or command == "help":
            # textworld would answer "Nothing happens." too; we skip the call and flag it.
            return INVALID_ACTION_FEEDBACK, 0.0, False, self._info(True)
        with _TEXTWORLD_LOCK:
            self._state, _, _ = self._tw_env.step(command)
        info = self._info(False)
        return self._state.feedback, (1.0 if info["won"] else 0.0), info["won"], info

    def expert_actions(self) -> list[str]:
        """A fast-downward plan from the current state (the PDDL planner alfworld uses)."""
        if self._tw_env is None or self._state is None:
            raise RuntimeError("call reset() before expert_actions()")
        pddl_env = self._tw_env.unwrapped
        with _TEXTWORLD_LOCK:
            return pddl_env._pddl_state.replan(pddl_env._entity_infos)

    def close(self) -> None:
        if self._tw_env is not None:
            with _TEXTWORLD_LOCK:
                self._tw_env.close()
            self._tw_env = None
