"""Memory planner: hand-computed terms on a toy model, monotonicity, the 72B layouts, every recipe,
the model sources (the model YAML's architecture block, an HF config.json), the composition it
shares with the trainer (the dry run's memory plan is the planner's) and the CLI. The CPU RSS check
is ``tools/validate_plan.py`` (run by test_validate_plan_against_measured_rss, about 20 s)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_sdar.config.schema import recipe_names
from megatron_sdar.models.architecture import QwenArchitecture, UnsupportedConfigError
from megatron_sdar.utils.memory_plan import (
    GIB, PlanError, Rollout, Workload, _stage_estimate, compose_plan, estimate, is_moe, load_recipe, recipe_table,
    stage_params, total_params,
)
from megatron_sdar.utils.parallel_dims import ParallelDims


def Dims(**sizes) -> ParallelDims:  # noqa: N802 - the planner's layouts here use the distributed optimizer
    return ParallelDims(**{"distributed_optimizer": True, **sizes})


ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = {"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16, "vocab_size": 10}
TOY = QwenArchitecture.from_hf_config(TOY_CONFIG)  # qwen2: QKV bias, no QK-norm, untied embeddings
TOY_WORK = Workload(seq_len=4, micro_batch_size=1, global_batch_size=2, teacher_extra_tokens=0,
                    reference_model=True, teacher_pass=False)


def _bytes(est, key):
    return round(getattr(est, key) * GIB, 6)


def _model(model_type: str = "qwen2", **config) -> QwenArchitecture:
    return QwenArchitecture.from_hf_config({**TOY_CONFIG, "model_type": model_type, **config})


def test_toy_model_terms_by_hand():
    # per layer: attention 8*(8+2*4) + 8*8 = 192 + QKV bias 8+2*4 = 16, norms 2*8 = 16, MLP 3*8*16 = 384
    # -> 608; 2 layers + embedding and output 2*10*8 + final norm 8 = 1384 parameters
    assert total_params(TOY) == 1384
    assert total_params(_model("qwen3")) == 1384 - 2 * 16 + 2 * 2 * 4  # no bias, QK-norms of head_dim 4
    assert total_params(_model(tie_word_embeddings=True)) == 1384 - 80
    est = estimate(TOY, Dims(dp=2), TOY_WORK, name="toy", overhead_gib=0.0)
    assert est.model == "toy" and est.params_billion == 1384 / 1e9
    assert _bytes(est, "weights") == 2 * 1384
    assert _bytes(est, "gradients") == 4 * 1384
    assert _bytes(est, "optimizer") == 12 * 1384 / 2  # distributed optimizer over dp=2
    assert _bytes(est, "reference") == 2 * 1384
    # activations, T=4 tokens, 2 bytes: 4*T*h*2=256 + T*(2*8+2*4)*2=192 + lse T*2*4=32 + 3*T*16*2=384
    # = 864 per layer, 2 layers, plus embedding output and final norm input 2*T*h*2 = 128
    assert _bytes(est, "activations") == 2 * 864 + 128
    assert _bytes(est, "activations_full_recompute") == 2 * (4 * 8 * 2) + 864 + 128
    assert _bytes(est, "logits") == pytest.approx(4 * 10 * (2 * 2 + 0.4))
    assert est.total * GIB == pytest.approx(2768 + 5536 + 8304 + 2768 + 1856 + 176)
    no_dist = estimate(TOY, Dims(dp=2, distributed_optimizer=False), TOY_WORK, overhead_gib=0.0)
    assert _bytes(no_dist, "optimizer") == 12 * 1384
    fp32 = estimate(TOY, Dims(), replace(TOY_WORK, precision="fp32"), overhead_gib=0.0)
    assert (_bytes(fp32, "weights"), _bytes(fp32, "optimizer")) == (4 * 1384, 8 * 1384)  # no separate master copy


def test_tensor_and_pipeline_split_by_hand():
    toy = _model(num_key_value_heads=2)  # attention 8*(8+2*8) + 8*8 = 256 + bias 8+2*8 = 24 -> 280
    est = estimate(toy, Dims(tp=2, pp=2), TOY_WORK, overhead_gib=0.0)
    # one layer per stage: (280+384)/2 + 16 = 348; stage 0 adds the embedding 5*8 = 40 (388),
    # the last stage the output layer 40 and the final norm 8 (396)
    assert (stage_params(toy, Dims(tp=2, pp=2), 0).total, stage_params(toy, Dims(tp=2, pp=2), 1).total) == (388, 396)
    # ...but stage 0 keeps 2 micro-batches in flight (1F1B), so it is the worst stage
    assert est.stage == 0 and _bytes(est, "weights") == 2 * 388 and est.logits == 0
    last = _stage_estimate(toy, Dims(tp=2, pp=2), TOY_WORK, 1)
    assert last["logits"] == pytest.approx(4 * 5 * 4.4)  # [T, V/tp] logits + grad (bf16) + 0.1x fp32
    # one layer at tp=2: 4*T*h*2 = 256 + T*(2*8+2*8)*2/2 = 128 + lse T*1*4 = 16 + 3*T*16*2/2 = 192 -> 592
    assert (_bytes(est, "activations"), last["activations"]) == (2 * 592 + 128, 592 + 128)


def test_monotonicity():
    shape = load_recipe("alfworld_qwen2_5_7b").arch
    base = Dims(tp=2, dp=4, sequence_parallel=True)
    work = Workload(global_batch_size=128)
    ref = estimate(shape, base, work)
    assert estimate(shape, replace(base, tp=4, dp=2), work).weights < ref.weights
    assert estimate(shape, replace(base, dp=8), work).optimizer < ref.optimizer
    assert estimate(shape, base, replace(work, seq_len=4096)).activations > ref.activations
    assert estimate(shape, base, replace(work, micro_batch_size=2)).activations > ref.activations
    recomputes = [estimate(shape, replace(base, recompute=r), replace(work, kernels="unfused")).activations
                  for r in ("none", "selective", "full")]
    assert recomputes[0] > recomputes[1] > recomputes[2]
    assert estimate(shape, replace(base, sequence_parallel=False), work).activations > ref.activations
    assert estimate(shape, base, work, Rollout(gpu_memory_utilization=0.4, tp=2)).total > ref.total
    fp8 = estimate(shape, base, replace(work, precision="fp8"))
    assert fp8.weights > ref.weights and fp8.optimizer == ref.optimizer  # FP8 weight copies, same Adam states


def test_72b_does_not_fit_at_tp1_but_fits_with_the_recipe_layout():
    recipe = load_recipe("alfworld_qwen2_5_72b")
    shape = recipe.arch
    assert total_params(shape) == pytest.approx(72.7e9, rel=0.01)
    too_big = estimate(shape, Dims(tp=1, dp=8), Workload(global_batch_size=128))
    assert not too_big.fits and too_big.weights > 100 and "GiB per GPU" in too_big.problems[0]
    est = estimate(shape, recipe.layout, recipe.workload, recipe.rollout)
    assert est.fits and est.total < est.capacity
    assert (recipe.layout.tp, recipe.layout.pp, recipe.nodes) == (8, 4, 8)


def test_every_recipe_fits_an_h100_and_the_table_lists_it():
    names = recipe_names()
    assert len(names) >= 13
    table = recipe_table()
    for name in names:
        assert f"| {name} |" in table
    assert "| NO |" not in table


def test_moe_expert_parallel_shards_experts():
    shape = load_recipe("alfworld_qwen3_30b_a3b").arch
    assert is_moe(shape) and total_params(shape) == pytest.approx(30.5e9, rel=0.02)
    work = Workload(global_batch_size=128)
    ep8 = estimate(shape, Dims(dp=16, ep=8, etp=1), work)
    ep16 = estimate(shape, Dims(dp=16, ep=16, etp=1), work)
    assert ep16.weights < ep8.weights
    # the distributed optimizer shards expert states over ep * expert-dp = all 16 ranks either way
    assert ep16.optimizer == pytest.approx(ep8.optimizer)
    no_distopt = estimate(shape, Dims(dp=16, ep=16, etp=1, distributed_optimizer=False), work)
    assert no_distopt.optimizer > ep16.optimizer
    with pytest.raises(PlanError, match="ep=3 must divide num_experts=128"):
        estimate(shape, Dims(dp=6, ep=3, etp=1), Workload(global_batch_size=6))
    with pytest.raises(PlanError, match="needs a mixture-of-experts model"):
        estimate(TOY, Dims(dp=2, ep=2), TOY_WORK)


def test_vllm_pool_and_kv_cache():
    shape = load_recipe("alfworld_qwen2_5_7b").arch
    est = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.3, tp=2))
    assert est.vllm_weights == pytest.approx(total_params(shape) * 2 / 2 / GIB)
    per_token = 2 * 28 * 4 * 128 * 2 / 2  # K and V, 28 layers, 4 KV heads of 128, bf16, over rollout tp 2
    assert est.vllm_kv_tokens == int(est.vllm_kv_cache * GIB // per_token)
    tiny_pool = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.05, tp=1))
    assert not tiny_pool.fits and "do not fit its pool" in tiny_pool.problems[0]
    asleep = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.3, tp=2, sleeps=True))
    assert asleep.total < est.total


QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False}


def test_model_sources_and_errors(tmp_path):
    """The model YAML's architecture block and an HF config.json parse into the same QwenArchitecture;
    a config.json in the model directory wins over the block; errors are PlanError lines."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    from_yaml = load_recipe("alfworld_qwen2_5_7b").arch  # the checkpoint is not here: the YAML block
    assert from_yaml == QwenArchitecture.from_hf_config(tmp_path)
    shape = (from_yaml.hidden_size, from_yaml.num_layers, from_yaml.qkv_bias, from_yaml.qk_norm)
    assert shape == (3584, 28, True, False)  # qwen2: QKV bias, no QK-norm
    assert compose_plan([f"model.hf_path={tmp_path}", "model.dtype=bfloat16"], dp=1).arch == from_yaml
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_7B, "num_hidden_layers": 14}))
    assert load_recipe("alfworld_qwen2_5_7b", f"model.hf_path={tmp_path}").arch.num_layers == 14
    moe = load_recipe("alfworld_qwen3_30b_a3b").arch
    assert moe.moe.num_experts == 128 and moe.moe.norm_topk_prob and moe.qk_norm and not moe.qkv_bias
    with pytest.raises(PlanError, match="Could not find 'model/nope'"):
        compose_plan(["model=nope"])
    with pytest.raises(PlanError, match="model.hf_path is null"):
        compose_plan(["model=tiny"])
    with pytest.raises(PlanError, match=r"model.architecture \(model 'qwen2_5_7b_instruct'\): architecture keys "
                                        r"\['hiden_size'\] are not config.json keys"):
        load_recipe("alfworld_qwen2_5_7b", "+model.architecture.hiden_size=8")
    with pytest.raises(UnsupportedConfigError, match="architecture.model_type='qwen3' differs from arch='qwen2'"):
        QwenArchitecture.from_architecture_block("qwen2", {**QWEN25_7B, "model_type": "qwen3"})
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_7B, "model_type": "llama"}))
    with pytest.raises(PlanError, match="is not a supported model: model_type='llama'"):
        load_recipe("alfworld_qwen2_5_7b", f"model.hf_path={tmp_path}")
    with pytest.raises(PlanError, match="tp=3 must divide"):
        estimate(TOY, Dims(tp=3), TOY_WORK)
    with pytest.raises(PlanError, match="pp=3 must divide layers=2"):
        estimate(TOY, Dims(pp=3), TOY_WORK)
    with pytest.raises(PlanError, match="multiple of micro_batch_size"):
        estimate(TOY, Dims(dp=4), TOY_WORK)
    with pytest.raises(PlanError, match="tensor parallel size 2 must divide intermediate_size=15"):  # the model's check
        estimate(_model(num_key_value_heads=2, intermediate_size=15), Dims(tp=2), TOY_WORK)


