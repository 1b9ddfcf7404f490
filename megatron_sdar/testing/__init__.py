"""Test utilities: the multi-process gloo launcher and tiny models/tokenizers built on the fly."""
from megatron_sdar.testing.launcher import DistributedTestError, run_distributed

#: Hydra overrides that shrink the main job's embedded default to seconds per step (end-to-end
#: tests of the real trainer: resume, preemption through the Slurm script). No spaces inside.
TINY_RUN_OVERRIDES = (
    "model.tiny.layers=2", "trainer.sft_steps=2", "trainer.sft_episodes=4", "trainer.sft_batch_size=4",
    "trainer.eval_tasks=2", "trainer.eval_interval=2", "trainer.save_interval=2", "trainer.max_steps=4",
    "trainer.micro_batch_size=4", "rollout.tasks_per_step=1", "rollout.group_size=2", "env.max_turns=2",
    "rollout.max_response_tokens=12", "trainer.tensorboard=false", "trainer.plot=false", "trainer.export_hf=false",
)

__all__ = ["DistributedTestError", "TINY_RUN_OVERRIDES", "run_distributed"]
