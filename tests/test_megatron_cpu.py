"""megatron-core on CPU through our shims: the same weights give the same logits and gradients at
every TP/PP layout, through the real pipeline schedule."""
import os

import pytest
import torch

from megatron_sdar.testing import DistributedTestError, run_distributed

VOCAB, HIDDEN, HEADS, LAYERS, FFN, SEQ, BATCH = 128, 64, 4, 4, 128, 16, 2


def _full_param(global_name: str, shape: torch.Size) -> torch.Tensor:
    """Deterministic full (unsharded) value of a parameter from its layout-independent name."""
    gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(global_name)))
    if global_name.endswith("layer_norm_weight") or global_name.endswith("final_layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def _build_gpt_with_deterministic_weights():
    """A tiny GPTModel (local spec) whose weights do not depend on the TP/PP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        add_bias_linear=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    layer_offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + layer_offset)
            full_shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                full_shape[param.partition_dim] *= tp
            full = _full_param(".".join(parts), torch.Size(full_shape))
            if getattr(param, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
            param.copy_(full)
    return model


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    return tokens, labels


def _forward_backward(forward_only: bool):
    """Runs the real Megatron schedule; returns gathered logits (last stage) and grad statistics."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_sdar.utils.device import causal_attention_mask, current_device

    device = current_device()
    model = _build_gpt_with_deterministic_weights().to(device)
    tokens, labels = (t.to(device) for t in _batch())
    position_ids = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
    mask = causal_attention_mask(SEQ)

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        logits = model(tok, position_ids, mask)

        def loss_func(output):
            if not ps.is_pipeline_last_stage():
                return output, {}
            full_logits = gather_from_tensor_model_parallel_region(output)  # [b, s, V]
            logprobs = torch.log_softmax(full_logits.float(), dim=-1)
            nll = -logprobs.gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            loss = nll.mean()
            return loss, {"logits": full_logits.detach().clone(), "loss": loss.detach()}

        return logits, loss_func

    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([(tokens[:1], labels[:1]), (tokens[1:], labels[1:])]),
        model=[model],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    result = {}
    if ps.is_pipeline_last_stage():
        result["logits"] = torch.cat([d["logits"] for d in store]).cpu()
        result["loss"] = float(sum(d["loss"] for d in store) / len(store))
    if not forward_only:
        # Squared grad norm over the whole model: TP-sharded params summed over TP; replicated
        # ones counted on TP rank 0 only; then summed over pipeline stages.
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for p in model.parameters():
            if p.grad is None:
                continue
            if getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0:
                sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
        result["grad_norm"] = float(sq.sqrt())
    return result


@pytest.mark.gpu
@pytest.mark.multiproc
def test_gpt_on_gpu_matches_cpu_shims():
    """On a GPU machine: no shims, real CUDA; same numbers as the CPU path of the same model."""
    gpu = run_distributed(_forward_backward, world_size=1, args=(False,))[0]
    cpu = run_distributed(_forward_backward, world_size=1, args=(False,),
                          env={"MEGATRON_SDAR_FORCE_CPU": "1"})[0]
    torch.testing.assert_close(gpu["logits"], cpu["logits"], atol=1e-4, rtol=0)
    assert abs(gpu["grad_norm"] - cpu["grad_norm"]) < 1e-4 * max(1.0, cpu["grad_norm"])


def _last_stage_result(results):
    return next(r for r in reversed(results) if "logits" in r)


@pytest.mark.multiproc
def test_logits_and_grads_match_across_tp_pp_layouts():
    reference = run_distributed(_forward_backward, world_size=1, args=(False,))[0]
    assert torch.isfinite(reference["logits"]).all() and reference["grad_norm"] > 0
    for world, tp, pp in [(2, 2, 1), (2, 1, 2), (4, 2, 2)]:
        results = run_distributed(_forward_backward, world_size=world, tp=tp, pp=pp, args=(False,))
        got = _last_stage_result(results)
        torch.testing.assert_close(got["logits"], reference["logits"], atol=1e-5, rtol=0,
                                   msg=lambda m: f"tp={tp} pp={pp}: {m}")
        assert abs(got["loss"] - reference["loss"]) < 1e-5, (tp, pp)
        # grad norm is all-reduced over the model-parallel group: every rank agrees
        for r in results:
            assert abs(r["grad_norm"] - reference["grad_norm"]) < 1e-5 * max(1, reference["grad_norm"]), (tp, pp)


def _raise_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the launcher's failure handling
    return "unreachable"


def _hang_on_rank_one():
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)
    return dist.get_rank()


def _exit_without_result():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    return dist.get_rank()


@pytest.mark.multiproc
def test_launcher_reports_rank_traceback():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2[\s\S]*deliberate failure on rank 1"):
        run_distributed(_raise_on_rank_one, world_size=2, init="process_group", timeout=60)


@pytest.mark.multiproc
def test_launcher_times_out_on_hung_rank():
    import time

    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[1\] did not finish within 20s"):
        run_distributed(_hang_on_rank_one, world_size=2, init="process_group", timeout=20)
    assert time.monotonic() - start < 40


@pytest.mark.multiproc
def test_launcher_detects_rank_dying_silently():
    with pytest.raises(DistributedTestError, match=r"rank 1 exited with code 3"):
        run_distributed(_exit_without_result, world_size=2, init="process_group", timeout=60)


@pytest.mark.multiproc
def test_layout_validation():
    with pytest.raises(ValueError, match="not divisible"):
        run_distributed(_hang_on_rank_one, world_size=3, tp=2)


def _layouts_read_back():
    from megatron.core import parallel_state as ps

    from megatron_sdar.utils.distributed import initialize_megatron_parallel
    from megatron_sdar.utils.parallel_dims import ParallelDims

    initialized = ParallelDims.current()  # set up by the launcher's ParallelDims.initialize
    ps.destroy_model_parallel()
    initialize_megatron_parallel(tp=2)  # the same sizes, set up without a ParallelDims
    return initialized, ParallelDims.current()


@pytest.mark.multiproc
def test_current_layout_carries_its_flags():
    """``ParallelDims.current()`` is the layout the process was initialized with, flags included
    (what the passes plan micro-batches from); a state set up otherwise has only its sizes."""
    from megatron_sdar.utils.parallel_dims import ParallelDims

    per_rank = run_distributed(_layouts_read_back, world_size=2, tp=2, sequence_parallel=True, recompute="selective",
                               distributed_optimizer=True, timeout=120)
    for initialized, direct in per_rank:
        assert initialized == ParallelDims(tp=2, sequence_parallel=True, recompute="selective",
                                           distributed_optimizer=True)
        assert direct == ParallelDims(tp=2)


def _unpicklable_result():
    return lambda: None  # a lambda cannot be pickled, so it cannot cross processes


@pytest.mark.multiproc
def test_launcher_reports_unpicklable_result():
    with pytest.raises(DistributedTestError, match="pickle"):
        run_distributed(_unpicklable_result, world_size=1, init="process_group", timeout=60)
