import os

import pytest

# Everything here runs on CPU; keep BLAS/OpenMP from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--skip-slow", action="store_true", help="deselect tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (Transformer Engine / FP8 / NCCL path)")
    skip_slow = pytest.mark.skip(reason="slow test deselected with --skip-slow")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and config.getoption("--skip-slow"):
            item.add_marker(skip_slow)
