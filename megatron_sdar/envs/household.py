"""A built-in household world in the style of ALFWorld (no download, pure Python).

Each task is generated from a seed: a room (kitchen, living room, bedroom, bathroom) with
a few numbered receptacles (``cabinet 1``, ``fridge 1``...), the goal objects and some
distractor objects, and one of ALFWorld's six task families:

==========================  =====================================================
task type                   success condition
==========================  =====================================================
``pick_and_place``          an object of kind K is in/on a receptacle of kind R
``pick_two``                two objects of kind K are in/on the same receptacle of kind R
``clean``                   a clean object of kind K is in/on a receptacle of kind R
``heat``                    a hot object of kind K is in/on a receptacle of kind R
``cool``                    a cool object of kind K is in/on a receptacle of kind R
``look_at_obj_in_light``    the agent holds an object of kind K next to a lamp that is on
==========================  =====================================================

Actions follow ALFWorld's vocabulary: ``go to R``, ``open R``, ``close R``,
``take O from R``, ``put O in/on R`` (``put O in R``, ``put O on R`` and ALFWorld 0.4's
``move O to R`` are accepted too), ``clean O with R`` (sinkbasin), ``heat O with R``
(microwave), ``cool O with R`` (fridge), ``use L`` (toggle a lamp), ``examine X``,
``inventory``, ``look``. An action that is not admissible in the current state leaves the
state unchanged, answers ``"Nothing happens."`` and sets ``info["invalid_action"]``.

Reward: 1.0 on the step that completes the task (``terminated=True``), else 0.0.
:meth:`HouseholdEnv.expert_actions` returns a plan that solves the task from the
current state (it simulates the plan on a copy of the state with the same rules).

**World knowledge** (``placement="homes"``): the goal object of each task type starts in its
*home* receptacle kind (``homes``, default :data:`DEFAULT_HOMES`: leftovers to heat wait in the
fridge, things to cool on the stoveburner, ...) with probability ``home_prob``, elsewhere uniformly.
The task text does not reveal it; a skill can state it (the built-in skill set does, in one line
per task type: :func:`home_skill_text`). With closed containers among the receptacles and a turn
budget close to the optimal plan, every wrong guess costs turns, so knowing the home decides the
episode: :class:`ScriptedSearcher` without the knowledge wins far less often than one that looks
in the home first (``tests/test_envs_household.py`` measures both). ``placement="uniform"`` is the
world without regularities.

**Many facts** (``homes_by="object"``): homes belong to goal object kinds instead of task types
(``homes={"mug": "cabinet 3", ...}``; a home may name one receptacle of a fixed room), every task's
goal object is one of those kinds, and ``info["task_type"]`` is the object kind, the key the skills
are organized by (as TWC's are by room). ``experiment=household_knowledge_tiny`` is such a world:
eight facts, 31 places, a budget of the optimal plan, so reward is scarce and knowledge decides.

**The decisive choice** (``info["first_choice_correct"]``, :class:`~megatron_sdar.envs.base.TextEnv`):
the first receptacle the agent goes to, right when it is the home the matching skill states.
"""
from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, field
from typing import Any

from megatron_sdar.envs.base import INVALID_ACTION_FEEDBACK, Demonstration, EnvOptionError, TextEnv, normalize_command

TASK_TYPES = ("pick_and_place", "pick_two", "clean", "heat", "cool", "look_at_obj_in_light")

# Receptacle kinds: (openable, preposition used in "put O in/on R").
RECEPTACLE_KINDS: dict[str, tuple[bool, str]] = {
    "cabinet": (True, "in"), "drawer": (True, "in"), "fridge": (True, "in"), "microwave": (True, "in"),
    "safe": (True, "in"), "countertop": (False, "on"), "diningtable": (False, "on"), "sinkbasin": (False, "in"),
    "stoveburner": (False, "on"), "shelf": (False, "on"), "garbagecan": (False, "in"), "sofa": (False, "on"),
    "armchair": (False, "on"), "coffeetable": (False, "on"), "sidetable": (False, "on"), "tvstand": (False, "on"),
    "bed": (False, "on"), "desk": (False, "on"), "dresser": (False, "on"), "toilet": (False, "on"),
    "bathtubbasin": (False, "in"),
}
# Kinds that may appear more than once in a room (cabinet 1, cabinet 2...).
REPEATABLE_RECEPTACLES = frozenset({"cabinet", "drawer", "shelf", "sidetable", "stoveburner", "countertop"})
APPLIANCE_FOR = {"heat": "microwave", "cool": "fridge", "clean": "sinkbasin"}
LAMP_HOLDERS = ("desk", "sidetable", "dresser")
LAMP_KIND = "desklamp"

ROOMS: dict[str, tuple[str, ...]] = {
    "kitchen": ("cabinet", "drawer", "countertop", "diningtable", "fridge", "microwave", "sinkbasin",
                "stoveburner", "shelf", "garbagecan"),
    "livingroom": ("sofa", "armchair", "coffeetable", "sidetable", "shelf", "drawer", "cabinet", "tvstand",
                   "garbagecan", "desk"),
    "bedroom": ("bed", "desk", "sidetable", "dresser", "drawer", "shelf", "garbagecan", "safe"),
    "bathroom": ("countertop", "cabinet", "drawer", "sinkbasin", "toilet", "bathtubbasin", "shelf", "garbagecan"),
}
ROOM_TEXT = {"kitchen": "kitchen", "livingroom": "living room", "bedroom": "bedroom", "bathroom": "bathroom"}


@dataclass(frozen=True)
class ItemKind:
    """Properties of a portable object kind."""

    rooms: tuple[str, ...]
    heatable: bool = False
    coolable: bool = False
    cleanable: bool = False
    lookable: bool = False  # can be the object of a look_at_obj_in_light task


