"""TextWorld Commonsense and CookingWorld through the real TextWorldExpress engine (its JVM, its
folds, its gold paths), the skills written for them, the SFT demonstrations and a rollout of the real
vLLM engine on a TWC game."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sdar.envs import INVALID_ACTION_FEEDBACK, SPLITS, EnvBatch, EnvError, make
from megatron_sdar.envs.textworld_express import GAMES, RULE_LINE, TextWorldExpressEnv, _twc_places
from megatron_sdar.testing import run_distributed

GAMES_PER_SPLIT = 150


def _objects_of(env: TextWorldExpressEnv) -> list[str]:
    return [a[len("take "):] for a in env.expert_actions() if a.startswith("take ")]


def _twc_fold_objects() -> dict[str, set[str]]:
    from textworld_express.constants import BASEPATH

    folds = json.loads((Path(BASEPATH) / "twc_objects.folds.json").read_text())
    return {"train": set(folds["train"]), "validation": set(folds["valid"]), "test": set(folds["test"])}


@pytest.mark.parametrize("game", sorted(GAMES))
def test_folds_are_disjoint_and_the_gold_path_solves_every_game(game):
    """Each split draws its own engine fold: disjoint generation seeds and, for TWC, disjoint objects
    (the engine's twc_objects.folds.json); the engine's gold path, played through our adapter, wins
    every game with reward 1 on its last step, within the turn budget (gold + slack)."""
    env = make(game, seed=0, turn_slack=2)
    seeds = {split: set(env.game_seeds(split)) for split in SPLITS}
    assert all(len(s) == 1000 for s in seeds.values())
    assert not (seeds["train"] & seeds["validation"]) and not (seeds["train"] & seeds["test"]) \
        and not (seeds["validation"] & seeds["test"])
    objects: dict[str, set[str]] = {split: set() for split in SPLITS}
    for split in SPLITS:
        played = set()
        for task_seed in range(GAMES_PER_SPLIT):
            observation, info = env.reset(seed=task_seed, split=split)
            assert info["game_seed"] in seeds[split] and info["split"] == split
            played.add(info["game_seed"])
            objects[split].update(_objects_of(env))
            gold = env.expert_actions()
            assert env.max_turns == min(env.cap_turns, len(gold) + 2)
            rewards = []
            for action in gold:
                assert action in info["admissible_actions"], (action, info["admissible_actions"])
                _, reward, terminated, truncated, info = env.step(action)
                rewards.append(reward)
            assert terminated and info["won"] and not truncated and rewards[-1] == 1.0 and sum(rewards) == 1.0
        assert len(played) > GAMES_PER_SPLIT * 0.8  # different games, not one replayed
    if game == "twc":
        folds = _twc_fold_objects()
        assert not (objects["train"] & objects["test"]) and not (objects["train"] & objects["validation"]) \
            and not (objects["validation"] & objects["test"])
        for split in SPLITS:
            assert objects[split] <= folds[split] and len(objects[split]) > 30, split


def test_adapter_interface_invalid_actions_and_task_types():
    """Admissible actions are the engine's validActions; an action outside them answers the
    invalid-action feedback and changes nothing; TWC's task type is the room, CookingWorld's
    ``cooking``; a wrong appliance ruins the meal (terminated, not won)."""
    env = make("twc", seed=0)
    observation, info = env.reset(seed=3, split="test")
    assert info["task"] in observation and "usual locations" in info["task"]
    assert info["task_type"] in {"bathroom", "bedroom", "corridor", "kitchen", "laundry room", "living room", "pantry"}
    assert re.search(rf"You are in the {info['task_type']}\.", observation)
    before = info["admissible_actions"]
    assert before == sorted(before) and any(a.startswith("take ") for a in before)
    feedback, reward, terminated, truncated, info = env.step("dance wildly")
    assert feedback == INVALID_ACTION_FEEDBACK and info["invalid_action"] and reward == 0.0 and not terminated
    assert info["admissible_actions"] == before
    _, _, _, _, info = env.step(" Take " + _objects_of(env)[0].upper() + ".")  # normalized, case-insensitive
    assert not info["invalid_action"] and any(a.startswith("put ") for a in info["admissible_actions"])

    cooking = make("cookingworld", seed=0)
    for task_seed in range(40):
        _, info = cooking.reset(seed=task_seed, split="validation")
        gold = cooking.expert_actions()
        cook = next((i for i, a in enumerate(gold) if a.startswith("cook ")), None)
        if cook is not None:
            break
    assert info["task_type"] == "cooking" and cook is not None
    for action in gold[:cook]:
        cooking.step(action)
    ingredient, right = re.match(r"cook (.+) in (.+)", gold[cook]).groups()
    wrong = next(a for a in ("oven", "stove", "toaster") if a != right)
    _, reward, terminated, _, info = cooking.step(f"cook {ingredient} in {wrong}")
    assert terminated and not info["won"] and info["failed"] and reward == 0.0
    with pytest.raises(EnvError, match="refused game_params"):
        make("twc", game_params={"numItemsToPutAway": 99})
    with pytest.raises(EnvError, match="game_params must be integers, got {'numLocations': 'two'}"):
        make("twc", game_params={"numLocations": "two"})


def test_concurrent_episodes_equal_sequential_play():
    """One JVM serves every environment of the process; EnvBatch steps them from threads, and the
    transcripts equal the same games played one after another."""
    def play(batch_envs, parallel: bool):
        transcripts = [[] for _ in batch_envs]
        if parallel:
            batch = EnvBatch(batch_envs, step_timeout_s=60)
            results = batch.reset(seeds=list(range(len(batch_envs))), splits=["test"] * len(batch_envs))
            plans = [env.expert_actions() for env in batch_envs]
            for k, r in enumerate(results):
                transcripts[k].append(r.observation)
            turn = 0
            while any(turn < len(p) for p in plans):
                actions = [p[turn] if turn < len(p) else None for p in plans]
                for k, r in enumerate(batch.step(actions)):
                    if r is not None:
                        transcripts[k].append((r.observation, r.reward, r.terminated))
                turn += 1
            return transcripts
        for k, env in enumerate(batch_envs):
            observation, _ = env.reset(seed=k, split="test")
            transcripts[k].append(observation)
            for action in env.expert_actions():
                observation, reward, terminated, _, _ = env.step(action)
                transcripts[k].append((observation, reward, terminated))
        return transcripts

    envs = [make("cookingworld" if k % 2 else "twc", seed=k) for k in range(16)]
    sequential = play(envs, parallel=False)
    assert play([make("cookingworld" if k % 2 else "twc", seed=k) for k in range(16)], parallel=True) == sequential
    assert all(t[-1][1] == 1.0 for t in sequential)


@pytest.mark.multiproc
def test_missing_java_or_package_is_one_line(tmp_path):
    """Without ``java`` on PATH, building the environment and composing a run that uses it fail with
    one line naming the fix (no py4j traceback); the main job exits with that line."""
    code = ("from megatron_sdar.envs import make\n"
            "try:\n    make('twc')\nexcept Exception as exc:\n    print(type(exc).__name__, '|', exc)\n")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().startswith("EnvError | TextWorldExpress runs on the JVM and `java` was not found: "
                                         "install Java 17"), out.stdout + out.stderr
    job = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "experiment=twc_tiny",
                          f"trainer.output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    last = (job.stdout + job.stderr).strip().splitlines()[-1]
    assert job.returncode != 0 and "Traceback" not in job.stdout + job.stderr, job.stderr[-2000:]
    assert last == ("megatron-sdar: configuration error: twc: TextWorldExpress runs on the JVM and `java` was not "
                    "found: install Java 17 (e.g. apt-get install openjdk-17-jre-headless) and put `java` on PATH"), last
    missing_package = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['textworld_express'] = None\n"
         "from megatron_sdar.envs.textworld_express import missing_dependency; print(missing_dependency())"],
        capture_output=True, text=True, timeout=120)
    assert missing_package.stdout.strip() == ("TextWorldExpress is not installed: pip install textworld-express==1.1.0 "
                                              "(tools/bootstrap.sh installs it from requirements/cpu.lock)")


def test_twc_skills_are_written_from_the_train_fold_and_cover_its_rooms():
    """One skill per room (the task type), retrievable by keyword; no object of the validation or test
    folds is named in them (the test fold checks that a rule transfers, not a memorised object); every
    place a rule names is furniture of that room in the engine's games."""
    from megatron_sdar.skills import SkillBank, SkillRetriever, builtin_skill_dir

    bank = SkillBank.from_dir(builtin_skill_dir("twc"))
    folds = _twc_fold_objects()
    held_out = (folds["validation"] | folds["test"]) - folds["train"]
    text = "\n".join(s.text.lower() for s in bank.skills.values())
    for name in sorted(folds["train"], key=len, reverse=True):  # "electric razor" names a train object only
        text = re.sub(rf"\b{re.escape(name.lower())}s?\b", " ", text)
    named = sorted(o for o in held_out if re.search(rf"\b{re.escape(o.lower())}s?\b", text))
    assert named == [], named
    env = make("twc", seed=0)
    furniture: dict[str, set[str]] = {}
    for task_seed in range(200):
        observation, info = env.reset(seed=task_seed, split="train")
        furniture.setdefault(info["task_type"], set()).update(_twc_places(observation))
    assert set(furniture) == set(bank.task_to_skill)
    retriever = SkillRetriever(bank, mode="keyword")
    for room, places in furniture.items():
        retrieval = retriever.retrieve(info["task"], room)
        assert retrieval.skill_names == [bank.task_to_skill[room]]
        rules = RULE_LINE.findall(retrieval.context)
        assert rules and all(where in places for _, where in rules), (room, rules, places)
    cooking = SkillBank.from_dir(builtin_skill_dir("cookingworld"))
    assert SkillRetriever(cooking, mode="keyword").retrieve("cook", "cooking").skill_names == ["cook"]
    assert len(cooking.task_skill_names) == 4  # the random control draws the right one 1 time in 4


@pytest.mark.parametrize("game", sorted(GAMES))
def test_demonstrations_teach_reading_a_skill_not_the_answers(game):
    """The first choice a demonstration makes (where TWC puts its object, which appliance CookingWorld
    cooks with) is a uniform draw in plain demonstrations and the randomly drawn rule of the skill in
    skill demonstrations: both agree with the engine about as often as chance. A TWC put that did not
    finish the task is followed by a search of places not tried yet."""
    env = make(game, seed=0, turn_slack=2)
    demos = env.demonstrations(list(range(300)), skill_share=0.5, seed=0)
    assert 100 < sum(bool(d.context) for d in demos) < 200
    verb = "put" if game == "twc" else "cook"
    agree = {True: [], False: []}  # with skill -> [first choice equals the engine's]
    uniform = []  # the chance that a uniform first choice is the engine's
    retries = 0
    for k, demo in enumerate(demos):
        env.reset(seed=k, split="train")
        truth = dict(a.rsplit(" in ", 1) for a in env.expert_actions() if a.startswith(verb))
        choices = [demo.steps[i][0].rsplit(" in ", 1) for i in demo.decisive if demo.steps[i][0].startswith(verb)]
        if not choices:
            continue
        (what, where), tried = choices[0], [w for _, w in choices]
        agree[bool(demo.context)].append(where == truth[what])
        uniform.append(1 / len(_twc_places(demo.observation)) if game == "twc" else 1 / 3)
        if demo.context:
            assert any(w == where for _, w in RULE_LINE.findall(demo.context)), (demo.context, where)
        assert len(set(tried)) == len(tried) and all(w != truth[what] for w in tried[:-1])  # no place twice
        retries += len(tried) - 1
    plain, skill = (sum(v) / len(v) for v in (agree[False], agree[True]))
    chance = sum(uniform) / len(uniform)  # TWC: 2-9 places in a room; CookingWorld: 3 appliances
    assert abs(plain - chance) < 0.1 and abs(skill - chance) < 0.1, (plain, skill, chance)
    assert (retries > 50) == (game == "twc"), retries  # a wrong appliance ends CookingWorld's game
    assert all(i < len(d.steps) for d in demos for i in d.decisive)


def _twc_rollout(model_dir: str):
    from transformers import AutoTokenizer

    from megatron_sdar.rollout import AgentLoop, EpisodeSpec, RolloutEngine, RolloutEngineConfig
    from megatron_sdar.skills import SkillBank, SkillRetriever, builtin_skill_dir
    from tests.configs import loop_config

    engine = RolloutEngine(model_dir, RolloutEngineConfig(tp=1, max_model_len=1024))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    retriever = SkillRetriever(SkillBank.from_dir(builtin_skill_dir("twc")), mode="keyword")
    loop = AgentLoop(engine, tokenizer, loop_config(max_turns=4, max_prompt_tokens=900, max_response_tokens=8,
                                                    progress=False), retriever)
    specs = [EpisodeSpec(env=make("twc", seed=k, turn_slack=2), group=k // 2, task_seed=k // 2, episode_id=k,
                         split="test") for k in range(4)]
    batch = loop.run(specs)
    return {"episodes": [(e.task_type, e.num_turns, len(e.skill_names), e.env_error, e.reward) for e in batch.episodes],
            "roundtrip": all(loop.formatter.encode(t.messages) == t.prompt_ids for _, t in batch.turns()),
            "contexts": [e.privileged_context for e in batch.episodes],
            "summary": batch.summary()}


@pytest.mark.multiproc
def test_rollout_of_the_real_engine_on_twc(tmp_path):
    """The vLLM engine (CPU) plays TWC test-fold games with a tiny Qwen2 whose tokenizer was trained on
    the benchmark's text: multi-turn episodes, the room's skill retrieved, no environment error."""
    from megatron_sdar.models.tiny import build_tiny_qwen

    corpus = make("twc", seed=0).corpus_text(list(range(20)))
    model_dir = build_tiny_qwen(tmp_path / "qwen2", "qwen2", extra_text=corpus, max_position_embeddings=1024)
    result = run_distributed(_twc_rollout, world_size=1, args=(str(model_dir),), timeout=600,
                             env={"OMP_NUM_THREADS": "2"})[0]
    episodes = result["episodes"]
    assert len(episodes) == 4 and result["roundtrip"]
    assert all(err is None and n_skills == 1 and turns >= 1 for _, turns, n_skills, err, _ in episodes), episodes
    assert sum(turns for _, turns, *_ in episodes) > 4  # multi-turn
    assert result["summary"]["rollout/episodes"] == 4.0
    assert all(context.startswith("### TASK: ") and "\n- " in context for context in result["contexts"])


def test_the_laptop_recipes_compose_and_are_not_cluster_recipes():
    """``experiment=twc_tiny`` and ``experiment=cooking_tiny`` compose into tiny-model runs of the
    benchmarks (SFT on, test-fold evaluation, each preset's tuned settings where the file exists); the
    cluster tooling (plan table, --rehearse) lists only the cluster recipes and says so for these."""
    from megatron_sdar.config.schema import ConfigError, compose_run, experiment_names, recipe_names
    from megatron_sdar.trainer.rehearsal import plan_rehearsal

    assert {"twc_tiny", "cooking_tiny"} <= set(experiment_names())
    assert not {"twc_tiny", "cooking_tiny"} & set(recipe_names()) and len(recipe_names()) == 13
    for recipe, env_name in (("twc_tiny", "twc"), ("cooking_tiny", "cookingworld")):
        run = compose_run([f"experiment={recipe}"], need_files=True)
        assert (run.env.name, run.model.name, run.model.hf_path, run.trainer.eval_split) == (env_name, "tiny", None, "test")
        assert run.trainer.sft_steps > 0 and run.rollout.action_format == "words"
        assert run.env.kwargs["game_params"]["numLocations"] == 1
        with pytest.raises(ConfigError, match=f"experiment={recipe} is a CPU benchmark of the tiny model"):
            plan_rehearsal([f"experiment={recipe}"])


@pytest.mark.parametrize("game", sorted(GAMES))
def test_first_choice_is_judged_against_the_gold_path(game):
    """``info["first_choice_correct"]``: TWC's first put of an object, CookingWorld's first cooking,
    right when it is where (with what) the gold path does it; False until made, fixed once made;
    invalid actions and other verbs are no choice. Played on test-fold games whose answer is known."""
    env = make(game, seed=0, turn_slack=4)
    verb = "put " if game == "twc" else "cook "
    checked = {True: 0, False: 0}
    for index in range(40):
        _, info = env.reset(options={"game_index": index}, split="test")
        gold = env.expert_actions()
        decisive = [a for a in gold if a.startswith(verb)]
        if not decisive:  # a recipe without cooking has no choice to judge
            assert "first_choice_correct" not in info
            continue
        assert info["first_choice_correct"] is False
        right = index % 2 == 0
        *before, choice = gold[: gold.index(decisive[0]) + 1]
        _, _, _, _, info = env.step("jump over the moon")  # invalid: not a choice
        assert info["first_choice_correct"] is False
        for action in before:
            assert env.step(action)[4]["first_choice_correct"] is False
        if not right:  # the same verb with another place / appliance that the game offers
            head = choice[: choice.rindex(" in ") + 4]
            others = [a for a in env._response["validActions"] if a.startswith(head) and a != choice]
            if not others:
                continue
            choice = others[0]
        info = env.step(choice)[4]
        assert info["first_choice_correct"] is right, (game, index, choice, gold)
        checked[right] += 1
        for action in env._response["validActions"][:2]:  # later actions never change the verdict
            if not (info.get("won") or info.get("failed")):
                info = env.step(action)[4]
                assert info["first_choice_correct"] is right
    assert checked[True] >= 5 and checked[False] >= 5, checked
    env.close()
