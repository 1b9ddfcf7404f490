"""The SDAR objective: vocabulary-parallel log-probs and divergences, gates, GRPO, aggregation."""
from megatron_sdar.algo.aggregation import LOSS_AGG_MODES, LossNormalizers, aggregate, masked_moments
from megatron_sdar.algo.gates import GATES, compute_gate, gated_distillation, skill_sd_distillation
from megatron_sdar.algo.grpo import (
    group_advantages,
    kl_penalty,
    ppo_clip_loss,
    rlsd_token_advantages,
    rlsd_weights,
    truncated_is_weights,
)
from megatron_sdar.algo.objective import (
    PRESETS,
    ObjectiveConfig,
    Preset,
    ObjectiveInputs,
    ParallelGroups,
    SDARObjective,
    preset,
    preset_fields,
)
from megatron_sdar.algo.vocab_parallel import (
    DIVERGENCES,
    topk_tail_divergence,
    vocab_parallel_divergence,
    vocab_parallel_gather_logprobs,
    vocab_parallel_logprobs_entropy,
    vocab_parallel_topk,
)
