"""tools/gpu_check.py's wiring, on CPU (``--allow-cpu``): every check runs or says why it did not,
the numbers in its table are real, and a missing dependency is "not run", never a pass."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_its_checks_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--allow-cpu", "--out", str(tmp_path),
                           "--budget-s", "600"], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    table = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(table) == ["te_vs_local", "sdar_step_bf16", "sdar_step_fp8", "vllm", "objective_bench"]
    assert "| sdar_step_bf16 | PASS: loss=" in proc.stdout  # the markdown table
    for name in ("te_vs_local", "sdar_step_fp8"):  # no Transformer Engine on the CPU machine
        assert table[name] == {"status": "not run", "reason": "Transformer Engine is not installed",
                               "wall_s": table[name]["wall_s"]}, table[name]
    step = table["sdar_step_bf16"]
    assert step["status"] == "ran" and step["ok"] and step["grad_norm"] > 0 and 0 < step["gate_mean"] < 1, step
    vllm = table["vllm"]
    assert vllm["status"] == "ran" and vllm["ok"], vllm
    assert vllm["same_tokens_after_wake"] and vllm["train_infer_logprob_diff_mean"] < 1e-3
    assert vllm["train_infer_logprob_diff_max"] > 0  # measured, not a default
    bench = table["objective_bench"]
    assert bench["status"] == "ran" and bench["ours_logprobs_entropy_x_megatron_ce"] > 0, bench
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
