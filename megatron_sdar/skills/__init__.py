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


#: Small skill sets in the SDAR release's format for the environments whose real sets come from the
#: release (``env.skills_dir``): our own few lines per task type, used by ``--rehearse`` when the
#: recipe's skill directory is absent. They exercise retrieval and the teacher's context, not learning.
SAMPLE_SKILL_ROOT = Path(__file__).parent / "samples"


def sample_skill_dir(name: str) -> Path | None:
    """The shipped sample skill set of environment ``name``, or None."""
    path = SAMPLE_SKILL_ROOT / name
    return path if (path / "skill_mapping.json").is_file() else None


__all__ = [
    "ArmStats", "BUILTIN_SKILL_ROOT", "SAMPLE_SKILL_ROOT", "sample_skill_dir", "GENERAL_SKILL", "RETRIEVAL_MODES", "Retrieval", "Skill", "SkillBank",
    "SkillBankError", "SkillRetriever", "builtin_skill_dir",
]
