"""A recipe rehearsed end to end on CPU before a cluster sees it.

    python -m megatron_sdar.train experiment=alfworld_qwen2_5_72b --rehearse [overrides]
    bash slurm/submit.sh --rehearse experiment=alfworld_qwen2_5_72b          # the same, locally

The recipe runs exactly as it stands, through the main job (``torchrun`` of
``megatron_sdar.train``, two processes), except what cannot fit two CPU cores; every value changed
is printed first, with the reason:

- the model: a tiny model of the recipe's family and architecture options (Qwen2/2.5 with QKV bias,
  Qwen3 with q/k-norm, Qwen3-MoE with 4 experts, top-2; tied embeddings as the recipe's model has
  them), random weights, a tokenizer trained locally, float32 (FP8 needs an H100);
- the layout: the recipe's features at two processes: TP=2 (with sequence parallelism when the
  recipe has it), PP=2 (x VPP=2 when the recipe interleaves), EP=2, CP=2; DP=2 when it has none;
  the distributed optimizer and recomputation as the recipe sets them; rollout TP=2 wherever the
  recipe's is at least 2. A recipe with two such features (72B: TP and PP) runs its first step at
  one and resumes at the other; an MoE recipe with EP and PP (30B-A3B) runs EP=2 in both phases
  and says that PP is not rehearsed (megatron-core cannot resume its optimizer across ep=1/ep>1);
- the sizes: 2 tasks x 2 episodes per step, at most 3 turns, 16 response tokens, 2 evaluation tasks;
- the data: the shipped samples (ALFWorld's three built-in games, the shipped WebShop catalog, the
  shipped search corpus and questions); the shipped sample skill set when the recipe's skill
  directory is absent.

Phase 1 runs RL step 1 (after the step-0 evaluation on the test split) and checkpoints it;
phase 2 resumes from that checkpoint (at the second layout when there is one), runs step 2,
evaluates on the test split, checkpoints and exports to HF. The rehearsal then checks what the
run wrote: the metrics of both steps (finite loss and gradient, weights synced into vLLM, vLLM's
log-probs of the sampled tokens within :data:`LOGPROB_BOUND` of Megatron's), the test-split
evaluation, the checkpoints, the resume and an HF export that transformers loads without a
missing or unexpected tensor. The last line names the recipe and what ran; ``rehearsal.json`` in
the output directory holds the same, with the measured numbers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_sdar.config.schema import CONFIG_DIR, ConfigError, RunConfig, compose_run

NPROC = 2
#: Largest |vLLM - Megatron| log-prob of a sampled token a float32 run accepts (measured on CPU:
#: 9.5e-7 in every recipe's rehearsal, 5.7e-6 to 7.6e-6 after a 5% weight perturbation at rollout
#: TP=1 and TP=2; a weight that missed the sync showed 6e-5 after one lr-1e-6 step).
LOGPROB_BOUND = 1e-4
MARKER = "rehearsal.json"
TASKS_PER_STEP, GROUP_SIZE, MAX_TURNS, RESPONSE_TOKENS, EVAL_TASKS, TINY_LAYERS = 2, 2, 3, 16, 2, 4


@dataclass(frozen=True)
class Change:
    """One value the rehearsal sets differently from the recipe, and why."""

    key: str
    recipe: Any
    rehearsal: Any
    why: str


@dataclass
class RehearsalPlan:
    recipe: str
    output_dir: Path
    changes: list[Change]  # for both phases
    layouts: list[dict[str, Any]]  # the ``parallel`` values of phase 1 and phase 2
    layout_names: list[str]
    rollout_tp: int
    notes: list[str] = field(default_factory=list)  # what the rehearsal cannot run of the recipe
    user_overrides: list[str] = field(default_factory=list)

    def phase_overrides(self, phase: int) -> list[str]:
        """The Hydra overrides of phase ``phase`` (1 or 2): the user's, then the rehearsal's."""
        values = {c.key: c.rehearsal for c in self.changes}
        values.update({f"parallel.{k}": v for k, v in self.layouts[phase - 1].items()})
        values["trainer.max_steps"] = phase
        if phase == 1:
            values["trainer.export_hf"] = False  # phase 2 exports
        return [*self.user_overrides, *(f"++{k}={_hydra_value(v)}" for k, v in values.items())]

    def describe(self) -> str:
        layouts = self.layout_names[0] if self.layout_names[0] == self.layout_names[1] else \
            f"{self.layout_names[0]}, resumed at {self.layout_names[1]}"
        return layouts


def _hydra_value(value: Any) -> str:
    if value is None or isinstance(value, (bool, dict, list)):
        return json.dumps(value).replace(" ", "").replace('"', "")
    return str(value)


def _layouts(run: RunConfig) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Phase 1 and phase 2 layouts at :data:`NPROC` processes: the recipe's model-parallel
    features, each at size 2 (at most two of them: a world of 2 holds one); the names; notes on
    what could not be rehearsed."""
    p = run.parallel
    base = {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "vpp": None, "sequence_parallel": False}
    features: list[tuple[dict[str, Any], str]] = []
    if p.tp > 1:
        features.append(({"tp": 2, "sequence_parallel": p.sequence_parallel},
                         "TP=2" + ("+SP" if p.sequence_parallel else "")))
    if p.pp > 1:
        features.append(({"pp": 2, "vpp": 2 if p.vpp else None}, "PP=2" + ("xVPP=2" if p.vpp else "")))
    if p.cp > 1:
        features.append(({"cp": 2}, "CP=2"))
    if p.ep > 1:
        features.append(({"ep": 2}, "EP=2"))
    if len(features) > 2:
        raise ConfigError(f"--rehearse: the recipe uses {len(features)} model-parallel features "
                          f"({', '.join(n for _, n in features)}); a rehearsal holds two (one per phase)")
    notes: list[str] = []
    if not features:
        features = [({}, "DP=2")]
    ep = [f for f in features if "ep" in f[0]]
    if ep and len(features) > 1:
        # a world of 2 holds EP=2 or the other feature, and megatron-core 0.19 cannot resume an MoE
        # optimizer between ep=1 and ep>1 (one optimizer vs one per expert group): EP in both phases
        notes.append(f"{', '.join(n for f, n in features if 'ep' not in f)} is not rehearsed with this MoE recipe: "
                     "two processes hold EP=2 or it, and megatron-core 0.19 cannot resume an MoE optimizer "
                     "between ep=1 and ep>1; both phases run EP=2")
        features = ep
    if len(features) == 1:
        features = features * 2
    features.sort(key=lambda f: 0 if "tp" in f[0] else 1)  # 72B: TP=2+SP, then resumed at PP=2 x VPP=2
    extras = f" ({'distributed optimizer, ' if p.distributed_optimizer else ''}recompute {p.recompute})"
    return [{**base, **f} for f, _ in features], [n + extras for _, n in features], notes


