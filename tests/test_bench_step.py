"""tools/bench_step.py runs end to end (real trainer, real vLLM rollout) and reports what it
measured: per-phase tokens that add up, and the ratios (no timing threshold here: the numbers are
the benchmark's, in the README)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_step_reports_every_phase_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), "--repeats", "1", "--json", str(out),
                           "model.tiny.layers=2", "rollout.tasks_per_step=2", "rollout.group_size=2",
                           "env.max_turns=2", "rollout.max_response_tokens=12"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout.strip().splitlines()[-1])
    sdar, grpo, padded = (report["steps"][k] for k in ("sdar_packed", "grpo_packed", "sdar_padded"))
    for step in (sdar, padded):
        assert all(step[f"perf/{p}_seconds"] > 0 for p in ("teacher", "reference", "student", "optimizer"))
    assert "perf/teacher_seconds" not in grpo  # GRPO has no teacher pass
    assert report["phases"]["teacher_batch_seconds"] > 0  # SDAR renders its teacher batch
    # the same samples in every step; packing computes fewer tokens than padding
    assert sdar["perf/student_real_tokens"] == grpo["perf/student_real_tokens"] == padded["perf/student_real_tokens"]
    assert sdar["perf/student_padded_tokens"] <= padded["perf/student_padded_tokens"]
    ratios = report["ratios"]
    assert ratios["student_padded_over_real"] >= 1.0 and ratios["sdar_step_over_grpo_step"] > 1.0
    (paired,) = report["sdar_step_over_grpo_step_per_repeat"]  # one repeat
    assert paired == pytest.approx(ratios["sdar_step_over_grpo_step"]) and paired == ratios["sdar_step_over_grpo_step_mean"]
    assert report["ideal"]["student_fwd_bwd"]["tokens"] >= sdar["perf/student_real_tokens"]
