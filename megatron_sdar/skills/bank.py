"""The skill bank: skill files in the SDAR release's format and the retrievers over them.

A skill directory holds ``skill_mapping.json`` and one markdown file per skill::

    {
      "skill_files":   {"general_skills": "general_skills.md", "heat": "heat.md", ...},
      "task_to_skill": {"pick_heat_then_place_in_recep": "heat", ...},
      "task_keywords": {"pick_heat_then_place_in_recep": ["heat"], ...}     (optional)
    }

``skill_files`` maps a skill name to its file (relative to the directory);
``task_to_skill`` maps a task type (``info["task_type"]`` of an environment) to a skill;
``task_keywords`` maps a task type to phrases that identify it in the task text. Keyword
matching walks ``task_keywords`` in file order and takes the first task type with a phrase
contained in the lower-cased task text, so more specific entries ("put two") must come
before general ones ("put"). The skill named ``general_skills`` is always included in the
retrieved context when the bank has it.

The retrieved skills become the teacher's privileged context ``c`` (SPEC section 1).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

GENERAL_SKILL = "general_skills"
RETRIEVAL_MODES = ("keyword", "ucb", "full", "random")


class SkillBankError(ValueError):
    """A skill directory or mapping file is malformed; the message names the file and key."""


@dataclass(frozen=True)
class Skill:
    name: str
    text: str
    path: Path


@dataclass
class SkillBank:
    """Skills loaded from one directory. ``len(bank)`` counts every skill, general included."""

    root: Path
    skills: dict[str, Skill]
    task_to_skill: dict[str, str]
    task_keywords: dict[str, list[str]] = field(default_factory=dict)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "SkillBank":
        root = Path(path)
        mapping_path = root / "skill_mapping.json"
        if not root.is_dir():
            raise FileNotFoundError(f"skill directory {root} does not exist")
        if not mapping_path.is_file():
            raise FileNotFoundError(f"skill directory {root} has no skill_mapping.json")
        try:
            mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SkillBankError(f"{mapping_path}: not valid JSON ({exc})") from None
        if not isinstance(mapping, dict):
            raise SkillBankError(f"{mapping_path}: top level must be a JSON object, got {type(mapping).__name__}")
        unknown = set(mapping) - {"skill_files", "task_to_skill", "task_keywords"}
        if unknown:
            raise SkillBankError(f"{mapping_path}: unknown keys {sorted(unknown)}; expected skill_files, "
                                 "task_to_skill and optionally task_keywords")

        skill_files = _str_dict(mapping, "skill_files", mapping_path, required=True)
        if not skill_files:
            raise SkillBankError(f"{mapping_path}: 'skill_files' is empty")
        skills: dict[str, Skill] = {}
        for name, rel in skill_files.items():
            file = (root / rel).resolve()
            if not file.is_file():
                raise SkillBankError(f"{mapping_path}: skill '{name}' points to missing file {rel!r} "
                                     f"(looked for {file})")
            text = file.read_text(encoding="utf-8").strip()
            if not text:
                raise SkillBankError(f"{mapping_path}: skill '{name}' file {rel!r} is empty")
            skills[name] = Skill(name, text, file)

        task_to_skill = _str_dict(mapping, "task_to_skill", mapping_path, required=True)
        for task_type, skill in task_to_skill.items():
            if skill not in skills:
                raise SkillBankError(f"{mapping_path}: task_to_skill['{task_type}'] = '{skill}' is not in skill_files")

        raw_keywords = mapping.get("task_keywords", {})
        if not isinstance(raw_keywords, dict):
            raise SkillBankError(f"{mapping_path}: 'task_keywords' must be an object of task type -> list of phrases")
        task_keywords: dict[str, list[str]] = {}
        for task_type, phrases in raw_keywords.items():
            if task_type not in task_to_skill:
                raise SkillBankError(f"{mapping_path}: task_keywords has task type '{task_type}' "
                                     "that task_to_skill does not map")
            if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise SkillBankError(f"{mapping_path}: task_keywords['{task_type}'] must be a list of non-empty strings")
            task_keywords[task_type] = [p.strip().lower() for p in phrases]
        return cls(root=root, skills=skills, task_to_skill=task_to_skill, task_keywords=task_keywords)

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.skills)

    def __contains__(self, name: object) -> bool:
        return name in self.skills

    @property
    def general(self) -> Skill | None:
        return self.skills.get(GENERAL_SKILL)

    @property
    def task_skill_names(self) -> list[str]:
        """Skills that retrieval chooses among (everything except ``general_skills``)."""
        return [n for n in self.skills if n != GENERAL_SKILL]

    def skill_for_task_type(self, task_type: str | None) -> str | None:
        return self.task_to_skill.get(task_type) if task_type else None

    def match_task_type(self, task_text: str) -> str | None:
        """First task type (in ``task_keywords`` order) with a phrase inside ``task_text``."""
        text = " ".join(task_text.lower().split())
        for task_type, phrases in self.task_keywords.items():
            if any(p in text for p in phrases):
                return task_type
        return None

    def context(self, skill_names: Iterable[str]) -> str:
        """The privileged-context text: ``general_skills`` first, then the given skills, in
        order, separated by blank lines (each file carries its own heading)."""
        names = [GENERAL_SKILL] if GENERAL_SKILL in self.skills else []
        for name in skill_names:
            if name not in self.skills:
                raise KeyError(f"unknown skill '{name}'; the bank at {self.root} has {sorted(self.skills)}")
            if name not in names:
                names.append(name)
        return "\n\n".join(self.skills[n].text for n in names)


def _str_dict(mapping: dict, key: str, path: Path, required: bool) -> dict[str, str]:
    value = mapping.get(key)
    if value is None:
        if required:
            raise SkillBankError(f"{path}: missing required key '{key}'")
        return {}
    if not isinstance(value, dict):
        raise SkillBankError(f"{path}: '{key}' must be a JSON object, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str) or not v.strip():
            raise SkillBankError(f"{path}: '{key}'['{k}'] must be a non-empty string, got {v!r}")
    return dict(value)


# ============================================================================ retrieval
@dataclass
class Retrieval:
    """What a retriever chose for one task: the skills (without ``general_skills``) whose
    outcome the bandit credits, and the full context text (general skills included)."""

    skill_names: list[str]
    context: str
    context_key: str


@dataclass
class ArmStats:
    pulls: int = 0
    reward_sum: float = 0.0

    @property
    def mean(self) -> float:
        return self.reward_sum / self.pulls if self.pulls else 0.0


class SkillRetriever:
    """Chooses the skills for a task.

    Modes:

    - ``keyword``: the skill of the environment's ``task_type`` when ``task_to_skill`` maps
      it (exact, so it wins); otherwise the skill of the task type matched by
      :meth:`SkillBank.match_task_type` on the task text; if neither, general skills only.
      (Keywords alone can mislead: the reference ALFWorld set's ``"put"`` catches ALFWorld's
      "put a hot apple in fridge", whose type is a heat task.)
    - ``ucb``: a UCB1 bandit over the task skills. Each skill ``i`` keeps ``n_i`` (episodes
      that used it) and ``mean_i`` (mean episode reward of those episodes); with
      ``N = sum_i n_i`` the score is

          score_i = mean_i + c * sqrt(ln(N) / n_i),      score_i = +inf when n_i = 0,

      and the ``top_k`` highest scores are used (ties: skill order in the mapping file).
      With ``per_task_type=True`` (default) each task type has its own bandit, so a skill
      that helps "heat" tasks is not credited on "cool" tasks. Feed outcomes with
      :meth:`update` after every episode.
    - ``full``: every task skill.
    - ``random``: ``top_k`` task skills drawn uniformly without replacement.

    ``general_skills`` is always in the context. ``state_dict()``/``load_state_dict()``
    round-trip the bandit counts and the random generator through a checkpoint.
    """

    def __init__(self, bank: SkillBank, mode: str = "keyword", top_k: int = 1, ucb_c: float = 1.0,
                 per_task_type: bool = True, seed: int = 0) -> None:
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval mode must be one of {RETRIEVAL_MODES}, got {mode!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if ucb_c < 0:
            raise ValueError(f"ucb_c must be >= 0, got {ucb_c}")
        self.bank = bank
        self.mode = mode
        self.top_k = int(top_k)
        self.ucb_c = float(ucb_c)
        self.per_task_type = per_task_type
        self._rng = random.Random(seed)
        self.arms: dict[str, dict[str, ArmStats]] = {}

    # ------------------------------------------------------------------ choose
    def _context_key(self, task_type: str | None) -> str:
        return (task_type or "__none__") if (self.mode == "ucb" and self.per_task_type) else "__all__"

    def ucb_scores(self, context_key: str = "__all__") -> dict[str, float]:
        arms = self.arms.get(context_key, {})
        total = sum(a.pulls for a in arms.values())
        scores: dict[str, float] = {}
        for name in self.bank.task_skill_names:
            arm = arms.get(name, ArmStats())
            if arm.pulls == 0:
                scores[name] = math.inf
            else:
                scores[name] = arm.mean + self.ucb_c * math.sqrt(math.log(total) / arm.pulls)
        return scores

    def retrieve(self, task_text: str, task_type: str | None = None) -> Retrieval:
        candidates = self.bank.task_skill_names
        key = self._context_key(task_type)
        if self.mode == "keyword":
            matched = task_type if task_type in self.bank.task_to_skill else self.bank.match_task_type(task_text)
            skill = self.bank.skill_for_task_type(matched)
            chosen = [skill] if skill and skill != GENERAL_SKILL else []
        elif self.mode == "full":
            chosen = list(candidates)
        elif self.mode == "random":
            chosen = self._rng.sample(candidates, min(self.top_k, len(candidates)))
        else:
            scores = self.ucb_scores(key)
            order = {n: i for i, n in enumerate(candidates)}
            chosen = sorted(candidates, key=lambda n: (-scores[n], order[n]))[: self.top_k]
        return Retrieval(skill_names=chosen, context=self.bank.context(chosen), context_key=key)

    # ------------------------------------------------------------------ learn
    def update(self, retrieval: Retrieval | Sequence[str], reward: float, task_type: str | None = None) -> None:
        """Credit one finished episode's reward to every skill it was given."""
        if isinstance(retrieval, Retrieval):
            names, key = retrieval.skill_names, retrieval.context_key
        else:
            names, key = list(retrieval), self._context_key(task_type)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        arms = self.arms.setdefault(key, {})
        for name in names:
            if name not in self.bank.skills:
                raise KeyError(f"unknown skill '{name}'")
            arm = arms.setdefault(name, ArmStats())
            arm.pulls += 1
            arm.reward_sum += float(reward)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable) state for the training checkpoint."""
        return {
            "mode": self.mode,
            "ucb_c": self.ucb_c,
            "arms": {key: {n: [a.pulls, a.reward_sum] for n, a in arms.items()} for key, arms in self.arms.items()},
            "rng_state": _rng_state_to_list(self._rng.getstate()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "arms" not in state:
            raise ValueError("skill retriever state must be a dict with an 'arms' entry (from state_dict())")
        arms: dict[str, dict[str, ArmStats]] = {}
        for key, entries in state["arms"].items():
            arms[key] = {}
            for name, (pulls, reward_sum) in entries.items():
                if name not in self.bank.skills:
                    raise ValueError(f"checkpointed skill '{name}' is not in the bank at {self.bank.root}")
                arms[key][name] = ArmStats(int(pulls), float(reward_sum))
        self.arms = arms
        if "rng_state" in state:
            self._rng.setstate(_rng_state_from_list(state["rng_state"]))


def _rng_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
