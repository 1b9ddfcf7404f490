"""Vocabulary-parallel log-probs, entropy and divergences vs a float64 single-process reference."""
import pytest
import torch

from megatron_sdar.algo import (
    topk_tail_divergence,
    vocab_parallel_divergence,
    vocab_parallel_gather_logprobs,
    vocab_parallel_logprobs_entropy,
    vocab_parallel_topk,
)
from megatron_sdar.testing import run_distributed

V, N = 96, 37  # V divisible by 1, 2, 4; N not a multiple of the chunk size used below
CHUNK = 8
KINDS = ("reverse_kl", "forward_kl", "jsd")
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


# ---------------------------------------------------------------- float64 reference
def ref_logprobs_entropy(logits, targets):
    lsm = torch.log_softmax(logits, -1)
    p = lsm.exp()
    ent = -torch.where(p > 0, p * lsm, torch.zeros((), dtype=lsm.dtype)).sum(-1)
    return lsm.gather(-1, targets[..., None]).squeeze(-1), ent


def ref_divergence_of_logprobs(ls, lt, kind):
    ps, pt = ls.exp(), lt.exp()
    if kind == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    if kind == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    lm = torch.logaddexp(ls, lt) - torch.log(torch.tensor(2.0, dtype=ls.dtype))
    return 0.5 * (ps * (ls - lm) + pt * (lt - lm)).sum(-1)


def ref_divergence(student, teacher, kind):
    return ref_divergence_of_logprobs(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), kind)


def ref_topk_tail(student, t_lp, t_ids, kind, eps=1e-6):
    s_lp = torch.log_softmax(student, -1).gather(-1, t_ids)

    def tail(lp):
        return torch.cat([lp, torch.log((1 - lp.exp().sum(-1, keepdim=True)).clamp_min(eps))], -1)

    return ref_divergence_of_logprobs(tail(s_lp), tail(t_lp.double()), kind)


