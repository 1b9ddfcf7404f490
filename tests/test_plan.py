"""Memory planner: hand-computed terms on a toy model, monotonicity, the 72B layouts, every recipe,
the model sources (yaml name, HF config.json) and the CLI. The CPU RSS check is
``tools/validate_plan.py`` (run by test_validate_plan_against_measured_rss, about 20 s)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_sdar.utils.memory_plan import (
    GIB, ModelShape, PlanError, Rollout, Workload, estimate, load_model_shape, load_recipe, recipe_names,
    _stage_estimate, recipe_table, shape_from_hf_config, stage_params,
)
from megatron_sdar.utils.parallel_dims import ParallelDims


def Dims(**sizes) -> ParallelDims:  # noqa: N802 - the planner's layouts here use the distributed optimizer
    return ParallelDims(**{"distributed_optimizer": True, **sizes})


ROOT = Path(__file__).resolve().parents[1]
TOY = ModelShape(name="toy", hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
TOY_WORK = Workload(seq_len=4, micro_batch_size=1, global_batch_size=2, teacher_extra_tokens=0,
                    reference_model=True, teacher_pass=False)


def _bytes(est, key):
    return round(getattr(est, key) * GIB, 6)


def test_toy_model_terms_by_hand():
    # per layer: attention 8*(8+2*4) + 8*8 = 192, norms 2*8 = 16, MLP 3*8*16 = 384 -> 592;
    # 2 layers + embedding and output 2*10*8 + final norm 8 = 1352 parameters
    assert TOY.total_params() == 1352
    est = estimate(TOY, Dims(dp=2), TOY_WORK, overhead_gib=0.0)
    assert _bytes(est, "weights") == 2 * 1352
    assert _bytes(est, "gradients") == 4 * 1352
    assert _bytes(est, "optimizer") == 12 * 1352 / 2  # distributed optimizer over dp=2
    assert _bytes(est, "reference") == 2 * 1352
    # activations, T=4 tokens, 2 bytes: 4*T*h*2=256 + T*(2*8+2*4)*2=192 + lse T*2*4=32 + 3*T*16*2=384
    # = 864 per layer, 2 layers, plus embedding output and final norm input 2*T*h*2 = 128
    assert _bytes(est, "activations") == 2 * 864 + 128
    assert _bytes(est, "activations_full_recompute") == 2 * (4 * 8 * 2) + 864 + 128
    assert _bytes(est, "logits") == pytest.approx(4 * 10 * (2 * 2 + 0.4))
    assert est.total * GIB == pytest.approx(2704 + 5408 + 8112 + 2704 + 1856 + 176)
    no_dist = estimate(TOY, Dims(dp=2, distributed_optimizer=False), TOY_WORK, overhead_gib=0.0)
    assert _bytes(no_dist, "optimizer") == 12 * 1352
    fp32 = estimate(TOY, Dims(), replace(TOY_WORK, precision="fp32"), overhead_gib=0.0)
    assert (_bytes(fp32, "weights"), _bytes(fp32, "optimizer")) == (4 * 1352, 8 * 1352)  # no separate master copy


def test_tensor_and_pipeline_split_by_hand():
    toy = replace(TOY, kv_heads=2)  # attention 8*(8+2*8) + 8*8 = 256
    est = estimate(toy, Dims(tp=2, pp=2), TOY_WORK, overhead_gib=0.0)
    # one layer per stage: (256+384)/2 + 16 = 336; stage 0 adds the embedding 5*8 = 40 (376),
    # the last stage the output layer 40 and the final norm 8 (384)
    assert (stage_params(toy, Dims(tp=2, pp=2), 0).total, stage_params(toy, Dims(tp=2, pp=2), 1).total) == (376, 384)
    # ...but stage 0 keeps 2 micro-batches in flight (1F1B), so it is the worst stage
    assert est.stage == 0 and _bytes(est, "weights") == 2 * 376 and est.logits == 0
    last = _stage_estimate(toy, Dims(tp=2, pp=2), TOY_WORK, 1)
    assert last["logits"] == pytest.approx(4 * 5 * 4.4)  # [T, V/tp] logits + grad (bf16) + 0.1x fp32
    # one layer at tp=2: 4*T*h*2 = 256 + T*(2*8+2*8)*2/2 = 128 + lse T*1*4 = 16 + 3*T*16*2/2 = 192 -> 592
    assert (_bytes(est, "activations"), last["activations"]) == (2 * 592 + 128, 592 + 128)


def test_monotonicity():
    shape = load_model_shape("qwen2_5_7b_instruct")
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
    shape = load_model_shape("qwen2_5_72b_instruct")
    assert shape.total_params() == pytest.approx(72.7e9, rel=0.01)
    too_big = estimate(shape, Dims(tp=1, dp=8), Workload(global_batch_size=128))
    assert not too_big.fits and too_big.weights > 100 and "GiB per GPU" in too_big.problems[0]
    recipe = load_recipe("alfworld_qwen2_5_72b")
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
    shape = load_model_shape("qwen3_30b_a3b")
    assert shape.is_moe and shape.total_params() == pytest.approx(30.5e9, rel=0.02)
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
    shape = load_model_shape("qwen2_5_7b_instruct")
    est = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.3, tp=2))
    assert est.vllm_weights == pytest.approx(shape.total_params() * 2 / 2 / GIB)
    per_token = 2 * 28 * 4 * 128 * 2 / 2  # K and V, 28 layers, 4 KV heads of 128, bf16, over rollout tp 2
    assert est.vllm_kv_tokens == int(est.vllm_kv_cache * GIB // per_token)
    tiny_pool = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.05, tp=1))
    assert not tiny_pool.fits and "do not fit its pool" in tiny_pool.problems[0]
    asleep = estimate(shape, Dims(tp=2, dp=4), Workload(), Rollout(gpu_memory_utilization=0.3, tp=2, sleeps=True))
    assert asleep.total < est.total


def test_model_sources_and_errors(tmp_path):
    hf = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
          "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_hf = load_model_shape(tmp_path)
    assert replace(from_hf, name="x") == replace(load_model_shape("qwen2_5_7b_instruct"), name="x")
    moe = shape_from_hf_config({**hf, "model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
                                "moe_intermediate_size": 768, "head_dim": 128})
    assert moe.is_moe and moe.qk_norm and not moe.qkv_bias
    with pytest.raises(PlanError, match="unknown model 'nope'"):
        load_model_shape("nope")
    with pytest.raises(PlanError, match="model_type='llama'"):
        shape_from_hf_config({**hf, "model_type": "llama"})
    with pytest.raises(PlanError, match="tp=3 must divide"):
        estimate(TOY, Dims(tp=3), TOY_WORK)
    with pytest.raises(PlanError, match="pp=3 must divide layers=2"):
        estimate(TOY, Dims(pp=3), TOY_WORK)
    with pytest.raises(PlanError, match="multiple of micro_batch_size"):
        estimate(TOY, Dims(dp=4), TOY_WORK)


def test_cli(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import plan

    assert plan.main(["--experiment", "alfworld_qwen2_5_72b"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert plan.main(["--model", "qwen2_5_72b_instruct", "--tp", "1", "--dp", "8"]) == 2
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan.main(["--model", "qwen2_5_72b_instruct", "--tp", "3"]) == 1
    assert "tp=3 must divide" in capsys.readouterr().err
    assert plan.main(["--model", "qwen3_8b", "--tp", "2", "--dp", "4", "--distributed-optimizer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["tp"] == 2


def test_validate_plan_against_measured_rss():
    """A real tiny Megatron model (107M params, fp32) trains two iterations on CPU; the planner's
    estimate must be within 25% of the peak RSS over the post-import baseline (about 20 s)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "validate_plan.py"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["within_tolerance"] and 0.75 <= report["ratio"] <= 1.25, report
