"""megatron-sdar: Self-Distilled Agentic RL (SDAR) on Megatron-Core."""

__version__ = "0.1.0"
