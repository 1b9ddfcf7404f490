"""GRPO pieces, gates, aggregation and the full objective, exact under TP, CP and DP."""
import math

import pytest
import torch

from megatron_sdar.algo import (
    PRESETS,
    LossNormalizers,
    ObjectiveInputs,
    ParallelGroups,
    SDARObjective,
    aggregate,
    compute_gate,
    gated_distillation,
    group_advantages,
    kl_penalty,
    ppo_clip_loss,
    preset,
    truncated_is_weights,
    vocab_parallel_topk,
)
from megatron_sdar.testing import run_distributed


# ------------------------------------------------------------------ hand-checked pieces
def test_group_advantages_hand_checked():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, groups, eps=0.0)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0]  # identical rewards, and a group of one
    torch.testing.assert_close(group_advantages(rewards, groups, norm_by_std=False)[:4],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_ppo_clip_loss_hand_checked():
    lp_old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped, approx_kl = ppo_clip_loss(lp, lp_old, adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -1.1, 1.5]]))
    assert clipped.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(approx_kl, -lp)
    loss_high, _, _ = ppo_clip_loss(lp, lp_old, adv, 0.2, 0.28)  # clip-higher
    assert loss_high[0, 0].item() == pytest.approx(-1.28)
    loss_dual, _, _ = ppo_clip_loss(torch.log(torch.tensor([[5.0]])), torch.zeros(1, 1),
                                    torch.tensor([[-1.0]]), dual_clip=3.0)
    assert loss_dual.item() == pytest.approx(3.0)


def test_kl_estimators_and_tis_hand_checked():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl_penalty(lp, lp, "k3").item() == 0.0
    w = truncated_is_weights(torch.tensor([0.0, 0.0]), torch.tensor([-3.0, 0.5]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, math.exp(-0.5)]))
    with pytest.raises(ValueError, match="kl estimator"):
        kl_penalty(lp, ref, "k4")


def test_aggregation_modes_hand_checked():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    norm = LossNormalizers.from_mask(mask)
    assert (norm.num_tokens, norm.num_sequences) == (3.0, 3.0)
    assert aggregate(values, mask, "token-mean", norm).item() == pytest.approx(7 / 3)
    assert aggregate(values, mask, "seq-mean-token-sum", norm).item() == pytest.approx(7 / 3)
    assert aggregate(values, mask, "seq-mean-token-mean", norm).item() == pytest.approx((1.5 + 4) / 3)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregate(values, mask, "sum", norm)
    with pytest.raises(ValueError, match="mask has shape"):
        aggregate(values, mask[:, :2], "token-mean", norm)


