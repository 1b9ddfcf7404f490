"""The forward-only passes (teacher, reference) and the student's forward/backward, run through
Megatron's pipeline schedule (``get_forward_backward_func``) on any TP/PP/CP/DP layout.

Forward-only passes return per-sample, per-response-token values (``{sample: [R, ...]}``) on
the last pipeline stage of every data-parallel rank (CP slices are all-gathered, so the values do
not depend on the pass's layout and can be scattered into the next pass, whose prompts differ).

The student pass returns each micro-batch's loss *contribution* to Megatron's schedule
multiplied by ``num_micro_batches * dp``: the schedule divides by the number of micro-batches (and
multiplies by cp) and DDP averages gradients over DP x CP, so the gradients that reach the
optimizer are exactly the gradients of the global loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron_sdar.algo.aggregation import LossNormalizers, Segments
from megatron_sdar.algo.objective import ObjectiveConfig, ObjectiveInputs, ParallelGroups, SDARObjective
from megatron_sdar.algo.vocab_parallel import (
    vocab_parallel_logprobs_entropy,
    vocab_parallel_topk,
)
from megatron_sdar.trainer.batch import MicroBatch, PassLayout
from megatron_sdar.utils.device import causal_attention_mask, current_device
from megatron_sdar.utils.parallel_dims import ProcessGroups


def objective_groups(ctx: ProcessGroups) -> ParallelGroups:
    """The groups the objective reduces over (``None`` where the layout does not split)."""
    return ParallelGroups(tp=ctx.reduction(ctx.tp_group), cp=ctx.reduction(ctx.cp_group),
                          dp_cp=ctx.reduction(ctx.dp_cp_group))


def _mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """Columns past the real vocabulary (TP padding) get -inf: they must carry no probability."""
    v_local = logits.shape[-1]
    start = dist.get_rank(tp_group) * v_local if dist.get_world_size(tp_group) > 1 else 0
    if start + v_local <= vocab_size:
        return logits
    keep = torch.arange(start, start + v_local, device=logits.device) < vocab_size
    return logits.masked_fill(~keep, float("-inf"))


def _attention_mask(seq_len: int, cp_size: int):
    # the context-parallel core attention builds its causal mask from the CP rank
    return None if cp_size > 1 else causal_attention_mask(seq_len)


def _run_schedule(model: list, micro_batches: list[MicroBatch], layout: PassLayout,
                  loss_func: Callable[[MicroBatch, torch.Tensor], tuple], forward_only: bool) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = current_device()
    causal: dict[int, torch.Tensor | None] = {}  # one mask per row length (packed micro-batches vary)

    def forward_step(data_iterator, chunk):
        mb: MicroBatch = next(data_iterator)
        if layout.thd:  # Transformer Engine: the rows as one [1, B * S] THD sequence
            from megatron_sdar.trainer.batch import thd_packed_seq_params

            rows, length = mb.tokens.shape
            output = chunk(mb.tokens.reshape(1, -1).to(device), mb.position_ids.reshape(1, -1).to(device), None,
                           packed_seq_params=thd_packed_seq_params(mb.segments, device))
            return output, (lambda out, mb=mb: loss_func(mb, out.view(rows, length, -1)))
        if mb.attention_mask is None:
            length = mb.tokens.shape[1] * layout.cp_size
            if length not in causal:
                causal[length] = _attention_mask(length, layout.cp_size)
            mask = causal[length]
        else:
            mask = mb.attention_mask.to(device)  # rows of several samples: block-diagonal
        output = chunk(mb.tokens.to(device), mb.position_ids.to(device), mask)
        return output, (lambda out, mb=mb: loss_func(mb, out))

    vpp = len(model)
    iterators = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    seq_length, micro_batch_size = ((layout.seq_len * layout.micro_batch_size, 1) if layout.thd
                                    else (layout.seq_len, layout.micro_batch_size))
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=model,
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)


def _gather_cp(values: torch.Tensor, ctx: ProcessGroups, layout: PassLayout) -> torch.Tensor:
    """[B, S_local, ...] CP slices -> [B, S, ...] in global position order."""
    if ctx.dims.cp == 1:
        return values
    from megatron_sdar.utils.distributed import cp_token_indices

    parts = [torch.empty_like(values) for _ in range(ctx.dims.cp)]
    dist.all_gather(parts, values.contiguous(), group=ctx.cp_group)
    length = values.shape[1] * ctx.dims.cp  # this micro-batch's row length
    full = torch.empty((values.shape[0], length, *values.shape[2:]), dtype=values.dtype, device=values.device)
    for rank, part in enumerate(parts):
        full[:, cp_token_indices(length, ctx.dims.cp, rank).to(values.device)] = part
    return full


def forward_token_values(model: list, micro_batches: list[MicroBatch], layout: PassLayout, vocab_size: int,
                         ctx: ProcessGroups, *, topk: int = 0, keep_logits: bool = False, kernel: str = "eager"
                         ) -> dict[str, dict[int, torch.Tensor]]:
    """No-grad pass; returns ``{"logprobs": {sample: [R]}}`` (plus ``"topk_logprobs"``/``"topk_ids"``
    ``[R, k]`` when ``topk``, and ``"logits"`` ``[R, V_local]`` when ``keep_logits``) on the last
    pipeline stage (empty dicts elsewhere). ``kernel``: the objective's vocabulary-chunk kernels."""
    out: dict[str, dict[int, torch.Tensor]] = {"logprobs": {}}
    if topk:
        out["topk_logprobs"], out["topk_ids"] = {}, {}
    if keep_logits:
        out["logits"] = {}

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        logits = _mask_padded_vocab(logits.float(), vocab_size, ctx.tp_group)
        # the vocabulary-wide work on the response positions only (the values read later)
        sel = mb.response_pos.to(logits.device) >= 0
        picked = logits[sel]

        def scatter(values: torch.Tensor) -> torch.Tensor:
            full = values.new_zeros((*sel.shape, *values.shape[1:]))
            full[sel] = values
            return full

        logprobs, _ = vocab_parallel_logprobs_entropy(picked, mb.targets.to(logits.device)[sel], ctx.tp_group,
                                                      kernel=kernel)
        tables = {"logprobs": scatter(logprobs)}
        if topk:
            tables["topk_logprobs"], tables["topk_ids"] = map(scatter, vocab_parallel_topk(picked, topk, ctx.tp_group))
        if keep_logits:
            tables["logits"] = logits
        pos = _gather_cp(mb.response_pos.to(logits.device), ctx, layout)
        segments = _gather_cp(mb.segments.to(logits.device), ctx, layout)
        for name, values in tables.items():
            full = _gather_cp(values.detach(), ctx, layout)
            for k, index in enumerate(mb.samples):
                picked = full[(segments == k) & (pos >= 0)]  # [R, ...] in position order
                out[name][index] = picked.cpu() if name != "logits" else picked
        return torch.zeros((), device=logits.device), {}

    with torch.no_grad():
        _run_schedule(model, micro_batches, layout, loss_func, forward_only=True)
    return out


