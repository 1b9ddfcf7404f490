"""Skill bank and retrieval (keyword, UCB bandit, full, random) for the teacher's context."""
from pathlib import Path

from megatron_sdar.skills.bank import (
    GENERAL_SKILL,
    RETRIEVAL_MODES,
    ArmStats,
    Retrieval,
    Skill,
    SkillBank,
    SkillBankError,
    SkillRetriever,
)

#: Skill sets shipped inside the package (``builtin_skill_dir("household")``).
BUILTIN_SKILL_ROOT = Path(__file__).parent / "data"


def builtin_skill_dir(name: str) -> Path:
    path = BUILTIN_SKILL_ROOT / name
    if not (path / "skill_mapping.json").is_file():
        shipped = sorted(p.name for p in BUILTIN_SKILL_ROOT.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no built-in skill set '{name}'; shipped: {shipped}")
    return path


__all__ = [
    "ArmStats", "BUILTIN_SKILL_ROOT", "GENERAL_SKILL", "RETRIEVAL_MODES", "Retrieval", "Skill", "SkillBank",
    "SkillBankError", "SkillRetriever", "builtin_skill_dir",
]