def test_the_run_decides_the_workload():
    """The recipe composed as the trainer composes it: its overrides, the objective's teacher pass
    and KL reference model, and the checks of the configuration."""
    sdar = load_recipe("alfworld_qwen2_5_7b")
    assert (sdar.workload.teacher_pass, sdar.workload.reference_model) == (True, True)
    assert (sdar.workload.seq_len, sdar.layout.world, sdar.layout.dp) == (2048 + 512, 8, 4)
    plain = load_recipe("alfworld_qwen2_5_7b", "algo.distill_coef=0", "algo.kl_coef=0",
                        "rollout.max_response_tokens=1024")
    assert (plain.workload.teacher_pass, plain.workload.reference_model, plain.workload.seq_len) == (False, False, 3072)
    a, b = (estimate(r.arch, r.layout, r.workload, r.rollout) for r in (sdar, plain))
    assert a.reference > 0 and b.reference == 0 and b.teacher == 0 and a.teacher > 0
    with pytest.raises(PlanError, match="trainer.adam_beta1 must be in"):
        load_recipe("alfworld_qwen2_5_7b", "trainer.adam_beta1=1.5")
    with pytest.raises(PlanError, match="parallel: tp=3 must divide heads=28 and kv_heads=4"):
        load_recipe("alfworld_qwen2_5_7b", "parallel.tp=3")