def _given(overrides: list[str], key: str) -> str | None:
    """The value of ``key`` on the command line (``key=v``, ``+key=v``, ``++key=v``), or None."""
    return next((o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+") == key), None)


def plan_rehearsal(overrides: list[str]) -> RehearsalPlan:
    """What ``--rehearse`` changes in the recipe of ``overrides`` (its configuration is composed and
    checked as the main job would, without the files a cluster run needs)."""
    recipe = _given(overrides, "experiment")
    if recipe is None:
        raise ConfigError("--rehearse rehearses a recipe: pass experiment=<name> (megatron_sdar/config/experiment/)")
    from megatron_sdar.config.schema import experiment_names, recipe_names

    if recipe in experiment_names() and recipe not in recipe_names():
        raise ConfigError(f"--rehearse rehearses a cluster recipe; experiment={recipe} is a CPU benchmark of the tiny "
                          f"model: run it as it is (python -m megatron_sdar.train experiment={recipe})")
    run = compose_run(overrides, need_files=False)
    m, r, e, t = run.model, run.rollout, run.env, run.trainer
    from omegaconf import OmegaConf

    from megatron_sdar.skills import sample_skill_dir

    tiny = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml").tiny)
    tiny["layers"] = TINY_LAYERS  # PP=2 x VPP=2: one layer per virtual stage
    if m.architecture is not None and "tie_word_embeddings" in m.architecture:
        tiny["tie_embeddings"] = bool(m.architecture["tie_word_embeddings"])
    shape = f"{m.arch}, {'tied' if tiny.get('tie_embeddings') else 'untied'} embeddings"
    out = Path(t.output_dir) if _given(overrides, "trainer.output_dir") is not None else Path(f"outputs/rehearsal/{recipe}")
    wanted: list[Change] = [
        Change("model.hf_path", m.hf_path, None, f"a tiny {shape} (random weights, tokenizer trained locally), "
                                                 f"built into <output_dir>/base_model"),
        Change("model.tiny", m.tiny and asdict(m.tiny), tiny, f"the tiny model's shape ({TINY_LAYERS} layers: "
                                                            "PP=2 x VPP=2 has one per virtual stage)"),
        Change("model.dtype", m.dtype, "float32", "CPU, and vLLM's log-probs compared with Megatron's in float32"),
        Change("model.fp8", m.fp8, None, "FP8 needs Transformer Engine on an H100 (--dry-run checks its wiring)"),
        Change("model.fp8_rollout", m.fp8_rollout, False, "FP8 rollouts need a GPU"),
        Change("rollout.tp", r.tp, 2 if r.tp >= 2 else 1, "rollout tensor parallelism at two processes"),
        Change("rollout.tasks_per_step", r.tasks_per_step, TASKS_PER_STEP, "sizes that fit two CPU cores"),
        Change("rollout.group_size", r.group_size, GROUP_SIZE, "sizes that fit two CPU cores"),
        Change("rollout.max_response_tokens", r.max_response_tokens, min(r.max_response_tokens, RESPONSE_TOKENS),
               "a random model writes until the budget: short turns"),
        Change("env.max_turns", e.max_turns, min(e.max_turns, MAX_TURNS), "short episodes"),
        Change("trainer.eval_tasks", t.eval_tasks, EVAL_TASKS, "a few held-out tasks"),
        Change("trainer.eval_interval", t.eval_interval, 2, "evaluate at step 2, the last"),
        Change("trainer.save_interval", t.save_interval, 1, "a checkpoint after each step"),
        Change("trainer.resume", t.resume, "auto", "phase 2 resumes from phase 1's checkpoint"),
        Change("trainer.output_dir", t.output_dir, str(out), "the rehearsal's own directory"),
        Change("trainer.sft_steps", t.sft_steps, 0, "the recipe's warm start is its checkpoint's"),
        Change("trainer.wandb_project", t.wandb_project, None, "no reporting from a rehearsal"),
    ]
    if e.name == "alfworld" and e.kwargs.get("data_dir") != "builtin":
        given = e.kwargs.get("data_dir")
        missing = given is not None and not Path(str(given)).expanduser().is_dir()
        wanted.append(Change("env.kwargs.data_dir", given, "builtin",
                             "the shipped ALFWorld games (one per split)"
                             + ("; the given directory does not exist: download the games before the real run"
                                if missing else "")))
    skills = Path(e.skills_dir) if e.skills_dir is not None else None
    if skills is not None and not (skills / "skill_mapping.json").is_file():
        sample = sample_skill_dir(e.name)
        if sample is None:
            raise ConfigError(f"--rehearse: env.skills_dir={e.skills_dir} has no skill_mapping.json and env "
                              f"{e.name!r} has no shipped sample skill set; set env.skills_dir")
        wanted.append(Change("env.skills_dir", e.skills_dir, str(sample),
                             "the recipe's skill set is absent here: the shipped sample in the release's format"))
    changes = [c for c in wanted if c.recipe != c.rehearsal]
    layouts, names, notes = _layouts(run)
    return RehearsalPlan(recipe=recipe, output_dir=out, changes=changes, layouts=layouts, layout_names=names,
                         rollout_tp=2 if r.tp >= 2 else 1, notes=notes, user_overrides=list(overrides))


def _prepare_output_dir(out: Path) -> None:
    """A fresh directory: a previous rehearsal's (it holds :data:`MARKER`) is replaced; a directory
    holding anything else is refused (it may be a run)."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--rehearse: trainer.output_dir={out} is a file; choose another trainer.output_dir")
        if (out / MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise ConfigError(f"--rehearse: trainer.output_dir={out} holds files that are not a rehearsal's; "
                              "choose another trainer.output_dir")
    out.mkdir(parents=True, exist_ok=True)


def _run_phase(plan: RehearsalPlan, phase: int, echo: Callable[[str], None], timeout_s: float) -> tuple[int, Path]:
    """One ``torchrun --nproc-per-node 2 -m megatron_sdar.train`` invocation; its whole output goes to
    ``<output_dir>/rehearsal-phase<phase>.log``, the trainer's own lines (``[<preset>] ...``) to ``echo``.
    A phase still running after ``timeout_s`` (a hung collective prints nothing) is killed."""
    import socket
    import threading

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = plan.output_dir / f"rehearsal-phase{phase}.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC), "--master-port",
               str(port), "-m", "megatron_sdar.train", *plan.phase_overrides(phase)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        log_file.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                start_new_session=True)
        watchdog = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
        watchdog.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log_file.write(line)
                if line.startswith("[") and "] " in line[:24] and not line.startswith("[rank"):
                    echo(f"  phase {phase} | {line.rstrip()}")
            code = proc.wait()
        finally:
            watchdog.cancel()
    return code, log_path


def _root_error(log_path: Path) -> str | None:
    """The first error a rank reported in a phase's log (``[rank1]: RuntimeError: ...``, a configuration
    error line), without torchrun's summary."""
    import re

    for line in log_path.read_text(errors="replace").splitlines():
        text = re.sub(r"^\[rank\d+\]:\s*", "", line).strip()
        if text.startswith("megatron-sdar: configuration error") or re.match(r"^[\w.]*(Error|Exception)\b.*:", text):
            if "ChildFailedError" not in text:
                return text[:500]
    return None


def _check_run(plan: RehearsalPlan) -> dict[str, Any]:
    """What the two phases wrote, checked; the measured numbers. AssertionError names what is wrong."""
    from megatron_sdar.checkpoint.resume import complete_checkpoints
    from megatron_sdar.utils.logging import read_metrics

    out = plan.output_dir
    rows = {int(row["step"]): row for row in read_metrics(out / "metrics.jsonl")}
    assert set(rows) >= {1, 2}, f"metrics.jsonl holds steps {sorted(rows)}, not 1 and 2"
    found: dict[str, Any] = {}
    for step in (1, 2):
        row = rows[step]
        for key in ("actor/loss", "actor/grad_norm"):
            assert math.isfinite(row[key]), f"step {step}: {key} = {row[key]}"
        assert row["rollout/weight_sync_bytes"] > 0, f"step {step}: no weights were synced into vLLM"
        gap = row["rollout/train_infer_logprob_diff_max"]
        assert gap <= LOGPROB_BOUND, f"step {step}: vLLM and Megatron log-probs differ by {gap:.2e} > {LOGPROB_BOUND}"
        found[f"step{step}"] = {k: row[k] for k in (
            "actor/loss", "actor/grad_norm", "rollout/success_rate", "rollout/episodes", "rollout/response_tokens",
            "rollout/weight_sync_bytes", "rollout/train_infer_logprob_diff_max", "perf/step_seconds") if k in row}
    last = rows[2]
    assert "eval/success_rate" in last and last["eval/num_tasks"] == EVAL_TASKS, "no test-split evaluation at step 2"
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"]["eval_split"] == "test", "the evaluation did not read the test split"
    found["eval"] = {"success_rate": last["eval/success_rate"], "num_tasks": last["eval/num_tasks"], "split": "test"}
    steps = [int(p.name.split("_")[-1]) for p in complete_checkpoints(out / "checkpoints")]
    assert 2 in steps, f"no complete checkpoint of step 2 (found {steps})"
    resumed = out / "config.resume-1.json"
    assert resumed.is_file(), "phase 2 did not resume from step 1's checkpoint"
    found["resumed_layout"] = json.loads(resumed.read_text())["parallel"]
    found["checkpoints"] = steps
    found["hf_export"] = _check_hf_export(out / "hf_export")
    return found


def _check_hf_export(path: Path) -> dict[str, Any]:
    """The export loads into transformers with every tensor it expects, and computes finite logits."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    assert (path / "config.json").is_file(), f"no HF export in {path}"
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"the HF export does not load cleanly: {problems}"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all(), "the HF export computes non-finite logits"
    return {"model_type": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
            "tie_word_embeddings": bool(model.config.tie_word_embeddings)}


def rehearse(overrides: list[str], echo: Callable[[str], None] = print, timeout_s: float = 1500.0) -> int:
    """Run the rehearsal of the recipe in ``overrides``; 0 when every check passed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--rehearse starts its own processes: run it as one process, not under torchrun or srun")
    started = time.monotonic()
    plan = plan_rehearsal(overrides)
    # both phases' configurations must compose before anything runs
    for phase in (1, 2):
        compose_run(plan.phase_overrides(phase), need_files=True)
    _prepare_output_dir(plan.output_dir)
    record: dict[str, Any] = {"recipe": plan.recipe, "status": "running", "overrides": overrides,
                              "changes": [asdict(c) for c in plan.changes], "layouts": plan.layout_names,
                              "not_rehearsed": plan.notes}
    (plan.output_dir / MARKER).write_text(json.dumps(record, indent=2))
    echo(f"rehearsal of {plan.recipe}: the recipe as it stands, except (recipe -> rehearsal):")
    width = max(len(c.key) for c in plan.changes)
    for c in plan.changes:
        echo(f"  {c.key:<{width}}  {_shown(c.recipe)} -> {_shown(c.rehearsal)}   ({c.why})")
    for phase, name in ((1, "phase 1 (step 1)"), (2, "phase 2 (resume, step 2, export)")):
        layout = ", ".join(f"parallel.{k}={_shown(v)}" for k, v in plan.layouts[phase - 1].items())
        echo(f"  {name}: {plan.layout_names[phase - 1]}: {layout}")
    for note in plan.notes:
        echo(f"  not rehearsed: {note}")
    record["phases"] = []
    for phase in (1, 2):
        phase_started = time.monotonic()
        code, log_path = _run_phase(plan, phase, echo, timeout_s)
        record["phases"].append({"phase": phase, "exit_code": code, "seconds": round(time.monotonic() - phase_started, 1),
                                 "log": str(log_path)})
        if code != 0:
            cause = _root_error(log_path)
            return _finish(plan, record, started, echo, f"phase {phase} ({plan.layout_names[phase - 1]}) exited with "
                           f"code {code}{': ' + cause if cause else ''}; log: {log_path}")
    try:
        record["found"] = _check_run(plan)
    except AssertionError as exc:
        return _finish(plan, record, started, echo, str(exc))
    except (KeyError, OSError, ValueError) as exc:  # a metric or file the run should have written
        return _finish(plan, record, started, echo, f"the run did not write what it should: {type(exc).__name__}: {exc}")
    return _finish(plan, record, started, echo, None)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def _finish(plan: RehearsalPlan, record: dict[str, Any], started: float, echo: Callable[[str], None],
            failure: str | None) -> int:
    seconds = time.monotonic() - started
    record.update(status="failed" if failure else "passed", seconds=round(seconds, 1), failure=failure)
    (plan.output_dir / MARKER).write_text(json.dumps(record, indent=2, default=str))
    took = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if failure:
        echo(f"rehearsal FAILED: {plan.recipe} after {took}: {failure}")
        return 1
    found = record["found"]
    gap = max(found[f"step{s}"]["rollout/train_infer_logprob_diff_max"] for s in (1, 2))
    echo(f"rehearsal passed: {plan.recipe} in {took}: tiny {found['hf_export']['model_type']}, {plan.describe()}, "
         f"rollout TP={plan.rollout_tp}; 2 RL steps, test-split evaluation ({found['eval']['num_tasks']:.0f} tasks), "
         f"checkpoint, resume, HF export; vLLM-Megatron log-prob gap {gap:.1e} (see {plan.output_dir / MARKER})")
    return 0


__all__ = ["LOGPROB_BOUND", "Change", "RehearsalPlan", "plan_rehearsal", "rehearse"]
