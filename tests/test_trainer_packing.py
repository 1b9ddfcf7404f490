"""Sequence packing: samples packed into token-budget micro-batches (block-diagonal causal masks in
the local spec's attention, context parallelism included) give the loss, metrics, gradients and
updated weights of the padded path (at TP=2, PP=2, CP=2, DP=2 and TP=2xPP=2:
tests/test_trainer_equivalence.py::test_sdar_step_equal_on_every_layout)."""
import pytest

from megatron_sdar.testing import run_distributed
from megatron_sdar.trainer.batch import plan_pass

COMPARED = ["actor/loss", "actor/pg_loss", "sdar/distill_loss", "actor/kl_ref", "actor/entropy",
            "sdar/gate_mean", "sdar/gap_mean", "actor/grad_norm", "rollout/train_infer_logprob_diff_mean"]
BUDGET = 96  # tokens per micro-batch: two 48-token rows, each holding one to three samples


def test_plan_places_every_sample_once_with_the_same_shape_on_every_rank():
    lengths = [13, 41, 7, 22, 30, 5, 18, 40, 9, 27, 33, 12]
    for dp in (1, 2, 3):
        plans = [plan_pass(lengths, 4, dp, r, micro_batch_tokens=BUDGET, micro_batch_multiple=2) for r in range(dp)]
        placed = sorted(i for p in plans for rows in p.rows for row in rows for i in row)
        assert placed == list(range(len(lengths)))
        shapes = {(p.micro_batch_size, p.num_micro_batches, len(p.rows), p.padded_tokens) for p in plans}
        assert len(shapes) == 1 and plans[0].num_micro_batches % 2 == 0  # Megatron needs one count
        for p in plans:
            assert p.micro_batch_size * 48 <= BUDGET and len(p.seq_lens) == p.num_micro_batches
            for rows, length in zip(p.rows, p.seq_lens):  # each micro-batch as long as its longest row
                fills = [sum(lengths[i] for i in row) for row in rows]
                assert length % 8 == 0 and max(fills) <= length <= 48 and length - max(fills) < 8
        assert plans[0].real_tokens == sum(lengths)
        uniform = plan_pass(lengths, 4, dp, 0, micro_batch_tokens=BUDGET, uniform_seq_len=True)  # pipeline stages
        assert set(uniform.seq_lens) == {48}
    one = plan_pass(lengths, 4, 1, 0, micro_batch_tokens=BUDGET)
    padded = plan_pass(lengths, 4, 1, 0)
    assert one.padded_tokens / one.real_tokens < 1.2 < padded.padded_tokens / padded.real_tokens
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1"):
        plan_pass(lengths, 4, 1, 0, micro_batch_tokens=0)


def test_packed_mask_is_block_diagonal_causal():
    import torch

    from megatron_sdar.trainer.batch import packed_attention_mask

    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    visible = ~packed_attention_mask(seg)[0, 0]
    assert visible.tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [False, False, True, False, False, False],
        [False, False, True, True, False, False],
        [False, False, True, True, True, False],
        [False, False, False, False, False, True],
    ]


def _step(model_dir: str, packed: bool, parallel: dict, loss_agg: str):
    import torch.distributed as dist

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.trainer.launch import transformer_overrides
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate
    from megatron_sdar.utils.parallel_dims import ParallelDims

    from tests.test_trainer_equivalence import _samples, _train

    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0), hf_dir=model_dir,
                          **transformer_overrides(ParallelDims(**parallel)))
    updater = PolicyUpdate(policy, preset("sdar", kl_coef=0.01, loss_agg=loss_agg), micro_batch_size=2, pad_id=0,
                           reference_dir=lambda: model_dir, micro_batch_tokens=BUDGET if packed else None)
    metrics = _train(updater, _samples(arch.vocab_size), 0)
    metrics.update(updater.pass_metrics())
    weights = {name: t.numpy().copy() for name, t in iter_hf_weights(policy.model, arch, target="first")}
    return {"metrics": metrics, "weights": weights if dist.get_rank() == 0 else None}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("packing") / "qwen2", "qwen2", num_hidden_layers=4))


def _check(got: dict, want: dict, label: str) -> None:
    for key in COMPARED:
        assert abs(got["metrics"][key] - want["metrics"][key]) <= 1e-5 * max(1.0, abs(want["metrics"][key])), \
            (label, key, got["metrics"][key], want["metrics"][key])
    if got["weights"] is not None:
        for name, expected in want["weights"].items():
            assert float(abs(got["weights"][name] - expected).max()) <= 1e-6, (label, name)