_KITCHEN = ("kitchen",)
_LIVING = ("livingroom", "bedroom")
ITEM_KINDS: dict[str, ItemKind] = {
    "apple": ItemKind(_KITCHEN, True, True, True), "bread": ItemKind(_KITCHEN, True, True, False),
    "egg": ItemKind(_KITCHEN, True, True, True), "potato": ItemKind(_KITCHEN, True, True, True),
    "tomato": ItemKind(_KITCHEN, True, True, True), "lettuce": ItemKind(_KITCHEN, False, True, True),
    "mug": ItemKind(_KITCHEN, True, True, True), "cup": ItemKind(_KITCHEN, True, True, True),
    "plate": ItemKind(_KITCHEN, True, True, True), "bowl": ItemKind(_KITCHEN, True, True, True),
    "pan": ItemKind(_KITCHEN, False, True, True), "knife": ItemKind(_KITCHEN, False, False, True),
    "fork": ItemKind(_KITCHEN, False, False, True), "spoon": ItemKind(_KITCHEN, False, False, True),
    "spatula": ItemKind(_KITCHEN, False, False, True),
    "soapbar": ItemKind(("bathroom",), cleanable=True), "cloth": ItemKind(("bathroom",), cleanable=True),
    "sponge": ItemKind(("bathroom",), cleanable=True), "towel": ItemKind(("bathroom",)),
    "toiletpaper": ItemKind(("bathroom",)), "spraybottle": ItemKind(("bathroom",)), "candle": ItemKind(("bathroom",)),
    "book": ItemKind(_LIVING, lookable=True), "pen": ItemKind(_LIVING, lookable=True),
    "pencil": ItemKind(_LIVING, lookable=True), "cd": ItemKind(_LIVING, lookable=True),
    "cellphone": ItemKind(_LIVING, lookable=True), "keychain": ItemKind(_LIVING, lookable=True),
    "creditcard": ItemKind(_LIVING, lookable=True), "remotecontrol": ItemKind(_LIVING, lookable=True),
    "alarmclock": ItemKind(_LIVING, lookable=True), "vase": ItemKind(_LIVING, lookable=True),
    "statue": ItemKind(_LIVING, lookable=True), "pillow": ItemKind(_LIVING, lookable=True),
    "watch": ItemKind(_LIVING, lookable=True), "newspaper": ItemKind(_LIVING, lookable=True),
}

TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "pick_and_place": ("put a {obj} {prep} {recep}", "put some {obj} {prep} {recep}"),
    "pick_two": ("put two {obj} {prep} {recep}", "find two {obj} and put them {prep} {recep}"),
    "clean": ("put a clean {obj} {prep} {recep}", "clean some {obj} and put it {prep} {recep}"),
    "heat": ("put a hot {obj} {prep} {recep}", "heat some {obj} and put it {prep} {recep}"),
    "cool": ("put a cool {obj} {prep} {recep}", "cool some {obj} and put it {prep} {recep}"),
    "look_at_obj_in_light": ("look at {obj} under the {recep}", "examine the {obj} with the {recep}"),
}


# Where the goal object of each task type usually starts (placement="homes"). Kitchen kinds, so the
# embedded default (a kitchen) has every home; an appliance is never the home of its own task.
DEFAULT_HOMES: dict[str, str] = {
    "pick_and_place": "countertop", "pick_two": "shelf", "clean": "stoveburner", "heat": "fridge",
    "cool": "diningtable", "look_at_obj_in_light": "shelf",
}
PLACEMENTS = ("uniform", "homes")
HOMES_BY = ("task_type", "object")  # what a home belongs to


def receptacle_names(kinds: tuple[str, ...] | list[str]) -> list[str]:
    """The names a room of these receptacle kinds gives them, in the room overview's order
    (``cabinet 1``, ``cabinet 2``, ``countertop 1``...)."""
    counts: dict[str, int] = {}
    names = []
    for kind in sorted(kinds):
        counts[kind] = counts.get(kind, 0) + 1
        names.append(f"{kind} {counts[kind]}")
    return names


def home_kind(home: str) -> str:
    """The receptacle kind of a home given as a kind (``fridge``) or a name (``cabinet 3``)."""
    return home if home in RECEPTACLE_KINDS else home.rsplit(" ", 1)[0]


def is_home(receptacle_name: str, home: str) -> bool:
    """Whether the receptacle ``receptacle_name`` is ``home`` (a name, or any receptacle of a kind)."""
    return receptacle_name == home or home_kind(receptacle_name) == home


def _int_range(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) else tuple(value)
    if not 0 <= low <= high:
        raise ValueError(f"{name} must be an int or a (low, high) pair with 0 <= low <= high, got {value!r}")
    return int(low), int(high)


