"""One full SDAR training step (teacher pass, reference pass, student pass, optimizer step) on the
same samples gives the same loss, gate metrics, grad norm and updated weights on every layout."""
import pytest

from megatron_sdar.testing import run_distributed

LAYOUTS = [  # (world, tp, pp, cp) -> dp = world / (tp * pp * cp)
    (2, 2, 1, 1),
    (2, 1, 2, 1),
    (2, 1, 1, 2),
    (2, 1, 1, 1),
    (4, 2, 2, 1),
]
COMPARED = ["actor/loss", "actor/pg_loss", "sdar/distill_loss", "actor/kl_ref", "actor/entropy",
            "sdar/gate_mean", "sdar/gate_active_ratio", "sdar/gap_mean", "sdar/gap_std", "actor/grad_norm",
            "rollout/train_infer_logprob_diff_mean", "rollout/train_infer_logprob_diff_max"]


def _samples(vocab: int, count: int = 8, rescues: int = 0):
    """Turn-like samples: a prompt and a response (:func:`_train` adds the teacher's prompts).
    ``rescues``: that many more samples as HDPO's rescue turns (distillation only), and the others
    RL only."""
    import torch

    from megatron_sdar.trainer.batch import TrainingSample

    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(count):
        prompt = torch.randint(3, vocab, (int(torch.randint(10, 30, (1,), generator=gen)),), generator=gen).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
        rollout_lp = (-3.0 * torch.rand(len(response), generator=gen)).tolist()
        samples.append(TrainingSample(prompt + response, len(prompt), rollout_lp,
                                      advantage=float(torch.randn(1, generator=gen)), episode=i // 2))
    if rescues:
        for sample in samples:
            sample.distill = False
        for sample in _samples(vocab, count + rescues)[count:]:
            sample.advantage, sample.rl = 0.0, False
            samples.append(sample)
    return samples


def _train(updater, samples, step: int = 0) -> dict:
    """``updater.train_on`` with the samples' teacher batch: the teacher's prompt of sample ``i`` is a
    context of 7-9 random tokens (seeded by ``i``) in front of the same prompt."""
    import torch

    from megatron_sdar.trainer.teacher import TeacherBatch

    vocab = updater.arch.vocab_size

    def prompt_of(i: int) -> list[int]:
        context = torch.randint(3, vocab, (7 + i % 3,), generator=torch.Generator().manual_seed(1000 + i))
        return context.tolist() + samples[i].input_ids[:samples[i].response_start]

    teacher = TeacherBatch.build(samples, updater.objective, lambda indices: [prompt_of(i) for i in indices])
    return updater.train_on(samples, step, teacher=teacher)


def _one_step(model_dir: str, algo: str, rescues: int = 0, micro_batch_tokens: int | None = None):
    """One full step on the process's layout (:meth:`ParallelDims.current`: its sizes and flags,
    sequence parallelism, recomputation, the distributed optimizer), turned into model and optimizer
    settings as the main job does; ``micro_batch_tokens``: sequence packing."""
    import torch.distributed as dist

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.teacher import teacher_indices
    from megatron_sdar.trainer.update import PolicyUpdate

    from megatron_sdar.trainer.launch import transformer_overrides
    from megatron_sdar.utils.parallel_dims import ParallelDims

    dims = ParallelDims.current()
    arch = QwenArchitecture.from_hf_config(model_dir)
    # adam_eps 1e-3: the first Adam update lr * g / (|g| + eps) is then a smooth function of the
    # gradient, so weights compare at the precision of the gradients
    policy = build_policy(arch, OptimConfig(lr=1e-3, adam_eps=1e-3, clip_grad=0.0,
                                            use_distributed_optimizer=dims.distributed_optimizer),
                          hf_dir=model_dir, **transformer_overrides(dims))
    objective = preset(algo, kl_coef=0.01)
    updater = PolicyUpdate(policy, objective, micro_batch_size=2, pad_id=0,
                           reference_dir=lambda: model_dir, micro_batch_tokens=micro_batch_tokens)
    # with rescues: 7 ordinary samples, so the rescue turns (the teacher's subset) start at an odd
    # index and a subset dealt round-robin on its own would land on other DP ranks than its samples
    samples = _samples(arch.vocab_size, count=7 if rescues else 8, rescues=rescues)
    metrics = _train(updater, samples)
    metrics["teacher_scored"] = len(teacher_indices(samples, objective))
    # numpy: pickled by value (tensors would travel as shared-memory handles of an exiting process)
    weights = {name: t.numpy().copy() for name, t in iter_hf_weights(policy.model, arch, target="first")}
    return {"metrics": metrics, "weights": weights if dist.get_rank() == 0 else None, "dims": dims,
            "sequence_parallel": policy.config.sequence_parallel, "recompute": policy.config.recompute_granularity}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("equiv") / "qwen2", "qwen2", num_hidden_layers=4))


