"""Rollouts: the colocated vLLM engine, the trainer -> vLLM weight sync, the multi-turn agent loop.

    engine = RolloutEngine(hf_dir, RolloutEngineConfig(tp=1))
    engine.sync_weights(MegatronWeightSource(model, arch, bucket_mb=256))
    batch = AgentLoop(engine, tokenizer, AgentLoopConfig.of_run(run), retriever).run(specs)  # run: compose_run(...)

Names are imported on first use: the trajectory types are needed by the trainer's update code,
which must not pay for importing vLLM (several seconds per rank).
"""
from importlib import import_module

_HOMES = {
    "AgentLoop": "agent_loop", "AgentLoopConfig": "agent_loop", "ChatFormatter": "agent_loop",
    "EpisodeSpec": "agent_loop", "parse_action": "agent_loop",
    "Generation": "engine", "RolloutEngine": "engine", "RolloutEngineConfig": "engine",
    "RolloutEngineError": "engine", "SamplingConfig": "engine",
    "Episode": "trajectory", "TrajectoryBatch": "trajectory", "Turn": "trajectory",
    "MegatronWeightSource": "weight_sync", "SyncStats": "weight_sync",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'megatron_sdar.rollout' has no attribute {name!r}")
    return getattr(import_module(f"megatron_sdar.rollout.{_HOMES[name]}"), name)