class MetricAccumulator:
    """Combines the objective's per-micro-batch metrics into step metrics.

    Loss-type metrics are contributions (summed over micro-batches and ranks); mean-type metrics
    are weighted by the micro-batch's global count of the tokens they average over: RL tokens,
    action-choice tokens (``actor/action_*``), distillation tokens (``sdar/*``) or action tokens
    of the distillation (``sdar/action_*``); ``*_std`` metrics are combined exactly from their
    means (population std).
    """

    SUMMED = ("actor/pg_loss", "actor/loss", "sdar/distill_loss")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weighted: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.second: dict[str, float] = {}
        self.maxima: dict[str, float] = {}

    @staticmethod
    def kind(key: str) -> str:
        """Which token count weights ``key``: ``tokens``, ``action``, ``distill`` or ``distill_action``."""
        if key.startswith("sdar/action_"):
            return "distill_action"
        if "/action_" in key:
            return "action"
        return "distill" if key.startswith("sdar/") else "tokens"

    def add(self, metrics: dict[str, float], counts: dict[str, float]) -> None:
        """``counts``: this micro-batch's global token counts by :meth:`kind`."""
        for key, value in metrics.items():
            weight = counts.get(self.kind(key), 0.0)
            if key in self.SUMMED:
                self.sums[key] = self.sums.get(key, 0.0) + value
            elif key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, float("-inf")), value)
            elif key.endswith("_std"):
                mean = metrics.get(key[:-4] + "_mean", 0.0)
                self.second[key] = self.second.get(key, 0.0) + weight * (value * value + mean * mean)
                self.weights[key] = self.weights.get(key, 0.0) + weight
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + weight * value
                self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self, sum_group=None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.sums:
            keys = sorted(self.sums)
            t = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
            if sum_group is not None and dist.get_world_size(sum_group) > 1:
                dist.all_reduce(t, group=sum_group)
            out.update(zip(keys, t.tolist()))
        # a mean over no tokens is no number: omitted (a random model's rollout may hold no action
        # token, and an action entropy of 0 read as a collapsing policy)
        for key, value in self.weighted.items():
            if self.weights[key] > 0:
                out[key] = value / self.weights[key]
        for key, value in self.second.items():
            if self.weights[key] > 0:
                mean = out.get(key[:-4] + "_mean", 0.0)
                out[key] = max(value / self.weights[key] - mean * mean, 0.0) ** 0.5
        out.update(self.maxima)
        return out


