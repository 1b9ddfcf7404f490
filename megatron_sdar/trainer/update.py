"""One policy update on a list of samples (and their teacher batch): teacher pass, reference pass,
student pass, optimizer step.

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
from megatron_sdar.trainer.batch import (PassLayout, TrainingSample, action_mask_table, assign_ranks,
                                         build_micro_batches, plan_pass, rollout_logprob_table)
from megatron_sdar.trainer.passes import forward_token_values, sft_pass, student_pass
from megatron_sdar.trainer.policy import Policy
from megatron_sdar.trainer.teacher import TeacherBatch, TeacherWeights, teacher_indices
from megatron_sdar.utils.logging import log
from megatron_sdar.utils.parallel_dims import ProcessGroups


class PolicyUpdate:
    """``policy``: this rank's model + optimizer; ``reference_dir``: a callable giving the HF
    directory of the frozen KL reference (read once, when the first KL term is needed).
    ``micro_batch_tokens``: pack samples into micro-batches of at most that many tokens
    (:func:`~megatron_sdar.trainer.batch.plan_pass`); ``None``: ``micro_batch_size`` padded rows.
    ``pass_tokens`` holds the last step's real and computed (padded) tokens per pass. ``teacher_weights``: the
    weights of the teacher pass (``objective.teacher``; the frozen teacher is the reference model)."""

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
        dims, config = self.ctx.dims, policy.config
        if (bool(config.sequence_parallel), config.virtual_pipeline_model_parallel_size or 1) != \
                (dims.sequence_parallel, dims.chunks):
            raise ValueError(
                f"the policy's TransformerConfig (sequence_parallel={config.sequence_parallel}, "
                f"virtual_pipeline_model_parallel_size={config.virtual_pipeline_model_parallel_size}) is not the "
                f"layout the process runs ({dims}): build the policy with "
                "transformer_overrides(ParallelDims.current())")
        self.reference = None
        self.pass_tokens: dict[str, float] = {}
        self.teacher_weights = TeacherWeights(objective.teacher if objective.needs_teacher else "shared", policy,
                                      self._reference_model, objective.teacher_ema_decay)

    def owners(self, samples: list[TrainingSample]) -> list[int]:
        """Each sample's DP rank for every pass of a step (from the student sequences)."""
        return assign_ranks([len(s.input_ids) for s in samples], self.ctx.dims.dp,
                            balance=self.micro_batch_tokens is not None)

    def pass_layout(self, samples: list[TrainingSample]) -> PassLayout:
        """This rank's :class:`~megatron_sdar.trainer.batch.PassLayout` of the student pass over
        ``samples``: rows, their sequence length and micro-batches (what :meth:`train_on` runs)."""
        return self._layout(samples, owners=self.owners(samples))

    def _layout(self, samples: list[TrainingSample], name: str | None = None,
                owners: list[int] | None = None) -> PassLayout:
        lengths = [len(s.input_ids) for s in samples]
        dims = self.ctx.dims
        layout = plan_pass(lengths, self.micro_batch_size, dims.dp, self.ctx.dp_rank, dims.cp, self.ctx.cp_rank,
                           dims.tp if dims.sequence_parallel else 1,  # SP splits each row over the TP ranks
                           dims.pp if dims.chunks > 1 else 1,  # interleaving runs micro-batches in groups of pp
                           micro_batch_tokens=self.micro_batch_tokens, owners=owners, uniform_seq_len=dims.pp > 1)
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

    def _forward_values(self, model: list, samples: list[TrainingSample], name: str = "forward",
                        owners: list[int] | None = None, **kwargs):
        """A no-grad pass over ``samples`` (``owners``: their DP ranks, default :func:`assign_ranks`)."""
        with self._timed(name):
            layout = self._layout(samples, name, owners)
            micro = build_micro_batches(samples, layout, pad_id=self.pad_id)
            return forward_token_values(model, micro, layout, self.arch.vocab_size, self.ctx,
                                        kernel=self.objective.kernel, **kwargs)

    def _reference_model(self) -> list:
        """The frozen reference: the policy at the start of RL (after SFT), read once (the KL
        reference pass and the frozen teacher share it)."""
        if self.reference is None:
            self.reference = self.policy.frozen_copy(self.reference_dir())
        return self.reference

    def train_on(self, samples: list[TrainingSample], step: int, lr: float | None = None,
                 teacher: TeacherBatch | None = None) -> dict[str, float]:
        """Teacher pass (over ``teacher``: the :class:`TeacherBatch` of the same ``samples``;
        required when the objective has a teacher term), reference pass, student pass and
        optimizer step on ``samples`` (identical on every rank). Returns the step's metrics."""
        from megatron_sdar.algo.aggregation import LossNormalizers

        objective = self.objective
        self.pass_tokens = {}
        owners = self.owners(samples)
        tables: dict[str, dict[int, torch.Tensor]] = {"rollout_logprobs": rollout_logprob_table(samples)}
        expected = teacher_indices(samples, objective)
        if (teacher.indices if teacher is not None else []) != expected:
            got = "no teacher batch" if teacher is None else f"a teacher batch of samples {teacher.indices[:8]}"
            raise ValueError(f"the objective's teacher scores samples {expected[:8]} (of {len(samples)}), got {got}: "
                             "pass teacher=TeacherBatch.from_messages(samples, objective, formatter)")
        if expected:
            estimator = objective.estimator
            values = self._forward_values(self.teacher_weights.model(), teacher.sequences, name="teacher",
                                          owners=[owners[i] for i in teacher.indices],
                                          topk=objective.topk if estimator == "topk" else 0,
                                          keep_logits=estimator == "full")
            tables.update(teacher.step_tables(values))
        if objective.kl_coef > 0:  # no reference pass (or model) without a KL term
            reference = self._reference_model()
            tables["ref_logprobs"] = self._forward_values(reference, samples, name="reference",
                                                          owners=owners)["logprobs"]
        if (actions := action_mask_table(samples)) is not None:
            tables["action_mask"] = actions
        if not self.ctx.last_stage:
            tables = {"rollout_logprobs": tables["rollout_logprobs"]}  # values are read on the last stage only
        student_started = time.perf_counter()
        layout = self._layout(samples, name="student", owners=owners)
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
        metrics = self.optimizer_step(metrics, self.policy.optim_config.lr_at(step) if lr is None else lr)
        if not metrics["trainer/skipped_step"]:
            self.teacher_weights.after_step()
        return metrics

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
        layout = self._layout(samples, name="sft")
        micro = build_micro_batches(samples, layout, pad_id=self.pad_id)
        normalizers = LossNormalizers(float(sum(s.num_response_tokens for s in samples)), float(len(samples)))
        prompt = LossNormalizers(float(sum(s.response_start - 1 for s in samples)), float(len(samples)))
        self.policy.zero_grad()
        loss = sft_pass(self.policy.model, micro, layout, self.arch.vocab_size, self.ctx, normalizers,
                        prompt_weight, prompt, kernel=self.objective.kernel)
        return self.optimizer_step({"sft/loss": loss}, lr)
