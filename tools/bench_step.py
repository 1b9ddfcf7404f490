"""One SDAR step and one GRPO step on the same trajectory batch, each phase against its ideal.

    bash tools/run.sh tools/bench_step.py [--device cpu|cuda] [--repeats 2] [--json out.json] [main-job overrides ...]

The main job's trainer is built from the embedded default (plus the overrides, e.g.
``model.hf_path=outputs/sdar/sft_model`` for a trained policy's turn lengths), one rollout step
runs through vLLM, and on its samples, in the same process:

* the SDAR step and the GRPO step (``PolicyUpdate.train_on``), packed (``trainer.micro_batch_tokens``)
  and padded (one sample per row): per phase (rollout, weight sync, teacher, reference, student
  forward+backward, optimizer) the seconds (best of ``--repeats``), the real tokens and the tokens
  computed (padding included);
* the ideal: a bare Megatron forward, and forward + backward of Megatron's cross entropy, over the
  same real tokens laid end to end in rows of the student pass's length (no padding but the last
  row's, no objective, no schedule).

It prints the table and the ratios (padded / real tokens, student pass / ideal, teacher pass /
ideal forward, SDAR step / GRPO step, the last also per repeat with its mean and 95% interval), and
the same as one JSON object on its last line. SDAR's step includes rendering its teacher batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("teacher", "reference", "student", "optimizer")


def _ideal(model, samples, seq_len: int, rows_per_micro: int, backward: bool) -> tuple[float, int]:
    """Seconds of a bare forward (+ Megatron cross entropy backward) over the samples' tokens laid
    end to end in rows of ``seq_len``; and the tokens computed."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sdar.utils.device import causal_attention_mask, current_device

    device = current_device()
    stream = torch.tensor([t for s in samples for t in s.input_ids])
    rows = -(-len(stream) // seq_len)
    tokens = torch.zeros(rows * seq_len + 1, dtype=torch.long)
    tokens[:len(stream)] = stream
    inputs, targets = tokens[:-1].view(rows, seq_len), tokens[1:].view(rows, seq_len)
    mask = causal_attention_mask(seq_len, device=device)
    positions = torch.arange(seq_len, device=device)
    start = time.perf_counter()
    for first in range(0, rows, rows_per_micro):
        x = inputs[first:first + rows_per_micro].to(device)
        with torch.set_grad_enabled(backward):
            logits = model(x, positions.expand_as(x), mask)
            if backward:
                loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                    targets[first:first + rows_per_micro].to(device).t().contiguous()).mean()
                loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, rows * seq_len


def _step(updater, samples, teacher, step: int) -> dict[str, float]:
    import torch

    from megatron_sdar.utils.device import on_gpu

    updater.train_on(samples, step, teacher=teacher)
    if on_gpu():
        torch.cuda.synchronize()
    return updater.pass_metrics()


