"""Environment errors are not task failures (issue 33, item 3; probe rows E05, E06), and environment
options the engine refuses are refused when the run is composed (item 6, probe row A28).

An episode whose environment raised or hung (``Episode.env_error``) is counted in ``*/env_errors`` and
left out of the success rate, its interval, the task count and GRPO's groups; more than 10% of them
stop the run with one line naming the environment's own first error. The unit tests build the
episodes the agent loop builds (an environment that fails at reset leaves no task and no task type),
with the error text of a real refused connection; the end-to-end tests replay the probe's command
against a port where nothing listens.
"""
import os
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from megatron_sdar.algo.grpo import group_advantages
from megatron_sdar.envs import EnvBatch, EnvironmentFailure, make
from megatron_sdar.rollout.trajectory import (MAX_ENV_ERROR_SHARE, Episode, TrajectoryBatch, Turn,
                                              check_env_errors)
from megatron_sdar.trainer.batch import samples_from_trajectories
from megatron_sdar.utils.stats import wilson_interval

ROOT = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    """A local port where nothing listens (bound, then released: the kernel refuses connections to it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def refused() -> str:
    """The error the environment batch records when WebShop's server refuses the connection."""
    url = f"http://127.0.0.1:{_closed_port()}"
    batch = EnvBatch([make("webshop", base_url=url, seed=0)], step_timeout_s=30)
    try:
        (result,) = batch.reset([1], ["test"])
    finally:
        batch.close()
    assert result.error is not None and "Connection refused" in result.error, result.error
    return result.error


def _turn(n_response: int) -> Turn:
    return Turn(prompt_ids=[1, 2, 3], response_ids=[7] * n_response, rollout_logprobs=[-0.5] * n_response,
                messages=[{"role": "user", "content": "task"}], action="go to desk 1")


def _played(group: int, episode_id: int, reward: float, task_type: str = "pick", turns: int = 2) -> Episode:
    return Episode(group=group, task=f"task {group}", task_type=task_type, seed=100 + group, episode_id=episode_id,
                   turns=[_turn(3) for _ in range(turns)], reward=reward, env_return=max(reward, 0.0),
                   won=reward > 0, first_choice_correct=reward > 0)


def _failed_at_reset(group: int, episode_id: int, error: str) -> Episode:
    """What the agent loop keeps of an episode whose reset failed: no task, no task type, no turn."""
    return Episode(group=group, task="", task_type="", seed=100 + group, episode_id=episode_id, env_error=error)


def _failed_mid_episode(group: int, episode_id: int, error: str) -> Episode:
    """An episode whose environment raised at its second step: two generated turns, reward 0."""
    episode = _played(group, episode_id, 0.0, turns=2)
    episode.env_error, episode.won, episode.first_choice_correct = error, False, False
    return episode


@pytest.fixture
def batch(refused) -> TrajectoryBatch:
    """Two groups of four: group 0 rewards 1, 0, 0 and one reset refused; group 1 one refused reset, one
    environment that failed mid-episode, rewards 1 and -0.2 (an invalid action's penalty). Task types:
    ``pick`` and ``heat``."""
    return TrajectoryBatch([
        _played(0, 0, 1.0), _played(0, 1, 0.0), _played(0, 2, 0.0, task_type="heat"), _failed_at_reset(0, 3, refused),
        _failed_at_reset(1, 4, refused), _failed_mid_episode(1, 5, "step raised ConnectionError: gone"),
        _played(1, 6, 1.0, task_type="heat"), _played(1, 7, -0.2),
    ])


def test_summary_counts_env_errors_and_leaves_them_out_of_every_rate(batch):
    summary = batch.summary()
    assert summary["rollout/env_errors"] == 3.0 and summary["rollout/episodes"] == 8.0
    # over the five played episodes: two won (the old code: 2 of 8 = 0.25)
    assert summary["rollout/success_rate"] == pytest.approx(2 / 5)
    assert summary["rollout/reward_mean"] == pytest.approx((1.0 + 0.0 + 0.0 + 1.0 - 0.2) / 5)
    assert summary["rollout/turns_mean"] == pytest.approx(2.0)
    assert summary["rollout/success_rate/pick"] == pytest.approx(1 / 3)  # 1, 0, -0.2
    assert summary["rollout/success_rate/heat"] == pytest.approx(1 / 2)  # 0, 1
    assert summary["rollout/first_choice_correct"] == pytest.approx(2 / 5)
    # both groups differ in success among their played episodes
    assert summary["rollout/success_contrast_groups"] == 1.0
    # the refused resets have no task type: no key names an empty one
    assert not [k for k in summary if k.endswith("/")], sorted(summary)
    assert {k for k in summary if k.startswith("rollout/success_rate/")} == {"rollout/success_rate/pick",
                                                                            "rollout/success_rate/heat"}
    # the response tokens are work done, the failed episode's included
    assert summary["rollout/response_tokens"] == 3.0 * 2 * 6


