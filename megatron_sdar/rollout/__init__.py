"""Rollouts: the colocated vLLM engine, the trainer -> vLLM weight sync, the multi-turn agent loop.

    engine = RolloutEngine(hf_dir, RolloutEngineConfig(tp=1))
    engine.sync_weights(MegatronWeightSource(model, arch, bucket_mb=256))
    batch = AgentLoop(engine, tokenizer, AgentLoopConfig(), retriever).run(specs)
"""
from megatron_sdar.rollout.agent_loop import (
    AgentLoop,
    AgentLoopConfig,
    ChatFormatter,
    EpisodeSpec,
    parse_action,
)
from megatron_sdar.rollout.engine import (
    Generation,
    RolloutEngine,
    RolloutEngineConfig,
    RolloutEngineError,
    SamplingConfig,
)
from megatron_sdar.rollout.trajectory import Episode, TrajectoryBatch, Turn
from megatron_sdar.rollout.weight_sync import MegatronWeightSource, SyncStats

__all__ = [
    "AgentLoop", "AgentLoopConfig", "ChatFormatter", "Episode", "EpisodeSpec", "Generation",
    "MegatronWeightSource", "RolloutEngine", "RolloutEngineConfig", "RolloutEngineError", "SamplingConfig",
    "SyncStats", "TrajectoryBatch", "Turn", "parse_action",
]
