"""One policy update on a list of samples: teacher pass, reference pass, student pass, optimizer step.

Independent of where the samples came from (a rollout, expert demonstrations, a test), so the
same code is checked for layout equivalence (TP/PP/CP/DP) without a rollout engine.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_sdar.algo.objective import ObjectiveConfig
from megatron_sdar.trainer.batch import (TrainingSample, action_mask_table, assign_ranks, build_micro_batches,
                                         plan_pass, rollout_logprob_table)
from megatron_sdar.trainer.passes import forward_token_values, sft_pass, student_pass
from megatron_sdar.trainer.policy import Policy
from megatron_sdar.utils.parallel_dims import ProcessGroups


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[sdar] {message}", flush=True)


class PolicyUpdate:
    """``policy``: this rank's model + optimizer; ``reference_dir``: a callable giving the HF
    directory of the frozen KL reference (read once, when the first KL term is needed).
    ``micro_batch_tokens``: pack samples into micro-batches of at most that many tokens
    (:func:`~megatron_sdar.trainer.batch.plan_pass`); ``None``: ``micro_batch_size`` padded rows.
    ``pass_tokens`` holds the last step's real and computed (padded) tokens per pass."""

    def __init__(self, policy: Policy, objective: ObjectiveConfig, micro_batch_size: int,
                 pad_id: int, reference_dir: Callable[[], Path], micro_batch_tokens: int | None = None) -> None:
        self.policy = policy
        self.arch = policy.arch
        self.objective = objective
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.pad_id = pad_id
        self.reference_dir = reference_dir
        self.ctx = ProcessGroups.current()
        self.reference = None
        self.pass_tokens: dict[str, float] = {}

    def owners(self, samples: list[TrainingSample]) -> list[int]:
        """Each sample's DP rank for every pass of a step (from the student sequences)."""
        return assign_ranks([len(s.input_ids) for s in samples], self.ctx.dims.dp,
                            balance=self.micro_batch_tokens is not None)

    def _layout(self, samples: list[TrainingSample], teacher: bool, name: str | None = None,
                owners: list[int] | None = None):
        lengths = [len(s.teacher_input_ids if teacher else s.input_ids) for s in samples]
        config = self.policy.config
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        interleaved = (config.virtual_pipeline_model_parallel_size or 1) > 1
        layout = plan_pass(lengths, self.micro_batch_size, self.ctx.dims.dp, self.ctx.dp_rank, self.ctx.dims.cp,
                           self.ctx.cp_rank, multiple, config.pipeline_model_parallel_size if interleaved else 1,
                           micro_batch_tokens=self.micro_batch_tokens, owners=owners,
                           uniform_seq_len=config.pipeline_model_parallel_size > 1)
        layout.thd = layout.packed and self.policy.uses_transformer_engine
        if name is not None:
            self.pass_tokens[f"perf/{name}_real_tokens"] = float(layout.real_tokens)
            self.pass_tokens[f"perf/{name}_padded_tokens"] = float(layout.padded_tokens)
        return layout

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        self.pass_tokens[f"perf/{name}_seconds"] = time.perf_counter() - start

    def pass_metrics(self) -> dict[str, float]:
        """The last step's per-pass ``perf/<pass>_real_tokens``, ``_padded_tokens`` (computed,
        padding included) and ``_seconds`` (``teacher``, ``reference``, ``student`` forward+backward,
        ``optimizer``; ``sft`` in the warm start), and ``perf/padded_token_fraction`` (the share of
        computed tokens that were padding, over every pass)."""
        real = sum(v for k, v in self.pass_tokens.items() if k.endswith("_real_tokens"))
        padded = sum(v for k, v in self.pass_tokens.items() if k.endswith("_padded_tokens"))
        return {**self.pass_tokens, "perf/padded_token_fraction": 1.0 - real / padded if padded else 0.0}

    def _forward_values(self, model: list, samples: list[TrainingSample], teacher: bool, name: str = "forward",
                        owners: list[int] | None = None, **kwargs):
        """A no-grad pass over ``samples`` (``owners``: their DP ranks, default :func:`assign_ranks`)."""
        with self._timed(name):
            layout = self._layout(samples, teacher, name, owners)
            micro = build_micro_batches(samples, layout, teacher=teacher, pad_id=self.pad_id)
            return forward_token_values(model, micro, layout, self.arch.vocab_size, self.ctx, **kwargs)

    def _reference_model(self) -> list:
        """The frozen reference: the policy at the start of RL (after SFT), built once with the
        policy's own TransformerConfig (layout, precision) and no DDP wrapper or optimizer."""
        if self.reference is None:
            import dataclasses

            from megatron_sdar.models.hf_loader import load_hf_weights
            from megatron_sdar.models.megatron_model import build_model

            source = self.reference_dir()
            config = dataclasses.replace(self.policy.config, perform_initialization=False)
            vpp = len(self.policy.model)
            chunks = ([build_model(self.arch, config, vp_stage=i) for i in range(vpp)] if vpp > 1
                      else [build_model(self.arch, config)])
            load_hf_weights(chunks, self.arch, source)
            for chunk in chunks:
                chunk.eval()
                for param in chunk.parameters():
                    param.requires_grad_(False)
            self.reference = chunks
        return self.reference

    def teacher_samples(self, samples: list[TrainingSample]) -> list[int]:
        """Indices of the samples the teacher pass scores: the distillation samples, and with RLSD's
        token weighting every RL sample (none when the objective has no teacher)."""
        objective = self.objective
        if not objective.needs_teacher:
            return []
        return [i for i, s in enumerate(samples)
                if (s.distill and objective.distill_coef > 0) or (s.rl and objective.rlsd_coef > 0)]

    def train_on(self, samples: list[TrainingSample], step: int, lr: float | None = None) -> dict[str, float]:
        """Teacher pass, reference pass, student pass and optimizer step on ``samples``
        (identical on every rank). Returns the step's metrics (all ranks)."""
        from megatron_sdar.algo.aggregation import LossNormalizers

        objective = self.objective
        self.pass_tokens = {}
        owners = self.owners(samples)
        tables: dict[str, dict[int, torch.Tensor]] = {"rollout_logprobs": rollout_logprob_table(samples)}
        if scored := self.teacher_samples(samples):
            estimator = objective.estimator
            values = self._forward_values(self.policy.model, [samples[i] for i in scored], teacher=True,
                                          name="teacher", owners=[owners[i] for i in scored],
                                          topk=objective.topk if estimator == "topk" else 0,
                                          keep_logits=estimator == "full")
            names = {"logprobs": "teacher_logprobs", "topk_logprobs": "teacher_topk_logprobs",
                     "topk_ids": "teacher_topk_ids", "logits": "teacher_logits"}
            for name, by_position in values.items():  # positions in the scored subset -> sample indices
                tables[names[name]] = {scored[j]: v for j, v in by_position.items()}
        if objective.kl_coef > 0:  # no reference pass (or model) without a KL term
            reference = self._reference_model()
            tables["ref_logprobs"] = self._forward_values(reference, samples, teacher=False, name="reference",
                                                          owners=owners)["logprobs"]
        if (actions := action_mask_table(samples)) is not None:
            tables["action_mask"] = actions
        if not self.ctx.last_stage:
            tables = {"rollout_logprobs": tables["rollout_logprobs"]}  # values are read on the last stage only
        student_started = time.perf_counter()
        layout = self._layout(samples, teacher=False, name="student", owners=owners)
        micro = build_micro_batches(samples, layout, per_token=tables if self.ctx.last_stage else None,
                                    pad_id=self.pad_id)
        rl = [s for s in samples if s.rl]
        normalizers = LossNormalizers(num_tokens=float(sum(s.num_response_tokens for s in rl)),
                                      num_sequences=float(len(rl)))
        distilled = [s for s in samples if s.distill]
        distill_normalizers = LossNormalizers(num_tokens=float(sum(s.num_response_tokens for s in distilled)),
                                              num_sequences=float(len(distilled)))
        self.policy.zero_grad()
        metrics = student_pass(self.policy.model, micro, layout, self.arch.vocab_size, self.ctx, objective,
                               normalizers, step, distill_normalizers)
        self.pass_tokens["perf/student_seconds"] = time.perf_counter() - student_started
        return self.optimizer_step(metrics, self.policy.optim_config.lr_at(step) if lr is None else lr)

    def optimizer_step(self, metrics: dict[str, float], lr: float) -> dict[str, float]:
        metrics = self._from_last_stage(metrics)
        loss = metrics.get("actor/loss", metrics.get("sft/loss", 0.0))
        if not torch.isfinite(torch.tensor(loss)):
            self.policy.zero_grad()
            log(f"non-finite loss {loss}: update skipped, weights unchanged")
            metrics["trainer/skipped_step"] = 1.0
            return metrics
        with self._timed("optimizer"):
            result = self.policy.step(lr)
        metrics["actor/grad_norm"] = result.grad_norm
        metrics["actor/lr"] = result.lr
        metrics["trainer/skipped_step"] = 0.0 if result.applied else 1.0
        return metrics

    def _from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """The last pipeline stage's metrics on every rank."""
        if self.ctx.dims.pp == 1:
            return dict(metrics)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, metrics if self.ctx.last_stage else None)
        return dict(next(p for p in parts if p is not None))


    def sft_on(self, samples: list[TrainingSample], lr: float, prompt_weight: float = 0.0) -> dict[str, float]:
        """One cross-entropy step on demonstrations: token-mean over the response tokens, plus
        ``prompt_weight`` x the token-mean over the prompt tokens (``sft/loss`` is the response part)."""
        from megatron_sdar.algo.aggregation import LossNormalizers

        self.pass_tokens = {}
        layout = self._layout(samples, teacher=False, name="sft")
        micro = build_micro_batches(samples, layout, pad_id=self.pad_id)
        normalizers = LossNormalizers(float(sum(s.num_response_tokens for s in samples)), float(len(samples)))
        prompt = LossNormalizers(float(sum(s.response_start - 1 for s in samples)), float(len(samples)))
        self.policy.zero_grad()
        loss = sft_pass(self.policy.model, micro, layout, self.arch.vocab_size, self.ctx, normalizers,
                        prompt_weight, prompt)
        return self.optimizer_step({"sft/loss": loss}, lr)