def test_an_empty_task_type_of_a_played_episode_has_no_key():
    """An environment that names no task type: the overall rates, and no ``success_rate/`` key."""
    summary = TrajectoryBatch([_played(0, 0, 1.0, task_type=""), _played(0, 1, 0.0, task_type="")]).summary()
    assert summary["rollout/success_rate"] == 0.5 and summary["rollout/first_choice_correct"] == 0.5
    assert not [k for k in summary if k.endswith("/")], sorted(summary)


def test_evaluation_numbers_are_those_of_the_played_episodes(batch):
    """What the trainer's evaluation reports (``eval/num_tasks`` and the Wilson interval) counts the
    played episodes only."""
    played = batch.played
    assert [e.episode_id for e in played] == [0, 1, 2, 6, 7] and batch.env_errors == 3
    assert wilson_interval(sum(e.won for e in played), len(played)) == pytest.approx(wilson_interval(2, 5))
    everything_failed = TrajectoryBatch([_failed_at_reset(0, 0, "x"), _failed_at_reset(1, 1, "x")]).summary()
    assert everything_failed == {"rollout/env_errors": 2.0, "rollout/overlong": 0.0, "rollout/episodes": 2.0,
                                 "rollout/response_tokens": 0.0}


def test_failed_episodes_are_no_group_members_of_grpo(batch):
    """The played episodes' advantages are GRPO's over the played members of their group; a failed
    episode gives no sample (its reward 0 would have counted as a failure of the policy)."""
    samples = samples_from_trajectories(batch)
    assert {s.episode for s in samples} == {0, 1, 2, 6, 7}
    assert len(samples) == 5 * 2
    by_episode = {s.episode: s.advantage for s in samples}
    # group 0 played rewards 1, 0, 0: mean 1/3, unbiased std sqrt(1/3)
    std0 = (1 / 3) ** 0.5
    assert by_episode[0] == pytest.approx((2 / 3) / std0, rel=1e-5)  # 1.1547 (with the failure as a 0: 1.5)
    assert by_episode[1] == by_episode[2] == pytest.approx((-1 / 3) / std0, rel=1e-5)
    # group 1 played rewards 1, -0.2: +-0.6 / 0.8485
    assert by_episode[6] == pytest.approx(0.6 / (2 * 0.36) ** 0.5, rel=1e-5)
    assert by_episode[7] == pytest.approx(-0.6 / (2 * 0.36) ** 0.5, rel=1e-5)
    expected = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, -0.2]), torch.tensor([0, 0, 0, 1, 1])).tolist()
    assert [by_episode[i] for i in (0, 1, 2, 6, 7)] == pytest.approx(expected)
    assert samples_from_trajectories(TrajectoryBatch([_failed_mid_episode(0, 0, "x")])) == []


def test_a_group_whose_episodes_all_failed_in_the_environment_is_no_cliff(refused):
    """HDPO replays the groups where every played episode failed, not those the environment failed."""
    batch = TrajectoryBatch([_failed_at_reset(0, 0, refused), _failed_at_reset(0, 1, refused),
                             _played(1, 2, 0.0), _failed_mid_episode(1, 3, "x"),
                             _played(2, 4, 1.0), _failed_at_reset(2, 5, refused)])
    assert batch.cliff_groups() == [1]


def _mixed(episodes: int, failed: int, error: str) -> TrajectoryBatch:
    return TrajectoryBatch([_failed_at_reset(i, i, f"{error} #{i}") if i < failed else _played(i, i, 1.0)
                            for i in range(episodes)])


