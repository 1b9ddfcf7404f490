"""The main job: train an agent with SDAR.

    python -m megatron_sdar.train                                  # the embedded default (tiny, CPU)
    python -m megatron_sdar.train algo=grpo trainer.max_steps=20   # Hydra overrides
    torchrun --nproc-per-node 8 -m megatron_sdar.train experiment=alfworld_qwen2_5_7b
    python -m megatron_sdar.train experiment=alfworld_qwen2_5_7b --dry-run   # on a login node
    python -m megatron_sdar.train experiment=alfworld_qwen2_5_7b --rehearse  # the recipe end to end on CPU

``--dry-run`` validates everything that needs no GPU, prints the layout, the per-GPU memory plan,
the exact TransformerConfig / DDP / optimizer / vLLM arguments and every trainer / rollout / env
setting that differs from its YAML group's default (last line: one JSON object), and builds
nothing. ``--rehearse`` runs the recipe end to end on two CPU processes (a tiny model of its
family, its layout features at size 2, two RL steps, test-split evaluation, checkpoint, resume, HF
export; :mod:`megatron_sdar.trainer.rehearsal`) and prints every value it changed. ``--dry-run`` plans for ``WORLD_SIZE`` ranks, else the recipe's ``slurm.nodes x
slurm.gpus_per_node``; the model directory needs only its ``config.json``.

Config groups (``megatron_sdar/config``, where every value lives): model, algo (the SDAR presets),
env, parallel, rollout, trainer, and ``experiment=<recipe>``. The configuration is validated once,
when it is composed, before anything is built; an error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_sdar.config.schema import ConfigError, check_output_dir, compose_run

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from megatron_sdar.algo.objective import PRESETS

        print(__doc__)
        print("Presets (algo=<name>):")
        for name, spec in PRESETS.items():
            print(f"  {name:<11} {spec.summary}")
        return 0
    dry, rehearsal = "--dry-run" in args, "--rehearse" in args
    args = [a for a in args if a not in ("--dry-run", "--rehearse")]
    try:
        if rehearsal:
            if dry:
                raise ConfigError("--dry-run and --rehearse are two different checks: pass one")
            from megatron_sdar.trainer.rehearsal import rehearse

            return rehearse(args)
        run = compose_run(args)
        check_output_dir(run)  # a second run into a run directory would overwrite the first
        if dry:
            from megatron_sdar.trainer.launch import dry_run

            dry_run(run)
            return 0
    except ConfigError as exc:
        print(f"megatron-sdar: configuration error: {exc}", file=sys.stderr)
        return 2
    from megatron_sdar.trainer.loop import run_training

    try:
        result = run_training(run)
    except ConfigError as exc:
        print(f"megatron-sdar: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())
