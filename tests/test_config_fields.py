"""Config fields that no other test sets to a non-default value, each set through the Hydra
composition (``compose_run``) and checked where it acts, against numbers computed here from the
formulas (plain torch, float64):

* the objective's knobs (``algo.clip_low``, ``algo.entropy_gate_beta``, ``algo.entropy_gate_threshold``,
  ``algo.skill_sd_rho_cap``, ``algo.skill_sd_gap_cap``, ``algo.rlsd_clip``): loss, metrics and
  gradients of :class:`SDARObjective` on hand-built logits;
* the optimizer's (``trainer.weight_decay``, ``trainer.adam_beta1``, ``trainer.adam_beta2``): the
  Megatron optimizer the trainer builds from its launch plan, over two real steps;
* ``trainer.sft_prompt_weight``: the gradient of one SFT step (``trainer/sft.py``'s ``run_sft``)
  against the same loss computed with Hugging Face transformers;
* the rest through the main job itself (``megatron_sdar.train.main``, tiny model, real vLLM,
  household world): ``rollout.temperature`` (the ``SamplingParams`` vLLM receives),
  ``rollout.invalid_action_penalty`` (the episode rewards), ``rollout.cpu_kv_cache_gib`` (vLLM's KV
  cache), ``trainer.eval_greedy`` (which evaluations run), ``trainer.sft_lr`` and ``trainer.min_lr``
  (the learning rates applied); and ``algo=skill_grpo`` training end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_sdar.testing import TINY_RUN_OVERRIDES, run_distributed

GIB = 1 << 30


def _compose(*overrides: str):
    from megatron_sdar.config.schema import compose_run

    return compose_run(list(overrides))


# ---------------------------------------------------------------------------------------------
# the objective's knobs, on hand-built tensors

def _objective(tmp_path: Path, *overrides: str):
    from megatron_sdar.algo import SDARObjective

    cfg = _compose(f"trainer.output_dir={tmp_path / 'run'}", *overrides).objective()
    return SDARObjective(cfg), cfg


def _tokens(seed: int = 0, B: int = 2, T: int = 5, V: int = 7, scale: float = 1.0):
    """Logits [B, T, V], sampled tokens and a mask whose first position of each row is a prompt token."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, T, V, generator=g)).float()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[:, 0] = 0.0
    return logits, targets, mask


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax of the sampled tokens, float64, differentiable."""
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.double()).sum() / mask.sum()


def _run_objective(objective, logits, targets, mask, advantages, **extra):
    """The objective's loss, metrics and the gradient of the loss w.r.t. the logits."""
    from megatron_sdar.algo import ObjectiveInputs

    x = logits.clone().requires_grad_(True)
    loss, metrics = objective(ObjectiveInputs(student_logits=x, targets=targets, mask=mask, advantages=advantages,
                                              **extra))
    loss.backward()
    return float(loss.detach()), metrics, x.grad.double()


def _reference(loss_of_logprobs, logits, targets):
    """A float64 loss of the sampled-token log-probs and its gradient w.r.t. the logits."""
    y = logits.double().clone().requires_grad_(True)
    loss = loss_of_logprobs(_logprobs(y, targets))
    loss.backward()
    return float(loss.detach()), y.grad


def test_clip_low_bounds_the_ratio_of_negative_advantage_tokens(tmp_path):
    """PPO: ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``A < 0`` a token whose ratio
    fell below ``1 - clip_low`` takes the constant branch (no gradient)."""
    objective, cfg = _objective(tmp_path, "algo=grpo", "algo.clip_low=0.05", "algo.kl_coef=0")
    assert (cfg.clip_low, cfg.clip_high) == (0.05, 0.2)
    logits, targets, mask = _tokens(seed=1)
    lp = _logprobs(logits, targets).detach()
    ratio = torch.tensor([[1.0, 0.9, 0.7, 1.1, 0.97], [1.0, 0.92, 0.6, 1.25, 1.1]], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 0.5])
    old = lp - ratio.log()  # exp(lp - old) = ratio

    def pg(clip_low):
        def loss(lps):
            r, a = torch.exp(lps - old), advantages.double()[:, None]
            return _token_mean(torch.maximum(-a * r, -a * r.clamp(1 - clip_low, 1 + 0.2)), mask)
        return loss

    loss, metrics, grad = _run_objective(objective, logits, targets, mask, advantages, old_logprobs=old.float())
    want, want_grad = _reference(pg(0.05), logits, targets)
    at_default, _ = _reference(pg(0.2), logits, targets)
    # row 0 (A = -1): r = 0.9 is clipped at 0.95 (not at the default 0.8), r = 0.7 at both;
    # row 1 (A = 0.5): r = 1.25 at 1.2
    assert loss == pytest.approx(want, abs=1e-6) and metrics["actor/pg_loss"] == pytest.approx(want, abs=1e-6)
    assert abs(want - at_default) > 0.02, (want, at_default)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(3 / 8)  # 2 of 3 clipped tokens only with clip_low 0.05
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert float(grad[0, 1].abs().max()) == 0.0 and float(grad[0, 2].abs().max()) == 0.0  # clipped: no gradient


