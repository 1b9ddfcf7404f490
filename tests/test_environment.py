"""The environment holds what the project needs, and the CPU shims behave as documented."""
import subprocess
import sys

import pytest
import torch

from megatron_sdar.testing import run_distributed


def test_core_imports_in_one_interpreter():
    out = subprocess.run(
        [sys.executable, "-c", "import megatron_sdar, megatron.core, vllm, transformers, hydra; "
         "print(megatron.core.__version__, vllm.__version__)"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["0.19.2", "0.32.0"]


def _shim_behaviour():
    from megatron_sdar.utils import device

    assert not device.cpu_shims_active()
    assert device.setup_device().type == "cpu"
    assert device.cpu_shims_active()
    a = torch.empty(3, device="cuda")
    b = torch.zeros(2, device=torch.device("cuda", 0))
    c = torch.ones(2).cuda()
    d = torch.ones(2).to("cuda")
    e = torch.arange(4, device=torch.cuda.current_device())
    mask = device.causal_attention_mask(3)
    return {
        "devices": [t.device.type for t in (a, b, c, d, e)],
        "type_name": torch.ones(1).type(),
        "explicit_type": str(torch.ones(1).type(torch.float64).dtype),
        "current_device": torch.cuda.current_device(),
        "mask": mask.tolist(),
    }


@pytest.mark.multiproc
def test_cpu_shims_route_cuda_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the shims are CPU-only (see test_no_shims_on_gpu)")
    got = run_distributed(_shim_behaviour, world_size=1, init="none", timeout=120)[0]
    assert got["devices"] == ["cpu"] * 5
    assert got["type_name"] == "torch.cuda.FloatTensor"
    assert got["explicit_type"] == "torch.float64"
    assert got["current_device"] == "cpu"
    assert got["mask"] == [[[[False, True, True], [False, False, True], [False, False, False]]]]


def _device_without_shims():
    from megatron_sdar.utils import device

    dev = device.setup_device()
    return dev.type, device.cpu_shims_active(), torch.empty(1, device="cuda").device.type


@pytest.mark.gpu
@pytest.mark.multiproc
def test_no_shims_on_gpu():
    assert run_distributed(_device_without_shims, world_size=1, init="none")[0] == ("cuda", False, "cuda")


def test_main_job_help_and_config_errors_exit_cleanly():
    out = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "python -m megatron_sdar.train" in out.stdout
    out = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "parallel.tp=3"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "configuration error" in out.stderr and "Traceback" not in out.stderr
