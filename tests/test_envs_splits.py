"""Task splits: each environment's train / validation / test tasks on the shipped data are disjoint and
non-empty, a draw from a split only ever gives that split's tasks, and the trainer evaluates on the
test split (validation for the sweep) while SFT and RL draw train tasks."""
from __future__ import annotations

import functools
import json

import pytest

from megatron_sdar.envs import SPLITS, EnvBatch, EnvError, make

SEEDS = range(300)


def _pairwise_disjoint(pools: dict[str, set]) -> None:
    assert set(pools) == set(SPLITS)
    for split, tasks in pools.items():
        assert tasks, f"{split} is empty"
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not pools[a] & pools[b], (a, b, pools[a] & pools[b])


# ------------------------------------------------------------------------------------- ALFWorld
@pytest.fixture(scope="module")
def alfworld():
    env = make("alfworld", data_dir="builtin")
    yield env
    env.close()


def test_alfworld_splits_are_its_own_directories(alfworld):
    from megatron_sdar.envs.alfworld_env import BUILTIN_DATA_DIR

    pools = {split: {str(g.game_file.relative_to(BUILTIN_DATA_DIR)) for g in alfworld.games(split)} for split in SPLITS}
    _pairwise_disjoint(pools)
    # test is valid_seen (what the SDAR release reports), validation valid_unseen, train train: one sample each
    assert pools == {
        "test": {"json_2.1.1/valid_seen/pick_heat_then_place_in_recep-Apple-None-DiningTable-1/"
                 "trial_T00000000_000000_000001/game.tw-pddl"},
        "validation": {"json_2.1.1/valid_unseen/pick_clean_then_place_in_recep-Cloth-None-Shelf-424/"
                       "trial_T00000000_000000_000003/game.tw-pddl"},
        "train": {"json_2.1.1/train/pick_cool_then_place_in_recep-Mug-None-Cabinet-2/"
                  "trial_T00000000_000000_000002/game.tw-pddl"},
    }
    tasks = {}
    for split in SPLITS:
        for seed in range(6):
            _, info = alfworld.reset(seed=seed, split=split)
            assert info["game_file"] in {str(g.game_file) for g in alfworld.games(split)}
            tasks.setdefault(split, set()).add(info["task"])
    assert tasks == {"test": {"put a hot apple in diningtable"}, "validation": {"put a clean cloth in shelf"},
                     "train": {"put a cool mug in cabinet"}}
    with pytest.raises(ValueError, match="different directories"):
        make("alfworld", data_dir="builtin", split_dirs={"validation": "valid_seen"})
    swapped = make("alfworld", data_dir="builtin", split_dirs={"test": "valid_unseen", "validation": "valid_seen"})
    assert swapped.reset(seed=0, split="test")[1]["task"] == "put a clean cloth in shelf"
    swapped.close()


def test_alfworld_sample_games_are_won_by_the_planner(alfworld):
    for split in SPLITS:
        _, info = alfworld.reset(seed=0, split=split)
        plan = alfworld.expert_actions()
        walkthrough = json.loads(alfworld.game.game_file.read_text())["walkthrough"]
        assert plan == walkthrough
        for action in plan:
            _, reward, terminated, _, info = alfworld.step(action)
            assert not info["invalid_action"], action
        assert terminated and reward == 1.0 and info["won"], split


# -------------------------------------------------------------------------------------- WebShop
def test_webshop_goal_ranges_are_webshops_own():
    from megatron_sdar.envs.splits import webshop_goal_ranges

    # princeton-nlp/WebShop baseline_models/env.py: test range(500), eval range(500, 1500), train the rest
    assert webshop_goal_ranges(12087) == {"test": range(0, 500), "validation": range(500, 1500),
                                          "train": range(1500, 12087)}
    # a small list keeps WebShop's proportions (500 and 1000 of 12087), at least one goal each
    assert webshop_goal_ranges(10) == {"test": range(0, 1), "validation": range(1, 2), "train": range(2, 10)}
    assert webshop_goal_ranges(1000) == {"test": range(0, 41), "validation": range(41, 124),
                                         "train": range(124, 1000)}
    with pytest.raises(EnvError, match="at least 3"):
        webshop_goal_ranges(2)


def test_webshop_splits_on_the_shipped_catalog():
    env = make("webshop")
    pools = {split: set(env.goal_ranges[split]) for split in SPLITS}
    _pairwise_disjoint(pools)
    assert pools == {"test": {0}, "validation": {1}, "train": set(range(2, 10))}
    assert set().union(*pools.values()) == set(range(len(env.shop.goals)))
    drawn: dict[str, set] = {}
    for split in SPLITS:
        for seed in SEEDS:
            _, info = env.reset(seed=seed, split=split)
            assert info["goal_index"] in pools[split] and info["split"] == split
            assert info["task"] == env.shop.goals[info["goal_index"]]["instruction_text"]
            drawn.setdefault(split, set()).add(info["goal_index"])
    assert drawn == pools  # every goal of a split is drawn, none of another


