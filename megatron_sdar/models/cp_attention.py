"""Context-parallel core attention for Megatron's local (non-Transformer-Engine) layer spec.

Megatron-Core's ``DotProductAttention`` asserts ``context_parallel_size == 1``: context
parallelism (CP) lives in Transformer Engine's attention, and TE needs a GPU. On CPU (tests, CI,
small CPU runs) :class:`ContextParallelDotProductAttention` takes its place in the local spec
(:func:`megatron_sdar.models.megatron_model.build_layer_spec` swaps it in whenever TE is not
used). With TE, TE's own CP attention is used and this module is not involved.

Scheme ("all-gather CP", as in Megatron's ``cp_comm_type="all_gather"``):

* Megatron's load-balanced split: the global sequence of length ``S`` is cut into ``2 * cp``
  chunks of ``c = S / (2 * cp)`` tokens and CP rank ``r`` holds chunks ``r`` and
  ``2 * cp - 1 - r`` (:func:`megatron_sdar.utils.distributed.cp_token_indices`), so causal work
  is even across ranks. Each rank's local length is ``s = S / cp = 2 * c``.
* Keys and values (``[s, b, ng, hn]``, before the GQA head expansion, so the smaller tensors
  travel) are all-gathered over the CP group and put back into global token order
  (``[S, b, ng, hn]``). The gather's backward is a reduce-scatter: every rank's queries send
  key/value gradients to every chunk, and the owning rank receives their sum.
* Local queries (``[s, b, np, hn]``) attend to all ``S`` keys with a mask built from their global
  positions: query at global position ``p`` sees keys ``0..p``. The scores are ``[b, np, s, S]``;
  the rest (scaling, softmax, dropout, GQA, TP head split) is Megatron's ``DotProductAttention``
  unchanged, so with keys in global order the result matches CP=1 up to float rounding.

Memory: ``S`` keys per rank and ``[b, np, s, S]`` scores, i.e. ``1/cp`` of the CP=1 score
matrix. At CP=1 the module *is* ``DotProductAttention`` (same code path, bit-identical).

``attention_mask`` accepted under CP (``True`` marks a masked pair, Megatron's convention):

* ``None``: built here from the CP rank: causal over global positions when the mask type is
  causal (the local spec's), no mask otherwise;
* a mask over the whole global sequence, broadcastable to ``[b, np, S, S]`` with the last two
  dims exactly ``(S, S)`` in global token order (e.g. ``causal_attention_mask(S)``, what a CP=1
  caller passes); this rank's query rows are selected here;
* a mask already restricted to this rank's queries, last two dims ``(s, S)``: query rows in local
  order, key columns in global order.

A local ``(s, s)`` mask (e.g. ``causal_attention_mask(s)``) is rejected: it cannot say which
global keys a query sees. Packed sequences (``packed_seq_params``) and sliding-window attention
are not supported under CP.

What the caller passes under CP: this rank's tokens (``tokens[:, cp_token_indices(S, cp,
cp_rank)]``), their global position ids (GPTModel ignores them for RoPE: its rotary embedding
is computed for ``s * cp`` positions and sliced to this rank's chunks by Megatron), one of the
masks above, ``packed_seq_params=None``; labels/loss masks split the same way.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.utils.distributed import cp_token_indices

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


def gather_cp_sequence(local: Tensor, cp_group) -> Tensor:
    """All-gather ``[s, ...]`` shards of the load-balanced CP split into ``[s * cp, ...]`` in
    global token order. Backward: reduce-scatter of the gradient to the owning ranks.

    The raw gather stacks rank ``r``'s two chunks ``(r, 2cp-1-r)`` at rows ``[r*s, (r+1)*s)``;
    global chunk ``k < cp`` is rank ``k``'s first chunk, chunk ``k >= cp`` is rank
    ``2cp-1-k``'s second one.
    """
    cp = cp_group.size()
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=cp_group)
    chunk = local.shape[0] // 2
    by_rank = gathered.view(cp, 2, chunk, *local.shape[1:])
    ordered = torch.cat([by_rank[:, 0], by_rank[:, 1].flip(0)], dim=0)  # [2cp, chunk, ...]
    return ordered.reshape(cp * local.shape[0], *local.shape[1:])


class ContextParallelDotProductAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` plus all-gather context parallelism (see the module
    docstring for the scheme and the masks accepted under CP).

    Same constructor and forward signature as ``DotProductAttention`` (it is the local spec's
    ``core_attention``). Shapes: query ``[s, b, np, hn]``, key/value ``[s, b, ng, hn]`` (this
    rank's ``s = S / cp`` tokens, its TP share of heads) -> context ``[s, b, np * hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        # The parent refuses CP > 1 by assertion; everything else it sets up is CP-agnostic.
        parent_config = config
        if config.context_parallel_size > 1:
            parent_config = copy.copy(config)
            parent_config.context_parallel_size = 1
        super().__init__(
            parent_config, layer_number, attn_mask_type, attention_type, attention_dropout,
            softmax_scale, cp_comm_type, pg_collection,
        )
        self.config = config
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else cp_group.size()
        if self.cp_size != config.context_parallel_size:
            raise ValueError(
                f"config.context_parallel_size={config.context_parallel_size} but the CP group "
                f"has {self.cp_size} ranks"
            )
        if self.cp_size > 1:
            if self.scale_mask_softmax.window_size is not None:
                raise NotImplementedError(
                    "sliding-window attention is not supported with context parallelism"
                )
            # Under CP a mask is always passed explicitly and scores are [s, S], not square:
            # Megatron's fused causal kernel (square scores only) must not be picked.
            self.scale_mask_softmax.attn_mask_type = AttnMaskType.padding

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Context ``[s, b, np * hn]`` of this rank's queries over the whole sequence."""
        if self.cp_size == 1:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences are not supported by the CPU context-parallel attention"
            )
        local_len = query.shape[0]
        if local_len % 2:
            raise ValueError(
                f"context parallelism needs the sequence length to be a multiple of 2 * cp_size = "
                f"{2 * self.cp_size}; this rank holds {local_len} tokens (global length "
                f"{local_len * self.cp_size})"
            )
        mask = self._cp_mask(attention_mask, attn_mask_type or self.attn_mask_type, local_len, query.device)
        # one collective for both: keys and values share [s, b, ng, hn] up to the last dim
        key_dim = key.shape[-1]
        kv = gather_cp_sequence(torch.cat([key, value], dim=-1), self.cp_group)
        key, value = kv[..., :key_dim], kv[..., key_dim:]
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias, None)

    def _cp_mask(
        self, attention_mask: Optional[Tensor], mask_type: AttnMaskType, local_len: int, device: torch.device
    ) -> Optional[Tensor]:
        """``[.., s, S]`` boolean mask (``True`` = masked) of this rank's queries vs all keys."""
        global_len = local_len * self.cp_size
        query_pos = cp_token_indices(global_len, self.cp_size, self.cp_group.rank()).to(device)
        if attention_mask is None:
            if mask_type not in _CAUSAL_TYPES:
                return None
            key_pos = torch.arange(global_len, device=device)
            return (key_pos[None, :] > query_pos[:, None])[None, None]
        rows, cols = attention_mask.shape[-2:]
        if cols != global_len or rows not in (global_len, local_len):
            raise ValueError(
                f"under context parallelism (cp={self.cp_size}) attention_mask must be None, "
                f"[..., {global_len}, {global_len}] (global sequence) or [..., {local_len}, "
                f"{global_len}] (this rank's queries vs all keys); got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if rows == global_len:
            attention_mask = attention_mask.index_select(-2, query_pos.to(attention_mask.device))
        return attention_mask