@dataclass
class HouseholdConfig:
    """Difficulty knobs. Defaults are easy: 4-5 receptacles, 1-2 distractors, short plans
    (2-9 expert steps), so a tiny model can learn the world on CPU.

    ``num_receptacles`` counts every receptacle in the room, including the appliance and
    the target the task needs; ``num_distractors`` counts objects that are not goal
    objects; either is an int or an inclusive (low, high) range. ``rooms``: the room kinds
    tasks are set in.

    World knowledge: with ``placement="homes"`` the goal object of a task type starts in a
    receptacle of kind ``homes[task_type]`` (default :data:`DEFAULT_HOMES`) with probability
    ``home_prob``, else in any other receptacle (never the target kind); the home is never the
    task's target. ``closed_share``: the chance that each receptacle added beyond the ones the task
    needs is a closed container (cabinet, drawer, safe: a wrong guess costs go + open).
    ``turn_slack``: each episode's budget is the oracle's plan length + ``turn_slack`` (capped by
    ``max_turns``), so wrong guesses cannot be absorbed by a generous budget. ``targets``: the
    receptacle kinds a task may put its object on or in (None: any kind but the appliances and
    the task type's home), ``receptacles``: a fixed room.

    ``homes_by="object"``: ``homes`` maps goal object kinds to their home (a receptacle kind, or one
    receptacle's name of the fixed room ``receptacles``, e.g. ``"cabinet 3"``); every task's goal
    object is one of those kinds (the usable ones for its task type), so each kind is one fact.
    """

    num_receptacles: int | tuple[int, int] = (4, 5)
    num_distractors: int | tuple[int, int] = (1, 2)
    max_turns: int = 20
    task_types: tuple[str, ...] = TASK_TYPES
    rooms: tuple[str, ...] = tuple(sorted(ROOMS))
    placement: str = "uniform"  # "homes": the goal object usually starts in its task type's home
    homes: dict[str, str] | None = None  # task type (or object kind) -> receptacle kind; None: DEFAULT_HOMES
    homes_by: str = "task_type"  # "object": homes maps goal object kinds to a receptacle kind or name
    home_prob: float = 0.9
    closed_share: float = 0.0  # chance that each extra receptacle is a closed container (cabinet, drawer, ...)
    turn_slack: int | None = None  # budget = the optimal plan's length + turn_slack (<= max_turns); None: max_turns
    receptacles: tuple[str, ...] | None = None  # a fixed room: these receptacle kinds in every episode
    targets: tuple[str, ...] | None = None  # receptacle kinds a task may name as its target; None: any

    def __post_init__(self) -> None:
        self.num_receptacles = _int_range(self.num_receptacles, "num_receptacles")
        self.num_distractors = _int_range(self.num_distractors, "num_distractors")
        if self.num_receptacles[0] < 3:
            raise ValueError(f"num_receptacles must be >= 3 (source, appliance, target), got {self.num_receptacles}")
        self.task_types = tuple(self.task_types)
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown or not self.task_types:
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {self.task_types}")
        if self.homes_by not in HOMES_BY:
            raise ValueError(f"homes_by must be one of {HOMES_BY}, got {self.homes_by!r}")
        if self.homes_by == "object" and not self.homes:
            raise ValueError("homes_by='object' needs homes: {object kind: receptacle kind or name}")
        self.homes = dict(DEFAULT_HOMES if self.homes is None else self.homes)
        self.rooms = tuple(self.rooms)
        if not self.rooms or any(r not in ROOMS for r in self.rooms):
            raise ValueError(f"rooms must be a non-empty subset of {sorted(ROOMS)}, got {self.rooms}")
        for task_type in self.task_types:
            if not _rooms_for(task_type, self.rooms):
                raise ValueError(f"task type {task_type!r} cannot be set in rooms {self.rooms}")
        if self.receptacles is not None:
            self.receptacles = tuple(self.receptacles)
            if len(self.rooms) != 1 or any(k not in ROOMS[self.rooms[0]] for k in self.receptacles):
                raise ValueError(f"receptacles {self.receptacles} must be kinds of one room (rooms={self.rooms})")
            for task_type in self.task_types:
                needed = {APPLIANCE_FOR.get(task_type), self.homes.get(task_type) if self.placement == "homes" else None}
                missing = sorted(k for k in needed - {None} if k not in self.receptacles)
                if missing:
                    raise ValueError(f"receptacles {self.receptacles} lack {missing}, needed by {task_type} tasks")
        if self.targets is not None:
            self.targets = tuple(self.targets)
            for task_type in self.task_types:
                if task_type == "look_at_obj_in_light":
                    continue
                home = self.homes.get(task_type) if self.placement == "homes" else None
                usable = [k for k in self.targets if k not in APPLIANCE_FOR.values() and k != home
                          and any(k in ROOMS[r] for r in _rooms_for(task_type, self.rooms))
                          and (self.receptacles is None or k in self.receptacles)]
                if not usable:
                    raise ValueError(f"targets {self.targets} leave {task_type} tasks no target (appliances, the "
                                     f"task's home and kinds outside the rooms cannot be targets)")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.turn_slack is not None and self.turn_slack < 0:
            raise ValueError(f"turn_slack must be >= 0 or None, got {self.turn_slack}")
        for name in ("home_prob", "closed_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.homes_by == "object":
            self._check_object_homes()
        elif self.placement == "homes":
            for task_type in self.task_types:
                home = self.homes.get(task_type)
                if home not in RECEPTACLE_KINDS:
                    raise ValueError(f"homes[{task_type!r}] must be a receptacle kind, got {home!r}")
                if home == APPLIANCE_FOR.get(task_type):
                    raise ValueError(f"homes[{task_type!r}] = {home!r} is the task's own appliance")
                if not any(home in ROOMS[r] for r in _rooms_for(task_type, self.rooms)):
                    raise ValueError(f"homes[{task_type!r}] = {home!r} is in none of the rooms {self.rooms}")

    def _check_object_homes(self) -> None:
        if self.receptacles is None:
            raise ValueError("homes_by='object' needs a fixed room (receptacles)")
        names = receptacle_names(self.receptacles)
        for kind, home in self.homes.items():
            if kind not in ITEM_KINDS or self.rooms[0] not in ITEM_KINDS[kind].rooms:
                raise ValueError(f"homes: {kind!r} is not an object kind of the {self.rooms[0]}")
            if home not in names and home not in self.receptacles:
                raise ValueError(f"homes[{kind!r}] = {home!r} is neither a receptacle of the room ({names}) nor "
                                 "one of its kinds")
            if self.targets is not None and home_kind(home) in self.targets:
                raise ValueError(f"homes[{kind!r}] = {home!r} is of a target kind {self.targets}")
        for task_type in self.task_types:
            if not object_kinds_for(self, task_type):
                raise ValueError(f"homes {sorted(self.homes)}: no object kind can be the goal of {task_type} tasks")
            if any(home_kind(self.homes[k]) == APPLIANCE_FOR.get(task_type) for k in object_kinds_for(self, task_type)):
                raise ValueError(f"homes: a {task_type} task's object cannot live in its own appliance")

    def home_of(self, task: "HouseholdTask") -> str:
        """The home the matching skill states for ``task`` (by its type or its goal object)."""
        return self.homes[task.object_kind if self.homes_by == "object" else task.task_type]

    def skill_key(self, task: "HouseholdTask") -> str:
        """What the skills are organized by: the task type, or the goal object's kind (``info["task_type"]``)."""
        return task.object_kind if self.homes_by == "object" else task.task_type


def _usable_object(kind: str, task_type: str, room: str) -> bool:
    spec = ITEM_KINDS[kind]
    if room not in spec.rooms:
        return False
    return {"heat": spec.heatable, "cool": spec.coolable, "clean": spec.cleanable,
            "look_at_obj_in_light": spec.lookable}.get(task_type, True)


def object_kinds_for(config: HouseholdConfig, task_type: str) -> list[str]:
    """The homed object kinds that can be the goal of a ``task_type`` task (``homes_by="object"``)."""
    return sorted(k for k in config.homes if _usable_object(k, task_type, config.rooms[0]))


@dataclass
class Receptacle:
    name: str
    kind: str
    openable: bool
    preposition: str
    is_open: bool = False
    contents: list[str] = field(default_factory=list)

    @property
    def accessible(self) -> bool:
        """Objects inside can be seen, taken and put: open, or nothing to open."""
        return self.is_open or not self.openable


@dataclass
class Item:
    name: str
    kind: str
    location: str | None  # receptacle name; None while the agent holds it
    is_clean: bool = False
    is_hot: bool = False
    is_cool: bool = False
    is_on: bool = False  # lamps only
    portable: bool = True


@dataclass
class HouseholdTask:
    task_type: str
    object_kind: str
    target_kind: str  # receptacle kind, or the lamp kind for look_at_obj_in_light
    text: str
    room: str


@dataclass
class WorldState:
    task: HouseholdTask
    receptacles: dict[str, Receptacle]
    items: dict[str, Item]
    agent_at: str | None = None  # None: in the middle of the room
    holding: str | None = None


def _article_list(names: list[str]) -> str:
    if not names:
        return "nothing"
    parts = [f"a {n}" for n in names]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]


