"""Build Megatron-Core's ``TransformerConfig`` and ``GPTModel`` for a :class:`QwenArchitecture`.

Must be called after Megatron's parallel state is initialized (see
:func:`megatron_sdar.utils.distributed.initialize_megatron_parallel`): the TP/PP sizes and this
rank's pipeline stage come from there.

Layer spec: Transformer Engine's when TE imports (GPU training, FP8), Megatron's local modules
otherwise (CPU). The two name a few parameters differently (TE fuses the pre-attention and
pre-MLP RMSNorm weights into ``linear_qkv`` / ``linear_fc1``); the weight mapping accepts both,
and Megatron's distributed checkpoints use the TE names for either spec, so a checkpoint written
on CPU loads with TE and vice versa.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdar.models.architecture import QwenArchitecture


def transformer_engine_available() -> bool:
    """True when megatron-core can build Transformer Engine layers in this environment."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - a broken TE install counts as absent
        return False
    return bool(HAVE_TE)


def _yarn_config_class():
    from megatron.core.transformer import TransformerConfig

    @dataclass
    class YarnTransformerConfig(TransformerConfig):
        """``TransformerConfig`` plus the YaRN fields ``GPTModel(position_embedding_type='yarn')``
        reads from its config. ``yarn_mscale``/``yarn_mscale_all_dim`` stay None so the attention
        scale is ``0.1 * ln(factor) + 1``, as in transformers' Qwen."""

        yarn_rotary_scaling_factor: float = 1.0
        yarn_original_max_position_embeddings: int = 4096
        yarn_beta_fast: float = 32.0
        yarn_beta_slow: float = 1.0
        yarn_mscale: float | None = None
        yarn_mscale_all_dim: float | None = None
        yarn_correction_range_round_to_int: bool = True

    return YarnTransformerConfig


def build_transformer_config(arch: QwenArchitecture, **kwargs: Any):
    """The Megatron ``TransformerConfig`` equivalent to ``arch`` (arguments: :func:`transformer_config_kwargs`)."""
    config_class, fields = transformer_config_kwargs(arch, **kwargs)
    return config_class(**fields)


def transformer_config_kwargs(
    arch: QwenArchitecture,
    *,
    tp: int | None = None,
    pp: int | None = None,
    cp: int | None = None,
    ep: int | None = None,
    etp: int | None = None,
    params_dtype: torch.dtype | None = None,
    initialize_weights: bool = True,
    on_cpu: bool | None = None,
    **overrides: Any,
) -> tuple[type, dict[str, Any]]:
    """The ``TransformerConfig`` class and fields equivalent to ``arch`` (what a dry run prints).

    ``tp``/``pp``/``cp``/``ep`` (expert parallel)/``etp`` (expert tensor parallel) default to
    Megatron's current parallel state (``ep=1``, ``etp=tp`` without one); ``params_dtype`` to the
    checkpoint's dtype (keeps HF -> Megatron -> HF bit-exact). ``initialize_weights=False`` skips
    the random init (weights are about to be loaded). ``on_cpu`` (default: whether the CPU shims
    are active) turns off the CUDA-only fusions. ``overrides`` go to the config verbatim
    (sequence_parallel, recompute, fp8, an aux loss for MoE training, ...).
    """
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from megatron_sdar.utils.device import cpu_shims_active, transformer_config_device_fields

    tp = ps.get_tensor_model_parallel_world_size() if tp is None else tp
    pp = ps.get_pipeline_model_parallel_world_size() if pp is None else pp
    have_state = ps.model_parallel_is_initialized()
    if cp is None:  # unlike tp/pp, callers building a config without parallel state get CP=1
        cp = ps.get_context_parallel_world_size() if have_state else 1
    if ep is None:
        ep = ps.get_expert_model_parallel_world_size() if have_state else 1
    if etp is None:
        etp = ps.get_expert_tensor_parallel_world_size() if have_state else tp
    arch.check_tensor_parallel(tp)
    arch.check_expert_parallel(ep, etp)
    if arch.num_layers % pp and "pipeline_model_parallel_layout" not in overrides:
        raise ValueError(f"num_hidden_layers={arch.num_layers} is not divisible by pipeline size {pp}")
    dtype = params_dtype or arch.torch_dtype_object()
    on_cpu = cpu_shims_active() if on_cpu is None else on_cpu
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # RoPE covers s * cp positions and slices this rank's chunks from it
        context_parallel_size=cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        perform_initialization=initialize_weights,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    if arch.moe is not None:
        kwargs.update(_moe_config_fields(arch, ep, etp))
    kwargs.update(transformer_config_device_fields(on_cpu, moe=arch.moe is not None,
                                                   te_available=transformer_engine_available()))
    config_class = TransformerConfig
    if arch.rope.kind == "yarn":
        config_class = _yarn_config_class()
        kwargs.update(
            yarn_rotary_scaling_factor=arch.rope.factor,
            yarn_original_max_position_embeddings=arch.rope.original_max_position_embeddings,
            yarn_beta_fast=arch.rope.beta_fast,
            yarn_beta_slow=arch.rope.beta_slow,
        )
    kwargs.update(overrides)
    return config_class, kwargs


