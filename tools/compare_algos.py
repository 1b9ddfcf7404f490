"""Compare presets over several seeds from one shared SFT start; means with 95% confidence intervals.

    bash tools/run.sh tools/compare_algos.py --algos grpo sdar sdar:algo.estimator=full \
        --seeds 0 1 2 3 4 --out outputs/compare [hydra overrides for every run...]

0. Everything is checked before anything runs: the command of every run below (the shared SFT run
   included) composes and validates as ``python -m megatron_sdar.train`` would, and every run
   directory can take its run. A bad key or value is one line, ``compare_algos: configuration
   error: ...``, and exit code 2, with nothing run. The overrides reach every run, but not what the
   comparison sets itself: ``model.hf_path`` (``--init``), ``trainer.sft_steps`` (``--sft-steps``),
   ``trainer.seed`` (``--seeds``, ``--sft-seed``), ``trainer.eval_split`` (``--split``),
   ``trainer.output_dir`` (``--out``), ``algo`` (``--algos``) and ``trainer.resume`` are refused,
   naming the option. ``trainer.max_steps`` is the variants' RL budget: the shared SFT run trains
   no RL step whatever it says.
1. One SFT-only run (``trainer.max_steps=0``, ``trainer.seed=--sft-seed``, ``trainer.sft_steps=
   --sft-steps``, default the configuration's) makes the shared starting point
   ``<out>/sft/sft_model`` (the policy after SFT) and its evaluation (step 0: held-out success
   without skills, and with skills in the prompt: the teacher's edge). ``--init <HF dir>`` skips it;
   the step-0 evaluation is then taken from the run that wrote that directory, when it is a run's
   ``sft_model/`` evaluated on the same split, else made by ``<out>/start`` (an evaluation of
   ``--init`` alone).
2. Every variant x seed is one ``python -m megatron_sdar.train`` run from that start
   (``trainer.seed=S``: other training tasks and sampling seeds, the same held-out tasks;
   ``trainer.sft_steps=0``: no SFT of its own), with a fresh optimizer and the same budget. A
   variant is a preset (``python -m megatron_sdar.train --help`` lists them), optionally with
   overrides: ``name:key=value,key=value`` (``sdar:algo.estimator=full``,
   ``sdar:env.retrieval=random``). On the embedded default each preset runs at the settings chosen
   for it on the validation split (``config/tuned/``); a variant's overrides replace them.
3. ``<out>/summary.json``: variant -> seed (a string) -> the run's evaluation rows (``step``,
   ``eval/success_rate``, ``eval/num_tasks``, ``eval/first_choice_correct`` where judged; the step-0
   row of the shared start also ``eval/with_skills/*``; the last row ``collapse_warnings``, the steps
   at which the run warned of a collapse). ``<out>/summary.md``: the mean +- 95% t-interval over seeds
   at each evaluated step, and at each step after the start each variant's difference from the first
   one and from its random-skill control (the same variant with ``env.retrieval=random``, when the
   comparison has it), paired by seed and marked when the interval includes 0; the runs that end below
   their start and those that warned of a collapse; the same table for ``eval/first_choice_correct``
   (the share of first decisive choices that were the skill's) where the environment judges one.
   ``<out>/comparison.png``: the means with shaded 95% bands.

Evaluation is on the test split (``--split validation`` scores the validation split instead, as
``tools/sweep.py`` does). A finished run whose configuration is the one it would run now is kept, an
unfinished one resumes, and a run directory of another configuration is refused (exit 2, the keys
that differ). A run that fails exits 1 (2 when the trainer refused its configuration). Whatever the
numbers, they are reported as measured.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_sdar.trainer.comparison import add_comparison_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["grpo", "sdar"], help="variants: preset[:key=value,...]")
    add_comparison_arguments(parser, seeds=[0, 1, 2, 3, 4], out="outputs/compare")
    parser.add_argument("--split", default="test", choices=("test", "validation"), help="evaluation split")
    args = parser.parse_args(argv)

    from megatron_sdar.algo.objective import PRESETS
    from megatron_sdar.trainer.comparison import (comparison_of, exit_code_of_errors, fixed_settings, parse_variant,
                                                  summarize)
    from megatron_sdar.utils.plots import plot_bands

    try:
        variants = {spec: parse_variant(spec) for spec in args.algos}
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted({p for p, _ in variants.values() if p not in PRESETS})
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    comparison = comparison_of(parser, args, list(variants), args.split)
    out = comparison.out

    def log(message: str) -> None:
        print(f"[compare] {message}", flush=True)

    def compare() -> int:
        checked = comparison.check(fixed_settings("--algos {value}[:key=value,...]", "--split {value} chooses it"))
        log(f"the configuration of {checked} runs checked")
        start = comparison.shared_start(log)
        results = comparison.run_variants(log)
        summary = {spec: {seed: start + rows for seed, rows in runs.items()} for spec, runs in results.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        table = summarize(summary, baseline=args.algos[0])
        if any("eval/first_choice_correct" in r for runs in summary.values() for rows in runs.values() for r in rows):
            table += "\n" + summarize(summary, args.algos[0], "eval/first_choice_correct")
        (out / "summary.md").write_text(table)
        plot_bands({spec: {seed: [(r["step"], r["eval/success_rate"]) for r in rows] for seed, rows in runs.items()}
                    for spec, runs in summary.items()}, out / "comparison.png",
                   title=f"held-out {args.split} success, mean and 95% band over seeds {args.seeds}")
        print(table, flush=True)
        log(f"{out / 'summary.json'}, {out / 'summary.md'}, {out / 'comparison.png'}")
        return 0

    return exit_code_of_errors("compare_algos", compare)


if __name__ == "__main__":
    sys.exit(main())