def _compare_layouts(tiny_model, algo, layouts, rescues=0):
    """``layouts``: (world, tp, pp, cp) or (world, tp, pp, cp, vpp, parallel fields), each against one process."""
    reference = run_distributed(_one_step, world_size=1, args=(tiny_model, algo, rescues), timeout=300)[0]
    ref_metrics = reference["metrics"]
    assert all(k in ref_metrics for k in COMPARED), sorted(ref_metrics)
    assert 0 < ref_metrics["sdar/gate_mean"] <= 1 and ref_metrics["actor/grad_norm"] > 0
    assert ref_metrics["rollout/train_infer_logprob_diff_max"] > 0  # the samples' rollout log-probs are made up
    from safetensors.torch import load_file

    initial = load_file(f"{tiny_model}/model.safetensors")
    moved = max(float(abs(reference["weights"][n] - initial[n].numpy()).max()) for n in initial)
    assert moved > 1e-4, moved  # the step changed the weights
    for world, tp, pp, cp, *more in layouts:
        vpp, parallel = more if more else (None, {})
        flags = {k: v for k, v in parallel.items() if k != "micro_batch_tokens"}  # ep and the layout's flags
        results = run_distributed(_one_step, world_size=world, tp=tp, pp=pp, cp=cp, vpp=vpp, **flags,
                                  args=(tiny_model, algo, rescues, parallel.get("micro_batch_tokens")),
                                  timeout=300, env={"OMP_NUM_THREADS": "1"})
        layout = f"{algo} world={world} tp={tp} pp={pp} cp={cp} vpp={vpp} {parallel}"
        for rank, result in enumerate(results):
            # the layout the step ran: ParallelDims.current() carries the flags to the model
            dims = result["dims"]
            assert (dims.tp, dims.pp, dims.cp, dims.vpp, dims.ep, dims.sequence_parallel, dims.recompute,
                    dims.distributed_optimizer) == (tp, pp, cp, vpp, flags.get("ep", 1),
                                                    flags.get("sequence_parallel", False),
                                                    flags.get("recompute", "none"),
                                                    flags.get("distributed_optimizer", False)), (layout, dims)
            assert result["sequence_parallel"] == dims.sequence_parallel, layout
            assert result["recompute"] == (None if dims.recompute == "none" else dims.recompute), layout
            for key in COMPARED:
                assert key in result["metrics"], f"{layout} rank {rank}: {sorted(result['metrics'])}"
                got, want = result["metrics"][key], ref_metrics[key]
                assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), f"{layout} rank {rank} {key}: {got} vs {want}"
        weights = results[0]["weights"]
        assert weights.keys() == reference["weights"].keys()
        for name, want in reference["weights"].items():
            diff = float(abs(weights[name] - want).max())
            assert diff <= 1e-6, f"{layout}: {name} differs by {diff}"
    return reference


PACKED = {"micro_batch_tokens": 96}  # two 48-token rows per micro-batch, one to three samples per row


@pytest.mark.multiproc
def test_sdar_step_equal_on_every_layout(tiny_model):
    """Packed micro-batches (the main job's default) at every two-process layout against the padded
    single process: layout and packing equivalence at once (the scale paths below stay padded)."""
    _compare_layouts(tiny_model, "sdar", [(*layout, None, PACKED) for layout in LAYOUTS if layout[0] == 2])


