"""Text environments for SDAR: the built-in household world, ALFWorld, WebShop, Search-QA, and
TextWorld Commonsense and CookingWorld (TextWorldExpress).

    from megatron_sdar.envs import make
    env = make("household", seed=0)
    observation, info = env.reset(seed=1)                 # split="train" | "validation" | "test"
    observation, reward, terminated, truncated, info = env.step("go to fridge 1")
"""
from megatron_sdar.envs.base import (
    Demonstration,
    INVALID_ACTION_FEEDBACK,
    REQUIRED_INFO_KEYS,
    SPLITS,
    EnvError,
    EnvOptionError,
    EnvironmentFailure,
    StepResult,
    TextEnv,
    normalize_command,
)
from megatron_sdar.envs.batch import EnvBatch
from megatron_sdar.envs.registry import (available_envs, check_options, env_class, has_demonstrations, make,
                                         register)

__all__ = [
    "Demonstration", "INVALID_ACTION_FEEDBACK", "REQUIRED_INFO_KEYS", "SPLITS", "EnvBatch", "EnvError", "EnvOptionError",
    "EnvironmentFailure", "StepResult", "TextEnv", "available_envs", "check_options", "env_class", "has_demonstrations",
    "make", "normalize_command", "register",
]
