"""TextWorld Commonsense and CookingWorld through the real TextWorldExpress engine.

TextWorldExpress (Jansen & Côté, 2022; the ``textworld-express`` package) reimplements published
text-game benchmarks in Scala and serves them to Python through ``py4j``. Two of them run here:

- ``make("twc")``: TextWorld Commonsense (Murugesan et al., AAAI 2021): objects lie out of place
  and the task is to put them in their usual locations ("a dirty shirt goes in the laundry
  basket"). The engine's object folds (``twc_objects.folds.json``) hold different objects, so
  the test fold measures whether a rule transfers to objects never seen in training.
- ``make("cookingworld")``: CookingWorld, the games of the First TextWorld Problems competition:
  read the cookbook, gather the ingredients, process them as directed (slice with the knife,
  roast in the oven, ...), prepare the meal and eat it. Cooking with the wrong appliance ruins
  the meal and ends the game.

**Splits.** The engine's folds are ours: ``train`` <- ``train``, ``validation`` <- ``dev``,
``test`` <- ``test``; each fold has its own generation seeds (1000 games each), and TWC's folds
also their own objects. ``reset(seed, split=...)`` draws one game seed of the split's list with
``Random(seed)`` (``options={"game_index": i}`` picks the split's game ``i``).

**Game parameters** are the engine's (``game_params``: ``numLocations``, ``numItemsToPutAway``,
``numIngredients``, ``numDistractorItems``, ``includeDoors``, ``limitInventorySize``), checked
by the engine when the run's configuration is composed (:meth:`TextWorldExpressEnv.check_options`)
and again at construction. ``turn_slack``: each episode's turn budget is its gold path plus
``turn_slack`` turns (capped by ``max_turns``), as the household world does; None keeps
``max_turns``.

**Actions** are the engine's ``validActions`` (sorted; ``admissible_actions``); anything else
answers :data:`~megatron_sdar.envs.base.INVALID_ACTION_FEEDBACK` and leaves the game unchanged.
Reward 1.0 when the task succeeds, else 0.0 (the engine's partial score is ``info["score"]``).
``info["task_type"]``: TWC the room the agent starts in (the built-in skills are per room);
CookingWorld ``cooking``.

**The JVM.** One Java process per Python process, started at the first environment and shut down
at exit; every environment is its own game object on it (``PythonInterface``). Those objects
are independent, so :class:`~megatron_sdar.envs.EnvBatch` steps them from several threads
(``tests/test_envs_textworld_express.py`` checks that concurrent play equals sequential play).
Java 17 and the package are checked first, with one line naming the fix when either is missing.

**SFT demonstrations** (:meth:`TextWorldExpressEnv.demonstrations`) teach the format and the use of
a skill without the answers: the gold path, with its decisive choices (where TWC puts an object,
which appliance CookingWorld cooks with) either drawn uniformly (plain demonstrations) or taken
from a skill in the built-in skills' format that states a *randomly drawn* rule (skill
demonstrations). The engine keeps its own rules, so a skill demonstration usually fails after that
choice; it is cut there. A model trained on them reads rules from a skill, and knows none of the
world's own.
"""
from __future__ import annotations

import atexit
import json
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from megatron_sdar.envs.base import (INVALID_ACTION_FEEDBACK, Demonstration, EnvError, EnvOptionError, TextEnv,
                                     normalize_command)