def student_pass(model: list, micro_batches: list[MicroBatch], layout: PassLayout, vocab_size: int,
                 ctx: ProcessGroups, objective_config: ObjectiveConfig, normalizers: LossNormalizers,
                 step: int, distill_normalizers: LossNormalizers | None = None) -> dict[str, float]:
    """Forward + backward of the SDAR objective over this rank's micro-batches (gradients land in
    the DDP buffers). ``normalizers`` count the step's RL tokens, ``distill_normalizers`` its
    distillation tokens (default: the same). Returns the step's objective metrics (meaningful on
    the last stage)."""
    objective = SDARObjective(objective_config, objective_groups(ctx))
    scale = len(micro_batches) * ctx.dims.dp
    acc = MetricAccumulator()

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        device = logits.device
        logits = _mask_padded_vocab(logits.float() if logits.dtype != torch.float32 else logits,
                                    vocab_size, ctx.tp_group)
        get = lambda name: mb.per_token[name].to(device) if name in mb.per_token else None  # noqa: E731
        inputs = ObjectiveInputs(
            student_logits=logits, targets=mb.targets.to(device), mask=mb.loss_mask.to(device),
            advantages=mb.advantages.to(device), ref_logprobs=get("ref_logprobs"),
            rollout_logprobs=get("rollout_logprobs"), teacher_logprobs=get("teacher_logprobs"),
            teacher_topk_logprobs=get("teacher_topk_logprobs"), teacher_topk_ids=get("teacher_topk_ids"),
            teacher_logits=get("teacher_logits"), action_mask=get("action_mask"),
            distill_mask=mb.distill_mask.to(device),
            segments=Segments(mb.segments.to(device), len(mb.samples)) if layout.packed else None)
        loss, metrics = objective(inputs, normalizers, step, distill_normalizers)
        action = mb.per_token["action_mask"] if "action_mask" in mb.per_token else mb.loss_mask * 0
        tokens = torch.stack([mb.loss_mask.sum(), (action * mb.loss_mask).sum(), mb.distill_mask.sum(),
                              (action * mb.distill_mask).sum()]).to(torch.float64)
        if ctx.dp_cp_group is not None and dist.get_world_size(ctx.dp_cp_group) > 1:
            dist.all_reduce(tokens, group=ctx.dp_cp_group)
        acc.add(metrics, dict(zip(("tokens", "action", "distill", "distill_action"), tokens.tolist())))
        return loss * scale, {}

    _run_schedule(model, micro_batches, layout, loss_func, forward_only=False)
    return acc.result(sum_group=ctx.dp_cp_group) if ctx.last_stage else {}


def sft_pass(model: list, micro_batches: list[MicroBatch], layout: PassLayout, vocab_size: int,
             ctx: ProcessGroups, normalizers: LossNormalizers, prompt_weight: float = 0.0,
             prompt_normalizers: LossNormalizers | None = None, kernel: str = "eager") -> float:
    """Cross-entropy on the response tokens (expert demonstrations), token-mean over the batch, plus
    ``prompt_weight`` x the token-mean cross-entropy of the prompt tokens (a language-model loss on
    the world's text, for models that start from random weights). Returns the response part."""
    from megatron_sdar.algo.aggregation import aggregate

    scale = len(micro_batches) * ctx.dims.dp
    total = [0.0]
    cp_group = ctx.cp_group if ctx.dims.cp > 1 else None

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        logits = _mask_padded_vocab(logits.float(), vocab_size, ctx.tp_group)
        logprobs, _ = vocab_parallel_logprobs_entropy(logits, mb.targets.to(logits.device), ctx.tp_group,
                                                      kernel=kernel)
        loss = aggregate(-logprobs, mb.loss_mask.to(logits.device), "token-mean", normalizers, cp_group)
        total[0] += float(loss.detach())
        if prompt_weight > 0:
            loss = loss + prompt_weight * aggregate(-logprobs, mb.prompt_mask.to(logits.device), "token-mean",
                                                    prompt_normalizers, cp_group)
        return loss * scale, {}

    _run_schedule(model, micro_batches, layout, loss_func, forward_only=False)
    if not ctx.last_stage:
        return float("nan")
    t = torch.tensor([total[0]], dtype=torch.float64)
    if dist.get_world_size(ctx.dp_cp_group) > 1:
        dist.all_reduce(t, group=ctx.dp_cp_group)
    return float(t)
