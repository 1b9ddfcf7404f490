"""The environment holds what the project needs, and the CPU shims behave as documented."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sdar.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
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


@pytest.mark.multiproc
def test_main_job_help_and_config_errors_exit_cleanly():
    out = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "python -m megatron_sdar.train" in out.stdout
    out = subprocess.run([sys.executable, "-m", "megatron_sdar.train", "parallel.tp=3"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "configuration error" in out.stderr and "Traceback" not in out.stderr


def _copy_of_this_checkout(dest: Path) -> Path:
    """What a clone of this checkout's working tree holds: its tracked and untracked (not ignored) files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / os.fsdecode(name)
        if src.is_file():  # not a file deleted in the working tree
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    return dest


@pytest.mark.multiproc
def test_two_checkouts_sharing_the_environment_each_run_their_own_code(tmp_path):
    """Two checkouts of different code share the environment. Checkout A's process starts, checkout
    B bootstraps while it runs (which re-pointed the old editable install to B), then A starts a
    script: every process runs the code of the checkout whose tools/run.sh started it."""
    a, b = _copy_of_this_checkout(tmp_path / "a"), _copy_of_this_checkout(tmp_path / "b")
    version = __import__("megatron_sdar").__version__
    init = b / "megatron_sdar" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{version}"', f'__version__ = "{version}+b"'))
    probe = tmp_path / "probe.py"  # outside both checkouts: sys.path[0] is its directory, not a checkout
    probe.write_text("import megatron_sdar\nprint(megatron_sdar.__version__, megatron_sdar.__file__)\n")
    in_a = ("import subprocess, sys, megatron_sdar\n"
            "print(megatron_sdar.__version__, megatron_sdar.__file__, flush=True)\n"
            f"subprocess.run(['bash', {str(b / 'tools' / 'run.sh')!r}, {str(probe)!r}], check=True)\n"
            f"subprocess.run([sys.executable, {str(probe)!r}], check=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as from a fresh shell
    out = subprocess.run(["bash", str(a / "tools" / "run.sh"), "-c", in_a], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a_init, b_init = str(a / "megatron_sdar" / "__init__.py"), str(b / "megatron_sdar" / "__init__.py")
    assert out.stdout.splitlines() == [f"{version} {a_init}",  # A's process
                                       f"{version}+b {b_init}",  # B's, started from A's
                                       f"{version} {a_init}"], out.stdout  # A's child, after B bootstrapped
    out = subprocess.run(["bash", str(b / "tools" / "run.sh"), str(probe)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.split() == [f"{version}+b", b_init], out.stderr[-3000:]
    site = Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    assert not [p.name for p in site.glob("*megatron_sdar*")]  # the shared environment holds no install