def _moe_config_fields(arch: QwenArchitecture, ep: int, etp: int) -> dict[str, Any]:
    """Megatron MoE settings that reproduce transformers' Qwen3-MoE block exactly.

    Routing: softmax router in float32 (``moe_router_dtype``, as HF's ``softmax(dtype=float)``).
    HF without ``norm_topk_prob`` keeps the top-k of the full softmax: Megatron's
    ``moe_router_pre_softmax``. HF with it divides those by their sum, which equals a softmax over
    the top-k logits: Megatron's default order (top-k, then softmax). The chosen experts are the
    same either way (softmax is monotonic).

    No auxiliary loss and no token dropping (unlimited capacity), so the forward is HF's; a
    trainer that wants a load-balancing loss passes ``moe_router_load_balancing_type="aux_loss"``
    and ``moe_aux_loss_coeff=arch.moe.router_aux_loss_coef`` as overrides (neither changes the
    forward). Token dispatcher (``alltoall`` on GPU, each token goes only to the EP ranks of its
    experts) and grouped GEMM (Transformer Engine's ``TEGroupedMLP``, GPU spec only): see
    :func:`megatron_sdar.utils.device.transformer_config_device_fields`.
    """
    moe = arch.moe
    assert moe is not None
    return dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_router_topk=moe.num_experts_per_token,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def build_layer_spec(arch: QwenArchitecture, use_transformer_engine: bool | None = None):
    """Transformer Engine layer spec if available (or requested), else the local spec.

    The local spec's core attention is :class:`~megatron_sdar.models.cp_attention.
    ContextParallelDotProductAttention`: Megatron's ``DotProductAttention`` at CP=1 (identical),
    all-gather context parallelism at CP>1 (Megatron's own asserts CP=1; TE brings its own CP).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    num_experts = arch.moe.num_experts if arch.moe is not None else None
    if use_transformer_engine:
        if not transformer_engine_available():
            raise RuntimeError("use_transformer_engine=True but Transformer Engine is not importable")
        # MoE: TEGroupedMLP (one grouped GEMM over the local experts, params linear_fc1.weight{i})
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=arch.qk_norm)
    from megatron_sdar.models.cp_attention import ContextParallelDotProductAttention
    from megatron_sdar.patches import allow_sequence_parallel_torch_norm

    allow_sequence_parallel_torch_norm()
    # MoE: SequentialMLP (a loop over local experts, params local_experts.{i}.linear_fc1.weight)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec


def build_model(
    arch: QwenArchitecture,
    config=None,
    *,
    use_transformer_engine: bool | None = None,
    vocab_multiple: int = 1,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides: Any,
):
    """This rank's ``GPTModel`` chunk for ``arch`` (its pipeline stage, its TP shard).

    ``vocab_multiple``: the vocabulary is padded to a multiple of ``tp * vocab_multiple``.
    ``config`` defaults to :func:`build_transformer_config` (``config_overrides`` go there).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if config is None:
        config = build_transformer_config(arch, **config_overrides)
    elif config_overrides:
        raise TypeError("pass either config or config overrides, not both")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    rope = arch.rope
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(arch, use_transformer_engine),
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size, vocab_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="yarn" if rope.kind == "yarn" else "rope",
        rotary_base=rope.theta,
        seq_len_interpolation_factor=rope.factor if rope.kind == "linear" else None,
        vp_stage=vp_stage,
    )
    from megatron_sdar.utils.device import move_to_gpu

    return move_to_gpu(model)