# ----------------------------------------------------------------------------- generation
def _rooms_for(task_type: str, rooms: tuple[str, ...]) -> list[str]:
    """The rooms (of ``rooms``) where a task of ``task_type`` can be set."""
    appliance = APPLIANCE_FOR.get(task_type)
    if task_type == "look_at_obj_in_light":
        return [r for r in ("livingroom", "bedroom") if r in rooms]
    if appliance is not None:
        return [r for r, kinds in ROOMS.items() if appliance in kinds and r in rooms]
    return [r for r in sorted(ROOMS) if r in rooms]


def generate_world(rng: random.Random, config: HouseholdConfig) -> WorldState:
    """Build one task deterministically from ``rng``."""
    task_type = rng.choice(config.task_types)
    appliance = APPLIANCE_FOR.get(task_type)
    candidates = _rooms_for(task_type, config.rooms)
    by_object = config.homes_by == "object"
    home = config.homes.get(task_type) if config.placement == "homes" and not by_object else None
    if home is not None:
        candidates = [r for r in candidates if home in ROOMS[r]]
    room = rng.choice(candidates)
    pool = ROOMS[room]

    if by_object:
        object_kind = rng.choice(object_kinds_for(config, task_type))
        home = config.homes[object_kind] if config.placement == "homes" else None
    else:
        object_kind = rng.choice(sorted(k for k in ITEM_KINDS if _usable_object(k, task_type, room)))
    kinds: list[str] = []
    if config.receptacles is not None:  # a fixed room: only the target is drawn
        kinds = list(config.receptacles)
        target_kind = LAMP_KIND if task_type == "look_at_obj_in_light" else rng.choice(
            [k for k in dict.fromkeys(kinds) if k not in APPLIANCE_FOR.values() and k != (home and home_kind(home))
             and (config.targets is None or k in config.targets)])
    elif task_type == "look_at_obj_in_light":
        lamp_holder = rng.choice([k for k in LAMP_HOLDERS if k in pool])
        kinds.append(lamp_holder)
        target_kind = LAMP_KIND
    else:
        if appliance is not None:
            kinds.append(appliance)
        # Appliances are never targets: "cool X and put it in the fridge" is degenerate; nor is the
        # home of the goal object (the task would start nearly solved).
        target_kind = rng.choice([k for k in pool if k not in APPLIANCE_FOR.values() and k != home
                                  and (config.targets is None or k in config.targets)])
        kinds.append(target_kind)
        # At least one place the goal object can start from that is not the target kind.
        if home is not None and home not in kinds:
            kinds.append(home)
        else:
            kinds.append(rng.choice([k for k in pool if k != target_kind and k not in kinds]))
    if home is not None and task_type == "look_at_obj_in_light" and home not in kinds:
        kinds.append(home)
    n_receptacles = len(kinds) if config.receptacles is not None else rng.randint(*config.num_receptacles)
    closed = [k for k in pool if RECEPTACLE_KINDS[k][0] and k not in APPLIANCE_FOR.values() and k != home]
    while len(kinds) < n_receptacles:
        # Every room has repeatable kinds (cabinet, shelf...), so this always terminates.
        decoy = config.closed_share > 0 and closed and rng.random() < config.closed_share
        kind = rng.choice(closed if decoy else pool)
        if kind not in kinds or kind in REPEATABLE_RECEPTACLES:
            kinds.append(kind)

    receptacles: dict[str, Receptacle] = {}
    for name in receptacle_names(kinds):
        kind = home_kind(name)
        openable, prep = RECEPTACLE_KINDS[kind]
        receptacles[name] = Receptacle(name, kind, openable, prep)

    items: dict[str, Item] = {}
    item_counts: dict[str, int] = {}

    def add_item(kind: str, where: str, portable: bool = True) -> None:
        item_counts[kind] = item_counts.get(kind, 0) + 1
        name = f"{kind} {item_counts[kind]}"
        items[name] = Item(name, kind, where, portable=portable)
        receptacles[where].contents.append(name)

    names = list(receptacles)
    # Goal objects start away from any receptacle of the target kind so the task is not solved at reset.
    sources = [n for n in names if receptacles[n].kind != target_kind]
    homes_here = [n for n in sources if home is not None and is_home(n, home)]
    elsewhere = [n for n in sources if n not in homes_here]
    for _ in range(2 if task_type == "pick_two" else 1):
        at_home = homes_here and (not elsewhere or rng.random() < config.home_prob)
        add_item(object_kind, rng.choice(homes_here if at_home else elsewhere))
    if task_type == "look_at_obj_in_light":
        holders = [n for n in names if receptacles[n].kind in LAMP_HOLDERS]
        add_item(LAMP_KIND, rng.choice(holders), portable=False)
    distractor_kinds = sorted(k for k, s in ITEM_KINDS.items() if room in s.rooms and k != object_kind)
    for _ in range(rng.randint(*config.num_distractors)):
        add_item(rng.choice(distractor_kinds), rng.choice(names))

    if task_type == "look_at_obj_in_light":
        recep_text, prep = LAMP_KIND, ""
    else:
        recep_text, prep = target_kind, RECEPTACLE_KINDS[target_kind][1]
    text = rng.choice(TASK_TEMPLATES[task_type]).format(obj=object_kind, prep=prep, recep=recep_text)
    task = HouseholdTask(task_type, object_kind, target_kind, text, room)
    return WorldState(task=task, receptacles=receptacles, items=items)


