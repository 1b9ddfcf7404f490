"""The main job: train an agent with SDAR.

    python -m megatron_sdar.train                                  # the embedded default (tiny, CPU)
    python -m megatron_sdar.train algo=grpo trainer.max_steps=20   # Hydra overrides
    torchrun --nproc-per-node 8 -m megatron_sdar.train experiment=alfworld_qwen2_5_7b
    python -m megatron_sdar.train experiment=alfworld_qwen2_5_7b --dry-run   # on a login node
    python -m megatron_sdar.train experiment=alfworld_qwen2_5_7b --rehearse  # the recipe end to end on CPU
    python -m megatron_sdar.train experiment=alfworld_qwen2_5_7b --check     # validate only (slurm/submit.sh)

``--dry-run`` validates everything that needs no GPU, prints the layout, the per-GPU memory plan,
the exact TransformerConfig / DDP / optimizer / vLLM arguments and every trainer / rollout / env
setting that differs from its YAML group's default (last line: one JSON object), and builds
nothing. ``--check`` validates the configuration alone (no model files read: what ``slurm/submit.sh``
runs on the login node before ``sbatch``) and prints one line. ``--rehearse`` runs the recipe end to end on two CPU processes (a tiny model of its
family, its layout features at size 2, two RL steps, test-split evaluation, checkpoint, resume, HF
export; :mod:`megatron_sdar.trainer.rehearsal`) and prints every value it changed. ``--dry-run`` plans for ``WORLD_SIZE`` ranks, else the recipe's ``slurm.nodes x
slurm.gpus_per_node``; the model directory needs only its ``config.json``.

Config groups (``megatron_sdar/config``, where every value lives): model, algo (the SDAR presets),
env, parallel, rollout, trainer, and ``experiment=<recipe>``. The configuration is validated once,
when it is composed, before anything is built; an error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """The job's exit code: 0, 2 for a configuration error (one line), 3 when the environment failed
    more than a tenth of a rollout's episodes (one line naming its error), 130 after Ctrl-C (one line;
    the first one during training finishes the step and checkpoints it), 1 for any other failure."""
    from megatron_sdar.trainer.interrupt import Interrupted

    try:
        return _main(argv)
    except Interrupted:
        print("megatron-sdar: second SIGINT: stopped at once, without finishing the step (trainer.resume=auto "
              "continues from the last checkpoint)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the training steps (starting, checking, shutting down)
        print("megatron-sdar: SIGINT outside a training step: stopped at once", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from megatron_sdar.config.schema import (ConfigError, check_layout, check_model_files, check_output_dir, compose_run,
                                             resume_changes)

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from megatron_sdar.algo.objective import PRESETS

        print(__doc__)
        print("Presets (algo=<name>):")
        for name, spec in PRESETS.items():
            print(f"  {name:<11} {spec.summary}")
        return 0
    dry, rehearsal, check = "--dry-run" in args, "--rehearse" in args, "--check" in args
    args = [a for a in args if a not in ("--dry-run", "--rehearse", "--check")]
    try:
        if dry + rehearsal + check > 1:
            raise ConfigError("--dry-run, --rehearse and --check are three different checks: pass one")
        if check:
            return check_only(args)
        if rehearsal:
            from megatron_sdar.trainer.rehearsal import rehearse

            return rehearse(args)
        run = compose_run(args)
        check_output_dir(run)  # a second run into a run directory would overwrite the first
        resume_changes(run)  # what a resume may not change is refused before anything is built
        if not dry:  # the layout on this job's ranks (torchrun's WORLD_SIZE), before any library is imported
            check_layout(run, int(os.environ.get("WORLD_SIZE", "1")))
            check_model_files(run)
        if dry:
            from megatron_sdar.trainer.launch import dry_run

            dry_run(run)
            return 0
    except ConfigError as exc:
        print(f"megatron-sdar: configuration error: {exc}", file=sys.stderr)
        return 2
    from megatron_sdar.envs import EnvironmentFailure
    from megatron_sdar.trainer.loop import run_training

    try:
        result = run_training(run)
    except ConfigError as exc:
        print(f"megatron-sdar: configuration error: {exc}", file=sys.stderr)
        return 2
    except EnvironmentFailure as exc:  # the same on every rank (the episodes are gathered): rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-sdar: environment error: {exc}", file=sys.stderr)
        return 3
    if result is None:
        return 1
    return 130 if result.get("signal") == "SIGINT" else 0


def check_only(args: list[str]) -> int:
    """``--check``: compose and validate without the model files, check the layout on the job's world
    size (``WORLD_SIZE``, else the recipe's ``slurm.nodes x slurm.gpus_per_node``) and the output
    directory; one line. Raises :class:`ConfigError`."""
    from megatron_sdar.config.schema import (check_layout, check_output_dir, compose_run, dry_run_world_size,
                                             resume_changes)

    run = compose_run(args, need_files=False)
    world = dry_run_world_size(run)
    check_layout(run, world)
    check_output_dir(run)
    resume_changes(run)
    print(f"configuration ok: algo={run.algo.name}, env={run.env.name}, model={run.model.hf_path or 'tiny'}, "
          f"{world} rank(s), output_dir={run.trainer.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