def test_webshop_http_client_draws_the_same_splits():
    from megatron_sdar.envs.webshop import LocalShop
    from megatron_sdar.envs.webshop_http import serve_local_shop

    shop = LocalShop()
    server, url = serve_local_shop(shop)
    try:
        client = make("webshop", base_url=url, num_goals=len(shop.goals))
        for seed in range(40):
            _, info = client.reset(seed=seed, split="test")
            assert info["goal_index"] == 0 and info["task"] == shop.goals[0]["instruction_text"]
            _, info = client.reset(seed=seed, split="train")
            assert info["goal_index"] in range(2, 10)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ Search-QA
def _ids(path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def test_search_splits_on_the_shipped_questions():
    from megatron_sdar.envs.search_qa import DEFAULT_TEST_QUESTIONS, DEFAULT_TRAIN_QUESTIONS

    env = make("search")
    pools = {split: {q["key"] for q in env.splits[split]} for split in SPLITS}
    _pairwise_disjoint(pools)
    train_file, test_file = _ids(DEFAULT_TRAIN_QUESTIONS), _ids(DEFAULT_TEST_QUESTIONS)
    assert not train_file & test_file and len(train_file | test_file) == 16
    assert pools["test"] == test_file == {"q05", "q06", "q13", "q16"}
    assert pools["validation"] == {"q08", "q15"}  # the train questions whose id hashes below 0.1
    assert pools["train"] == train_file - pools["validation"] and len(pools["train"]) == 10
    # every skill category is tested
    assert {q["task_type"] for q in env.splits["test"]} == {"direct_retrieval", "entity_attribute_lookup",
                                                            "multi_hop_reasoning", "compare"}
    drawn: dict[str, set] = {}
    for split in SPLITS:
        for seed in SEEDS:
            _, info = env.reset(seed=seed, split=split)
            assert info["question_id"] in pools[split]
            drawn.setdefault(split, set()).add(info["question_id"])
    assert drawn == pools


def test_search_validation_slice_follows_the_id_not_the_position(tmp_path):
    from megatron_sdar.envs.search_qa import DEFAULT_TEST_QUESTIONS, DEFAULT_TRAIN_QUESTIONS, load_question_splits

    lines = DEFAULT_TRAIN_QUESTIONS.read_text().splitlines()
    extra = [json.dumps({"id": f"x{i}", "question": f"q{i}?", "answers": ["a"]}) for i in range(40)]
    shuffled = tmp_path / "train.jsonl"
    shuffled.write_text("\n".join(extra[:20] + lines[::-1] + extra[20:]) + "\n")
    splits = load_question_splits(shuffled, DEFAULT_TEST_QUESTIONS)
    validation = {q["key"] for q in splits["validation"]}
    assert {"q08", "q15"} <= validation and not {"q01", "q02", "q03"} & validation
    assert 0 < len(validation - {"q08", "q15"}) < 12  # about a tenth of the 40 added questions
    # one file per dataset: ids are keyed by data_source, and a question in train and test is refused
    nq = tmp_path / "nq_test.jsonl"
    nq.write_text(json.dumps({"id": "q01", "data_source": "nq", "question": "x?", "answers": ["y"]}) + "\n")
    both = load_question_splits(DEFAULT_TRAIN_QUESTIONS, [DEFAULT_TEST_QUESTIONS, nq])
    assert "nq/q01" in {q["key"] for q in both["test"]}
    leak = tmp_path / "leak.jsonl"
    leak.write_text(DEFAULT_TRAIN_QUESTIONS.read_text().splitlines()[0] + "\n")
    with pytest.raises(EnvError, match="both the train and the test files.*'q01'"):
        make("search", test_questions=leak)


# ------------------------------------------------------------------------- the trainer's draws
def test_task_seed_kinds_name_their_split():
    from megatron_sdar.trainer import seeds

    assert {seeds.split_of(s) for s in seeds.eval_seeds(50)} == {"test"}
    assert {seeds.split_of(s) for s in seeds.eval_seeds(50, "validation")} == {"validation"}
    for trainer_seed in (0, 7):
        assert {seeds.split_of(s) for s in seeds.sft_seeds(trainer_seed, 50)} == {"train"}
        assert {seeds.split_of(s) for s in seeds.train_seeds(trainer_seed, 3, 16)} == {"train"}
    with pytest.raises(ValueError, match="seed layout"):
        seeds.split_of(9 << 40)


@pytest.mark.parametrize("env_name", ["search", "webshop"])
def test_the_trainer_evaluates_on_the_test_split_and_trains_on_train(env_name):
    """The tasks the trainer's evaluation and RL steps start (its episode specs, reset as the agent
    loop resets them) on the shipped data."""
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.rollout.agent_loop import reset_episodes
    from megatron_sdar.trainer import seeds
    from megatron_sdar.trainer.loop import EVAL_EPISODE_ID, build_env, episode_specs

    def started(run, task_seeds, group_size, first_episode_id):
        specs = episode_specs(functools.partial(build_env, run.env), task_seeds, group_size, first_episode_id)
        batch = EnvBatch([s.env for s in specs], step_timeout_s=run.env.step_timeout_s)
        try:
            results = reset_episodes(batch, specs)
        finally:
            batch.close()
        assert all(r.error is None for r in results)
        key = "question_id" if env_name == "search" else "goal_index"
        return {r.info[key] for r in results}, specs[0].env

    overrides = [f"env={env_name}", "trainer.sft_steps=0"]
    run = compose_run(overrides, need_files=False)
    assert run.trainer.eval_split == "test"
    tested, env = started(run, seeds.eval_seeds(run.trainer.eval_tasks, run.trainer.eval_split), 1, EVAL_EPISODE_ID)
    if env_name == "search":
        pools = {split: {q["key"] for q in env.splits[split]} for split in SPLITS}
    else:
        pools = {split: set(env.goal_ranges[split]) for split in SPLITS}
    assert tested == pools["test"]  # the 200 evaluation tasks cover the test split and nothing else
    run = compose_run(overrides + ["trainer.eval_split=validation"], need_files=False)
    validated, _ = started(run, seeds.eval_seeds(run.trainer.eval_tasks, run.trainer.eval_split), 1, EVAL_EPISODE_ID)
    assert validated == pools["validation"]
    trained = set()
    for step in range(30):  # 120 training tasks
        step_tasks, _ = started(run, seeds.train_seeds(run.trainer.seed, step, run.rollout.tasks_per_step),
                                run.rollout.group_size, step * run.rollout.tasks_per_step * run.rollout.group_size)
        trained |= step_tasks
    assert trained == pools["train"]


# ------------------------------------------------------------------------ configuration check
def test_config_validation_names_the_missing_data(tmp_path, monkeypatch):
    import shutil

    from megatron_sdar.config.schema import ConfigError, compose_run
    from megatron_sdar.envs.alfworld_env import BUILTIN_DATA_DIR

    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    for name in ("train", "valid_seen"):
        shutil.copytree(BUILTIN_DATA_DIR / "json_2.1.1" / name, tmp_path / "json_2.1.1" / name)
    plain = ["algo=grpo", "env.skills_dir=null", "trainer.sft_steps=0"]
    alfworld = ["env=alfworld", *plain, f"+env.kwargs.data_dir={tmp_path}"]
    assert compose_run(alfworld).env.kwargs["data_dir"] == str(tmp_path)  # train and test (valid_seen) are there
    with pytest.raises(ConfigError, match=rf"^alfworld: env.kwargs.data_dir={tmp_path}: the validation split's "
                                          rf"directory {tmp_path}/json_2.1.1/valid_unseen does not exist"):
        compose_run(alfworld + ["trainer.eval_split=validation"])
    compose_run(alfworld + ["trainer.eval_split=validation", "trainer.eval_tasks=0"])  # no evaluation: not read
    compose_run(["env=alfworld", *plain])  # no data given ($ALFWORLD_DATA unset): nothing to check here
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^alfworld: \$ALFWORLD_DATA=.*nowhere: the test split's directory"):
        compose_run(["env=alfworld", *plain, "trainer.max_steps=0"])
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=rf"^search: env.kwargs.test_questions: {missing} does not exist$"):
        compose_run(["env=search", *plain, f"+env.kwargs.test_questions={missing}"])
    with pytest.raises(ConfigError, match=rf"^search: env.kwargs.train_questions: {missing} does not exist$"):
        compose_run(["env=search", *plain, f"+env.kwargs.train_questions=[{missing}]"])
    with pytest.raises(ConfigError, match=rf"^webshop: env.kwargs.catalog_path={missing} does not exist$"):
        compose_run(["env=webshop", *plain, f"+env.kwargs.catalog_path={missing}"])
    compose_run(["env=search", *plain])  # the shipped samples
    compose_run(["env=webshop", *plain])