# ----------------------------------------------------------------------------- rules
_PUT_PATTERNS = (
    re.compile(r"^put (?P<o>.+?) (?:in/on|in|on|into|onto) (?P<r>.+)$"),
    re.compile(r"^move (?P<o>.+?) to (?P<r>.+)$"),
)


def canonical_action(state: WorldState, action: str) -> str:
    """Map accepted spellings to the canonical admissible form (``put O in/on R``)."""
    text = normalize_command(action)
    for pattern in _PUT_PATTERNS:
        match = pattern.match(text)
        if match and match["r"] in state.receptacles:
            return f"put {match['o']} in/on {match['r']}"
    return text


def admissible_actions(state: WorldState) -> list[str]:
    """The "go to" actions first, one per receptacle in the room overview's order (the one where
    the agent stands included: going there again looks at it anew), then the others sorted. The
    stable order keeps each receptacle at the same place of a numbered list through an episode."""
    actions = {"inventory", "look"}
    held = state.items[state.holding] if state.holding else None
    if held is not None:
        actions.add(f"examine {held.name}")
    if state.agent_at is not None:
        recep = state.receptacles[state.agent_at]
        actions.add(f"examine {recep.name}")
        if recep.openable:
            actions.add(f"{'close' if recep.is_open else 'open'} {recep.name}")
        for name in recep.contents:
            item = state.items[name]
            if item.kind == LAMP_KIND:
                actions.add(f"use {name}")
            if recep.accessible:
                actions.add(f"examine {name}")
                if item.portable and held is None:
                    actions.add(f"take {name} from {recep.name}")
        if held is not None:
            if recep.accessible:
                actions.add(f"put {held.name} in/on {recep.name}")
            spec = ITEM_KINDS[held.kind]
            if recep.kind == "microwave" and spec.heatable:
                actions.add(f"heat {held.name} with {recep.name}")
            if recep.kind == "fridge" and spec.coolable:
                actions.add(f"cool {held.name} with {recep.name}")
            if recep.kind == "sinkbasin" and spec.cleanable:
                actions.add(f"clean {held.name} with {recep.name}")
    return [f"go to {r}" for r in state.receptacles] + sorted(actions)


def _describe_receptacle(recep: Receptacle) -> str:
    if recep.openable and not recep.is_open:
        return f"The {recep.name} is closed."
    if recep.openable:
        return f"The {recep.name} is open. In it, you see {_article_list(recep.contents)}."
    return f"On the {recep.name}, you see {_article_list(recep.contents)}."


def room_overview(state: WorldState) -> str:
    return (f"You are in the middle of a {ROOM_TEXT[state.task.room]}. Looking quickly around you, "
            f"you see {_article_list(list(state.receptacles))}.")