def _entropy_gate_case(tmp_path: Path, beta: float, threshold: float, *overrides: str):
    """SDAR's distillation term with the entropy gate ``g = sigmoid(beta (H - threshold))`` (A = 0,
    no KL: the loss is ``agg(g (lpT - lpS))``); returns the objective's and the reference's numbers."""
    objective, cfg = _objective(tmp_path, "algo=sdar", "algo.gate=entropy", "algo.distill_coef=1.0", "algo.kl_coef=0",
                                *overrides)
    assert (cfg.entropy_gate_beta, cfg.entropy_gate_threshold) == (beta, threshold)
    # rows at two temperatures: entropies spread around the threshold
    logits, targets, mask = _tokens(seed=2, T=6, V=9)
    logits[1] *= 0.3
    lp = _logprobs(logits, targets).detach()
    gaps = torch.linspace(-0.8, 0.8, 12, dtype=torch.float64).view(2, 6)
    teacher = lp + gaps

    def reference(b, h0):
        gate = torch.sigmoid(b * (_entropy(logits) - h0))
        distill = lambda lps: _token_mean(gate * (teacher - lps), mask)  # noqa: E731
        loss, grad = _reference(distill, logits, targets)
        return loss, grad, float(_token_mean(gate, mask))

    loss, metrics, grad = _run_objective(objective, logits, targets, mask, torch.zeros(2),
                                         teacher_logprobs=teacher.float())
    want, want_grad, want_gate = reference(beta, threshold)
    default_loss, _, default_gate = reference(5.0, 1.0)
    assert metrics["sdar/gate_mean"] == pytest.approx(want_gate, abs=1e-6)
    assert metrics["sdar/distill_loss"] == pytest.approx(want, abs=1e-6) and loss == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    return want_gate, default_gate, want, default_loss


def test_entropy_gate_beta_is_the_slope_of_the_entropy_gate(tmp_path):
    gate, default_gate, loss, default_loss = _entropy_gate_case(tmp_path, 1.5, 1.0, "algo.entropy_gate_beta=1.5")
    assert abs(gate - default_gate) > 0.02 and abs(loss - default_loss) > 1e-3, (gate, default_gate)


def test_entropy_gate_threshold_is_where_the_entropy_gate_is_one_half(tmp_path):
    gate, default_gate, loss, default_loss = _entropy_gate_case(tmp_path, 5.0, 1.8, "algo.entropy_gate_threshold=1.8")
    assert abs(gate - default_gate) > 0.05 and abs(loss - default_loss) > 1e-3, (gate, default_gate)