#: our splits -> the engine's folds
FOLDS = {"train": "train", "validation": "dev", "test": "test"}
#: the games, with the parameters of the laptop-sized defaults (the recipes' twc_tiny, cooking_tiny)
GAMES = {
    "twc": {"numLocations": 1, "numItemsToPutAway": 1, "includeDoors": 0, "limitInventorySize": 0},
    "cookingworld": {"numLocations": 1, "numIngredients": 1, "numDistractorItems": 0, "includeDoors": 0,
                     "limitInventorySize": 0},
}
PACKAGE_FIX = "pip install textworld-express==1.1.0 (tools/bootstrap.sh installs it from requirements/cpu.lock)"
JAVA_FIX = "install Java 17 (e.g. apt-get install openjdk-17-jre-headless) and put `java` on PATH"
#: a skill's rule lines: "- <what>: <where>"
RULE_LINE = re.compile(r"^- (?P<what>.+): (?P<where>[^:]+)$", re.MULTILINE)
_ROOM = re.compile(r"You are in the (?P<room>[^.]+)\.")
_PUT = re.compile(r"^put (?P<o>.+) in (?P<c>.+)$")
_COOK = re.compile(r"^cook (?P<i>.+) in (?P<a>.+)$")
#: CookingWorld's heat directions, and its appliances (which needs which: the skill cook.md)
COOKING_VERBS = ("roast", "fry", "grill")
COOKING_APPLIANCES = ["oven", "stove", "toaster"]


def missing_dependency() -> str | None:
    """One line naming what TextWorldExpress lacks on this machine (the package, or Java), or None."""
    try:
        import textworld_express  # noqa: F401
    except ImportError:
        return f"TextWorldExpress is not installed: {PACKAGE_FIX}"
    if shutil.which("java") is None:
        return f"TextWorldExpress runs on the JVM and `java` was not found: {JAVA_FIX}"
    return None


class _Gateway:
    """The process's JVM (started at first use, shut down at exit)."""

    _lock = threading.Lock()
    _gateway = None

    @classmethod
    def new_game(cls):
        with cls._lock:
            if cls._gateway is None:
                problem = missing_dependency()
                if problem is not None:
                    raise EnvError(problem)
                from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
                from textworld_express.constants import BASEPATH, JAR_PATH

                port, process = launch_gateway(classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH,
                                               javaopts=["-Xverify:none"], return_proc=True)
                cls._gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port),
                                           java_process=process)
                atexit.register(cls.shutdown)
            return cls._gateway.jvm.textworldexpress.runtime.PythonInterface()

    @classmethod
    def shutdown(cls) -> None:
        with cls._lock:
            if cls._gateway is None:
                return
            gateway, cls._gateway = cls._gateway, None
            process = gateway.java_process
            try:
                gateway.shutdown()
            finally:  # the JVM exits when its stdin closes (die_on_exit)
                if process is not None and process.poll() is None:
                    try:
                        process.stdin.close()
                        process.wait(timeout=10)
                    except Exception:
                        process.kill()


