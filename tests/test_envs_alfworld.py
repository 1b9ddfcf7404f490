"""ALFWorld adapter: the shipped hand-written games played through real alfworld/textworld."""
import json
import shutil

import pytest

from megatron_sdar.envs import INVALID_ACTION_FEEDBACK, EnvError, make
from megatron_sdar.envs.alfworld_env import BUILTIN_DATA_DIR, collect_games

SCRIPT = ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1", "go to microwave 1",
          "heat apple 1 with microwave 1", "go to diningtable 1", "move apple 1 to diningtable 1"]


@pytest.fixture(scope="module")
def env():
    env = make("alfworld", data_dir="builtin")
    yield env
    env.close()


def test_scripted_actions_win_the_shipped_game(env):
    obs, info = env.reset(seed=0, split="test")  # the valid_seen game
    assert "Welcome to TextWorld, ALFRED" in obs  # text from alfworld's own grammar
    assert info["task"] == "put a hot apple in diningtable"
    assert info["task_type"] == "pick_heat_then_place_in_recep"
    assert "help" not in info["admissible_actions"] and "go to fridge 1" in info["admissible_actions"]
    for i, action in enumerate(SCRIPT):
        obs, reward, terminated, truncated, info = env.step(action)
        assert not info["invalid_action"], action
        assert terminated == (i == len(SCRIPT) - 1)
    assert obs == "You move the apple 1 to the diningtable 1."
    assert reward == 1.0 and info["won"]


def test_planner_expert_and_put_spelling(env):
    env.reset(seed=0, split="test")
    plan = env.expert_actions()  # fast-downward, as alfworld's planner expert
    assert plan == SCRIPT
    # Placing before heating does not satisfy the goal; the "put ... in/on" spelling maps to "move ... to".
    for action in SCRIPT[:3] + ["go to diningtable 1", "put apple 1 in/on diningtable 1"]:
        obs, reward, terminated, _, info = env.step(action)
        assert not info["invalid_action"], action
    assert not terminated and reward == 0.0
    obs, reward, terminated, _, info = env.step("take apple 1 from diningtable 1")
    replan = env.expert_actions()
    assert "heat apple 1 with microwave 1" in replan
    for action in replan:
        obs, reward, terminated, _, info = env.step(action)
    assert terminated and reward == 1.0


def test_invalid_action(env):
    env.reset(seed=0, split="test")
    obs, reward, terminated, truncated, info = env.step("take apple 1 from fridge 1")
    assert obs == INVALID_ACTION_FEEDBACK and info["invalid_action"] and not terminated
    obs, *_ , info = env.step("help")
    assert info["invalid_action"]


def test_split_layout_and_errors(tmp_path, monkeypatch):
    # A user's alfworld-download tree: $ALFWORLD_DATA/json_2.1.1/<split>/<task>/<trial>/, here valid_seen only.
    shutil.copytree(BUILTIN_DATA_DIR / "json_2.1.1" / "valid_seen", tmp_path / "json_2.1.1" / "valid_seen")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    games = collect_games(None, "eval_in_distribution")
    assert len(games) == 1 and games[0].task_type == "pick_heat_then_place_in_recep"
    assert collect_games(None, "valid_seen") == games
    with pytest.raises(EnvError, match="no solvable games"):
        collect_games(None, "valid_seen", task_types=("pick_two_obj_and_place",))
    env = make("alfworld")
    assert env.reset(seed=3, split="test")[1]["game_file"] == str(games[0].game_file)
    with pytest.raises(EnvError, match="json_2.1.1/train does not exist"):
        env.reset(seed=0, split="train")
    with pytest.raises(EnvError, match="json_2.1.1/valid_unseen does not exist"):
        env.reset(seed=0, split="validation")
    env.close()
    with pytest.raises(ValueError, match="alfworld directory must be one of"):
        collect_games("builtin", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        make("alfworld", data_dir="builtin").reset(seed=0, split="valid_seen")
    with pytest.raises(ValueError, match="unknown task types"):
        make("alfworld", data_dir="builtin", task_types=["pick_three"])
    # An unsolvable game is skipped, as alfworld does.
    game_file = next((tmp_path / "json_2.1.1" / "valid_seen").rglob("game.tw-pddl"))
    data = json.loads(game_file.read_text())
    data["solvable"] = False
    game_file.write_text(json.dumps(data))
    with pytest.raises(EnvError, match="no solvable games"):
        collect_games(None, "valid_seen")
    monkeypatch.delenv("ALFWORLD_DATA")
    with pytest.raises(EnvError, match="alfworld-download"):
        collect_games(None, "valid_seen")


def test_concurrent_episodes_in_one_process_all_reset_and_play():
    """EnvBatch plays a rollout's episodes in threads. textworld's PDDL environment is not
    thread-safe (two games loaded at once failed with "IndexError: pop from empty list" or a tatsu
    parse error, differently in each process, which deadlocked rollout TP=2): every episode of 4
    rounds x 4 concurrent environments resets and steps with the same text as a lone environment."""
    from megatron_sdar.envs.batch import EnvBatch

    lone = make("alfworld", seed=0, max_turns=3, data_dir="builtin")
    observation, info = lone.reset(5, split="train")
    first = info["admissible_actions"][0]
    after = lone.step(first)[0]
    for _ in range(4):
        envs = [make("alfworld", seed=i, max_turns=3, data_dir="builtin") for i in range(4)]
        batch = EnvBatch(envs, step_timeout_s=60)
        results = batch.reset([5] * 4, splits=["train"] * 4)
        assert [r.error for r in results] == [None] * 4
        assert [r.observation for r in results] == [observation] * 4
        steps = batch.step([first] * 4)
        assert [r.error for r in steps] == [None] * 4
        assert [r.observation for r in steps] == [after] * 4
        for env in envs:
            env.close()