def apply_action(state: WorldState, action: str) -> tuple[str, bool]:
    """Apply an action in place. Returns (feedback, valid)."""
    command = canonical_action(state, action)
    if command not in admissible_actions(state):
        return INVALID_ACTION_FEEDBACK, False
    verb, _, rest = command.partition(" ")
    here = state.receptacles.get(state.agent_at) if state.agent_at else None
    if command == "look":
        if here is None:
            return room_overview(state), True
        return f"You are facing the {here.name}. Next to it, you see nothing.", True
    if command == "inventory":
        if state.holding is None:
            return "You are not carrying anything.", True
        return f"You are carrying: a {state.holding}.", True
    if command.startswith("go to "):
        state.agent_at = command[len("go to "):]
        return f"You arrive at {state.agent_at}. {_describe_receptacle(state.receptacles[state.agent_at])}", True
    if verb == "open":
        here.is_open = True
        return f"You open the {here.name}. {_describe_receptacle(here)}", True
    if verb == "close":
        here.is_open = False
        return f"You close the {here.name}.", True
    if verb == "take":
        name = rest[: rest.rindex(" from ")]
        here.contents.remove(name)
        state.items[name].location = None
        state.holding = name
        return f"You pick up the {name} from the {here.name}.", True
    if verb == "put":
        name = rest[: rest.rindex(" in/on ")]
        here.contents.append(name)
        state.items[name].location = here.name
        state.holding = None
        return f"You put the {name} {here.preposition} the {here.name}.", True
    if verb in ("heat", "cool", "clean"):
        item = state.items[state.holding]
        if verb == "heat":
            item.is_hot, item.is_cool = True, False
        elif verb == "cool":
            item.is_cool, item.is_hot = True, False
        else:
            item.is_clean = True
        return f"You {verb} the {item.name} using the {here.name}.", True
    if verb == "use":
        lamp = state.items[rest]
        lamp.is_on = not lamp.is_on
        return f"You turn {'on' if lamp.is_on else 'off'} the {lamp.name}.", True
    if verb == "examine":
        if rest in state.receptacles:
            return _describe_receptacle(state.receptacles[rest]), True
        item = state.items[rest]
        if item.kind == LAMP_KIND:
            return f"This {item.name} is {'on' if item.is_on else 'off'}.", True
        states = [s for s, flag in (("hot", item.is_hot), ("cool", item.is_cool), ("clean", item.is_clean)) if flag]
        if not states:
            return f"There's nothing special about {item.name}.", True
        return f"This is a {' and '.join(states)} {item.name}.", True
    raise AssertionError(f"admissible action without a rule: {command}")  # pragma: no cover


def _state_ok(task: HouseholdTask, item: Item) -> bool:
    return {"clean": item.is_clean, "heat": item.is_hot, "cool": item.is_cool}.get(task.task_type, True)


def _placed(state: WorldState, item: Item) -> bool:
    """The item is a finished goal object: right kind and state, in a target receptacle."""
    task = state.task
    return (item.kind == task.object_kind and item.location is not None and _state_ok(task, item)
            and state.receptacles[item.location].kind == task.target_kind)


def is_won(state: WorldState) -> bool:
    task = state.task
    if task.task_type == "look_at_obj_in_light":
        held = state.items.get(state.holding) if state.holding else None
        if held is None or held.kind != task.object_kind or state.agent_at is None:
            return False
        return any(state.items[n].kind == LAMP_KIND and state.items[n].is_on
                   for n in state.receptacles[state.agent_at].contents)
    if task.task_type == "pick_two":
        per_receptacle: dict[str, int] = {}
        for item in state.items.values():
            if _placed(state, item):
                per_receptacle[item.location] = per_receptacle.get(item.location, 0) + 1
        return any(n >= 2 for n in per_receptacle.values())
    return any(_placed(state, item) for item in state.items.values())


# ----------------------------------------------------------------------------- expert
def _go_or_open(state: WorldState, recep_name: str) -> str | None:
    """First step towards having ``recep_name`` accessible, or None when it already is."""
    if state.agent_at != recep_name:
        return f"go to {recep_name}"
    if not state.receptacles[recep_name].accessible:
        return f"open {recep_name}"
    return None


def expert_next_action(state: WorldState) -> str | None:
    """One optimal-enough step of the oracle policy (it knows where everything is)."""
    if is_won(state):
        return None
    task = state.task
    held = state.items[state.holding] if state.holding else None
    if task.task_type == "look_at_obj_in_light":
        lamp = next(i for i in state.items.values() if i.kind == LAMP_KIND)
        if held is not None and held.kind == task.object_kind:
            if state.agent_at != lamp.location:
                return f"go to {lamp.location}"
            return f"use {lamp.name}"
    else:
        targets = [r for r in state.receptacles.values() if r.kind == task.target_kind]
        # pick_two: keep filling the receptacle that already holds a finished object.
        target = max(targets, key=lambda r: sum(_placed(state, state.items[n]) for n in r.contents))
        if held is not None and held.kind == task.object_kind:
            if not _state_ok(task, held):
                appliance = next(r for r in state.receptacles.values() if r.kind == APPLIANCE_FOR[task.task_type])
                if state.agent_at != appliance.name:
                    return f"go to {appliance.name}"
                return f"{task.task_type} {held.name} with {appliance.name}"
            step = _go_or_open(state, target.name)
            return step or f"put {held.name} in/on {target.name}"
    if held is not None:  # holding something useless: put it down where we stand
        if state.agent_at is None:
            return f"go to {next(iter(state.receptacles))}"
        step = _go_or_open(state, state.agent_at)
        return step or f"put {held.name} in/on {state.agent_at}"
    candidates = [i for i in state.items.values()
                  if i.kind == task.object_kind and i.location is not None and not _placed(state, i)]
    if task.task_type == "pick_two":
        # A finished object in another target receptacle is still a candidate to gather.
        filled = max((r for r in state.receptacles.values() if r.kind == task.target_kind),
                     key=lambda r: sum(_placed(state, state.items[n]) for n in r.contents))
        candidates = [i for i in state.items.values()
                      if i.kind == task.object_kind and i.location is not None and i.location != filled.name]
    item = min(candidates, key=lambda i: (i.location != state.agent_at, i.name))
    step = _go_or_open(state, item.location)
    return step or f"take {item.name} from {item.location}"


def expert_plan(state: WorldState, max_steps: int = 100) -> list[str]:
    """Simulate the oracle on a copy of ``state``; the returned actions solve the task."""
    sim = copy.deepcopy(state)
    plan: list[str] = []
    while (action := expert_next_action(sim)) is not None:
        feedback, valid = apply_action(sim, action)
        if not valid or len(plan) >= max_steps:
            raise RuntimeError(f"household expert failed on task {sim.task.text!r} at {action!r}")
        plan.append(action)
    return plan


