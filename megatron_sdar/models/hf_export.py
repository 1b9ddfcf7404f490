"""Write a live (TP/PP-sharded) Megatron Qwen model as an HF safetensors checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import torch


def export_hf(model_chunks, arch, out_dir: str | Path, *, dtype: torch.dtype | None = None,
              assets_dir: str | Path | None = None, max_shard_bytes: int | None = None,
              progress: bool = False) -> None:
    """Collective over all ranks: the exporter gathers on every model-parallel rank, global rank 0
    writes ``out_dir`` (weights, ``config.json``, tokenizer and generation config copied from
    ``assets_dir``). Returns on every rank after the files are complete."""
    import torch.distributed as dist

    from megatron_sdar.models.exporter import iter_hf_weights
    from megatron_sdar.models.hf_writer import DEFAULT_MAX_SHARD_BYTES, write_hf_checkpoint, write_hf_metadata
    from megatron_sdar.models.weight_mapping import QwenWeightMapping

    dtype = dtype or arch.torch_dtype_object()
    pairs = iter_hf_weights(model_chunks, arch, target="first")
    if dist.get_rank() == 0:
        write_hf_checkpoint(pairs, QwenWeightMapping(arch).hf_tensor_shapes(), out_dir, dtype,
                            max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, progress=progress)
        write_hf_metadata(out_dir, dict(arch.hf_config), assets_dir, dtype)
    else:
        for _ in pairs:  # take part in the gathers; nothing is yielded here
            pass
    dist.barrier()
