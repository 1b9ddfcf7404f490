"""The run configuration tests start from: the embedded default, composed by Hydra from the YAML
config groups (the one place a value lives), with an output directory that holds no run."""
from __future__ import annotations

import functools
import tempfile


@functools.lru_cache(maxsize=None)
def embedded_run():
    """``compose_run([])``, into a fresh empty output directory (nothing is written there)."""
    from megatron_sdar.config.schema import compose_run

    return compose_run([f"trainer.output_dir={tempfile.mkdtemp(prefix='megatron-sdar-test-')}/run"])


def loop_config(**fields):
    """The agent loop's settings of the embedded default (``AgentLoopConfig.of_run``), ``fields``
    replaced."""
    from megatron_sdar.rollout.agent_loop import AgentLoopConfig

    return AgentLoopConfig.of_run(embedded_run(), **fields)
