"""Built-in household world: expert, random agent, determinism, knobs, invalid actions."""
import random

import pytest

from megatron_sdar.envs import INVALID_ACTION_FEEDBACK, REQUIRED_INFO_KEYS, make
from megatron_sdar.envs.household import TASK_TYPES, HouseholdEnv


def play(env, actions):
    info = None
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not info["invalid_action"], (action, obs)
    return reward, terminated, info


def test_expert_solves_1000_generated_tasks():
    env = make("household")
    solved, lengths, types = 0, [], set()
    for seed in range(1000):
        _, info = env.reset(seed=seed)
        plan = env.expert_actions()
        reward, terminated, info = play(env, plan)
        solved += int(terminated and reward == 1.0 and info["won"])
        lengths.append(len(plan))
        types.add(info["task_type"])
    print(f"expert success {solved / 1000:.3f}, mean plan length {sum(lengths) / 1000:.2f}, max {max(lengths)}")
    assert solved == 1000
    assert types == set(TASK_TYPES)
    # Default difficulty is meant to be easy: short plans well inside the 20-turn budget.
    assert max(lengths) <= 12 and sum(lengths) / len(lengths) < 8


def test_random_agent_rarely_succeeds():
    env = make("household")
    rng = random.Random(0)
    wins = 0
    n = 400
    for seed in range(n):
        _, info = env.reset(seed=100_000 + seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"]))
            done = terminated or truncated
        wins += int(info["won"])
    rate = wins / n
    print(f"random agent success over {n} tasks: {rate:.3f}")
    assert rate < 0.06  # measured 1.5% over 1,000 tasks at the default difficulty


def test_generation_is_deterministic_per_seed():
    a, b = HouseholdEnv(), HouseholdEnv()
    seen = set()
    for seed in range(50):
        obs_a, info_a = a.reset(seed=seed)
        obs_b, info_b = b.reset(seed=seed)
        assert obs_a == obs_b and info_a == info_b
        assert a.expert_actions() == b.expert_actions()
        seen.add(obs_a)
    assert len(seen) >= 45  # different seeds give different tasks
    # Without a seed, the env's own seed makes the sequence of tasks reproducible.
    c, d = HouseholdEnv(seed=7), HouseholdEnv(seed=7)
    assert [c.reset()[0] for _ in range(5)] == [d.reset()[0] for _ in range(5)]


def test_info_keys_and_first_observation():
    env = make("household")
    obs, info = env.reset(seed=3)
    for key in REQUIRED_INFO_KEYS:
        assert key in info
    assert obs.endswith(f"Your task is to: {info['task']}.")
    assert "go to" in " ".join(info["admissible_actions"])
    assert info["turn"] == 0 and info["won"] is False


def test_invalid_and_unparseable_actions_change_nothing():
    env = make("household")
    _, info = env.reset(seed=5)
    before = env.state
    import copy
    snapshot = copy.deepcopy(before)
    for bad in ["fly to the moon", "", "take unicorn 1 from shelf 1", "put apple 1 in fridge 9"]:
        obs, reward, terminated, truncated, info = env.step(bad)
        assert obs == INVALID_ACTION_FEEDBACK and info["invalid_action"] and reward == 0.0 and not terminated
    assert env.state == snapshot
    # Case, spacing and a trailing period are tolerated.
    target = info["admissible_actions"][0]
    obs, *_, info = env.step("  " + target.upper() + ". ")
    assert not info["invalid_action"]


def test_put_spellings_are_equivalent():
    env = make("household", task_types=("pick_and_place",))
    for spelling in ("put {o} in/on {r}", "put {o} in {r}", "put {o} on {r}", "move {o} to {r}"):
        env.reset(seed=11)
        plan = env.expert_actions()
        last = plan[-1]
        obj, recep = last[len("put "):].split(" in/on ")
        play(env, plan[:-1])
        _, reward, terminated, _, info = env.step(spelling.format(o=obj, r=recep))
        assert terminated and reward == 1.0, spelling


def test_expert_replans_from_any_state():
    env = make("household")
    rng = random.Random(1)
    for seed in range(100):
        _, info = env.reset(seed=seed)
        for _ in range(rng.randint(1, 8)):  # wander first, then hand over to the expert
            _, _, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"]))
            if terminated or truncated:
                break
        if terminated or truncated:
            continue
        env.max_turns = 1000  # the expert must finish; the budget is not what is tested here
        reward, terminated, _ = play(env, env.expert_actions())
        assert terminated and reward == 1.0, seed


def test_difficulty_knobs_and_truncation():
    env = make("household", num_receptacles=9, num_distractors=(5, 5), max_turns=3)
    obs, info = env.reset(seed=2)
    assert len(env.state.receptacles) == 9
    goal_kind = env.state.task.object_kind
    assert sum(i.kind != goal_kind and i.kind != "desklamp" for i in env.state.items.values()) == 5
    for turn in range(3):
        _, _, terminated, truncated, info = env.step("look")
    assert truncated and not terminated and info["turn"] == 3
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_receptacles=2), "num_receptacles"),
    (dict(num_distractors=(3, 1)), "num_distractors"),
    (dict(task_types=("fly",)), "task_types"),
    (dict(colour=3), "unknown option"),
    (dict(rooms=("garage",)), "rooms"),
    (dict(rooms=("bathroom",), task_types=("heat",)), "cannot be set in rooms"),
    (dict(placement="sorted"), "placement"),
    (dict(placement="homes", homes={"heat": "microwave"}, task_types=("heat",)), "own appliance"),
    (dict(placement="homes", homes={"heat": "bed"}, task_types=("heat",), rooms=("kitchen",)), "in none of the rooms"),
    (dict(home_prob=1.5), "home_prob"),
    (dict(turn_slack=-1), "turn_slack"),
    (dict(targets=("microwave",), task_types=("heat",)), "no target"),
    (dict(targets=("shelf",), placement="homes", homes={"cool": "shelf"}, task_types=("cool",)), "no target"),
    (dict(max_turns=0), "max_turns"),
    (dict(homes_by="owner"), "homes_by must be one of"),
    (dict(homes_by="object"), "homes_by='object' needs homes"),
    (dict(homes_by="object", homes={"mug": "cabinet 1"}, rooms=("kitchen",), task_types=("pick_and_place",)),
     "needs a fixed room"),
    (dict(homes_by="object", homes={"mug": "cabinet 3"}, rooms=("kitchen",), task_types=("pick_and_place",),
          receptacles=("cabinet", "cabinet", "shelf")), "neither a receptacle of the room"),
    (dict(homes_by="object", homes={"book": "cabinet 1"}, rooms=("kitchen",), task_types=("pick_and_place",),
          receptacles=("cabinet", "shelf")), "not an object kind of the kitchen"),
    (dict(homes_by="object", homes={"mug": "shelf 1"}, rooms=("kitchen",), targets=("shelf",),
          task_types=("pick_and_place",), receptacles=("cabinet", "shelf")), "of a target kind"),
    (dict(homes_by="object", homes={"mug": "fridge 1"}, rooms=("kitchen",), task_types=("cool",),
          receptacles=("fridge", "cabinet", "shelf")), "its own appliance"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make("household", **kwargs)


# ------------------------------------------------------------------------------------------------
# world knowledge: homes, the skills that state them, the scripted agents
# ------------------------------------------------------------------------------------------------
def embedded_world() -> dict:
    """The household kwargs of the embedded default (config/env/household.yaml)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import megatron_sdar.config as config_pkg

    env = OmegaConf.load(Path(config_pkg.__file__).parent / "env" / "household.yaml")
    return {**OmegaConf.to_container(env.kwargs), "max_turns": env.max_turns}


def _scripted_win_rate(world: dict, knowledge: bool, n: int = 1000) -> tuple[float, float]:
    from megatron_sdar.envs.household import ScriptedSearcher, play_scripted

    env = HouseholdEnv(**world)
    wins, turns = 0, 0
    for k in range(n):
        env.reset(seed=500_000 + k)
        home = env.config.homes[env.state.task.task_type] if knowledge else None
        actions, won = play_scripted(env, ScriptedSearcher(random.Random(k), home), 500_000 + k)
        wins += won
        turns += len(actions)
    return wins / n, turns / n


def test_embedded_world_rewards_knowing_the_homes():
    """The embedded default: a searcher without the knowledge wins at most 40%, one that looks in
    the home first (what the built-in skill says) at least 85%, over 1,000 tasks each."""
    world = embedded_world()
    assert world["placement"] == "homes"
    blind, blind_turns = _scripted_win_rate(world, knowledge=False)
    informed, informed_turns = _scripted_win_rate(world, knowledge=True)
    print(f"\nscripted searcher: without the homes {blind:.3f} ({blind_turns:.1f} turns), "
          f"with them {informed:.3f} ({informed_turns:.1f} turns)")
    assert blind <= 0.40 and informed >= 0.85
    # the same world with uniform placement: knowing the (meaningless) homes does not help
    uniform = dict(world, placement="uniform")
    assert abs(_scripted_win_rate(uniform, True, 600)[0] - _scripted_win_rate(uniform, False, 600)[0]) < 0.08


def test_embedded_world_is_one_fixed_kitchen():
    """Every task of the embedded default is set in the same room, so which receptacles a room has
    never hints where the goal object is: only knowing the homes (a skill, or experience) does."""
    env = HouseholdEnv(**embedded_world())
    rooms = set()
    for seed in range(300):
        env.reset(seed=seed)
        rooms.add(tuple(sorted(env.state.receptacles)))
    assert len(rooms) == 1 and len(next(iter(rooms))) == len(embedded_world()["receptacles"])


def test_goal_objects_start_at_home_with_home_prob():
    from megatron_sdar.envs.household import DEFAULT_HOMES

    world = embedded_world()
    env = HouseholdEnv(**world)
    at_home = 0
    for seed in range(1000):
        env.reset(seed=seed)
        state = env.state
        goal = next(i for i in state.items.values() if i.kind == state.task.object_kind)
        at_home += state.receptacles[goal.location].kind == DEFAULT_HOMES[state.task.task_type]
        assert not any(r.kind == state.task.target_kind and r.kind == DEFAULT_HOMES[state.task.task_type]
                       for r in state.receptacles.values())
    assert abs(at_home / 1000 - world["home_prob"]) < 0.03
    # the budget is the optimal plan + turn_slack, and the expert fits in it
    env.reset(seed=3)
    assert env.max_turns == len(env.expert_actions()) + world["turn_slack"]


def test_targets_fix_where_tasks_put_their_object():
    env = HouseholdEnv(**embedded_world())
    assert embedded_world()["targets"] == ["shelf"]
    for seed in range(200):
        env.reset(seed=seed)
        assert env.state.task.target_kind == "shelf" and env.state.task.text.rstrip(".").endswith("shelf")
        assert any(r.kind == "shelf" for r in env.state.receptacles.values())


def test_builtin_skills_state_the_homes_briefly(tmp_path):
    from megatron_sdar.envs.household import DEFAULT_HOMES, HouseholdConfig, corpus_text, home_skill_text
    from megatron_sdar.models.tiny import build_tokenizer
    from megatron_sdar.skills import SkillBank, builtin_skill_dir
    from megatron_sdar.trainer.seeds import corpus_seeds

    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    assert bank.general is None  # every token of privileged context is a task-specific fact
    # the main job's tokenizer is trained on the world's text, skills included
    tokenizer = build_tokenizer(tmp_path, vocab_size=768,
                                extra_text=corpus_text(HouseholdConfig(**embedded_world()), corpus_seeds(20)))
    for task_type in TASK_TYPES:
        text = bank.skills[bank.task_to_skill[task_type]].text
        assert text == home_skill_text(task_type, DEFAULT_HOMES[task_type])
        assert DEFAULT_HOMES[task_type] in text
        if task_type in embedded_world()["task_types"]:  # the ones the tokenizer's corpus covers
            assert len(tokenizer(text)["input_ids"]) <= 40, text  # tens of tokens


# ------------------------------------------------------------------------------------------------
# the decisive choice: the first receptacle gone to
# ------------------------------------------------------------------------------------------------
def test_first_choice_is_the_first_receptacle_gone_to():
    """``info["first_choice_correct"]``: whether the first valid ``go to`` names the home the matching
    skill states (the task type's, DEFAULT_HOMES in the embedded default); False until one is made,
    fixed once made, whatever follows or wherever the object really is."""
    env = HouseholdEnv(**embedded_world())
    seen = {True: 0, False: 0}
    for seed in range(40):
        _, info = env.reset(seed=seed)
        assert info["first_choice_correct"] is False
        home = env.config.homes[env.state.task.task_type]
        names = [r.name for r in env.state.receptacles.values()]
        right = seed % 2 == 0
        first = next(n for n in names if (n.rsplit(" ", 1)[0] == home) == right)
        for action in ("go to the moon", "look", "inventory"):  # invalid, then valid but no choice
            assert env.step(action)[4]["first_choice_correct"] is False
        info = env.step(f"go to {first}")[4]
        assert info["first_choice_correct"] is right
        seen[right] += 1
        other = next(n for n in names if n != first)
        assert env.step(f"go to {other}")[4]["first_choice_correct"] is right
    assert seen == {True: 20, False: 20}
    # the expert goes first to where the object is: at home in about home_prob of the tasks
    right = 0
    for seed in range(300):
        env.reset(seed=seed)
        right += play(env, env.expert_actions())[2]["first_choice_correct"]
    assert abs(right / 300 - embedded_world()["home_prob"]) < 0.06, right


def test_first_choice_share_per_task_type_in_the_rollout_summary():
    from megatron_sdar.rollout.trajectory import Episode, TrajectoryBatch

    episodes = [Episode(group=g, task="t", task_type=kind, seed=g, first_choice_correct=right)
                for g, (kind, right) in enumerate([("cool", True), ("cool", False), ("cool", True),
                                                   ("pick_and_place", False)])]
    summary = TrajectoryBatch(episodes).summary()
    assert summary["rollout/first_choice_correct"] == 0.5
    assert summary["rollout/first_choice_correct/cool"] == pytest.approx(2 / 3)
    assert summary["rollout/first_choice_correct/pick_and_place"] == 0.0
    # environments without a decisive choice report none
    plain = [Episode(group=0, task="t", task_type="search", seed=0)]
    assert not [k for k in TrajectoryBatch(plain).summary() if "first_choice" in k]
