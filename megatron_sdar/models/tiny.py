"""Tiny Qwen-architecture models and a small tokenizer, built from nothing (no hub access).

Used by the embedded default run (a model small enough to train on two CPU cores) and by the
tests. The tokenizer is a byte-level BPE trained on the fly on a built-in corpus (plus any text
the caller adds), with Qwen's special tokens and chat template, so vLLM, transformers and the
trainer all tokenize exactly as they would for a real Qwen checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen's chat markup; the template below is a compact re-statement of the ChatML format.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BUILTIN_CORPUS = """
You are a household agent. Your task is to put a clean mug in the coffee machine.
You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1,
a drawer 2, a fridge 1, a microwave 1, a sinkbasin 1, a stoveburner 3 and a toaster 1.
go to countertop 1. take apple 1 from countertop 1. open fridge 1. close fridge 1.
put mug 2 in/on coffeemachine 1. clean mug 2 with sinkbasin 1. heat egg 1 with microwave 1.
cool potato 1 with fridge 1. use desklamp 1. examine book 3. inventory. look.
Nothing happens. You arrive at drawer 2. The drawer 2 is closed. You open the drawer 2.
In it, you see a knife 1, a spoon 2 and a fork 3. You pick up the spatula 1 from the shelf 1.
<action>go to cabinet 1</action> <think>I should look for the mug first.</think>
search[wireless headphones under 50 dollars] click[buy now] <search>capital of france</search>
<answer>Paris</answer> The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9.
"""


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, extra_text: str = ""):
    """Train a byte-level BPE on the built-in corpus (+ ``extra_text``); save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (_BUILTIN_CORPUS + "\n" + extra_text).splitlines()
    tok.train_from_iterator([line for line in text if line.strip()] * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


TINY_ARCHS = ("qwen2", "qwen3", "qwen3_moe")


def tiny_qwen_config(arch: str = "qwen2", vocab_size: int = 512, **overrides):
    """A transformers config of the Qwen2 (QKV bias, untied), Qwen3 (QK-norm, tied) or Qwen3-MoE
    (QK-norm, untied like the released MoE models, 4 experts of width 128, top-2, renormalised)
    family.

    Defaults: hidden 256, 4 query heads of 64 (vLLM's CPU attention rejects head_dim 16), 2 KV
    heads (GQA), 2 layers.
    """
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    if arch == "qwen2":
        common.update(tie_word_embeddings=False)
        common.update(overrides)
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.update(tie_word_embeddings=True, head_dim=64)
        common.update(overrides)
        return Qwen3Config(**common)
    if arch == "qwen3_moe":
        common.update(tie_word_embeddings=False, head_dim=64, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=128, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[])
        common.update(overrides)
        return Qwen3MoeConfig(**common)
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def build_tiny_qwen(out_dir: str | Path, arch: str = "qwen2", seed: int = 0, extra_text: str = "",
                    init_std: float = 0.08, **config_overrides) -> Path:
    """Save a randomly initialized tiny Qwen model and its tokenizer as an HF directory.

    ``init_std``: the standard deviation of every matrix. The default 0.08 (4x Qwen's 0.02) makes
    greedy decoding of an untrained model well separated, so numerical comparisons in tests are
    meaningful; a model that is going to be trained (the embedded default run) uses 0.02."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    vocab_size = config_overrides.pop("vocab_size", 512)
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size, extra_text=extra_text)
    config = tiny_qwen_config(arch, vocab_size=vocab_size, **config_overrides)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.bos_token_id = config.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The default init (std 0.02) gives near-uniform outputs; a larger scale makes greedy
    # decoding well separated, so numerical comparisons are meaningful. For MoE the same scale
    # spreads the router logits so tokens pick different experts (HF inits the router to zeros,
    # which would send every token to the same top-k by tie-breaking). Experts are 3-D tensors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id})
    )
    return out_dir