def test_gates_and_gated_distillation():
    gap = torch.tensor([[0.0, 1.0, -1.0]])
    torch.testing.assert_close(compute_gate(gap, "gap", 5.0), torch.sigmoid(5 * gap))
    ent = torch.tensor([[0.5, 1.0, 3.0]])
    g_ent = torch.sigmoid(5 * (ent - 1.0))
    torch.testing.assert_close(compute_gate(gap, "entropy", entropy=ent), g_ent)
    torch.testing.assert_close(compute_gate(gap, "soft_or", entropy=ent),
                               1 - (1 - torch.sigmoid(5 * gap)) * (1 - g_ent))
    assert compute_gate(gap, "none").tolist() == [[1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="needs the student entropy"):
        compute_gate(gap, "entropy")

    student = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -2.5, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = gated_distillation(student, teacher, mask, beta=5.0)
    g = torch.sigmoid(5 * (teacher - student.detach()))
    assert loss.item() == pytest.approx(float((g * (teacher - student.detach()))[0, :3].sum() / 3))
    loss.backward()
    torch.testing.assert_close(student.grad, -g * mask / 3)  # gradient -g * grad lpS, token-mean
    gaps = torch.tensor([0.5, -0.5, 0.0])
    assert metrics["sdar/gap_mean"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["sdar/gap_std"] == pytest.approx(float(gaps.std(unbiased=False)))
    assert metrics["sdar/gate_mean"] == pytest.approx(float(torch.sigmoid(5 * gaps).mean()))
    assert metrics["sdar/gate_active_ratio"] == pytest.approx(1 / 3)  # only gap 0.5 has g > 0.5

    empty, m_empty = gated_distillation(student, teacher, torch.zeros(1, 4))
    assert empty.item() == 0.0 and all(v == 0.0 for v in m_empty.values())
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        gated_distillation(student, teacher[:, :2], mask)


def test_presets_exist_and_validate():
    assert set(PRESETS) == {"grpo", "opsd", "grpo_opsd", "sdar", "sdar_full", "skill_grpo", "rlsd", "skill_sd",
                            "hdpo"}
    assert all(p.summary and p.source for p in PRESETS.values())
    assert preset("grpo").distill_coef == 0.0 and not preset("grpo").needs_teacher
    sdar = preset("sdar")
    assert (sdar.distill_coef, sdar.gate, sdar.gate_beta, sdar.estimator) == (0.01, "gap", 5.0, "sampled")
    assert preset("sdar_full").estimator == "full" and preset("skill_grpo").student_sees_skills
    opsd = preset("grpo_opsd")  # the release: the SDAR loss with beta = 0
    assert (opsd.gate, opsd.gate_beta, opsd.distill_coef) == ("gap", 0.0, 0.01)
    assert compute_gate(torch.tensor([[-3.0, 0.0, 2.0]]), opsd.gate, opsd.gate_beta).tolist() == [[0.5, 0.5, 0.5]]
    rlsd = preset("rlsd")
    assert (rlsd.rlsd_coef, rlsd.rlsd_clip, rlsd.distill_coef) == (0.5, 0.2, 0.0) and rlsd.needs_teacher
    assert rlsd.rlsd_coef_at(0) == 0.5 and rlsd.rlsd_coef_at(50) == 0.25 and rlsd.rlsd_coef_at(10**6) == 0.0
    sd = preset("skill_sd")  # a fixed weight: the release logs a schedule but does not apply it
    assert (sd.distill_term, sd.distill_coef, sd.distill_coef_at(10**6)) == ("skill_sd", 0.001, 0.001)
    hdpo = preset("hdpo")
    assert (hdpo.cliff_rescue, hdpo.estimator, hdpo.topk, hdpo.divergence, hdpo.gate) == (True, "topk", 64, "jsd", "none")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("ppo")
    with pytest.raises(ValueError, match="unknown objective option"):
        preset("sdar", lamda=0.1)
    with pytest.raises(ValueError, match="objective.gate must be one of"):
        preset("sdar", gate="max")
    with pytest.raises(ValueError, match="divergence applies to estimator"):
        preset("sdar", divergence="jsd")
    with pytest.raises(ValueError, match="cannot be combined with rlsd_coef"):
        preset("hdpo", rlsd_coef=0.5)
    with pytest.raises(ValueError, match="sampled-token term"):
        preset("skill_sd", estimator="full")


def test_hdpo_distills_only_on_its_distillation_tokens():
    """With ``distill_mask`` the RL terms see ``mask`` and the distillation term ``distill_mask``
    (its own normalizer); without teacher values (no rescue) the loss is GRPO's exactly."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 8, generator=gen)
    targets = torch.randint(0, 8, (2, 4), generator=gen)
    rl = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    distill = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    base = dict(targets=targets, mask=rl, advantages=torch.tensor([1.0, 0.0]))
    topk_lp, topk_ids = vocab_parallel_topk(logits + torch.randn(2, 4, 8, generator=gen), 3)
    hdpo = SDARObjective(preset("hdpo", topk=3, kl_coef=0.0))
    grpo = SDARObjective(preset("grpo", kl_coef=0.0))
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_h, metrics = hdpo(ObjectiveInputs(student_logits=z1, **base), LossNormalizers.from_mask(rl))
    loss_g, _ = grpo(ObjectiveInputs(student_logits=z2, **base), LossNormalizers.from_mask(rl))
    (loss_h + 0 * z1.sum()).backward()
    loss_g.backward()
    assert loss_h.item() == loss_g.item() and torch.equal(z1.grad, z2.grad) and "sdar/distill_loss" not in metrics
    z = logits.clone().requires_grad_(True)
    loss, metrics = hdpo(ObjectiveInputs(student_logits=z, teacher_logprobs=torch.zeros(2, 4),
                                         teacher_topk_logprobs=topk_lp, teacher_topk_ids=topk_ids,
                                         distill_mask=distill, **base),
                         LossNormalizers.from_mask(rl), 0, LossNormalizers.from_mask(distill))
    loss.backward()
    assert z.grad[1, :2].abs().sum() > 0 and z.grad[1, 2:].abs().sum() == 0  # only distillation tokens
    assert metrics["sdar/distill_loss"] > 0 and metrics["sdar/gate_mean"] == 1.0


# -------------------------------------------------------- objective under TP / CP / DP
B, T, V = 4, 8, 32
CONFIGS = {
    "sdar_sampled": dict(name="sdar", loss_agg="token-mean"),
    "sdar_full_rkl": dict(name="sdar", estimator="full", loss_agg="seq-mean-token-mean", gate="soft_or"),
    "sdar_topk_jsd": dict(name="sdar", estimator="topk", topk=4, divergence="jsd", loss_agg="seq-mean-token-sum"),
    "rlsd_tis": dict(name="rlsd", tis_cap=2.0, entropy_coef=0.01, gate="entropy", distill_coef=0.02,
                     loss_agg="seq-mean-token-mean"),
    "opsd_fkl": dict(name="opsd", estimator="full", divergence="forward_kl"),
    "rlsd": dict(name="rlsd"),
    "skill_sd": dict(name="skill_sd", distill_coef=0.5),
    "grpo_opsd": dict(name="grpo_opsd"),
    "hdpo": dict(name="hdpo", topk=4),
}


def _objective_batch():
    gen = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(B, T, V, generator=gen)
    teacher_logits = logits + torch.randn(B, T, V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    mask[2] = 0.0  # a sequence with no trained token
    distill_mask = torch.zeros(B, T)
    distill_mask[2, 1:] = 1.0  # HDPO: a rescue turn
    distill_mask[0, :3] = 1.0
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    t_lp = torch.log_softmax(teacher_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    topk_lp, topk_ids = vocab_parallel_topk(teacher_logits, 4)
    return dict(
        student_logits=logits, teacher_logits=teacher_logits, targets=targets, mask=mask,
        advantages=torch.randn(B, generator=gen),
        old_logprobs=lp + 0.1 * torch.randn(B, T, generator=gen),
        ref_logprobs=lp + 0.2 * torch.randn(B, T, generator=gen),
        rollout_logprobs=lp + 0.3 * torch.randn(B, T, generator=gen),
        teacher_logprobs=t_lp, teacher_topk_logprobs=topk_lp, teacher_topk_ids=topk_ids, distill_mask=distill_mask,
    )


def _slice(batch, seqs, positions, vocab):
    out = {}
    for k, v in batch.items():
        v = v[seqs] if k == "advantages" else v[seqs][:, positions]
        if k in ("student_logits", "teacher_logits"):
            v = v[..., vocab]
        out[k] = v.clone()
    return out


def _run_objective(groups, seqs_per_microbatch, positions, vocab):
    """Every config on this rank's data: summed loss contributions, metrics, logits gradients."""
    batch = _objective_batch()
    results = {}
    for key, cfg in CONFIGS.items():
        cfg = dict(cfg)
        objective = SDARObjective(preset(cfg.pop("name"), **cfg), groups)
        all_seqs = torch.cat(seqs_per_microbatch)
        normalizers = LossNormalizers.from_mask(batch["mask"][all_seqs][:, positions], groups.dp_cp, groups.cp)
        hdpo = objective.config.cliff_rescue
        distill = LossNormalizers.from_mask(batch["distill_mask"][all_seqs][:, positions], groups.dp_cp, groups.cp)
        total, grads, metrics = 0.0, [], None
        for seqs in seqs_per_microbatch:  # micro-batches share the step's normalizers
            mb = _slice(batch, seqs, positions, vocab)
            if not hdpo:
                mb.pop("distill_mask")
            mb["student_logits"].requires_grad_(True)
            loss, metrics = objective(ObjectiveInputs(**mb), normalizers, step=3,
                                      distill_normalizers=distill if hdpo else None)
            loss.backward()
            total += loss.item()
            grads.append(mb["student_logits"].grad.detach())
        results[key] = dict(loss=total, metrics=metrics, grad=torch.cat(grads))
    return results


def _distributed_objective_worker():
    from megatron.core import parallel_state as ps

    groups = ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
    )
    from megatron_sdar.utils.distributed import cp_token_indices

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    my_seqs = torch.arange(B).chunk(dp)[dp_rank]
    microbatches = list(my_seqs.chunk(2))  # two micro-batches per rank
    positions = cp_token_indices(T, cp, cp_rank)
    vocab = torch.arange(tp_rank * V // tp, (tp_rank + 1) * V // tp)
    out = _run_objective(groups, microbatches, positions, vocab)
    # metrics are global means per micro-batch: compare them with one micro-batch per rank
    metrics = {k: v["metrics"] for k, v in _run_objective(groups, [my_seqs], positions, vocab).items()}
    return dict(out=out, metrics=metrics, seqs=my_seqs, positions=positions, vocab=vocab, tp_rank=tp_rank)


@pytest.mark.multiproc
@pytest.mark.parametrize("world,tp,cp", [(2, 2, 1), (2, 1, 2), (2, 1, 1), (4, 2, 2)],
                         ids=["tp2", "cp2", "dp2", "tp2xcp2"])
def test_objective_matches_single_process_under_parallelism(world, tp, cp):
    reference = _run_objective(ParallelGroups(), [torch.arange(B)], torch.arange(T), torch.arange(V))
    ranks = run_distributed(_distributed_objective_worker, world_size=world, tp=tp, cp=cp)
    for key, ref in reference.items():
        # one TP rank per (dp, cp) position contributes to the loss: TP ranks hold the same value
        loss = sum(r["out"][key]["loss"] for r in ranks if r["tp_rank"] == 0)
        assert loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), key
        for r in ranks:
            for name in ("sdar/gate_mean", "sdar/gap_mean", "sdar/gap_std", "actor/kl_ref", "rlsd/coef",
                         "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "skill_sd/rho_mean"):
                if name in ref["metrics"]:
                    assert r["metrics"][key][name] == pytest.approx(ref["metrics"][name], rel=1e-5,
                                                                          abs=1e-6), (key, name)
        grad = torch.zeros_like(ref["grad"])
        for r in ranks:
            grad[r["seqs"][:, None, None], r["positions"][None, :, None], r["vocab"][None, None, :]] = \
                r["out"][key]["grad"]
        err = (grad - ref["grad"]).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref["grad"].abs().max().item()), (key, err)
        assert ref["grad"].abs().sum() > 0, key
