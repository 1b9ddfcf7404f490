"""Skill bank: the release's format (reference sets), retrieval modes, UCB, checkpoints, bad input."""
import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from megatron_sdar.envs import make
from megatron_sdar.skills import GENERAL_SKILL, SkillBank, SkillBankError, SkillRetriever, builtin_skill_dir

# The public release's skill sets, for the compatibility check: .ci/run points this variable at
# them (shared/reference/sdar-skills beside the clone). The format itself is tested on fixtures
# written below in the release's schema, so a plain clone runs every other test.
REFERENCE_ENV = "MEGATRON_SDAR_REFERENCE_SKILLS"


@pytest.fixture(scope="module")
def release_format_sets(tmp_path_factory):
    from tests.skill_sets import write_release_format_sets

    return write_release_format_sets(tmp_path_factory.mktemp("release_format"))


@pytest.mark.parametrize("name, n_skills, n_task_types", [("alfworld", 6, 6), ("search", 4, 3)])
def test_release_format_loads(release_format_sets, name, n_skills, n_task_types):
    _check_release_set(release_format_sets[name], n_skills, n_task_types)


def _check_release_set(directory: Path, n_skills: int, n_task_types: int) -> None:
    bank = SkillBank.from_dir(directory)
    assert len(bank) == n_skills and len(bank.task_to_skill) == n_task_types
    assert bank.general is not None and bank.general.text.startswith("### GENERAL SKILLS ###")
    context = SkillRetriever(bank, mode="full").retrieve("anything").context
    assert context.startswith("### GENERAL SKILLS ###")
    assert all(bank.skills[n].text in context for n in bank.skills)


def test_release_format_keyword_matching(release_format_sets):
    alf = SkillRetriever(SkillBank.from_dir(release_format_sets["alfworld"]), mode="keyword")
    assert alf.retrieve("put two cellphone in sofa").skill_names == ["pick_and_place"]  # via pick_two_obj_and_place
    assert alf.retrieve("heat some egg and put it in garbagecan").skill_names == ["heat"]
    assert alf.retrieve("look at bowl under the desklamp").skill_names == ["look_at_obj_in_light"]
    # Keywords alone send ALFWorld's "put a hot ..." template to pick_and_place ("hot" is not a
    # keyword, "put" is); a task type the mapping knows takes precedence.
    assert alf.retrieve("put a hot apple in fridge").skill_names == ["pick_and_place"]
    assert alf.retrieve("put a hot apple in fridge", task_type="pick_heat_then_place_in_recep").skill_names == ["heat"]
    assert alf.retrieve("put a hot apple in fridge", task_type="unmapped").skill_names == ["pick_and_place"]
    search = SkillRetriever(SkillBank.from_dir(release_format_sets["search"]), mode="keyword")
    assert search.retrieve("who was born earlier", task_type="compare").skill_names == ["compare"]
    assert search.retrieve("who was born earlier").skill_names == []  # no keywords, no task type: general only
    assert search.retrieve("q").context == search.bank.general.text


@pytest.fixture(scope="module")
def reference_dir():
    value = os.environ.get(REFERENCE_ENV)
    if not value:
        pytest.skip(f"{REFERENCE_ENV} is not set (.ci/run sets it to the release's skill sets)")
    path = Path(value)
    if not (path / "alfworld" / "skill_mapping.json").is_file():
        pytest.fail(f"{REFERENCE_ENV}={value} does not hold the release's skill sets (alfworld/skill_mapping.json)")
    return path


@pytest.mark.parametrize("name, n_skills, n_task_types", [("alfworld", 6, 6), ("webshop", 8, 7), ("search", 5, 4)])
def test_reference_skill_sets_load(reference_dir, name, n_skills, n_task_types):
    _check_release_set(reference_dir / name, n_skills, n_task_types)


def test_reference_keyword_matching(reference_dir):
    alf = SkillRetriever(SkillBank.from_dir(reference_dir / "alfworld"), mode="keyword")
    assert alf.retrieve("put two cellphone in sofa").skill_names == ["pick_and_place"]
    assert alf.retrieve("heat some egg and put it in garbagecan").skill_names == ["heat"]
    assert alf.retrieve("look at bowl under the desklamp").skill_names == ["look_at_obj_in_light"]
    assert alf.retrieve("put a hot apple in fridge", task_type="pick_heat_then_place_in_recep").skill_names == ["heat"]
    shop = SkillRetriever(SkillBank.from_dir(reference_dir / "webshop"), mode="keyword")
    assert shop.retrieve("i need a usb c charger under 20 dollars").skill_names == ["electronics"]
    search = SkillRetriever(SkillBank.from_dir(reference_dir / "search"), mode="keyword")
    assert search.retrieve("who was born earlier", task_type="compare").skill_names == ["compare"]
    assert search.retrieve("who was born earlier").skill_names == []


def test_builtin_household_skills_match_generated_tasks():
    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    assert len(bank) == 6 and set(bank.task_to_skill) == set(bank.task_skill_names) and bank.general is None
    retriever = SkillRetriever(bank, mode="keyword")
    env = make("household")
    for seed in range(300):  # keywords alone (no task type) recover the task type of every generated task
        _, info = env.reset(seed=seed)
        assert retriever.retrieve(info["task"]).skill_names == [info["task_type"]], info["task"]
    with pytest.raises(FileNotFoundError, match="shipped"):
        builtin_skill_dir("nethack")