@pytest.mark.multiproc
@pytest.mark.slow  # 4 processes on CI's 2 cores
def test_sdar_step_equal_at_tp2xpp2(tiny_model):
    _compare_layouts(tiny_model, "sdar", [(*layout, None, PACKED) for layout in LAYOUTS if layout[0] == 4])


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [
    (2, 2, 1, 1, None, {"sequence_parallel": True}),
    (2, 1, 2, 1, 2, {}),
    (1, 1, 1, 1, None, {"recompute": "selective"}),
    (1, 1, 1, 1, None, {"recompute": "full"}),
    pytest.param((4, 2, 1, 1, None, {"distributed_optimizer": True}), marks=pytest.mark.slow),  # 4 processes
], ids=["tp2_sp", "pp2_vpp2", "recompute_selective", "recompute_full", "tp2xdp2_distopt"])
def test_scale_paths_equal_one_process(tiny_model, layout):
    """The recipes' layouts: sequence parallelism, virtual pipeline stages, recomputation and the
    distributed optimizer, through the main job's PolicyUpdate and its TransformerConfig knobs."""
    _compare_layouts(tiny_model, "sdar", [layout])


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from megatron_sdar.models.tiny import build_tiny_qwen

    return str(build_tiny_qwen(tmp_path_factory.mktemp("equiv_moe") / "qwen3_moe", "qwen3_moe", num_hidden_layers=2))


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    (4, 1, 2, 1, None, {"ep": 2}),
    (4, 2, 1, 1, None, {"ep": 2, "sequence_parallel": True}),
], ids=["ep2xpp2", "ep2xtp2_sp"])
def test_moe_expert_parallel_step_equal_one_process(tiny_moe, layout):
    """Qwen3-MoE (the 30B-A3B recipe's layout family): experts split over EP=2, with PP=2 or with
    TP=2 and sequence parallelism, against one process."""
    _compare_layouts(tiny_moe, "sdar", [layout])


@pytest.mark.multiproc
def test_hdpo_step_equal_at_tp2_and_dp2(tiny_model):
    """RL-only ordinary samples + distillation-only rescue samples (top-64 JSD, its own normalizer)."""
    # DP=2: the teacher scores a subset of the samples, which must stay on the ranks that own them
    # (before the owners were fixed per step, the padded DP=2 step logged rank 0 loss 2.30 instead of 0.065)
    reference = _compare_layouts(tiny_model, "hdpo", [(2, 2, 1, 1), (2, 1, 1, 1, None, PACKED)], rescues=3)
    assert reference["metrics"]["teacher_scored"] == 3  # the teacher scores only the rescue turns
    assert reference["metrics"]["sdar/gate_mean"] == 1.0 and reference["metrics"]["sdar/distill_loss"] > 0


def _hdpo_and_grpo_updates(model_dir: str):
    import torch

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate

    arch = QwenArchitecture.from_hf_config(model_dir)
    out = {}
    for algo in ("hdpo", "grpo"):
        policy = build_policy(arch, OptimConfig(lr=1e-3, clip_grad=0.0), hf_dir=model_dir)
        updater = PolicyUpdate(policy, preset(algo, kl_coef=0.01), micro_batch_size=2, pad_id=0,
                               reference_dir=lambda: model_dir)
        samples = _samples(arch.vocab_size)
        for sample in samples:  # HDPO's ordinary samples when no group was a cliff: RL only
            sample.distill = algo != "hdpo"
        metrics = _train(updater, samples)
        out[algo] = {"loss": metrics["actor/loss"], "weights": [p.detach().clone() for p in policy.model[0].parameters()]}
    return {"loss_equal": out["hdpo"]["loss"] == out["grpo"]["loss"],
            "weights_equal": all(torch.equal(a, b) for a, b in zip(out["hdpo"]["weights"], out["grpo"]["weights"]))}


@pytest.mark.multiproc
def test_hdpo_without_a_cliff_group_is_exactly_grpo(tiny_model):
    result = run_distributed(_hdpo_and_grpo_updates, world_size=1, args=(tiny_model,), timeout=300)[0]
    assert result["loss_equal"] and result["weights_equal"]


def _non_finite_step(model_dir: str):
    import torch

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.models.architecture import QwenArchitecture
    from megatron_sdar.trainer.policy import OptimConfig, build_policy
    from megatron_sdar.trainer.update import PolicyUpdate

    arch = QwenArchitecture.from_hf_config(model_dir)
    policy = build_policy(arch, OptimConfig(lr=1e-3), hf_dir=model_dir)
    updater = PolicyUpdate(policy, preset("grpo", kl_coef=0.0), micro_batch_size=2, pad_id=0,
                           reference_dir=lambda: model_dir)
    samples = _samples(arch.vocab_size, count=4)
    samples[1].advantage = float("nan")  # a poisoned advantage makes the loss NaN
    before = [p.detach().clone() for p in policy.model[0].parameters()]
    metrics = _train(updater, samples)
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, policy.model[0].parameters()))
    return {"skipped": metrics["trainer/skipped_step"], "loss": metrics["actor/loss"], "unchanged": unchanged,
            "updates": policy.steps_taken}


@pytest.mark.multiproc
def test_non_finite_loss_skips_the_update(tiny_model):
    result = run_distributed(_non_finite_step, world_size=1, args=(tiny_model,), timeout=300)[0]
    assert result["loss"] != result["loss"]  # NaN reported
    assert result["skipped"] == 1.0 and result["unchanged"] and result["updates"] == 0