def make_inputs(dtype_name, seed=0):
    """Global logits with peaked and flat rows, and targets on shard boundaries."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    student = 3 * torch.randn(N, V, generator=gen)
    teacher = student + torch.randn(N, V, generator=gen)
    student[0] = 0.0  # perfectly flat
    student[1, 5] = 300.0  # very peaked
    teacher[2] = -teacher[2]
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:8] = torch.tensor([0, V // 4 - 1, V // 4, V // 2 - 1, V // 2, 3 * V // 4, V - 1, 5])
    w_lp, w_ent, w_div = (torch.randn(N, generator=gen) for _ in range(3))
    return student.to(dtype), teacher.to(dtype), targets, w_lp, w_ent, w_div


def _compute_all(dtype_name, tp_group, tp_rank, tp_size, device="cpu", kernel="eager"):
    """Every op on this rank's shard with the chunk kernels of ``kernel``; returns values and the
    gradient shards (float64, on CPU)."""
    student, teacher, targets, w_lp, w_ent, w_div = (t.to(device) for t in make_inputs(dtype_name))
    shard = slice(tp_rank * V // tp_size, (tp_rank + 1) * V // tp_size)
    out = {}
    s = student[:, shard].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(s, targets, tp_group, chunk_size=CHUNK, kernel=kernel)
    (lp * w_lp + ent * w_ent).sum().backward()
    out["logprobs"], out["entropy"], out["grad_lp_ent"] = lp.double(), ent.double(), s.grad.double()
    t_lp, t_ids = vocab_parallel_topk(teacher[:, shard], 5, tp_group, chunk_size=CHUNK)
    out["topk_lp"], out["topk_ids"] = t_lp.double(), t_ids
    for kind in KINDS:
        s = student[:, shard].clone().requires_grad_(True)
        div = vocab_parallel_divergence(s, teacher[:, shard], kind, tp_group, chunk_size=CHUNK, kernel=kernel)
        (div * w_div).sum().backward()
        out[f"div_{kind}"], out[f"grad_div_{kind}"] = div.double(), s.grad.double()
        s = student[:, shard].clone().requires_grad_(True)
        div = topk_tail_divergence(s, t_lp, t_ids, kind, tp_group, chunk_size=CHUNK, kernel=kernel)
        (div * w_div).sum().backward()
        out[f"topk_{kind}"], out[f"grad_topk_{kind}"] = div.double(), s.grad.double()
    return {k: v.detach().cpu() for k, v in out.items()}


def _tp_worker(dtype_name, kernel="eager"):
    from megatron.core import parallel_state as ps

    return _compute_all(dtype_name, ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                        ps.get_tensor_model_parallel_world_size(), kernel=kernel)


def _assert_close(got, ref, tol, what):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = ((got - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol}"


def _check_against_reference(per_rank, dtype_name):
    student, teacher, targets, w_lp, w_ent, w_div = make_inputs(dtype_name)
    s64, t64 = student.double(), teacher.double()
    tol = TOL[dtype_name]
    for r in per_rank:  # every TP rank returns the same values
        ref_lp, ref_ent = ref_logprobs_entropy(s64, targets)
        _assert_close(r["logprobs"], ref_lp, tol, "logprobs")
        _assert_close(r["entropy"], ref_ent, tol, "entropy")
        ref_top_lp, ref_top_ids = torch.log_softmax(t64, -1).topk(5, -1)
        _assert_close(r["topk_lp"], ref_top_lp, tol, "topk logprobs")
        for kind in KINDS:
            _assert_close(r[f"div_{kind}"], ref_divergence(s64, t64, kind), tol, kind)
    # gradient shards concatenated over the vocabulary = gradient of the one loss
    x = s64.clone().requires_grad_(True)
    lp, ent = ref_logprobs_entropy(x, targets)
    (lp * w_lp + ent * w_ent).sum().backward()
    _assert_close(torch.cat([r["grad_lp_ent"] for r in per_rank], -1), x.grad, tol, "grad logprobs+entropy")
    t_lp, t_ids = per_rank[0]["topk_lp"], per_rank[0]["topk_ids"]
    if dtype_name == "float32":
        assert torch.equal(t_ids, ref_top_ids)
    for kind in KINDS:
        x = s64.clone().requires_grad_(True)
        (ref_divergence(x, t64, kind) * w_div).sum().backward()
        _assert_close(torch.cat([r[f"grad_div_{kind}"] for r in per_rank], -1), x.grad, tol, f"grad {kind}")
        x = s64.clone().requires_grad_(True)
        ref = ref_topk_tail(x, t_lp, t_ids, kind)
        (ref * w_div).sum().backward()
        for r in per_rank:
            _assert_close(r[f"topk_{kind}"], ref, tol, f"topk {kind}")
        _assert_close(torch.cat([r[f"grad_topk_{kind}"] for r in per_rank], -1), x.grad, tol,
                      f"grad topk {kind}")


@pytest.mark.parametrize("kernel", ["eager", "compile"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_single_process_matches_float64_reference(dtype_name, kernel):
    _check_against_reference([_compute_all(dtype_name, None, 0, 1, kernel=kernel)], dtype_name)


def test_kernel_is_an_objective_field():
    """``algo.kernel`` chooses the chunk kernels (no environment variable): the objective runs the
    compiled ones under ``compile`` (and nothing compiled under ``eager``), with the same loss and
    gradient; a bad value is refused."""
    from megatron_sdar.algo import fused_kernels
    from megatron_sdar.algo.objective import ObjectiveInputs, SDARObjective, preset

    assert preset("sdar").kernel == "eager" and preset("sdar", kernel="compile").kernel == "compile"
    gen = torch.Generator().manual_seed(5)
    logits, targets = torch.randn(2, 6, V, generator=gen), torch.randint(0, V, (2, 6), generator=gen)
    fused_kernels._compiled.cache_clear()
    results = {}
    for kernel in ("eager", "compile"):
        x = logits.clone().requires_grad_(True)
        objective = SDARObjective(preset("grpo", kl_coef=0.0, entropy_coef=0.1, kernel=kernel))
        loss, _ = objective(ObjectiveInputs(student_logits=x, targets=targets, mask=torch.ones(2, 6),
                                            advantages=torch.tensor([1.0, -1.0])))
        loss.backward()
        results[kernel] = (loss.detach(), x.grad, fused_kernels._compiled.cache_info().currsize)
    assert results["eager"][2] == 0 and results["compile"][2] == 2  # log-sum-exp statistics and their gradient
    torch.testing.assert_close(results["compile"][0], results["eager"][0])
    torch.testing.assert_close(results["compile"][1], results["eager"][1])
    with pytest.raises(ValueError, match=r"objective.kernel must be one of \('eager', 'compile', 'triton'\)"):
        preset("sdar", kernel="1")
    with pytest.raises(ValueError, match="kernel must be one of"):
        vocab_parallel_logprobs_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), kernel="fused")


def _triton_interpreted(dtype_name: str) -> dict:
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before triton's @jit runs
    from megatron_sdar.algo import triton_kernels

    assert triton_kernels.block_size(V) * 2 < V  # several vocabulary blocks per row: the combine is exercised
    return _compute_all(dtype_name, None, 0, 1, kernel="triton")


@pytest.mark.multiproc
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_triton_kernels_match_float64_reference_under_the_interpreter(dtype_name):
    """The Triton kernels (rows x vocabulary-block grid) on CPU through TRITON_INTERPRET=1, in a
    fresh process (the interpreter must be on before the kernels are defined)."""
    per_rank = run_distributed(_triton_interpreted, world_size=1, args=(dtype_name,), init="none", timeout=600)
    _check_against_reference(per_rank, dtype_name)


@pytest.mark.multiproc
@pytest.mark.slow
def test_triton_kernels_under_tensor_parallelism():
    per_rank = run_distributed(_tp_worker, world_size=2, tp=2, args=("float32", "triton"), timeout=600,
                               env={"TRITON_INTERPRET": "1"})
    _check_against_reference(per_rank, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_cuda_matches_float64_reference(dtype_name):
    _check_against_reference([_compute_all(dtype_name, None, 0, 1, device="cuda")], dtype_name)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_float64_reference(tp):
    per_rank = run_distributed(_tp_worker, world_size=tp, tp=tp, args=("float32",))
    _check_against_reference(per_rank, "float32")
    if tp == 2:
        per_rank = run_distributed(_tp_worker, world_size=tp, tp=tp, args=("bfloat16",))
        _check_against_reference(per_rank, "bfloat16")
        # the fused (torch.compile) kernels combine per-rank statistics differently: check them too
        per_rank = run_distributed(_tp_worker, world_size=tp, tp=tp, args=("float32", "compile"))
        _check_against_reference(per_rank, "float32")


def test_topk_tail_is_exact_when_tail_is_empty_and_a_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    t_lp, t_ids = vocab_parallel_topk(teacher, 16)
    for kind in KINDS:
        full = vocab_parallel_divergence(student, teacher, kind)
        torch.testing.assert_close(topk_tail_divergence(student, t_lp, t_ids, kind, eps=1e-12), full,
                                   atol=1e-5, rtol=1e-5)
        t_lp4, t_ids4 = vocab_parallel_topk(teacher, 4)
        assert (topk_tail_divergence(student, t_lp4, t_ids4, kind) <= full + 1e-6).all()


def test_minus_inf_logits_and_extremes_never_give_nan():
    logits = torch.tensor([[0.0, float("-inf"), 2.0, 1.0], [1e4, -1e4, 0.0, 0.0], [0.0] * 4])
    logits.requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(logits, torch.tensor([0, 0, 3]))
    assert lp[1].item() == pytest.approx(0.0) and lp[0].isfinite() and lp[2].item() == pytest.approx(-1.3862944)
    assert torch.isfinite(ent).all() and ent[2].item() == pytest.approx(1.3862944)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    teacher = torch.tensor([[0.0, float("-inf"), 2.0, 1.0], [0.0, 0.0, 1e4, 0.0], [1.0] * 4])
    for kind in KINDS:
        s = logits.detach().clone().requires_grad_(True)
        div = vocab_parallel_divergence(s, teacher, kind)
        div.sum().backward()
        assert torch.isfinite(div).all() and torch.isfinite(s.grad).all(), kind


def test_invalid_inputs_raise_clear_errors():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets holds ids outside"):
        vocab_parallel_logprobs_entropy(logits, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="targets has shape"):
        vocab_parallel_logprobs_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets must hold integer"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="logits must be floating point"):
        vocab_parallel_logprobs_entropy(logits.long(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_logits shape"):
        vocab_parallel_divergence(logits, torch.randn(4, 11))
    with pytest.raises(ValueError, match="kind must be one of"):
        vocab_parallel_divergence(logits, logits, "tv")
    with pytest.raises(ValueError, match="indices holds ids outside"):
        vocab_parallel_gather_logprobs(logits, torch.full((4, 2), -1))