def test_teacher_weights_cost_what_the_choice_keeps():
    """``algo.teacher``: ``shared`` keeps no copy; ``frozen`` runs on the KL reference copy (nothing more
    when the KL term keeps it anyway, that copy when it does not); ``ema`` keeps a bf16 copy of its own
    and its fp32 average (6 bytes per parameter)."""
    def plan(*overrides):
        r = load_recipe("alfworld_qwen2_5_7b", *overrides)
        return r.workload, estimate(r.arch, r.layout, r.workload, r.rollout)

    _, shared = plan()
    work, frozen = plan("algo.teacher=frozen")
    _, ema = plan("algo.teacher=ema")
    _, shared_no_kl = plan("algo.kl_coef=0")
    _, frozen_no_kl = plan("algo.teacher=frozen", "algo.kl_coef=0")
    _, grpo_ema = plan("algo.distill_coef=0", "algo.teacher=ema")  # no teacher term, no teacher weights
    assert work.teacher_weights == "frozen"
    assert shared.teacher_weights == frozen.teacher_weights == 0 and frozen.reference == shared.reference > 0
    assert frozen.total == shared.total
    assert shared_no_kl.reference == 0 and frozen_no_kl.reference == shared.reference
    assert ema.teacher_weights == pytest.approx(3 * ema.weights) and ema.reference == shared.reference
    assert ema.training == pytest.approx(shared.training + ema.teacher_weights)
    assert grpo_ema.teacher_weights == 0
    with pytest.raises(PlanError, match="teacher_weights must be"):
        estimate(_model(), Dims(), replace(TOY_WORK, teacher_weights="stale"))


