"""Parameter-by-parameter mapping between HF Qwen tensors and Megatron's TP-sharded parameters.

Every Megatron parameter is described by one :class:`ParamRule`: its (canonical) Megatron name,
the HF tensor(s) it is made of, and a :class:`ShardKind` saying how those HF tensors are fused and
split over tensor-parallel ranks. Both directions use the same rules: the loader
(:mod:`megatron_sdar.models.hf_loader`) turns a rule into the byte ranges one TP rank reads, the
exporter (:mod:`megatron_sdar.models.exporter`) turns it into the gathers that rebuild the HF
tensors. Adding an architecture means adding rules and, if new, a shard kind.

Layouts (h = hidden, d = head_dim, n_q / n_kv = query / key-value heads, g = n_q / n_kv, f = ffn):

* ``QKV``: Megatron's ``linear_qkv`` is ``[n_kv * (g + 2) * d, h]`` grouped per key-value head:
  for each group ``[q_1 .. q_g, k, v]`` (d rows each). TP rank r owns groups
  ``[r * n_kv/tp, (r+1) * n_kv/tp)``, i.e. a contiguous row range of each of q/k/v_proj.
* ``GATE_UP``: ``linear_fc1`` is ``[2f, h]``; each TP shard is ``[gate_r; up_r]`` with
  ``gate_r = gate_proj[r*f/tp:(r+1)*f/tp]`` (so the unsharded fc1 is NOT ``[gate; up]`` for tp>1).
* ``ROW``: split over the input dimension (``o_proj``, ``down_proj``).
* ``VOCAB``: rows of the (padded) vocabulary; rows past the HF vocabulary are zeros.
* ``REPLICATED``: every TP rank holds the full tensor (RMSNorm weights, the MoE router).

Mixture of experts (Qwen3-MoE): the router ``mlp.router.weight [E, h]`` is HF's ``mlp.gate.weight``
(replicated). Expert rules carry ``expert=True`` and an ``{expert}`` placeholder in their HF names:
one rule covers ``mlp.experts.{e}.gate_proj/up_proj`` (``GATE_UP``, fused into the expert's
``linear_fc1``) and one ``down_proj`` (``ROW``, ``linear_fc2``) for every expert ``e``. Expert
parallel rank ``r`` of ``ep`` holds experts ``[r * E/ep, (r+1) * E/ep)`` as local experts
``0 .. E/ep - 1``; inside one expert, the width is split over the *expert* tensor-parallel ranks
(``etp``, Megatron's default ``etp = tp``) exactly like a dense MLP over TP. Megatron names a local
expert ``mlp.experts.local_experts.{i}.linear_fc1.weight`` (``SequentialMLP``, local spec) or
``mlp.experts.linear_fc1.weight{i}`` (``TEGroupedMLP``, TE spec); both map to the rule
``mlp.experts.linear_fc1.weight`` with local index ``i``.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_sdar.models.architecture import QwenArchitecture

# Transformer Engine's layer spec fuses the RMSNorm in front of a linear into that linear; these
# are the TE names of parameters whose canonical (local-spec) name is on the right.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# a local expert's parameter: SequentialMLP (local_experts.{i}.<p>.weight) or TEGroupedMLP (<p>.weight{i})
_SEQUENTIAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$")


class ShardKind(enum.Enum):
    REPLICATED = "replicated"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter <-> its HF tensor(s).

    ``megatron_name`` is relative to the layer (``self_attention.linear_qkv.weight``) for
    per-layer rules, absolute (``embedding.word_embeddings.weight``) otherwise. ``hf_names``
    are templates with ``{layer}`` (the global 0-based layer index) and, for ``expert`` rules,
    ``{expert}`` (the global expert index); ``hf_shapes`` their full shapes. ``exported`` is False
    for a parameter whose HF tensor another rule already exports (the tied output layer of the
    last pipeline stage). ``expert`` rules are sharded over the expert tensor-parallel group.
    """

    megatron_name: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: ShardKind
    per_layer: bool
    exported: bool = True
    expert: bool = False

    def hf_names_for(self, layer: int | None, expert: int | None = None) -> tuple[str, ...]:
        if self.expert and expert is None:
            raise ValueError(f"{self.megatron_name} is an expert parameter: pass the expert index")
        return tuple(n.format(layer=layer, expert=expert) for n in self.hf_names)


