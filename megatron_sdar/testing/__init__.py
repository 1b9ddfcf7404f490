"""Test utilities: the multi-process gloo launcher and tiny models/tokenizers built on the fly."""
from megatron_sdar.testing.launcher import DistributedTestError, ParallelLayout, run_distributed

__all__ = ["DistributedTestError", "ParallelLayout", "run_distributed"]
