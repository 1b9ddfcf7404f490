"""``experiment=household_knowledge_tiny``: the household world where knowledge decides and reward is
scarce (config/env/household_knowledge.yaml): eight goal object kinds, each with a home of its own
among thirty places, a budget of exactly the optimal plan. Its recipe composes with its own skills;
its tasks are a function of the seed and the splits' seeds never meet; the expert wins every task
within the budget, a searcher without the homes rarely does and one told the home by the skill
nearly always; the SFT demonstrations teach reading a skill, never the true homes."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from megatron_sdar.envs.household import HouseholdEnv, ScriptedSearcher, object_home_skill_text, play_scripted
from megatron_sdar.trainer import seeds as task_seeds


@pytest.fixture(scope="module")
def run():
    from megatron_sdar.config.schema import compose_run

    return compose_run(["experiment=household_knowledge_tiny"])


@pytest.fixture(scope="module")
def world(run) -> dict:
    return {**run.env.kwargs, "max_turns": run.env.max_turns}


def test_recipe_composes_with_the_skills_of_its_homes(run, world):
    from megatron_sdar.config.schema import ConfigError, recipe_names, skills_dir_of
    from megatron_sdar.skills import BUILTIN_SKILL_ROOT, SkillBank, SkillRetriever
    from megatron_sdar.trainer.rehearsal import plan_rehearsal

    assert "household_knowledge_tiny" not in recipe_names()  # a CPU benchmark, not a cluster recipe
    with pytest.raises(ConfigError, match="is a CPU benchmark of the tiny model"):
        plan_rehearsal(["experiment=household_knowledge_tiny"])

    assert run.env.name == "household" and run.model.name == "tiny" and run.model.hf_path is None
    assert run.trainer.output_dir == "outputs/household_knowledge_tiny" and run.trainer.max_steps == 12
    homes = world["homes"]
    assert world["homes_by"] == "object" and len(homes) >= 6 and len(set(homes.values())) == len(homes)
    skills = skills_dir_of(run.env)
    assert skills == BUILTIN_SKILL_ROOT / "household_knowledge"
    bank = SkillBank.from_dir(skills)
    env = HouseholdEnv(**world)
    retriever = SkillRetriever(bank, mode="keyword")
    for kind, home in homes.items():
        text = bank.skills[bank.task_to_skill[kind]].text
        assert text == object_home_skill_text(kind, home) and f"go to {home} first" in text
    for seed in range(40):  # one short line per task, the one of its goal object
        _, info = env.reset(seed=seed)
        got = retriever.retrieve(info["task"], info["task_type"])
        assert got.skill_names == [info["task_type"]] and got.context.count("\n") == 1
        assert info["task_type"] == env.state.task.object_kind


def test_tasks_are_a_function_of_the_seed_and_the_splits_never_meet(world):
    env = HouseholdEnv(**world)

    def task(seed):
        env.reset(seed=seed)
        s = env.state
        return s.task.text, next(i.location for i in s.items.values() if i.kind == s.task.object_kind)

    assert [task(s) for s in range(30)] == [task(s) for s in range(30)]
    pools = {"test": task_seeds.eval_seeds(200, "test"), "validation": task_seeds.eval_seeds(200, "validation"),
             "train": [s for step in range(12) for s in task_seeds.train_seeds(0, step, 4)]
             + task_seeds.sft_seeds(0, 400)}
    names = list(pools)
    for i, a in enumerate(names):
        assert {task_seeds.split_of(s) for s in pools[a]} == {a}
        for b in names[i + 1:]:
            assert not set(pools[a]) & set(pools[b])
    # every split asks every fact: held out are the episodes (placements, samples), not the kinds
    for split in ("test", "validation"):
        kinds = {HouseholdEnv(**world).reset(seed=s)[1]["task_type"] for s in pools[split]}
        assert kinds == set(world["homes"])


def test_the_expert_wins_every_task_within_its_budget_and_knowledge_decides(world):
    env = HouseholdEnv(**world)
    assert len(env.reset(seed=0)[0].split(", ")) >= 25  # thirty places in the room overview
    for seed in range(500):
        env.reset(seed=seed)
        plan = env.expert_actions()
        assert env.max_turns == len(plan)  # turn_slack 0: the budget is the optimal plan
        for action in plan:
            obs, reward, terminated, truncated, info = env.step(action)
            assert not info["invalid_action"], (seed, action, obs)
        assert terminated and reward == 1.0 and info["won"]

    def scripted(knowledge: bool, n: int = 1000) -> tuple[float, float]:
        wins = right = 0
        for k in range(n):
            env.reset(seed=700_000 + k)
            home = env.config.home_of(env.state.task) if knowledge else None
            wins += play_scripted(env, ScriptedSearcher(random.Random(k), home), 700_000 + k)[1]
            right += env._last_info["first_choice_correct"]
        return wins / n, right / n

    blind, blind_right = scripted(False)
    told, told_right = scripted(True)
    print(f"\nscripted searcher: without the homes {blind:.3f} (first choice right {blind_right:.3f}), "
          f"told by the skill {told:.3f} ({told_right:.3f})")
    assert blind <= 0.06 and blind_right <= 0.06  # one place in thirty
    assert told >= 0.85 and told_right == 1.0  # home_prob 0.9: the object is elsewhere in one task in ten


def test_demonstrations_teach_reading_a_skill_not_the_homes(world):
    env = HouseholdEnv(**world)
    demos = env.demonstrations(task_seeds.sft_seeds(0, 400), skill_share=0.5, seed=0)
    with_skill = [d for d in demos if d.context]
    assert 150 <= len(with_skill) <= 250
    true_lines = {object_home_skill_text(k, h) for k, h in world["homes"].items()}
    stating_truth = sum(d.context in true_lines for d in with_skill)
    assert stating_truth <= 0.1 * len(with_skill), stating_truth  # homes drawn at random: about one in 30
    # the searcher the skill told goes there first; without a skill the first place is a blind draw
    firsts = [d.steps[0][0] for d in with_skill]
    assert all(f"{first} first." in d.context for first, d in zip(firsts, with_skill))
    blind_first = [d.steps[0][0][len("go to "):] for d in demos if not d.context]
    assert len(set(blind_first)) >= 20