def test_ucb_converges_to_the_best_skill_on_a_synthetic_bandit():
    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    true_success = {name: 0.2 + 0.1 * i for i, name in enumerate(bank.task_skill_names)}  # best: the last one
    best = max(true_success, key=true_success.get)
    retriever = SkillRetriever(bank, mode="ucb", ucb_c=0.5, per_task_type=False)
    rng = random.Random(0)
    picks = []
    for step in range(3000):
        chosen = retriever.retrieve("task")
        assert len(chosen.skill_names) == 1 and chosen.context == bank.skills[chosen.skill_names[0]].text
        arm = chosen.skill_names[0]
        retriever.update(chosen, float(rng.random() < true_success[arm]))
        picks.append(arm)
    assert set(picks[: len(true_success)]) == set(true_success)  # every arm is tried once first (score +inf)
    share_best = picks[-1000:].count(best) / 1000
    print(f"UCB: best arm chosen in {share_best:.2%} of the last 1000 pulls")
    assert share_best > 0.6
    arms = retriever.arms["__all__"]
    assert arms[best].pulls == max(a.pulls for a in arms.values())
    assert abs(arms[best].mean - true_success[best]) < 0.05
    # The score formula, by hand for one arm.
    total = sum(a.pulls for a in arms.values())
    expect = arms[best].mean + 0.5 * math.sqrt(math.log(total) / arms[best].pulls)
    assert retriever.ucb_scores("__all__")[best] == pytest.approx(expect)


def test_ucb_state_round_trips_through_a_checkpoint_dict():
    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    a = SkillRetriever(bank, mode="ucb", top_k=2)
    for i in range(40):
        r = a.retrieve("t", task_type=["heat", "cool"][i % 2])
        a.update(r, reward=float(i % 3 == 0))
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints may store it as JSON
    b = SkillRetriever(bank, mode="ucb", top_k=2)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for tt in ("heat", "cool", "clean"):
        assert b.retrieve("t", task_type=tt).skill_names == a.retrieve("t", task_type=tt).skill_names
    r1, r2 = SkillRetriever(bank, mode="random", top_k=3, seed=5), SkillRetriever(bank, mode="random", top_k=3)
    r1.retrieve("t")
    r2.load_state_dict(r1.state_dict())
    assert [r1.retrieve("t").skill_names for _ in range(5)] == [r2.retrieve("t").skill_names for _ in range(5)]
    with pytest.raises(ValueError, match="not in the bank"):
        b.load_state_dict({"arms": {"__all__": {"juggling": [1, 1.0]}}})


def test_full_and_random_modes():
    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    full = SkillRetriever(bank, mode="full").retrieve("x")
    assert full.skill_names == bank.task_skill_names and GENERAL_SKILL not in full.skill_names
    picks = {tuple(SkillRetriever(bank, mode="random", top_k=2, seed=s).retrieve("x").skill_names) for s in range(20)}
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks) and len(picks) > 5
    with pytest.raises(ValueError, match="retrieval mode"):
        SkillRetriever(bank, mode="oracle")


def _copy_builtin(tmp_path):
    root = tmp_path / "skills"
    shutil.copytree(builtin_skill_dir("household"), root)
    return root, json.loads((root / "skill_mapping.json").read_text())


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.pop("skill_files"), "missing required key 'skill_files'"),
    (lambda m: m["skill_files"].update(heat="no_such.md"), "skill 'heat' points to missing file 'no_such.md'"),
    (lambda m: m["task_to_skill"].update(fly="flying"), "task_to_skill\\['fly'\\] = 'flying' is not in skill_files"),
    (lambda m: m["task_keywords"].update(heat="hot"), "task_keywords\\['heat'\\] must be a list"),
    (lambda m: m["task_keywords"].update(swim=["pool"]), "task type 'swim'"),
    (lambda m: m.update(extra=1), "unknown keys \\['extra'\\]"),
    (lambda m: m["skill_files"].update(heat=3), "'skill_files'\\['heat'\\] must be a non-empty string"),
])
def test_malformed_mapping_is_a_clear_error(tmp_path, mutate, match):
    root, mapping = _copy_builtin(tmp_path)
    mutate(mapping)
    (root / "skill_mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(SkillBankError, match=match):
        SkillBank.from_dir(root)


def test_unreadable_or_missing_files(tmp_path):
    root, _ = _copy_builtin(tmp_path)
    (root / "skill_mapping.json").write_text('{"skill_files": ')
    with pytest.raises(SkillBankError, match="skill_mapping.json: not valid JSON"):
        SkillBank.from_dir(root)
    (root / "skill_mapping.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no skill_mapping.json"):
        SkillBank.from_dir(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SkillBank.from_dir(tmp_path / "nowhere")
    root2, mapping = _copy_builtin(tmp_path / "b")
    (root2 / "cool.md").write_text("   \n")
    with pytest.raises(SkillBankError, match="'cool' file 'cool.md' is empty"):
        SkillBank.from_dir(root2)
