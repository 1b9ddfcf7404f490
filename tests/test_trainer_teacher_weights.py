"""``algo.teacher``: which weights score the teacher batch. ``frozen`` is the KL reference model (the
policy at the start of RL, one copy shared by both passes), ``ema`` an exponential moving average of
the policy that follows its formula and travels through a training checkpoint, ``shared`` the policy
itself. Real megatron-core models and passes, one gloo process, float32."""
from __future__ import annotations

import pytest

from megatron_sdar.testing import run_distributed


def _updater(model_dir: str, teacher: str, kl_coef: float = 0.01, decay: float = 0.9):
    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate

    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(lr=3e-2, clip_grad=0.0), hf_dir=model_dir)
    objective = preset("sdar", distill_coef=1.0, kl_coef=kl_coef, teacher=teacher, teacher_ema_decay=decay)
    updater = PolicyUpdate(policy, objective, micro_batch_size=4, pad_id=0, reference_dir=lambda: model_dir,
                           micro_batch_tokens=4096)
    updater.teacher_weights.start()  # the start of RL, as the trainer does after SFT
    return updater


def _step(updater, step: int) -> dict:
    """One SDAR step on fixed samples; returns the teacher pass's log-probs ({sample: [R]})."""
    from tests.test_trainer_equivalence import _samples, _train

    seen: dict = {}
    forward = updater._forward_values

    def recording(model, samples, name="forward", **kwargs):  # the real pass; its teacher output is kept
        out = forward(model, samples, name, **kwargs)
        if name == "teacher":
            seen.update({"model": model, "logprobs": out["logprobs"], "sequences": samples})
        return out

    updater._forward_values = recording
    metrics = _train(updater, _samples(updater.arch.vocab_size), step)
    updater._forward_values = forward
    return {**seen, "metrics": metrics}


def _flat(chunks) -> "torch.Tensor":
    import torch

    return torch.cat([p.detach().flatten().double() for chunk in chunks for p in chunk.parameters()])


def _frozen_teacher(model_dir: str):
    updater = _updater(model_dir, "frozen")
    first = _step(updater, 0)
    second = _step(updater, 1)  # the policy has moved by one update
    # a reference model read afresh from the start's weights scores the same teacher sequences
    fresh = updater.policy.frozen_copy(model_dir)
    expected = updater._forward_values(fresh, second["sequences"], name="check")["logprobs"]
    shared_now = updater._forward_values(updater.policy.model, second["sequences"], name="check")["logprobs"]
    diff = max(float((second["logprobs"][j] - expected[j]).abs().max()) for j in expected)
    moved = max(float((shared_now[j] - expected[j]).abs().max()) for j in expected)
    same_object = second["model"] is updater.reference and first["model"] is updater.reference
    copies = (updater.reference is not None) + (updater.teacher_weights.ema is not None)
    return {"diff": diff, "moved": moved, "same_object": same_object, "copies": copies,
            "kl_ref": second["metrics"]["actor/kl_ref"]}


@pytest.mark.multiproc
def test_frozen_teacher_is_the_reference_model_with_the_skill_in_the_prompt(tiny_model):
    result = run_distributed(_frozen_teacher, world_size=1, args=(tiny_model,), timeout=300)[0]
    assert result["same_object"]  # the teacher pass ran on the KL reference model itself: no second copy
    assert result["copies"] == 1
    assert result["diff"] < 1e-6, result  # = the reference's log-probs of the teacher's sequences
    assert result["moved"] > 1e-3, result  # while the policy (a shared teacher) has moved away
    assert result["kl_ref"] > 0


def _ema(model_dir: str, decay: float, tmp: str):
    from megatron_sdar.checkpoint.training import IncompatibleCheckpointError, load_checkpoint, save_checkpoint

    updater = _updater(model_dir, "ema", decay=decay)
    thetas = [_flat(updater.policy.unwrapped())]
    teacher_models = []
    for step in range(3):
        out = _step(updater, step)
        teacher_models.append(out["model"])
        thetas.append(_flat(updater.policy.unwrapped()))
    ema = _flat(updater.teacher_weights.ema)
    # theta_T after k updates: d^k theta_0 + sum_i (1 - d) d^(k - i) theta_i
    expected = decay ** 3 * thetas[0] + sum((1 - decay) * decay ** (3 - i) * thetas[i] for i in (1, 2, 3))
    result = {"formula": float((ema - expected).abs().max()), "from_policy": float((ema - thetas[3]).abs().max()),
              "teacher_is_ema": all(m is updater.teacher_weights.ema for m in teacher_models)}
    # the EMA travels through a training checkpoint beside the policy
    path = save_checkpoint(f"{tmp}/ckpt", 3, updater.policy, {"step": 3},
                           extra_models=updater.teacher_weights.checkpoint_models())
    other = _updater(model_dir, "ema", decay=decay)
    load_checkpoint(path, other.policy, extra_models=other.teacher_weights.checkpoint_models())
    other.teacher_weights.loaded()
    result["resumed"] = float((_flat(other.teacher_weights.ema) - ema).abs().max())
    _step(updater, 3)
    _step(other, 3)
    result["next_step"] = float((_flat(other.teacher_weights.ema) - _flat(updater.teacher_weights.ema)).abs().max())
    # a checkpoint of a run without the EMA (another algo.teacher) cannot resume an EMA teacher
    frozen = _updater(model_dir, "frozen")
    plain = save_checkpoint(f"{tmp}/plain", 1, frozen.policy, {"step": 1})
    try:
        load_checkpoint(plain, other.policy, extra_models=other.teacher_weights.checkpoint_models())
        result["refusal"] = None
    except IncompatibleCheckpointError as exc:
        result["refusal"] = str(exc)
    return result


@pytest.mark.multiproc
def test_ema_teacher_follows_its_formula_and_resumes_exactly(tiny_model, tmp_path):
    result = run_distributed(_ema, world_size=1, args=(tiny_model, 0.8, str(tmp_path)), timeout=300)[0]
    assert result["formula"] < 1e-6, result
    assert result["from_policy"] > 1e-3, result  # it lags behind the policy
    assert result["teacher_is_ema"]
    assert result["resumed"] == 0.0 and result["next_step"] < 1e-6, result
    assert "holds no teacher_ema weights" in result["refusal"], result


def test_teacher_choice_is_checked():
    from megatron_sdar.algo.objective import preset

    assert preset("sdar").teacher == "shared"  # as released
    with pytest.raises(ValueError, match="objective.teacher must be one of"):
        preset("sdar", teacher="stale")
    with pytest.raises(ValueError, match="teacher_ema_decay"):
        preset("sdar", teacher="ema", teacher_ema_decay=1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("teacher") / "qwen2", "qwen2", num_hidden_layers=2))
