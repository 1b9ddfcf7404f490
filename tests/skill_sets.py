"""Skill sets in the SDAR release's schema, written by the tests themselves (our own text): so the
format tests and the recipes' validation run on any clone."""
from __future__ import annotations

import json
from pathlib import Path

_SETS = {
    # ALFWorld's task types, several mapped to one skill, with keywords
    "alfworld": {
        "skills": ["general_skills", "pick_and_place", "look_at_obj_in_light", "clean", "heat", "cool"],
        "task_to_skill": {"pick_and_place": "pick_and_place", "pick_two_obj_and_place": "pick_and_place",
                          "look_at_obj_in_light": "look_at_obj_in_light", "pick_heat_then_place_in_recep": "heat",
                          "pick_cool_then_place_in_recep": "cool", "pick_clean_then_place_in_recep": "clean"},
        "task_keywords": {"look_at_obj_in_light": ["look at", "light"], "pick_heat_then_place_in_recep": ["heat"],
                          "pick_cool_then_place_in_recep": ["cool"], "pick_clean_then_place_in_recep": ["clean"],
                          "pick_two_obj_and_place": ["put two"], "pick_and_place": ["put"]},
    },
    "webshop": {
        "skills": ["general_skills", "electronics", "apparel", "other"],
        "task_to_skill": {"electronics": "electronics", "apparel": "apparel", "other": "other"},
        "task_keywords": {"electronics": ["charger", "usb"], "apparel": ["shirt", "dress"]},
    },
    # no keywords: retrieval by task type only
    "search": {
        "skills": ["general_skills", "direct_retrieval", "multi_hop_reasoning", "compare"],
        "task_to_skill": {"direct_retrieval": "direct_retrieval", "multi_hop_reasoning": "multi_hop_reasoning",
                          "compare": "compare"},
    },
}


def write_release_format_sets(root: str | Path) -> dict[str, Path]:
    """``root/{alfworld,webshop,search}`` skill directories; returns them by name."""
    out = {}
    for name, spec in _SETS.items():
        directory = Path(root) / name
        directory.mkdir(parents=True, exist_ok=True)
        mapping = {"skill_files": {n: f"{n}.md" for n in spec["skills"]}, "task_to_skill": spec["task_to_skill"]}
        if "task_keywords" in spec:
            mapping["task_keywords"] = spec["task_keywords"]
        (directory / "skill_mapping.json").write_text(json.dumps(mapping, indent=2))
        for skill in spec["skills"]:
            heading = "GENERAL SKILLS" if skill == "general_skills" else f"TASK: {skill}"
            (directory / f"{skill}.md").write_text(f"### {heading} ###\n\n1. A strategy for {skill} tasks.\n")
        out[name] = directory
    return out