def _best(runs: list[dict]) -> dict[str, float]:
    out = dict(runs[0])
    for run in runs[1:]:
        for key, value in run.items():
            if key.endswith("_seconds"):
                out[key] = min(out[key], value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the report here")
    args, overrides = parser.parse_known_args(argv)
    if args.device == "cpu":
        os.environ["MEGATRON_SDAR_FORCE_CPU"] = "1"
    os.environ.setdefault("MASTER_PORT", str(29300 + os.getpid() % 500))

    from megatron_sdar.algo.objective import preset
    from megatron_sdar.config.schema import ConfigError, compose_run
    from megatron_sdar.trainer import seeds as task_seeds
    from megatron_sdar.trainer.batch import samples_from_trajectories
    from megatron_sdar.trainer.loop import SDARTrainer
    from megatron_sdar.trainer.teacher import TeacherBatch
    from megatron_sdar.trainer.update import PolicyUpdate
    from megatron_sdar.utils.distributed import destroy, init_process_group
    from megatron_sdar.utils.stats import mean_ci

    out_dir = tempfile.mkdtemp(prefix="bench_step_")
    try:
        run = compose_run([f"trainer.output_dir={out_dir}", "trainer.sft_steps=0", "trainer.tensorboard=false",
                           *overrides])
    except ConfigError as exc:
        print(f"bench_step: configuration error: {exc}", file=sys.stderr)
        return 2
    if run.trainer.micro_batch_tokens is None:
        parser.error("trainer.micro_batch_tokens is null: the benchmark compares packed with padded passes")
    init_process_group()
    trainer = SDARTrainer(run)
    try:
        r, t = run.rollout, run.trainer
        phases: dict[str, float] = {}
        started = time.perf_counter()
        trainer.sync_weights(force=True)  # vLLM has the weights it was built from: time a sync anyway
        phases["weight_sync_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        batch = trainer.rollout(task_seeds.train_seeds(t.seed, 0, r.tasks_per_step), temperature=r.temperature, with_skills=True,
                                group_size=r.group_size, first_episode_id=0)
        phases["rollout_seconds"] = time.perf_counter() - started
        samples = samples_from_trajectories(batch)
        pad = int(trainer.tokenizer.pad_token_id or 0)
        updaters = {
            name: PolicyUpdate(trainer.policy, preset(algo, kl_coef=run.algo.kl_coef, kernel=run.algo.kernel),
                               t.micro_batch_size, pad, trainer.reference_dir, micro_batch_tokens=tokens)
            for name, algo, tokens in (("sdar_packed", "sdar", t.micro_batch_tokens),
                                       ("grpo_packed", "grpo", t.micro_batch_tokens),
                                       ("sdar_padded", "sdar", None))}
        teachers = {}
        for name, updater in updaters.items():
            started = time.perf_counter()
            teachers[name] = TeacherBatch.from_messages(samples, updater.objective, trainer.formatter)
            if name == "sdar_packed":  # the step's one teacher batch (rendered from the stored messages)
                phases["teacher_batch_seconds"] = time.perf_counter() - started
        runs: dict[str, list[dict]] = {name: [] for name in updaters}
        for repeat in range(args.repeats + 1):  # the first round warms up (reference build, allocator)
            for name, updater in updaters.items():
                result = _step(updater, samples, teachers[name], step=repeat)
                if repeat:
                    runs[name].append(result)
        report = {name: _best(results) for name, results in runs.items()}
        student_layout = updaters["sdar_packed"].pass_layout(samples)
        model = trainer.policy.model[0]
        ideal = {}
        for key, sequences, backward in (("student_fwd_bwd", samples, True), ("student_fwd", samples, False),
                                         ("teacher_fwd", teachers["sdar_packed"].sequences, False)):
            seconds = []
            for _ in range(args.repeats):
                trainer.policy.zero_grad()
                s, computed = _ideal(model, sequences, student_layout.seq_len, student_layout.micro_batch_size,
                                     backward)
                seconds.append(s)
            ideal[key] = {"seconds": min(seconds), "tokens": computed}
        trainer.policy.zero_grad()
    finally:
        trainer.close()
        destroy()

    def train_seconds(metrics):
        return sum(metrics.get(f"perf/{p}_seconds", 0.0) for p in PHASES)

    sdar, grpo, padded = report["sdar_packed"], report["grpo_packed"], report["sdar_padded"]
    rows = []
    for label, metrics in (("sdar packed", sdar), ("grpo packed", grpo), ("sdar padded", padded)):
        for phase in PHASES:
            if f"perf/{phase}_seconds" not in metrics:
                continue
            real, computed = metrics.get(f"perf/{phase}_real_tokens"), metrics.get(f"perf/{phase}_padded_tokens")
            rows.append((label, phase, metrics[f"perf/{phase}_seconds"], real, computed))
    render = phases["teacher_batch_seconds"]  # SDAR's only work outside the passes
    shared = phases["rollout_seconds"] + phases["weight_sync_seconds"]
    ratios = {
        "student_padded_over_real": sdar["perf/student_padded_tokens"] / sdar["perf/student_real_tokens"],
        "teacher_padded_over_real": sdar["perf/teacher_padded_tokens"] / sdar["perf/teacher_real_tokens"],
        "student_padded_over_real_without_packing": padded["perf/student_padded_tokens"] / padded["perf/student_real_tokens"],
        "student_fwd_bwd_over_ideal": sdar["perf/student_seconds"] / ideal["student_fwd_bwd"]["seconds"],
        "teacher_fwd_over_ideal": sdar["perf/teacher_seconds"] / ideal["teacher_fwd"]["seconds"],
        "sdar_step_over_grpo_step": (train_seconds(sdar) + render) / train_seconds(grpo),
        "sdar_step_over_grpo_step_with_rollout": (train_seconds(sdar) + render + shared) / (train_seconds(grpo) + shared),
        "sdar_packed_over_padded_step": train_seconds(sdar) / train_seconds(padded),
    }
    # the same ratio per repeat (the SDAR and GRPO steps of a repeat run back to back): its spread
    # says how much of a difference from a target is noise of the machine
    paired = [(train_seconds(s) + render) / train_seconds(g) for s, g in zip(runs["sdar_packed"], runs["grpo_packed"])]
    mean, half_width = mean_ci(paired)
    ratios.update({"sdar_step_over_grpo_step_mean": mean, "sdar_step_over_grpo_step_ci95": half_width})
    print(f"bench_step: {len(samples)} samples from {len(batch.episodes)} episodes, device {args.device}")
    print(f"{'step':<13}{'phase':<11}{'seconds':>9}{'real tok':>10}{'computed':>10}{'ratio':>7}")
    print(f"{'-':<13}{'rollout':<11}{phases['rollout_seconds']:>9.3f}")
    print(f"{'-':<13}{'sync':<11}{phases['weight_sync_seconds']:>9.3f}")
    print(f"{'sdar':<13}{'render':<11}{phases['teacher_batch_seconds']:>9.3f}  (the teacher batch from the messages)")
    for label, phase, seconds, real, computed in rows:
        ratio = f"{computed / real:>7.3f}" if real else ""
        print(f"{label:<13}{phase:<11}{seconds:>9.3f}{real or '':>10}{computed or '':>10}{ratio}")
    for key, value in ideal.items():
        print(f"{'ideal':<13}{key:<11}{value['seconds']:>9.3f}{'':>10}{value['tokens']:>10}")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    print(f"sdar_step_over_grpo_step per repeat: {', '.join(f'{r:.3f}' for r in paired)} "
          f"(mean {mean:.3f} +- {half_width:.3f}, 95% t-interval)")
    result = {"phases": phases, "steps": report, "ideal": ideal, "ratios": ratios, "samples": len(samples),
              "sdar_step_over_grpo_step_per_repeat": paired}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