def test_dry_run_memory_plan_is_the_planners(tmp_path, monkeypatch):
    """``--dry-run`` (the downloaded model's config.json, the skill set) and the planner (the same
    recipe) estimate from the same QwenArchitecture and the same run: the same numbers."""
    from megatron_sdar.config.schema import compose_run
    from megatron_sdar.trainer.launch import dry_run_world_size, launch_plan, memory_plan
    from tests.recipes import recipe_model_dir
    from tests.skill_sets import write_release_format_sets

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    skills = write_release_format_sets(tmp_path / "skills")
    for recipe in ("alfworld_qwen2_5_72b", "alfworld_qwen3_30b_a3b"):
        overrides = [f"model.hf_path={recipe_model_dir(recipe, tmp_path)}", f"env.skills_dir={skills['alfworld']}",
                     f"trainer.output_dir={tmp_path / 'out'}"]
        run = compose_run([f"experiment={recipe}", *overrides])
        dry = memory_plan(launch_plan(run, dry_run_world_size(run), run.model.hf_path, check_hardware=False))
        planned = load_recipe(recipe, *overrides)
        est = estimate(planned.arch, planned.layout, planned.workload, planned.rollout)
        assert dry == {**{k: round(getattr(est, k), 3) for k in dry if k not in ("fits", "problems")},
                       "fits": est.fits, "problems": est.problems}, recipe


def test_cli(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import plan

    assert plan.main(["--experiment", "alfworld_qwen2_5_72b"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert plan.main(["--model", "qwen2_5_72b_instruct", "--tp", "1", "--dp", "8"]) == 2
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan.main(["--model", "qwen2_5_72b_instruct", "--tp", "3"]) == 1
    assert capsys.readouterr().err == "plan.py: parallel: tp=3 must divide heads=64 and kv_heads=8\n"
    assert plan.main(["--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plan.py: In 'sdar': Could not find 'model/nope'") and err.count("\n") == 1, err
    assert plan.main(["--model", "qwen3_8b", "--tp", "2", "--dp", "4", "--distributed-optimizer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["tp"] == 2
    # Hydra overrides, as for the trainer, between the flags
    assert plan.main(["--experiment", "alfworld_qwen2_5_7b", "parallel.tp=4", "--json", "rollout.tp=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["layout"]["tp"], out["layout"]["dp"], out["model"]) == (4, 2, "qwen2_5_7b_instruct")


@pytest.mark.multiproc
def test_validate_plan_against_measured_rss():
    """A real tiny Megatron model (107M params, fp32) trains two iterations on CPU; the planner's
    estimate must be within 25% of the peak RSS over the post-import baseline (about 20 s)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "validate_plan.py"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["within_tolerance"] and 0.75 <= report["ratio"] <= 1.25, report