# ----------------------------------------------------------------------------- scripted agents
def home_skill_text(task_type: str, home: str) -> str:
    """The skill that states a task type's home, as the built-in skill set and the skill-conditioned
    SFT demonstrations phrase it (a heading and one line, about 25 tokens)."""
    what = {"pick_and_place": "the object to move", "pick_two": "the objects to move",
            "clean": "the object to clean", "heat": "the object to heat", "cool": "the object to cool",
            "look_at_obj_in_light": "the object to look at"}[task_type]
    article = "an" if home[0] in "aeiou" else "a"
    verb = "are" if task_type == "pick_two" else "is"
    prep = RECEPTACLE_KINDS[home][1]
    return (f"### TASK: {task_type} ###\nIn {task_type.replace('_', ' ')} tasks {what} {verb} usually {prep} {article} "
            f"{home}: go to {home} first.")


def object_home_skill_text(object_kind: str, home: str) -> str:
    """The skill that states a goal object kind's home (``homes_by="object"``): a heading and one line."""
    prep = RECEPTACLE_KINDS[home_kind(home)][1]
    return f"### TASK: {object_kind} ###\nThe {object_kind} is usually {prep} {home}: go to {home} first."


def skill_text(config: HouseholdConfig, key: str, home: str) -> str:
    """The skill stating that ``key``'s home (a task type's, or an object kind's) is ``home``."""
    return object_home_skill_text(key, home) if config.homes_by == "object" else home_skill_text(key, home)


class ScriptedSearcher:
    """A non-oracle agent: it knows only what it has seen (the receptacles of the room overview and
    the contents of those it has visited), searches the receptacles it has not seen yet, and takes
    a goal object as soon as it sees one; with the goal in hand it acts like the expert.

    ``believed_home``: a receptacle kind or name it searches first (a home it was told about; None: no
    knowledge). Otherwise the next receptacle is drawn uniformly from ``rng`` among the unseen ones
    that can hold the goal object (never the target kind: goal objects never start there). Its
    episodes show misses and recoveries, unlike :func:`expert_next_action`, which knows where
    everything is.
    """

    def __init__(self, rng: random.Random, believed_home: str | None = None) -> None:
        self.rng = rng
        self.believed_home = believed_home
        self.seen: set[str] = set()

    def _observe(self, state: WorldState) -> None:
        here = state.receptacles.get(state.agent_at) if state.agent_at else None
        if here is not None and here.accessible:
            self.seen.add(here.name)

    def _known(self, state: WorldState, wanted) -> Item | None:
        """A wanted item lying in a receptacle already seen (nearest first: where we stand)."""
        found = [i for i in state.items.values() if i.location in self.seen and wanted(i)]
        return min(found, key=lambda i: (i.location != state.agent_at, i.name), default=None)

    def act(self, state: WorldState) -> str | None:
        """The next action (None when the task is solved)."""
        self._observe(state)
        if is_won(state):
            return None
        task = state.task
        held = state.items[state.holding] if state.holding else None
        look = task.task_type == "look_at_obj_in_light"
        if held is not None and held.kind == task.object_kind:
            if not look:
                return expert_next_action(state)
            lamp = self._known(state, lambda i: i.kind == LAMP_KIND)
            if lamp is not None:
                return f"go to {lamp.location}" if state.agent_at != lamp.location else f"use {lamp.name}"
            return self._search(state, kinds=LAMP_HOLDERS)
        filled = None
        if task.task_type == "pick_two":  # the target receptacle that already holds a finished object
            filled = max((r for r in state.receptacles.values() if r.kind == task.target_kind),
                         key=lambda r: sum(_placed(state, state.items[n]) for n in r.contents))
        goal = self._known(state, lambda i: i.kind == task.object_kind and not _placed(state, i)
                           and (filled is None or i.location != filled.name))
        if goal is not None:
            return _go_or_open(state, goal.location) or f"take {goal.name} from {goal.location}"
        return self._search(state)

    def _search(self, state: WorldState, kinds: tuple[str, ...] | None = None) -> str:
        here = state.receptacles.get(state.agent_at) if state.agent_at else None
        if here is not None and not here.accessible:  # arrived at a closed one: look inside
            return f"open {here.name}"
        unseen = [r for r in state.receptacles.values() if r.name not in self.seen
                  and (kinds is None or r.kind in kinds)
                  and (kinds is not None or r.kind != state.task.target_kind)]
        if not unseen:
            return "look"
        home = [r for r in unseen if self.believed_home is not None and is_home(r.name, self.believed_home)]
        return f"go to {self.rng.choice(home or unseen).name}"


def play_scripted(env: "HouseholdEnv", agent: ScriptedSearcher, seed: int) -> tuple[list[str], bool]:
    """One episode of ``agent`` in ``env`` (task ``seed``), to the turn limit: (actions, won)."""
    env.reset(seed=seed)
    actions: list[str] = []
    while True:
        action = agent.act(env.state)
        if action is None:
            return actions, True
        actions.append(action)
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return actions, bool(info["won"])


def _possible_homes(config: HouseholdConfig, key: str) -> list[str]:
    """Receptacle kinds that can be the home of the goal object of task type ``key`` in ``config``'s
    rooms (``homes_by="object"``, ``key`` an object kind: receptacle names of the fixed room, never a
    target's or an appliance's)."""
    if config.homes_by == "object":
        avoid = set(config.targets or ()) | {APPLIANCE_FOR.get(t) for t in config.task_types}
        return [n for n in receptacle_names(config.receptacles) if home_kind(n) not in avoid]
    kinds = set(config.receptacles) if config.receptacles is not None else \
        {k for r in _rooms_for(key, config.rooms) for k in ROOMS[r]}
    usable = sorted(k for k in kinds if k != APPLIANCE_FOR.get(key))
    if config.targets is not None:  # the home may not take away the task's last possible target
        usable = [k for k in usable if set(config.targets) - {k} - set(APPLIANCE_FOR.values())]
    return usable