def _skill_sd_case(tmp_path: Path, rho_cap: float, gap_cap: float, *overrides: str):
    """Skill-SD's term ``agg(rho k3)``, ``rho = exp(min(lpS - lp_old, rho_cap))``,
    ``k3 = exp(min(lpT - lpS, gap_cap)) - 1 + (lpS - lpT)`` (A = 0, no KL)."""
    objective, cfg = _objective(tmp_path, "algo=skill_sd", "algo.kl_coef=0", *overrides)
    assert (cfg.skill_sd_rho_cap, cfg.skill_sd_gap_cap) == (rho_cap, gap_cap)
    lam = cfg.distill_coef
    logits, targets, mask = _tokens(seed=3)
    lp = _logprobs(logits, targets).detach()
    moved = torch.tensor([[0.0, 0.5, 0.05, -0.3, 0.9], [0.0, 0.2, 1.5, 0.0, -1.0]], dtype=torch.float64)
    gaps = torch.tensor([[0.0, 1.0, -0.5, 0.4, 2.5], [0.0, 0.1, 0.8, -1.2, 1.6]], dtype=torch.float64)
    old, teacher = lp - moved, lp + gaps

    def reference(rc, gc):
        def term(lps):
            rho = torch.exp((lps - old).clamp(max=rc))
            k3 = torch.exp((teacher - lps).clamp(max=gc)) - 1 + (lps - teacher)
            return _token_mean(rho * k3, mask)
        loss, _ = _reference(term, logits, targets)
        _, grad = _reference(lambda lps: lam * term(lps), logits, targets)
        rho_mean = float(_token_mean(torch.exp(moved.clamp(max=rc)), mask))
        return loss, grad, rho_mean

    _, metrics, grad = _run_objective(objective, logits, targets, mask, torch.zeros(2), old_logprobs=old.float(),
                                      teacher_logprobs=teacher.float())
    want, want_grad, want_rho = reference(rho_cap, gap_cap)
    default, _, default_rho = reference(10.0, 20.0)
    assert metrics["sdar/distill_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["skill_sd/rho_mean"] == pytest.approx(want_rho, rel=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-9)
    return want, default, want_rho, default_rho


def test_skill_sd_rho_cap_caps_the_importance_ratio(tmp_path):
    loss, default, rho, default_rho = _skill_sd_case(tmp_path, 0.1, 20.0, "algo.skill_sd_rho_cap=0.1")
    assert rho < default_rho - 0.1 and abs(loss - default) > 0.05, (rho, default_rho, loss, default)


def test_skill_sd_gap_cap_caps_the_teacher_gap_of_k3(tmp_path):
    loss, default, rho, default_rho = _skill_sd_case(tmp_path, 10.0, 0.3, "algo.skill_sd_gap_cap=0.3")
    assert rho == default_rho and loss < default - 0.5, (loss, default)


def test_rlsd_clip_bounds_the_token_weights(tmp_path):
    """RLSD: ``A_t = A ((1 - lam) + lam clip(exp(sign(A) gap), 1 - eps_w, 1 + eps_w))``, lam 0.5 at
    step 0; with the ratio at 1 the policy-gradient loss is ``agg(-A_t)``."""
    objective, cfg = _objective(tmp_path, "algo=rlsd", "algo.rlsd_clip=0.05", "algo.kl_coef=0")
    assert cfg.rlsd_clip == 0.05 and cfg.rlsd_coef == 0.5
    logits, targets, mask = _tokens(seed=4)
    lp = _logprobs(logits, targets).detach()
    gaps = torch.tensor([[0.0, 0.1, -0.1, 0.3, 0.02], [0.0, 0.1, -0.15, 0.4, -0.03]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.7])

    def pg(eps):
        a = advantages.double()[:, None]
        weights = torch.exp(torch.sign(a) * gaps).clamp(1 - eps, 1 + eps)
        token_adv = a * ((1 - 0.5) + 0.5 * weights)
        return lambda lps: _token_mean(-token_adv * torch.exp(lps - lp), mask)

    loss, metrics, grad = _run_objective(objective, logits, targets, mask, advantages, old_logprobs=lp.float(),
                                         teacher_logprobs=(lp + gaps).float())
    want, want_grad = _reference(pg(0.05), logits, targets)
    at_default, _ = _reference(pg(0.2), logits, targets)
    assert metrics["rlsd/coef"] == 0.5
    assert metrics["actor/pg_loss"] == pytest.approx(want, abs=1e-6) and loss == pytest.approx(want, abs=1e-6)
    assert abs(want - at_default) > 5e-3, (want, at_default)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the optimizer the trainer builds, and one SFT step

OPTIMIZER_OVERRIDES = ("trainer.weight_decay=0.5", "trainer.adam_beta1=0.8", "trainer.adam_beta2=0.95",
                       "trainer.lr=1e-2", "trainer.warmup_steps=0", "trainer.sft_prompt_weight=2.0")
SEEN_TOKENS = 64  # the optimizer steps' batches use token ids below this: the other embedding rows get no gradient


def _sft_samples(vocab: int):
    from megatron_sdar.trainer.batch import TrainingSample

    g = torch.Generator().manual_seed(5)
    samples = []
    for length, start in ((23, 15), (17, 9), (30, 26)):
        ids = torch.randint(3, vocab - 1, (length,), generator=g).tolist()
        samples.append(TrainingSample(ids, start, [0.0] * (length - start)))
    return samples


def _optimizer_and_sft(model_dir: str, out_dir: str) -> dict:
    """In a one-rank Megatron world: the policy built as the trainer builds it (launch plan ->
    ``build_policy``); one SFT step through ``run_sft``; on a fresh policy two optimizer steps at
    the schedule's learning rate, recording weights, (clipped) gradients and Adam's moments."""
    from megatron_sdar.trainer.launch import launch_plan
    from megatron_sdar.trainer.policy import build_policy
    from megatron_sdar.trainer.sft import SFTData, run_sft
    from megatron_sdar.trainer.update import PolicyUpdate
    from megatron_sdar.utils.device import causal_attention_mask

    run = _compose(*TINY_RUN_OVERRIDES, f"model.hf_path={model_dir}", f"trainer.output_dir={out_dir}",
                   *OPTIMIZER_OVERRIDES)
    plan = launch_plan(run, 1, model_dir)
    t = run.trainer

    def policy():
        return build_policy(plan.arch, plan.optim, hf_dir=model_dir, precision=plan.precision,
                            **plan.transformer_overrides)

    out: dict = {"lr": [plan.optim.lr_at(k) for k in range(2)], "eps": plan.optim.adam_eps}
    # one SFT step as the trainer's warm start takes it
    sft_policy = policy()
    updater = PolicyUpdate(sft_policy, run.objective(), t.micro_batch_size, 0, lambda: Path(model_dir),
                           micro_batch_tokens=t.micro_batch_tokens)
    samples = _sft_samples(plan.arch.vocab_size)
    logged: list[dict] = []
    run_sft(updater, SFTData(samples, len(samples), 0, 0), 1, len(samples), t.sft_lr, t.seed,
            lambda step, metrics: logged.append(metrics), t.sft_prompt_weight)
    out["sft"] = logged[0]

    # two optimizer steps
    opt_policy = policy()
    model = opt_policy.unwrapped()[0]
    params = dict(model.named_parameters())
    names = {p: n for n, p in params.items()}
    optimizers = getattr(opt_policy.optimizer, "chained_optimizers", [opt_policy.optimizer])
    out["groups"] = [{"weight_decay": group["weight_decay"], "betas": tuple(group["betas"]),
                      "wd_mult": group.get("wd_mult", 1.0), "names": [names[p] for p in group["params"]]}
                     for o in optimizers for group in o.optimizer.param_groups]
    g = torch.Generator().manual_seed(6)
    steps = []
    for k in range(2):
        tokens = torch.randint(0, SEEN_TOKENS, (2, 12), generator=g)
        opt_policy.zero_grad()
        logits = opt_policy.model[0](tokens, torch.arange(12)[None].expand(2, -1), causal_attention_mask(12))
        torch.log_softmax(logits.float(), -1)[..., 1:5].mean().backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        result = opt_policy.step(plan.optim.lr_at(k))  # the learning rate train_on applies at step k
        state = {names[p]: {key: v.detach().clone() for key, v in s.items() if key in ("exp_avg", "exp_avg_sq")}
                 for o in optimizers for p, s in o.optimizer.state.items()}
        steps.append({"before": before, "after": {n: p.detach().clone() for n, p in params.items()},
                      "grad": {n: p.main_grad.detach().clone() for n, p in params.items()},  # clipped in place
                      "state": state, "applied": result.applied, "lr": result.lr})
    out["steps"] = steps
    return out


@pytest.fixture(scope="module")
def optimizer_run(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    root = tmp_path_factory.mktemp("optimizer")
    model_dir = build_tiny_qwen(root / "model", "qwen2", seed=3, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    result = run_distributed(_optimizer_and_sft, world_size=1, args=(str(model_dir), str(root / "run")),
                             timeout=300)[0]
    result["model_dir"] = model_dir
    return result


def _adamw(steps: list[dict], name: str, lr: list[float], wd: float, beta1: float, beta2: float, eps: float):
    """The weights after the recorded steps by torch's AdamW formula (decoupled weight decay, bias
    correction), from the first step's weights and each step's gradient, in float64."""
    p = steps[0]["before"][name].double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, step in enumerate(steps, start=1):
        grad = step["grad"][name].double()
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        p = p * (1 - lr[t - 1] * wd)
        denom = (v / (1 - beta2 ** t)).sqrt() + eps
        p = p - lr[t - 1] / (1 - beta1 ** t) * m / denom
    return p


def _decayed_matrices(run: dict) -> list[str]:
    """The weights Megatron puts in its weight-decay group (``wd_mult`` 1: the matrices)."""
    names = [n for group in run["groups"] if group["wd_mult"] == 1.0 for n in group["names"]]
    assert names and all(run["steps"][0]["before"][n].dim() == 2 for n in names)
    return names


@pytest.mark.multiproc
def test_weight_decay_shrinks_the_weights_by_lr_times_decay(optimizer_run):
    run, lr, eps = optimizer_run, optimizer_run["lr"], optimizer_run["eps"]
    steps = run["steps"]
    assert all(s["applied"] for s in steps) and lr == [1e-2, 1e-2]
    assert {group["weight_decay"] * group["wd_mult"] for group in run["groups"]} == {0.5, 0.0}
    # embedding rows of tokens no batch used: no gradient, so Adam moves them by the decay alone
    table = "embedding.word_embeddings.weight"
    assert float(steps[0]["grad"][table][SEEN_TOKENS:].abs().max()) == 0.0
    unused_before = steps[0]["before"][table][SEEN_TOKENS:].double()
    unused_after = steps[1]["after"][table][SEEN_TOKENS:].double()
    torch.testing.assert_close(unused_after, unused_before * (1 - 1e-2 * 0.5) ** 2, rtol=1e-6, atol=1e-9)
    # every matrix: AdamW with decoupled decay 0.5, not without it
    for name in _decayed_matrices(run):
        after = steps[1]["after"][name].double()
        want = _adamw(steps, name, lr, 0.5, 0.8, 0.95, eps)
        undecayed = _adamw(steps, name, lr, 0.0, 0.8, 0.95, eps)
        assert float((after - want).abs().max()) < 2e-6, name
        assert float((after - undecayed).abs().max()) > 1e-4, name


@pytest.mark.multiproc
def test_weight_decay_spares_norms_and_biases(optimizer_run):
    run, steps = optimizer_run, optimizer_run["steps"]
    spared = [n for group in run["groups"] if group["wd_mult"] == 0.0 for n in group["names"]]
    assert any("layernorm" in n for n in spared) and any(n.endswith("bias") for n in spared)
    for name in spared:
        after = steps[1]["after"][name].double()
        assert float((after - _adamw(steps, name, run["lr"], 0.0, 0.8, 0.95, run["eps"])).abs().max()) < 2e-6, name


def _moments_and_update(run: dict, name: str):
    steps = run["steps"]
    g1, g2 = (s["grad"][name].double() for s in steps)
    first, second = (s["state"][name] for s in steps)
    return g1, g2, first, second, steps[1]["after"][name].double()


@pytest.mark.multiproc
def test_adam_beta1_is_the_decay_of_the_first_moment(optimizer_run):
    run = optimizer_run
    assert {group["betas"] for group in run["groups"]} == {(0.8, 0.95)}
    for name in _decayed_matrices(run):
        g1, g2, first, second, after = _moments_and_update(run, name)
        tol = dict(rtol=1e-5, atol=1e-6 * float(g1.abs().max() + g2.abs().max()))
        torch.testing.assert_close(first["exp_avg"].double(), 0.2 * g1, **tol)
        torch.testing.assert_close(second["exp_avg"].double(), 0.8 * 0.2 * g1 + 0.2 * g2, **tol)
        # the second step's update follows beta1 = 0.8, not the default 0.9
        assert float((after - _adamw(run["steps"], name, run["lr"], 0.5, 0.8, 0.95, run["eps"])).abs().max()) < 2e-6
        assert float((after - _adamw(run["steps"], name, run["lr"], 0.5, 0.9, 0.95, run["eps"])).abs().max()) > 1e-4


@pytest.mark.multiproc
def test_adam_beta2_is_the_decay_of_the_second_moment(optimizer_run):
    run = optimizer_run
    for name in _decayed_matrices(run):
        g1, g2, first, second, after = _moments_and_update(run, name)
        tol = dict(rtol=1e-5, atol=1e-6 * float(g1.pow(2).max() + g2.pow(2).max()))
        torch.testing.assert_close(first["exp_avg_sq"].double(), 0.05 * g1 * g1, **tol)
        torch.testing.assert_close(second["exp_avg_sq"].double(), 0.95 * 0.05 * g1 * g1 + 0.05 * g2 * g2, **tol)
        assert float((after - _adamw(run["steps"], name, run["lr"], 0.5, 0.8, 0.95, run["eps"])).abs().max()) < 2e-6
        assert float((after - _adamw(run["steps"], name, run["lr"], 0.5, 0.8, 0.999, run["eps"])).abs().max()) > 1e-4


@pytest.mark.multiproc
def test_sft_prompt_weight_weighs_the_prompt_tokens_loss(optimizer_run):
    """One SFT step's gradient is that of ``mean_response(-lp) + 2.0 mean_prompt(-lp)`` (token means over
    the batch; prompt targets: the prompt's tokens after its first), computed with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(optimizer_run["model_dir"], dtype=torch.float32)
    samples = _sft_samples(model.config.vocab_size)

    def reference(weight: float) -> tuple[float, float]:
        model.zero_grad()
        response, prompt = [], []
        for s in samples:
            ids = torch.tensor([s.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lp = logp.gather(-1, ids[0, 1:, None])[:, 0]  # lp[j]: token j + 1
            prompt.append(lp[: s.response_start - 1])
            response.append(lp[s.response_start - 1:])
        response_loss = -torch.cat(response).mean()
        (response_loss - weight * torch.cat(prompt).mean()).backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        return float(response_loss.detach()), norm

    sft = optimizer_run["sft"]
    loss, norm = reference(2.0)
    _, default_norm = reference(0.5)
    _, no_prompt_norm = reference(0.0)
    assert sft["sft/loss"] == pytest.approx(loss, rel=1e-5)  # the logged loss is the response part
    assert sft["actor/grad_norm"] == pytest.approx(norm, rel=1e-4), (sft["actor/grad_norm"], norm, default_norm)
    assert min(abs(norm - default_norm), abs(norm - no_prompt_norm)) > 0.05 * norm


# ---------------------------------------------------------------------------------------------
# the main job

def _main_job(out: str, overrides: list[str]) -> dict:
    """``python -m megatron_sdar.train <overrides>`` in this process, with vLLM's ``LLM.generate``
    and the trainer's ``iteration`` / ``evaluate`` wrapped to record (and pass on) what reaches vLLM:
    each call's phase, sampling parameters, decoded prompts and the engine's KV-cache size."""
    import vllm

    from megatron_sdar.train import main
    from megatron_sdar.trainer import loop

    calls: list[dict] = []
    phase = ["setup"]
    generate, iteration, evaluate = vllm.LLM.generate, loop.SDARTrainer.iteration, loop.SDARTrainer.evaluate

    def recorded_generate(self, prompts, sampling_params=None, *args, **kwargs):
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params]
        tokenizer = self.get_tokenizer()
        calls.append({"phase": phase[0], "temperatures": sorted({p.temperature for p in params}),
                      "max_tokens": sorted({p.max_tokens for p in params}),
                      "prompts": [tokenizer.decode(p["prompt_token_ids"]) for p in prompts],
                      "kv_cache_bytes": self.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes})
        return generate(self, prompts, sampling_params, *args, **kwargs)

    def recorded_iteration(self, step):
        phase[0] = f"train/{step}"
        try:
            return iteration(self, step)
        finally:
            phase[0] = "other"

    def recorded_evaluate(self, *args, **kwargs):
        phase[0] = kwargs.get("prefix", "eval")
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            phase[0] = "other"

    vllm.LLM.generate = recorded_generate
    loop.SDARTrainer.iteration = recorded_iteration
    loop.SDARTrainer.evaluate = recorded_evaluate
    code = main([*overrides, f"trainer.output_dir={out}"])
    return {"code": code, "calls": calls}


def _run_main_job(out: Path, overrides: list[str]) -> dict:
    result = run_distributed(_main_job, world_size=1, args=(str(out), overrides), init="none", timeout=600)[0]
    assert result["code"] == 0, result["code"]
    result["out"] = out
    result["rows"] = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    sft = out / "sft_metrics.jsonl"
    result["sft_rows"] = [json.loads(line) for line in sft.read_text().splitlines()] if sft.is_file() else []
    return result


# skill_grpo with a short warm start (the skill-prompted student then acts validly about half the
# time, so rewards differ within a group and the first step has a gradient), two RL steps, and
# the fields under test set away from their defaults
SKILL_GRPO = [*TINY_RUN_OVERRIDES, "algo=skill_grpo", "trainer.sft_steps=40", "trainer.sft_lr=1e-2",
              "trainer.sft_episodes=16", "trainer.sft_batch_size=8", "rollout.group_size=4",
              "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.save_interval=2", "trainer.export_hf=true",
              "trainer.lr=3e-4", "trainer.warmup_steps=0", "trainer.min_lr=1e-4", "trainer.eval_greedy=false",
              "rollout.temperature=0.7", "rollout.eval_temperature=1.0", "rollout.invalid_action_penalty=0.25",
              "rollout.cpu_kv_cache_gib=2"]
# the same preset with those fields at their defaults, one RL step, no warm start
DEFAULTS = [*TINY_RUN_OVERRIDES, "algo=skill_grpo", "trainer.sft_steps=0", "trainer.max_steps=1",
            "trainer.eval_tasks=1"]


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """The defaults run's values of the fields under test (from the YAML), all unlike SKILL_GRPO's."""
    run = _compose(*DEFAULTS, f"trainer.output_dir={tmp_path_factory.mktemp('defaults') / 'run'}")
    r, t = run.rollout, run.trainer
    assert r.temperature != 0.7 and r.invalid_action_penalty != 0.25 and r.cpu_kv_cache_gib != 2 and t.eval_greedy
    return run


@pytest.fixture(scope="module")
def skill_grpo_run(tmp_path_factory):
    return _run_main_job(tmp_path_factory.mktemp("main") / "skill_grpo", SKILL_GRPO)


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory):
    return _run_main_job(tmp_path_factory.mktemp("main") / "defaults", DEFAULTS)


def _phase_calls(run: dict, prefix: str) -> list[dict]:
    return [c for c in run["calls"] if c["phase"].startswith(prefix)]


@pytest.mark.multiproc
def test_skill_grpo_trains_with_the_skills_in_the_students_prompt(skill_grpo_run):
    from safetensors.torch import load_file

    from megatron_sdar.rollout.agent_loop import CONTEXT_HEADER
    from megatron_sdar.skills import SkillBank, builtin_skill_dir

    run, rows, out = skill_grpo_run, skill_grpo_run["rows"], skill_grpo_run["out"]
    assert sorted(rows) == [0, 1, 2]
    for step in (1, 2):
        row = rows[step]
        assert math.isfinite(row["actor/loss"]) and math.isfinite(row["actor/pg_loss"]), row
        assert row["trainer/skipped_step"] == 0.0 and row["rollout/episodes"] == 4.0
        assert "sdar/distill_loss" not in row and "perf/teacher_tokens" not in row  # no teacher pass
    assert max(rows[1]["actor/grad_norm"], rows[2]["actor/grad_norm"]) > 0  # rewards differed within a group
    # every prompt the student acted from (the trained samples' prompts) holds a skill of the bank,
    # at training and at evaluation
    bank = SkillBank.from_dir(builtin_skill_dir("household"))
    skills = [" ".join(bank.skills[name].text.split()) for name in bank.task_skill_names]
    for phase in ("train/0", "train/1", "eval"):
        prompts = [" ".join(p.split()) for c in _phase_calls(run, phase) for p in c["prompts"]]
        assert prompts, phase
        for prompt in prompts:
            assert CONTEXT_HEADER.strip() in prompt and any(skill in prompt for skill in skills), prompt
    # the RL steps changed the weights: the final export differs from the SFT model RL started from
    start = load_file(out / "sft_model" / "model.safetensors")
    end = load_file(out / "hf_export" / "model.safetensors")
    assert start.keys() == end.keys()
    moved = max(float((end[k].double() - start[k].double()).abs().max()) for k in start)
    assert 1e-6 < moved < 0.1, moved
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # step 0 (after SFT) and step 2
    print({step: {k: rows[step][k] for k in ("actor/loss", "actor/grad_norm", "rollout/reward_mean",
                                             "rollout/invalid_action_rate")} for step in (1, 2)},
          "max weight change", moved)


@pytest.mark.multiproc
def test_rollout_temperature_reaches_vllms_sampling_params(skill_grpo_run, defaults_run, defaults):
    assert {t for c in _phase_calls(skill_grpo_run, "train/") for t in c["temperatures"]} == {0.7}
    assert {t for c in _phase_calls(skill_grpo_run, "eval") for t in c["temperatures"]} == {1.0}  # eval_temperature
    default = defaults.rollout.temperature
    assert {t for c in _phase_calls(defaults_run, "train/") for t in c["temperatures"]} == {default}


@pytest.mark.multiproc
def test_invalid_action_penalty_is_subtracted_per_invalid_action(skill_grpo_run, defaults_run, defaults):
    """Episode reward = success (1) - penalty x invalid actions, so the mean reward of a rollout is
    ``success_rate - penalty x invalid_action_rate x turns_mean``."""
    for run, penalty in ((skill_grpo_run, 0.25), (defaults_run, defaults.rollout.invalid_action_penalty)):
        checked = 0
        for row in run["rows"].values():
            for prefix in ("rollout", "eval"):
                if f"{prefix}/reward_mean" not in row:
                    continue
                invalid_per_episode = row[f"{prefix}/invalid_action_rate"] * row[f"{prefix}/turns_mean"]
                want = row[f"{prefix}/success_rate"] - penalty * invalid_per_episode
                assert row[f"{prefix}/reward_mean"] == pytest.approx(want, abs=1e-9), (prefix, row)
                checked += invalid_per_episode > 0
        assert checked >= 2


@pytest.mark.multiproc
def test_cpu_kv_cache_gib_sizes_vllms_kv_cache(skill_grpo_run, defaults_run, defaults):
    if torch.cuda.is_available():
        pytest.skip("the CPU KV-cache size applies to vLLM's CPU backend")
    assert {c["kv_cache_bytes"] for c in skill_grpo_run["calls"]} == {2 * GIB}
    assert {c["kv_cache_bytes"] for c in defaults_run["calls"]} == {int(defaults.rollout.cpu_kv_cache_gib * GIB)}


def test_fractional_cpu_kv_cache_gib_is_refused_with_the_config():
    """vLLM's CPU backend reads ``VLLM_CPU_KVCACHE_SPACE`` with ``int()``: 0.5 GiB would stop the
    engine after the model is built, so it is a configuration error."""
    from megatron_sdar.config.schema import ConfigError

    with pytest.raises(ConfigError, match="cpu_kv_cache_gib"):
        _compose(*TINY_RUN_OVERRIDES, "rollout.cpu_kv_cache_gib=0.5")


@pytest.mark.multiproc
def test_eval_greedy_false_drops_the_greedy_evaluation(skill_grpo_run, defaults_run, defaults):
    default_keys = {k for row in defaults_run["rows"].values() for k in row}
    assert "eval/greedy/success_rate" in default_keys and "eval/success_rate" in default_keys
    assert {t for c in _phase_calls(defaults_run, "eval/greedy") for t in c["temperatures"]} == {0.0}
    keys = {k for row in skill_grpo_run["rows"].values() for k in row}
    assert "eval/success_rate" in skill_grpo_run["rows"][0] and "eval/success_rate" in skill_grpo_run["rows"][2]
    assert not [k for k in keys if k.startswith("eval/greedy")]
    assert not _phase_calls(skill_grpo_run, "eval/greedy")
    assert 0.0 not in {t for c in skill_grpo_run["calls"] for t in c["temperatures"]}


@pytest.mark.multiproc
def test_sft_lr_is_the_peak_of_the_warm_starts_cosine(skill_grpo_run):
    rows = skill_grpo_run["sft_rows"]
    assert [r["sft_step"] for r in rows] == [0, 10, 20, 30, 39]
    for row in rows:
        want = 1e-2 * 0.5 * (1 + math.cos(math.pi * row["sft_step"] / 40))
        assert row["actor/lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), row


@pytest.mark.multiproc
def test_min_lr_is_where_the_rl_cosine_ends(skill_grpo_run):
    """No warmup, cosine from lr 3e-4 at step 0 towards min_lr over max_steps = 2: step 1 applies
    ``1e-4 + (3e-4 - 1e-4) (1 + cos(pi / 2)) / 2 = 2e-4`` (``trainer.min_lr=null``, the default, keeps it constant)."""
    rows = skill_grpo_run["rows"]
    assert rows[1]["actor/lr"] == pytest.approx(3e-4, rel=1e-12)
    assert rows[2]["actor/lr"] == pytest.approx(2e-4, rel=1e-12)