@dataclass(frozen=True)
class SliceRead:
    """Read ``hf_name[start:stop]`` along ``dim`` (the part of an HF tensor one TP rank needs)."""

    hf_name: str
    dim: int
    start: int
    stop: int


def split_expert_name(layer_param: str) -> tuple[str, int | None]:
    """``(rule name, local expert index)`` of a layer-relative parameter name (index None if not
    an expert's): both Megatron expert layouts map to ``mlp.experts.linear_fc{1,2}.weight``."""
    m = _SEQUENTIAL_EXPERT.match(layer_param)
    if m:
        return f"mlp.experts.{m.group(2)}", int(m.group(1))
    m = _GROUPED_EXPERT.match(layer_param)
    if m:
        return f"mlp.experts.{m.group(1)}", int(m.group(2))
    return layer_param, None


def canonical_megatron_name(name: str) -> str:
    """Strip wrapper prefixes (DDP/Float16Module ``module.``) and map TE names to local-spec names."""
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_PARAM.match(name)
    if m and m.group(2) in _TE_ALIASES:
        return f"decoder.layers.{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return name


class QwenWeightMapping:
    """The rules for one :class:`QwenArchitecture`, plus the per-rank slicing arithmetic."""

    def __init__(self, arch: QwenArchitecture):
        self.arch = arch
        a = arch
        h, d, f = a.hidden_size, a.head_dim, a.intermediate_size
        layer = "model.layers.{layer}."
        qkv_names = tuple(f"{layer}self_attn.{p}_proj" for p in "qkv")
        rules = [
            ParamRule("input_layernorm.weight", (f"{layer}input_layernorm.weight",), ((h,),),
                      ShardKind.REPLICATED, True),
            ParamRule("self_attention.linear_qkv.weight", tuple(n + ".weight" for n in qkv_names),
                      ((a.q_size, h), (a.kv_size, h), (a.kv_size, h)), ShardKind.QKV, True),
        ]
        if a.qkv_bias:
            rules.append(ParamRule("self_attention.linear_qkv.bias", tuple(n + ".bias" for n in qkv_names),
                                   ((a.q_size,), (a.kv_size,), (a.kv_size,)), ShardKind.QKV, True))
        if a.qk_norm:
            rules += [
                ParamRule("self_attention.q_layernorm.weight", (f"{layer}self_attn.q_norm.weight",), ((d,),),
                          ShardKind.REPLICATED, True),
                ParamRule("self_attention.k_layernorm.weight", (f"{layer}self_attn.k_norm.weight",), ((d,),),
                          ShardKind.REPLICATED, True),
            ]
        rules += [
            ParamRule("self_attention.linear_proj.weight", (f"{layer}self_attn.o_proj.weight",),
                      ((h, a.q_size),), ShardKind.ROW, True),
            ParamRule("pre_mlp_layernorm.weight", (f"{layer}post_attention_layernorm.weight",), ((h,),),
                      ShardKind.REPLICATED, True),
        ]
        if a.moe is None:
            rules += [
                ParamRule("mlp.linear_fc1.weight", (f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"),
                          ((f, h), (f, h)), ShardKind.GATE_UP, True),
                ParamRule("mlp.linear_fc2.weight", (f"{layer}mlp.down_proj.weight",), ((h, f),), ShardKind.ROW,
                          True),
            ]
        else:
            e, fe = a.moe.num_experts, a.moe.expert_ffn_hidden_size
            expert = layer + "mlp.experts.{expert}."
            rules += [
                ParamRule("mlp.router.weight", (f"{layer}mlp.gate.weight",), ((e, h),), ShardKind.REPLICATED, True),
                ParamRule("mlp.experts.linear_fc1.weight", (f"{expert}gate_proj.weight", f"{expert}up_proj.weight"),
                          ((fe, h), (fe, h)), ShardKind.GATE_UP, True, expert=True),
                ParamRule("mlp.experts.linear_fc2.weight", (f"{expert}down_proj.weight",), ((h, fe),),
                          ShardKind.ROW, True, expert=True),
            ]
        vocab = (a.vocab_size, h)
        self.embedding_rule = ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                                        (vocab,), ShardKind.VOCAB, False)
        self.final_norm_rule = ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),),
                                         ShardKind.REPLICATED, False)
        if a.tie_word_embeddings:
            # Only exists on a last pipeline stage without the embedding; loaded from the embedding.
            self.output_rule = ParamRule("output_layer.weight", ("model.embed_tokens.weight",), (vocab,),
                                         ShardKind.VOCAB, False, exported=False)
        else:
            self.output_rule = ParamRule("output_layer.weight", ("lm_head.weight",), (vocab,),
                                         ShardKind.VOCAB, False)
        self.layer_rules: dict[str, ParamRule] = {r.megatron_name: r for r in rules}
        self.global_rules: dict[str, ParamRule] = {
            r.megatron_name: r for r in (self.embedding_rule, self.final_norm_rule, self.output_rule)
        }

    # --- names ---------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.arch.moe.num_experts if self.arch.moe is not None else 0

    def experts_of(self, rule: ParamRule) -> tuple[int | None, ...]:
        """The expert indices a rule is instantiated for (``(None,)`` for a non-expert rule)."""
        return tuple(range(self.num_experts)) if rule.expert else (None,)

    def rule_for(self, canonical_name: str, layer_offset: int | Iterable[int] = 0) -> tuple[ParamRule, int | None]:
        """The rule of a canonical Megatron parameter name and its global layer index (or None).

        ``layer_offset`` is added to the chunk-local layer index in the name. Expert parameters
        (either Megatron layout) resolve to their expert rule; see :func:`split_expert_name`.
        """
        m = _LAYER_PARAM.match(canonical_name)
        if m:
            rule = self.layer_rules.get(split_expert_name(m.group(2))[0])
            if rule is None:
                raise KeyError(f"no HF mapping for Megatron parameter {canonical_name!r}")
            return rule, int(m.group(1)) + int(layer_offset)
        rule = self.global_rules.get(canonical_name)
        if rule is None:
            raise KeyError(f"no HF mapping for Megatron parameter {canonical_name!r}")
        return rule, None

    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of the checkpoint with its shape, in export order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for rule in self.export_order_rules(None):
            shapes.update(zip(rule.hf_names_for(None), rule.hf_shapes))
        for layer in range(self.arch.num_layers):
            for rule in self.layer_rules.values():
                for expert in self.experts_of(rule):
                    shapes.update(zip(rule.hf_names_for(layer, expert), rule.hf_shapes))
        for rule in self.export_order_rules("tail"):
            shapes.update(zip(rule.hf_names_for(None), rule.hf_shapes))
        return shapes

    def export_order_rules(self, where: str | None) -> list[ParamRule]:
        """Non-layer rules exported before the layers (``None``) or after them (``"tail"``)."""
        if where is None:
            return [self.embedding_rule]
        return [self.final_norm_rule] + ([self.output_rule] if self.output_rule.exported else [])

    # --- HF -> Megatron ------------------------------------------------------------------------
    def read_plan(self, rule: ParamRule, layer: int | None, tp_rank: int, tp: int,
                  padded_vocab: int | None = None, expert: int | None = None) -> list[SliceRead]:
        """The HF slices TP rank ``tp_rank`` of ``tp`` needs for its shard of ``rule``'s parameter.

        For an expert rule, ``expert`` is the global expert index and ``tp_rank``/``tp`` are the
        expert tensor-parallel rank and size.
        """
        names = rule.hf_names_for(layer, expert)
        kind = rule.kind
        if kind is ShardKind.REPLICATED:
            return [SliceRead(names[0], 0, 0, rule.hf_shapes[0][0])]
        if kind is ShardKind.ROW:
            cols = rule.hf_shapes[0][1]
            return [SliceRead(names[0], 1, tp_rank * cols // tp, (tp_rank + 1) * cols // tp)]
        if kind is ShardKind.VOCAB:
            rows = rule.hf_shapes[0][0]
            per_rank = (padded_vocab or rows) // tp
            start = min(tp_rank * per_rank, rows)
            return [SliceRead(names[0], 0, start, min(start + per_rank, rows))]
        if kind is ShardKind.GATE_UP:
            f = rule.hf_shapes[0][0]
            lo, hi = tp_rank * f // tp, (tp_rank + 1) * f // tp
            return [SliceRead(names[0], 0, lo, hi), SliceRead(names[1], 0, lo, hi)]
        if kind is ShardKind.QKV:
            a = self.arch
            groups = a.num_key_value_heads // tp
            g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
            q_rows = a.heads_per_group * a.head_dim
            return [SliceRead(names[0], 0, g0 * q_rows, g1 * q_rows),
                    SliceRead(names[1], 0, g0 * a.head_dim, g1 * a.head_dim),
                    SliceRead(names[2], 0, g0 * a.head_dim, g1 * a.head_dim)]
        raise AssertionError(kind)

    def assemble(self, rule: ParamRule, pieces: list[torch.Tensor], local_shape: torch.Size) -> torch.Tensor:
        """Build one TP rank's parameter shard from the slices of :meth:`read_plan` (same order)."""
        kind = rule.kind
        if kind in (ShardKind.REPLICATED, ShardKind.ROW):
            out = pieces[0]
        elif kind is ShardKind.VOCAB:
            out = pieces[0]
            missing = local_shape[0] - out.shape[0]
            if missing > 0:  # padded vocabulary rows past the HF vocabulary
                out = torch.cat([out, out.new_zeros((missing, *out.shape[1:]))])
        elif kind is ShardKind.GATE_UP:
            out = torch.cat(pieces, dim=0)
        elif kind is ShardKind.QKV:
            out = self.fuse_qkv(*pieces)
        else:
            raise AssertionError(kind)
        if tuple(out.shape) != tuple(local_shape):
            raise ValueError(
                f"{rule.megatron_name}: HF slices give shape {tuple(out.shape)}, the Megatron shard is "
                f"{tuple(local_shape)} (checkpoint and model config disagree)"
            )
        return out

    def fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [G*g*d, ...], k/v [G*d, ...]`` -> Megatron grouped ``[G*(g+2)*d, ...]`` (G groups)."""
        d, g = self.arch.head_dim, self.arch.heads_per_group
        groups = k.shape[0] // d
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, g * d, *rest), k.reshape(groups, d, *rest),
                           v.reshape(groups, d, *rest)], dim=1)
        return fused.reshape(groups * (g + 2) * d, *rest)

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`fuse_qkv`; returns contiguous ``q, k, v``."""
        d, g = self.arch.head_dim, self.arch.heads_per_group
        rest = fused.shape[1:]
        groups = fused.shape[0] // ((g + 2) * d)
        grouped = fused.reshape(groups, (g + 2) * d, *rest)
        q, k, v = torch.split(grouped, [g * d, d, d], dim=1)
        return (q.reshape(groups * g * d, *rest).contiguous(), k.reshape(groups * d, *rest).contiguous(),
                v.reshape(groups * d, *rest).contiguous())

    def shard_from_full(self, rule: ParamRule, layer: int | None, full: dict[str, torch.Tensor],
                        tp_rank: int, tp: int, local_shape: torch.Size, expert: int | None = None) -> torch.Tensor:
        """In-memory variant of read + assemble (tests, small models): full HF tensors -> shard."""
        padded = local_shape[0] * tp if rule.kind is ShardKind.VOCAB else None
        pieces = [full[r.hf_name].narrow(r.dim, r.start, r.stop - r.start)
                  for r in self.read_plan(rule, layer, tp_rank, tp, padded, expert)]
        return self.assemble(rule, pieces, local_shape)


@dataclass
class LocalParam:
    """One parameter of this rank's model chunk(s), resolved to its rule and global layer."""

    name: str  # canonical Megatron name with the chunk-local layer index
    rule: ParamRule
    layer: int | None  # global 0-based layer index, None for non-layer parameters
    tensor: torch.Tensor  # the parameter itself (its ``.data`` is read / written)
    expert: int | None = None  # global expert index (expert parameters only)


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def iter_local_params(model_chunks, mapping: QwenWeightMapping) -> list[LocalParam]:
    """All parameters of this rank's model chunk(s) (one module or a list, for virtual pipeline)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    first_expert = 0
    if mapping.num_experts:
        from megatron.core import parallel_state as ps

        ep = ps.get_expert_model_parallel_world_size()
        first_expert = ps.get_expert_model_parallel_rank() * (mapping.num_experts // ep)
    out: list[LocalParam] = []
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        layers = chunk.decoder.layers
        for raw_name, param in chunk.named_parameters():
            name = canonical_megatron_name(raw_name)
            m = _LAYER_PARAM.match(name)
            if m:
                # layer_number is Megatron's global 1-based index (pipeline offsets included)
                global_layer = layers[int(m.group(1))].layer_number - 1
                rule, layer = mapping.rule_for(name, global_layer - int(m.group(1)))
                local_expert = split_expert_name(m.group(2))[1]
                expert = None if local_expert is None else first_expert + local_expert
            else:
                (rule, layer), expert = mapping.rule_for(name), None
            out.append(LocalParam(name, rule, layer, param, expert))
    return out
