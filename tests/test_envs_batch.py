"""Registry and batched stepping: failures and timeouts end one episode, not the batch."""
import time

import pytest

from megatron_sdar.envs import EnvBatch, TextEnv, available_envs, make, register


class _Flaky(TextEnv):
    """Raises or stalls on command, to exercise EnvBatch's isolation."""

    name = "flaky"

    def __init__(self, mode: str) -> None:
        super().__init__(max_turns=10)
        self.mode = mode

    def _reset(self, rng, options):
        if self.mode == "reset_raises":
            raise RuntimeError("server gone")
        return "start", {"won": False, "task_type": "t", "task": "t"}

    def _step(self, action):
        if self.mode == "raises":
            raise ValueError(f"cannot parse {action!r}")
        if self.mode == "slow":
            time.sleep(0.6)
        return "ok", 0.0, False, {"won": False, "task_type": "t", "task": "t"}


def test_registry_names_and_errors():
    assert {"household", "alfworld", "webshop", "search"} <= set(available_envs())
    with pytest.raises(KeyError, match="unknown environment 'nethack'.*household"):
        make("nethack")
    with pytest.raises(TypeError, match="accepted options"):
        make("search", corpus="x.jsonl")
    register("flaky_ok", lambda: _Flaky("ok"))
    assert make("flaky_ok").reset()[0] == "start"
    with pytest.raises(ValueError, match="already registered"):
        register("flaky_ok", lambda: _Flaky("ok"))


def test_batch_isolates_exceptions_and_timeouts():
    envs = [make("household"), _Flaky("raises"), _Flaky("slow"), make("household"), _Flaky("reset_raises")]
    batch = EnvBatch(envs, step_timeout_s=0.2)
    try:
        starts = batch.reset(seeds=[1, 2, 3, 4, 5])
        assert [r.error is None for r in starts] == [True, True, True, True, False]
        assert "server gone" in starts[4].error and starts[4].terminated
        plans = {i: envs[i].expert_actions() for i in (0, 3)}
        first = batch.step([plans[0][0], "anything", "anything", plans[3][0], None])
        assert first[0].error is None and first[3].error is None and not first[0].done
        assert first[1].terminated and "ValueError" in first[1].error and first[1].info["won"] is False
        assert first[2].terminated and "timed out" in first[2].error and first[2].reward == 0.0
        assert first[4] is None
        # The healthy episodes run to success; the failed ones only accept None.
        with pytest.raises(ValueError, match="finished its episode"):
            batch.step([None, "again", None, None, None])
        for k in range(1, max(len(plans[0]), len(plans[3]))):
            actions = [plans[i][k] if k < len(plans[i]) else None for i in (0, 3)]
            out = batch.step([actions[0], None, None, actions[1], None])
        assert batch.finished == [True] * 5
        assert batch.last_info[0]["won"] and batch.last_info[3]["won"]
    finally:
        batch.close()


def test_batch_argument_checks():
    with pytest.raises(ValueError, match="at least one"):
        EnvBatch([])
    batch = EnvBatch([make("household")])
    try:
        with pytest.raises(ValueError, match="1 environments"):
            batch.step(["look", "look"])
    finally:
        batch.close()