@pytest.mark.multiproc
@pytest.mark.parametrize("loss_agg", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow)])
def test_packed_step_equals_padded_step(tiny_model, loss_agg):
    """At 1 process for both aggregations; seq-mean-token-mean (per-sample sums over packed rows)
    also at CP=2, where a sample's tokens are split over ranks. TP=2, PP=2, CP=2, DP=2 and TP=2xPP=2
    with token-mean: tests/test_trainer_equivalence.py::test_sdar_step_equal_on_every_layout."""
    padded = run_distributed(_step, world_size=1, args=(tiny_model, False, {}, loss_agg), timeout=300)[0]
    packed = run_distributed(_step, world_size=1, args=(tiny_model, True, {}, loss_agg), timeout=300)[0]
    _check(packed, padded, "packed 1 process")
    real, computed = packed["metrics"]["perf/student_real_tokens"], packed["metrics"]["perf/student_padded_tokens"]
    assert computed / real < padded["metrics"]["perf/student_padded_tokens"] / real  # packing removed padding
    layouts = [("cp2", 2, dict(cp=2))] if loss_agg != "token-mean" else []
    for label, world, sizes in layouts:
        results = run_distributed(_step, world_size=world, **sizes, timeout=300, env={"OMP_NUM_THREADS": "1"},
                                  args=(tiny_model, True, sizes, loss_agg))
        for rank, result in enumerate(results):
            _check(result, padded, f"packed {label} rank {rank}")


def test_thd_packed_seq_params_cut_rows_into_samples_and_padding():
    """The Transformer Engine wiring (GPU-only path; its forward is the gpu-marked test below):
    rows laid end to end, one sequence per sample and one per row's trailing padding."""
    import torch

    from megatron_sdar.trainer.batch import thd_packed_seq_params

    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1],
                             [2, 2, 2, 2, 2, 2, 2, 2],
                             [-1, -1, -1, -1, -1, -1, -1, -1]])
    params = thd_packed_seq_params(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 8, 16, 24] == params.cu_seqlens_kv.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == params.max_seqlen_kv == 8


def _te_packed_vs_padded(model_dir: str) -> dict:
    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.precision import resolve_precision
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate

    from tests.test_trainer_equivalence import _samples, _train

    arch = QwenArchitecture.from_hf_config(model_dir)
    out = {}
    for packed in (False, True):
        policy = build_policy(arch, OptimConfig(lr=1e-3, clip_grad=0.0), hf_dir=model_dir,
                              precision=resolve_precision("bfloat16", None))
        assert policy.uses_transformer_engine
        updater = PolicyUpdate(policy, preset("sdar", kl_coef=0.01), micro_batch_size=2, pad_id=0,
                               reference_dir=lambda: model_dir, micro_batch_tokens=BUDGET if packed else None)
        out[packed] = _train(updater, _samples(arch.vocab_size), 0)
    return out


@pytest.mark.gpu
def test_transformer_engine_thd_packed_step_matches_padded_on_gpu(tiny_model):
    result = run_distributed(_te_packed_vs_padded, world_size=1, args=(tiny_model,), timeout=600)[0]
    for key in ("actor/loss", "sdar/gate_mean", "actor/grad_norm"):
        assert abs(result[True][key] - result[False][key]) <= 2e-2 * max(1.0, abs(result[False][key])), key


def _without_kl(model_dir: str) -> dict:
    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate

    from tests.test_trainer_equivalence import _samples, _train

    def no_reference():
        raise AssertionError("the reference model was asked for")

    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(lr=1e-3), hf_dir=model_dir)
    updater = PolicyUpdate(policy, preset("sdar", kl_coef=0.0), micro_batch_size=2, pad_id=0,
                           reference_dir=no_reference, micro_batch_tokens=BUDGET)
    try:  # a teacher objective without the samples' teacher batch is refused before any pass
        updater.train_on(_samples(arch.vocab_size), 0)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    metrics = _train(updater, _samples(arch.vocab_size), 0)
    return {"refused": refused, "passes": sorted(k for k in updater.pass_metrics() if k.endswith("_seconds")),
            "reference_built": updater.reference is not None, "kl_logged": "actor/kl_ref" in metrics}


@pytest.mark.multiproc
def test_no_reference_pass_without_a_kl_term(tiny_model):
    result = run_distributed(_without_kl, world_size=1, args=(tiny_model,), timeout=300)[0]
    assert "no teacher batch" in result.pop("refused")
    assert result == {"passes": ["perf/optimizer_seconds", "perf/student_seconds", "perf/teacher_seconds"],
                      "reference_built": False, "kl_logged": False}


def test_metric_means_over_no_tokens_are_omitted():
    """A micro-batch mean weighted by a token count that is 0 over the whole step (a random model's
    rollout with no action token) is left out of the step's metrics, not reported as 0 (an action
    entropy of 0 raised the collapse warning)."""
    from megatron_sdar.trainer.loop import collapse_warning
    from megatron_sdar.trainer.passes import MetricAccumulator

    none = MetricAccumulator()
    none.add({"actor/entropy": 2.0, "actor/action_entropy": 0.0}, {"tokens": 10.0, "action": 0.0})
    result = none.result()
    assert result == {"actor/entropy": 2.0}
    assert collapse_warning({**result, "rollout/success_rate": 0.0, "rollout/success_contrast_groups": 0.0}) is None
    some = MetricAccumulator()
    some.add({"actor/action_entropy": 0.0}, {"action": 0.0})
    some.add({"actor/action_entropy": 0.05}, {"action": 4.0})
    assert some.result() == {"actor/action_entropy": pytest.approx(0.05)}
    assert "collapsing" in collapse_warning({**some.result(), "rollout/success_rate": 0.0,
                                             "rollout/success_contrast_groups": 0.0})