def test_more_than_a_tenth_of_episodes_failing_in_the_environment_stops(refused):
    assert MAX_ENV_ERROR_SHARE == Fraction(1, 10)
    assert check_env_errors(_mixed(10, 0, refused), "evaluation episodes", "webshop") is None
    # exactly 10%: left out of the numbers, with a warning naming the first error
    for episodes, failed in ((10, 1), (20, 2), (30, 3)):
        warning = check_env_errors(_mixed(episodes, failed, refused), "evaluation episodes", "webshop")
        assert warning.startswith(f"warning: {failed} of {episodes} evaluation episodes failed in the environment "
                                  "(webshop)"), warning
        assert f"first: {refused} #0" in warning
    # just above: stop, with the environment's own first error (the refused connection) and the count
    for episodes, failed in ((9, 1), (19, 2), (29, 3), (4, 4)):
        with pytest.raises(EnvironmentFailure) as raised:
            check_env_errors(_mixed(episodes, failed, refused), "episodes of RL step 1", "webshop")
        message = str(raised.value)
        assert message == (f"{failed} of {episodes} episodes of RL step 1 failed in the environment (webshop); "
                           f"first: {refused} #0")
        assert "Connection refused" in message and "\n" not in message
        assert (raised.value.errors, raised.value.episodes) == (failed, episodes)


def test_a_multi_line_error_is_one_line_in_the_stop_message():
    """A JVM's error (TextWorldExpress through py4j) comes with its stack trace: the line keeps its start."""
    error = "step raised Py4JJavaError: An error occurred while calling o12.stepJSON.\n: java.lang.Oops\n\tat x.y(Z)"
    with pytest.raises(EnvironmentFailure, match=r"first: step raised Py4JJavaError: An error occurred while calling "
                                                 r"o12.stepJSON. : java.lang.Oops at x.y\(Z\)$"):
        check_env_errors(TrajectoryBatch([_failed_at_reset(0, 0, error)]), "evaluation episodes", "twc")


# ---------------------------------------------------------------------------------------------------
# E05 / E06 end to end: WebShop at an address where nothing listens
# ---------------------------------------------------------------------------------------------------
PROBE = ["env=webshop", "env.skills_dir=megatron_sdar/skills/samples/webshop", "trainer.sft_steps=0",
         "trainer.max_steps=1", "trainer.eval_tasks=2", "rollout.tasks_per_step=2", "rollout.group_size=2"]


def _main_job(*overrides: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29900 + os.getpid() % 90),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megatron_sdar.train", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    return proc, time.monotonic() - started


@pytest.mark.multiproc
@pytest.mark.parametrize("where", ["evaluation", pytest.param("rl_step", marks=pytest.mark.slow)])
def test_an_unreachable_server_stops_the_run_with_one_line_naming_it(tmp_path, where):
    """E05 (the step-0 evaluation) and E06 (the first RL step, without that evaluation): exit code 3 and
    one line naming the refused connection and the count; no traceback, no success rate of 0 logged."""
    url = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "run"
    extra = ["trainer.eval_before_rl=false"] if where == "rl_step" else []
    proc, _ = _main_job(*PROBE, f"+env.kwargs.base_url={url}", f"trainer.output_dir={out}", *extra)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-sdar:")]
    what = "2 of 2 evaluation episodes" if where == "evaluation" else "4 of 4 episodes of RL step 1"
    assert proc.returncode == 3 and len(lines) == 1, (proc.returncode, text[-4000:])
    assert lines[0].startswith(f"megatron-sdar: environment error: {what} failed in the environment (webshop); "
                               f"first: reset raised EnvError: WebShop server {url}"), lines
    assert "Connection refused" in lines[0]
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or "success_rate" not in metrics.read_text()


@pytest.mark.slow
def test_a_prompt_budget_no_first_prompt_fits_is_one_configuration_line(tmp_path):
    """The other way a rollout gives no trainable token (E06's traceback said "every episode failed before a
    turn"): every first prompt longer than ``rollout.max_prompt_tokens``. One line naming it, exit code 2."""
    proc, _ = _main_job("trainer.sft_steps=0", "trainer.max_steps=1", "trainer.eval_tasks=2", "rollout.tasks_per_step=2",
                        "rollout.group_size=2", "trainer.eval_before_rl=false", "rollout.max_prompt_tokens=8",
                        f"trainer.output_dir={tmp_path / 'run'}")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-sdar:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert lines == ["megatron-sdar: configuration error: the rollout produced no trainable tokens: the first prompt "
                     "of each of the 4 episodes (no history yet) is longer than rollout.max_prompt_tokens=8; raise it"]


# ---------------------------------------------------------------------------------------------------
# A28: options the environment's engine refuses, refused when the run is composed
# ---------------------------------------------------------------------------------------------------
A28 = ["experiment=twc_tiny", "env.kwargs.game_params.numLocations=0"]