def _params_text(game: str, params: dict[str, Any]) -> str:
    """The engine's parameter string (``numLocations=1,...``) of the defaults with ``params``."""
    merged = {**GAMES[game], **params}
    bad = {k: v for k, v in merged.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        raise EnvError(f"{game}: game_params must be integers, got {bad}")
    return ",".join(f"{k}={v}" for k, v in merged.items())


def engine_refusal(game: str, params: str) -> str:
    """The engine's refusal of the parameter string ``params`` (:func:`_params_text`) for ``game``
    ("" when it accepts them). The rules (ranges of each parameter, known names) live in the engine's
    Scala game generators, so the engine itself is asked: ``load`` checks them without generating a
    game (the process's JVM starts once, in under a second; a check takes tens of ms)."""
    return str(_Gateway.new_game().load(game, params) or "").strip()


class TextWorldExpressEnv(TextEnv):
    """One TextWorldExpress game (``game``: ``twc`` | ``cookingworld``); see the module docstring."""

    def __init__(self, game: str, game_params: dict[str, Any] | None = None, turn_slack: int | None = None,
                 max_turns: int = 50, seed: int | None = None) -> None:
        if game not in GAMES:
            raise ValueError(f"textworld-express game must be one of {sorted(GAMES)}, got {game!r}")
        super().__init__(max_turns=max_turns, seed=seed)
        self.name = game
        self.cap_turns = self.max_turns
        self.turn_slack = turn_slack
        self.params = _params_text(game, dict(game_params or {}))
        self._server = _Gateway.new_game()
        message = self._server.load(game, self.params)
        if message:
            raise EnvError(f"{game}: the engine refused game_params {self.params!r}: {message.strip()}")
        self._seeds: dict[str, list[int]] = {}
        self._response: dict[str, Any] = {}
        self._gold: list[str] = []
        self._closed: set[str] = set()  # what can be opened at the start of the episode
        self._actions: list[str] = []
        self._task_type = ""
        self._task = ""
        self._decisive: dict[str, str] = {}  # the gold path's decisive choices: object -> place (TWC), ingredient -> appliance

    @classmethod
    def check_options(cls, game_params: dict[str, Any] | None = None, turn_slack: int | None = None,
                      **_: Any) -> None:
        """``game_params`` as the engine checks them when the environment is built (integers, known
        names, each within the game's range), and ``turn_slack`` >= 0. Without Java or the package the
        engine cannot be asked: its parameters are then left to the environment's construction (the
        configuration check reports the missing dependency itself, :func:`missing_dependency`)."""
        if turn_slack is not None and (isinstance(turn_slack, bool) or not isinstance(turn_slack, int)
                                       or turn_slack < 0):
            raise EnvOptionError("turn_slack", f"must be a whole number >= 0 or null, got {turn_slack!r}")
        if game_params is not None and not isinstance(game_params, dict):
            raise EnvOptionError("game_params", f"must be a mapping of the engine's parameters, got {game_params!r}")
        try:
            params = _params_text(cls.name, dict(game_params or {}))
        except EnvError as exc:
            raise EnvOptionError("game_params", str(exc)) from None
        if missing_dependency() is not None:
            return
        message = engine_refusal(cls.name, params)
        if message:
            raise EnvOptionError("game_params", f"the {cls.name} engine refuses {params}: {message}")

    # ------------------------------------------------------------------ folds
    def game_seeds(self, split: str) -> list[int]:
        """The engine's generation seeds of ``split``'s fold."""
        if split not in self._seeds:
            fetch = {"train": self._server.getSeedsTrain, "validation": self._server.getSeedsDev,
                     "test": self._server.getSeedsTest}[split]
            self._seeds[split] = sorted(int(s) for s in fetch())
        return self._seeds[split]

    # ------------------------------------------------------------------ play
    def _info(self, invalid: bool) -> dict[str, Any]:
        r = self._response
        return {"admissible_actions": sorted(r["validActions"]), "won": bool(r["tasksuccess"]),
                "task_type": self._task_type, "task": self._task,
                "invalid_action": invalid, "score": float(r["score"]), "failed": bool(r["taskfailure"])}

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        seeds = self.game_seeds(self.split)
        game_seed = seeds[options.get("game_index", rng.randrange(len(seeds)))]
        self._response = json.loads(self._server.generateNewGameJSON(game_seed, FOLDS[self.split], True))
        # the gold path starts with "look around", which only repeats the first observation
        self._gold = [a for a in self._server.getGoldActionSequence() if a != "look around"]
        self._closed = {a[len("open "):] for a in self._response["validActions"] if a.startswith("open ")}
        pattern = _PUT if self.name == "twc" else _COOK
        self._decisive = {m[1].lower(): m[2].lower() for m in map(pattern.match, self._gold) if m}
        self._actions = []
        self._task = self._server.getTaskDescription()
        observation = self._response["observation"].strip()
        room = _ROOM.match(observation)
        self._task_type = "cooking" if self.name == "cookingworld" else (room["room"] if room else "twc")
        if self.turn_slack is not None:
            self.max_turns = min(self.cap_turns, len(self._gold) + self.turn_slack)
        info = self._info(False)
        info["game_seed"] = game_seed
        return f"{observation}\n\n{info['task']}", info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        command = normalize_command(action)
        valid = {a.lower(): a for a in self._response["validActions"]}
        if command not in valid:
            return INVALID_ACTION_FEEDBACK, 0.0, False, self._info(True)
        self._response = json.loads(self._server.stepJSON(valid[command]))
        self._actions.append(valid[command])
        info = self._info(False)
        return self._response["observation"].strip(), (1.0 if info["won"] else 0.0), info["won"] or info["failed"], info

    def _episode_has_decisive_choice(self) -> bool:
        return bool(self._decisive)  # a CookingWorld recipe may need no cooking

    def _decisive_choice(self, command: str) -> bool | None:
        """The first object put somewhere (TWC) or ingredient cooked (CookingWorld): where, or with what,
        the gold path does it, which is what the matching skill's rule states."""
        match = (_PUT if self.name == "twc" else _COOK).match(command)
        if match is None:
            return None
        return self._decisive.get(match[1]) == match[2]

    def expert_actions(self) -> list[str]:
        """The rest of the engine's gold path (it is known for the episode's start: an error once the
        episode has left it)."""
        if not self._response:
            raise RuntimeError("call reset() before expert_actions()")
        if self._actions != self._gold[: len(self._actions)]:
            raise RuntimeError(f"{self.name}: the gold path is known only while the episode follows it")
        return self._gold[len(self._actions):]

    def close(self) -> None:
        self._server = None

    # ------------------------------------------------------------------ SFT demonstrations
    def demonstrations(self, seeds: list[int], skill_share: float, seed: int = 0,
                       skill_dir: str | Path | None = None) -> list[Demonstration]:
        """One demonstration per task seed (train tasks): the gold path with its decisive choices
        drawn uniformly (plain) or, with probability ``skill_share``, from a skill that states a
        randomly drawn rule in the format of the skill set at ``skill_dir`` (default: the built-in
        one). See the module docstring."""
        from megatron_sdar.skills import SkillBank, builtin_skill_dir

        bank = SkillBank.from_dir(skill_dir or builtin_skill_dir(self.name))
        rng = random.Random(seed)
        out = []
        for task_seed in seeds:
            observation, info = self.reset(seed=task_seed, split="train")
            with_skill = rng.random() < skill_share
            play = self._twc_demo if self.name == "twc" else self._cooking_demo
            steps, context, won = play(bank, rng, with_skill)
            # the steps the skill decides: where an object goes (open it, put it there), which appliance cooks
            decisive = tuple(i for i, (action, _, _) in enumerate(steps) if action.startswith(("open ", "put ", "cook "))
                             and (self.name == "twc" or action.startswith("cook ")))
            out.append(Demonstration(observation, info["admissible_actions"], steps, context, info["task_type"], won,
                                     "", info["task"], decisive))
        return out

    def _play(self, action: str, steps: list) -> bool:
        """Step ``action`` into ``steps``; whether the episode goes on (the action was admissible, the
        episode did not end)."""
        observation, _, terminated, truncated, info = self.step(action)
        steps.append((action, observation, info["admissible_actions"]))
        return not (info["invalid_action"] or terminated or truncated)

    @staticmethod
    def _rule_skill(bank, skill_name: str, choose) -> tuple[str, dict[str, str]]:
        """The skill ``skill_name`` with each rule's place replaced by ``choose(what)``: (text, {the
        skill's own place: the stated one})."""
        stated: dict[str, str] = {}

        def swap(match: re.Match) -> str:
            stated[match["where"]] = choose(match["what"])
            return f"- {match['what']}: {stated[match['where']]}"

        return RULE_LINE.sub(swap, bank.skills[skill_name].text), stated

    def _twc_demo(self, bank, rng: random.Random, with_skill: bool) -> tuple[list, str, bool]:
        """Take each object and put it where the skill's (random) rule says, or, without a skill, where a
        uniform draw says; when that put did not finish the task, take the object back and try a
        place not yet tried, while the budget lasts (a search with no knowledge of the answer: every
        further place is a uniform draw among the untried ones)."""
        truth = {m["o"]: m["c"] for m in map(_PUT.match, self._gold) if m}
        places = sorted(_twc_places(self._response["observation"]))
        skill = bank.task_to_skill.get(self._task_type)
        context, stated = "", {}
        if with_skill and skill is not None:
            context, stated = self._rule_skill(bank, skill, lambda what: rng.choice(places))
        steps: list = []
        opened: set[str] = set()

        def put_away(obj: str, place: str) -> bool:
            plan = [f"take {obj}"]
            if place in self._closed and place not in opened:
                plan.append(f"open {place}")
                opened.add(place)
            return all(self._play(step, steps) for step in plan + [f"put {obj} in {place}"])

        for action in self._gold:
            if not action.startswith("take "):
                continue
            obj = action[len("take "):]
            tried = [stated.get(truth.get(obj, "")) or rng.choice(places)]
            going = put_away(obj, tried[0])
            while going and self._turn < self.max_turns and len(tried) < len(places):
                # the object is where the last put left it and the task is not done: try another place
                tried.append(rng.choice([p for p in places if p not in tried]))
                going = put_away(obj, tried[-1])
            if not going:
                break
        return steps, context, bool(self._last_info.get("won"))

    def _cooking_demo(self, bank, rng: random.Random, with_skill: bool) -> tuple[list, str, bool]:
        stated: dict[str, str] = {}
        context = ""
        if with_skill:
            shuffled = dict(zip(COOKING_VERBS, rng.sample(COOKING_APPLIANCES, len(COOKING_APPLIANCES))))
            context, _ = self._rule_skill(bank, bank.task_to_skill["cooking"], lambda verb: shuffled[verb])
            stated = shuffled
        steps: list = []
        directions = ""
        for action in self._gold:
            match = _COOK.match(action)
            if match:
                verb = next((v for v in COOKING_VERBS if f"{v} the {match['i']}" in directions), None)
                action = f"cook {match['i']} in {stated.get(verb) or rng.choice(COOKING_APPLIANCES)}"
            if not self._play(action, steps):
                break
            if action == "read cookbook":
                directions = steps[-1][1]
        return steps, context, bool(self._last_info.get("won"))

    def corpus_text(self, seeds: list[int]) -> str:
        """Text of this benchmark (train games played by the demonstrations, with and without skills, and
        the built-in skills), for training a small tokenizer."""
        from megatron_sdar.skills import SkillBank, builtin_skill_dir

        lines = [skill.text for skill in SkillBank.from_dir(builtin_skill_dir(self.name)).skills.values()]
        for demo in self.demonstrations(seeds, skill_share=0.5, seed=1):
            lines += [demo.observation, ", ".join(demo.admissible), demo.context]
            for action, observation, admissible in demo.steps:
                lines += [f"<action>{action}</action>", observation, ", ".join(admissible)]
        return "\n".join(lines)


#: furniture in a room description: "you see a wardrobe that is closed", "a desk, that has nothing on it"
_FURNITURE = re.compile(r"(?:you see|There is also|You also see) (?:an? |the )?(?P<x>[^.,]+?),? that (?:has|is) ")


def _twc_places(observation: str) -> set[str]:
    """The furniture of a TWC room description (where objects can be put)."""
    return {m["x"] for m in _FURNITURE.finditer(observation)}


class TWCEnv(TextWorldExpressEnv):
    """``make("twc", game_params={...}, turn_slack=None)``: TextWorld Commonsense."""

    name = "twc"

    def __init__(self, game_params: dict[str, Any] | None = None, turn_slack: int | None = None,
                 max_turns: int = 50, seed: int | None = None) -> None:
        super().__init__("twc", game_params, turn_slack, max_turns, seed)


class CookingWorldEnv(TextWorldExpressEnv):
    """``make("cookingworld", game_params={...}, turn_slack=None)``: CookingWorld."""

    name = "cookingworld"

    def __init__(self, game_params: dict[str, Any] | None = None, turn_slack: int | None = None,
                 max_turns: int = 50, seed: int | None = None) -> None:
        super().__init__("cookingworld", game_params, turn_slack, max_turns, seed)
