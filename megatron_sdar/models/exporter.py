"""Stream ``(hf_name, full_tensor)`` pairs out of a live TP/PP-sharded Megatron Qwen model.

    for name, tensor in iter_hf_weights(model, arch, target="first"):   # on every rank
        ...                                                             # runs on global rank 0 only

Call it on every rank of the model-parallel group (it runs collectives); the pairs come out on the
ranks that need them: ``target="first"`` -> global rank 0 only (HF export), ``target="all"`` ->
every rank (weight sync to a colocated rollout engine, e.g. vLLM's ``reload_weights``).

Memory: items are processed one at a time in HF order (embedding, layer 0, layer 1, ..., final
norm, lm_head), one Megatron parameter at a time: the owning pipeline stage gathers that parameter
over its TP group straight into HF-layout buffers, then the buffers move to the pipeline stage(s)
that yield them. At any moment a rank holds at most one layer's full HF tensors beyond its own
model shard (for the embedding: the full embedding). The yielded tensors may alias the live
parameters (replicated norms at any TP, everything at TP=1): copy a tensor before modifying it or
keeping it across an optimizer step.

Mixture of experts: every expert tensor comes out on its own (``mlp.experts.{e}.gate_proj`` ...,
experts in index order within a layer). The expert-parallel rank holding expert ``e`` gathers it
over its expert-tensor-parallel group and broadcasts it over the expert-parallel group, so both
targets get every expert (vLLM needs all of them on every rank) while no rank holds more than one
expert tensor beyond its shard. Because the EP peers of rank 0 belong to other data-parallel
replicas, with ``ep > 1`` *every* rank must iterate, for ``target="first"`` too.
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch
import torch.distributed as dist

from megatron_sdar.models.architecture import QwenArchitecture
from megatron_sdar.models.weight_mapping import (
    LocalParam,
    ParamRule,
    QwenWeightMapping,
    ShardKind,
    iter_local_params,
)

ExportTarget = Literal["first", "all"]
_EMBEDDING, _FINAL_NORM, _OUTPUT = "embedding", "final_norm", "output"


def _item_of(mapping: QwenWeightMapping, lp: LocalParam) -> int | str | None:
    """Which export item a local parameter belongs to: a layer index or a non-layer key."""
    if lp.layer is not None:
        return lp.layer
    if lp.rule is mapping.embedding_rule:
        return _EMBEDDING
    if lp.rule is mapping.final_norm_rule:
        return _FINAL_NORM
    return _OUTPUT if lp.rule.exported else None


def _broadcast_expert(tensor: torch.Tensor | None, shape: tuple[int, ...], holder: int, ep_group,
                      dtype, device) -> torch.Tensor:
    """Give one expert tensor, gathered on its expert-parallel rank ``holder``, to every EP rank."""
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    elif not tensor.is_contiguous():
        tensor = tensor.contiguous()
    dist.broadcast(tensor, src=dist.get_global_rank(ep_group, holder), group=ep_group)
    return tensor


def _rules_of(mapping: QwenWeightMapping, item: int | str) -> list[ParamRule]:
    if isinstance(item, int):
        return list(mapping.layer_rules.values())
    return [{_EMBEDDING: mapping.embedding_rule, _FINAL_NORM: mapping.final_norm_rule,
             _OUTPUT: mapping.output_rule}[item]]


# Single-buffer all-gather (named all_gather_single from torch 2.13 on): the result lands in the
# output buffer directly, where a list all-gather may stage it in a temporary of the full size.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(local: torch.Tensor, rows: int, tp: int, group) -> torch.Tensor:
    """All-gather dim-0 shards straight into one ``[rows * tp, ...]`` buffer (no extra copy)."""
    if tp == 1:
        return local
    full = torch.empty((rows * tp, *local.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather_into(full, local.contiguous(), group=group)
    return full


def _gather_to_hf(mapping: QwenWeightMapping, lp: LocalParam, tp: int, group) -> list[Callable[[], torch.Tensor]]:
    """One thunk per HF tensor of this parameter; calling it gathers that full tensor over TP.

    Thunks, not tensors: the caller materializes (and releases) one HF tensor at a time, so
    gate and up (or q, k and v) are never all full at once.
    """
    local = lp.tensor.detach()
    kind = lp.rule.kind
    if kind is ShardKind.REPLICATED:
        return [lambda: local]
    if kind is ShardKind.VOCAB:
        # drop the TP padding rows (a view)
        return [lambda: _gather_rows(local, local.shape[0], tp, group)[: mapping.arch.vocab_size]]
    if kind in (ShardKind.GATE_UP, ShardKind.QKV):
        # gate/up: views of the local shard; q/k/v: small contiguous copies (1/tp of the tensor)
        parts = local.chunk(2, dim=0) if kind is ShardKind.GATE_UP else mapping.split_qkv(local)
        return [lambda part=part: _gather_rows(part, part.shape[0], tp, group) for part in parts]
    if kind is ShardKind.ROW:
        if tp == 1:
            return [lambda: local]

        def gather_columns() -> torch.Tensor:
            # [tp * out, in/tp] -> [out, tp * in/tp]: one transient copy of the parameter
            stacked = _gather_rows(local, local.shape[0], tp, group).view(tp, *local.shape)
            return stacked.permute(1, 0, 2).reshape(local.shape[0], tp * local.shape[1])

        return [gather_columns]
    raise AssertionError(kind)


def iter_hf_weights(model_chunks, arch: QwenArchitecture, *,
                    target: ExportTarget = "first") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every HF tensor of the model, full (unsharded), in HF checkpoint order.

    ``model_chunks``: this rank's model (or list of virtual-pipeline chunks), possibly wrapped in
    DDP/Float16Module. Every rank of the model-parallel group must iterate to the end; ranks of
    other data-parallel replicas may iterate too (with ``target="first"`` they yield nothing and
    run no collectives). With expert parallelism (``ep > 1``) every rank must iterate: the experts
    of rank 0's layers live on ranks of other data-parallel replicas.
    """
    from megatron.core import parallel_state as ps

    if target not in ("first", "all"):
        raise ValueError(f"target must be 'first' or 'all', got {target!r}")
    mapping = QwenWeightMapping(arch)
    local_params = iter_local_params(model_chunks, mapping)
    if not local_params:
        raise ValueError("the model has no parameters")
    dtype, device = local_params[0].tensor.dtype, local_params[0].tensor.device
    rank = dist.get_rank()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep, ep_rank, etp, ep_group, etp_group, experts_per_rank = 1, 0, 1, None, None, 1
    if mapping.num_experts:
        ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
        ep_rank = ps.get_expert_model_parallel_rank()
        ep_group, etp_group = ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()
        experts_per_rank = mapping.num_experts // ep
    if target == "first" and ep == 1 and 0 not in dist.get_process_group_ranks(ps.get_model_parallel_group()):
        return  # another data-parallel replica: rank 0's replica does the work

    by_item: dict[int | str, dict[tuple[str, int | None], LocalParam]] = {}
    for lp in local_params:
        item = _item_of(mapping, lp)
        if item is not None:
            by_item.setdefault(item, {})[(lp.rule.megatron_name, lp.expert)] = lp
    owners: dict[int | str, int] = {}
    if pp > 1:
        held: list[list] = [None] * pp  # type: ignore[list-item]
        dist.all_gather_object(held, sorted(by_item, key=str), group=pp_group)
        for stage, items in enumerate(held):
            for item in items:
                owners.setdefault(item, stage)
    else:
        owners = {item: 0 for item in by_item}
    order: list[int | str] = [_EMBEDDING, *range(arch.num_layers), _FINAL_NORM]
    if mapping.output_rule.exported:
        order.append(_OUTPUT)
    missing = [item for item in order if item not in owners]
    if missing:
        raise ValueError(f"no pipeline stage holds {missing[:5]}")

    with torch.no_grad():
        for item in order:
            owner = owners[item]
            mine = owner == pp_rank
            layer = item if isinstance(item, int) else None
            for rule, expert in ((r, e) for r in _rules_of(mapping, item) for e in mapping.experts_of(r)):
                thunks = None
                if mine and not rule.expert:
                    thunks = _gather_to_hf(mapping, by_item[item][(rule.megatron_name, None)], tp, tp_group)
                elif mine and expert // experts_per_rank == ep_rank:
                    thunks = _gather_to_hf(mapping, by_item[item][(rule.megatron_name, expert)], etp, etp_group)
                for i, (name, shape) in enumerate(zip(rule.hf_names_for(layer, expert), rule.hf_shapes)):
                    tensor = thunks[i]() if thunks is not None else None
                    if mine and rule.expert and ep > 1:
                        tensor = _broadcast_expert(tensor, shape, expert // experts_per_rank, ep_group,
                                                   dtype, device)
                    if (pp > 1 and owner != 0) or target == "all":
                        tensor = _move_over_pipeline(tensor, shape, target, owner, pp_rank, tp_rank,
                                                     pp_group, dtype, device)
                    if tensor is not None and (target == "all" or rank == 0):
                        yield name, tensor
                    del tensor


def _move_over_pipeline(tensor: torch.Tensor | None, shape: tuple[int, ...], target: ExportTarget,
                        owner: int, pp_rank: int, tp_rank: int, pp_group, dtype,
                        device) -> torch.Tensor | None:
    """Bring one HF tensor from the owner stage to the stage(s) that yield it (None elsewhere)."""
    pp = dist.get_world_size(pp_group)
    if pp == 1:
        return tensor
    src = dist.get_global_rank(pp_group, owner)
    if target == "all":  # every stage of every TP rank's pipeline receives
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        elif not tensor.is_contiguous():
            tensor = tensor.contiguous()
        dist.broadcast(tensor, src=src, group=pp_group)
        return tensor
    # target == "first": only TP rank 0 of the owner stage talks to global rank 0 (stage 0)
    if tp_rank != 0:
        return None
    if pp_rank == owner:
        dist.send(tensor.contiguous(), dst=dist.get_global_rank(pp_group, 0))
        return None
    if pp_rank == 0:
        received = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(received, src=src)
        return received
    return None