def test_engine_refused_game_params_are_a_configuration_error():
    from megatron_sdar.config.schema import ConfigError, compose_run

    with pytest.raises(ConfigError) as raised:
        compose_run(A28)
    assert str(raised.value) == ("env.kwargs.game_params: the twc engine refuses numLocations=0,numItemsToPutAway=1,"
                                 "includeDoors=0,limitInventorySize=0: Number of locations must be greater than one "
                                 "(specified value = 0).")
    with pytest.raises(ConfigError, match=r"^env.kwargs.game_params: the cookingworld engine refuses .*"
                                          r"Number of ingredients must less than 5 \(specified value = 9\)\.$"):
        compose_run(["env=cookingworld", "env.kwargs.game_params.numIngredients=9", "trainer.sft_steps=0"])
    with pytest.raises(ConfigError, match=r"^env.kwargs.game_params: the twc engine refuses .*Unrecognized property "
                                          r"name \(numLocs\)\.  Known properties: numLocations, "):
        compose_run(["experiment=twc_tiny", "+env.kwargs.game_params.numLocs=2"])
    with pytest.raises(ConfigError, match=r"^env.kwargs.turn_slack: must be a whole number >= 0 or null, got -1$"):
        compose_run(["experiment=twc_tiny", "env.kwargs.turn_slack=-1"])
    compose_run(["experiment=twc_tiny", "env.kwargs.game_params.numLocations=2"])  # what the engine takes passes


@pytest.mark.multiproc
def test_the_a28_command_exits_2_with_one_line_before_anything_is_built(tmp_path):
    out = tmp_path / "a28"
    proc, seconds = _main_job(*A28, f"trainer.output_dir={out}", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("megatron-sdar: configuration error: env.kwargs.game_params: the twc engine refuses ")
    assert lines[0].endswith("Number of locations must be greater than one (specified value = 0).")
    assert not out.exists() and seconds < 20, seconds


@pytest.mark.parametrize("overrides, line", [
    (["env=household", "+env.kwargs.num_receptacles=2"],
     "env.kwargs: household: num_receptacles must be >= 3 (source, appliance, target), got (2, 2)"),
    (["env=household", "+env.kwargs.num_receptacle=6"], "env.kwargs.num_receptacle: is not an option of household; "),
    (["env=household", "+env.kwargs.seed=3"], "env.kwargs.seed: is set by the trainer"),
    (["env=webshop", "+env.kwargs.base_url=127.0.0.1:3000"],
     "env.kwargs.base_url: '127.0.0.1:3000' is not an http(s) URL with a host (e.g. http://127.0.0.1:3000)"),
    (["env=webshop", "+env.kwargs.base_url=http://127.0.0.1:99999"],
     "env.kwargs.base_url: 'http://127.0.0.1:99999' is not a URL: Port out of range 0-65535"),
    (["env=webshop", "+env.kwargs.base_url=http://127.0.0.1:3000", "+env.kwargs.num_goals=2"],
     "env.kwargs.num_goals: webshop: 2 goals cannot be split into train, validation and test (at least 3 are needed)"),
    (["env=webshop", "+env.kwargs.timeout_s=5"], "env.kwargs.timeout_s: is not an option of webshop (LocalWebShopEnv)"),
    (["env=search", "+env.kwargs.topk=0"], "env.kwargs.topk: must be a whole number >= 1, got 0"),
    (["env=search", "+env.kwargs.reward=bleu"], "env.kwargs.reward: must be 'em' or 'f1', got 'bleu'"),
    (["env=search", "+env.kwargs.retriever_url=localhost:8000"], "env.kwargs.retriever_url: 'localhost:8000' is not"),
    (["env=alfworld", "+env.kwargs.task_types=[cook]"], "env.kwargs.task_types: alfworld: unknown task types ['cook']"),
    (["env=alfworld", "+env.kwargs.split_dirs={test: train}"],
     "env.kwargs.split_dirs: alfworld split_dirs: the splits must read different directories"),
])
def test_other_environments_refuse_their_options_at_composition(overrides, line):
    """What each environment would refuse only once built (or what would fail every episode: a server URL
    urllib cannot open) is one configuration line."""
    from megatron_sdar.config.schema import ConfigError, compose_run

    with pytest.raises(ConfigError) as raised:
        compose_run([*overrides, "trainer.sft_steps=0"])
    assert str(raised.value).startswith(line), str(raised.value)