def demonstrations(config: HouseholdConfig, seeds: list[int], skill_share: float, seed: int = 0) -> list[Demonstration]:
    """Scripted episodes that teach searching and the use of a skill, but not the world's homes.

    Each task seed becomes one episode of a :class:`ScriptedSearcher`, drawn (with ``seed``) as
    either
    * a *skill-conditioned* one (probability ``skill_share``): a home is drawn uniformly for each
      task type (or homed object kind), the world places the goal object there (with
      ``config.home_prob``), the skill text (:func:`skill_text`) states it and the searcher looks
      there first; or
    * a *plain* one: a world with uniform placement and a searcher without knowledge.
    Neither kind carries the true homes of ``config`` beyond chance, so a model trained on them
    learns to read a skill, not the regularities a skill states.
    """
    import dataclasses

    rng = random.Random(seed)
    out = []
    for task_seed in seeds:
        with_skill = rng.random() < skill_share
        if with_skill:
            keys = config.homes if config.homes_by == "object" else config.task_types
            homes = {k: rng.choice(_possible_homes(config, k)) for k in keys}
            world = dataclasses.replace(config, placement="homes", homes=homes)
        else:
            world = dataclasses.replace(config, placement="uniform")
        env = HouseholdEnv(**{f.name: getattr(world, f.name) for f in dataclasses.fields(world)})
        observation, info = env.reset(seed=task_seed)
        state = env.state
        task_type = state.task.task_type
        start = next(i.location for i in state.items.values() if i.kind == state.task.object_kind)
        key = world.skill_key(state.task)
        believed = world.home_of(state.task) if with_skill else None
        agent = ScriptedSearcher(random.Random(rng.randrange(2**31)), believed)
        steps, admissible = [], info["admissible_actions"]
        won = False
        while (action := agent.act(env.state)) is not None:
            obs, _, terminated, truncated, step_info = env.step(action)
            steps.append((action, obs, step_info["admissible_actions"]))
            won = bool(step_info["won"])
            if terminated or truncated:
                break
        out.append(Demonstration(observation, admissible, steps,
                                 skill_text(config, key, believed) if with_skill else "", info["task_type"], won,
                                 state.receptacles[start].kind, info["task"]))
    return out


def corpus_text(config: HouseholdConfig, seeds: list[int]) -> str:
    """Text of this world (observations, admissible actions, actions, and every skill a home can
    give) from the tasks of ``seeds``, for training a small tokenizer, so that observations and
    skills tokenize compactly."""
    if config.homes_by == "object":
        lines = [object_home_skill_text(k, h) for k in config.homes for h in _possible_homes(config, k)]
    else:
        lines = [home_skill_text(t, h) for t in TASK_TYPES for h in _possible_homes(config, t)]
    for demo in demonstrations(config, seeds, skill_share=0.0):
        lines += [demo.observation, ", ".join(demo.admissible)]
        for action, observation, admissible in demo.steps:
            lines += [f"<action>{action}</action>", observation, ", ".join(admissible)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- env
class HouseholdEnv(TextEnv):
    """The built-in household world. ``make("household", num_receptacles=(6, 8), ...)``
    takes the :class:`HouseholdConfig` fields as keyword arguments."""

    name = "household"

    def __init__(self, seed: int | None = None, max_turns: int | None = None, **config: Any) -> None:
        if max_turns is not None:
            config["max_turns"] = max_turns
        try:
            self.config = HouseholdConfig(**config)
        except TypeError as exc:
            raise TypeError(f"household: unknown option ({exc}); valid options: "
                            f"{sorted(HouseholdConfig.__dataclass_fields__)}") from None
        super().__init__(max_turns=self.config.max_turns, seed=seed)
        self.state: WorldState | None = None

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """The :class:`HouseholdConfig` the options make, built (it checks every knob; no world is generated)."""
        unknown = [k for k in options if k not in HouseholdConfig.__dataclass_fields__]
        if unknown:
            raise EnvOptionError(unknown[0], f"is not an option of household; its options: "
                                             f"{', '.join(k for k in HouseholdConfig.__dataclass_fields__ if k != 'max_turns')}")
        try:
            HouseholdConfig(**options)
        except (TypeError, ValueError) as exc:
            raise EnvOptionError(None, f"household: {exc}") from None

    def _info(self, invalid: bool) -> dict[str, Any]:
        state = self.state
        return {"admissible_actions": admissible_actions(state), "won": is_won(state),
                "task_type": self.config.skill_key(state.task), "task": state.task.text, "invalid_action": invalid}

    def _reset(self, rng: random.Random, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.state = generate_world(rng, self.config)
        if self.config.turn_slack is not None:  # a budget close to the optimal plan (the agent is not told)
            self.max_turns = min(self.config.max_turns, len(expert_plan(self.state)) + self.config.turn_slack)
        observation = f"{room_overview(self.state)}\n\nYour task is to: {self.state.task.text}."
        return observation, self._info(False)

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        feedback, valid = apply_action(self.state, action)
        info = self._info(not valid)
        return feedback, (1.0 if info["won"] else 0.0), info["won"], info

    def _decisive_choice(self, command: str) -> bool | None:
        """The first receptacle gone to: the home the matching skill states, or not."""
        if not command.startswith("go to "):
            return None
        return is_home(command[len("go to "):], self.config.home_of(self.state.task))

    def demonstrations(self, seeds: list[int], skill_share: float, seed: int = 0) -> list[Demonstration]:
        """:func:`demonstrations` in this world."""
        return demonstrations(self.config, seeds, skill_share, seed=seed)

    def corpus_text(self, seeds: list[int]) -> str:
        """:func:`corpus_text` of this world."""
        return corpus_text(self.config, seeds)

    def expert_actions(self) -> list[str]:
        """Actions that solve the current task from the current state."""
        if self.state is None:
            raise RuntimeError("call reset() before expert_actions()")
        return expert_plan(self.state)
