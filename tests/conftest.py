import os

import pytest

# Everything here runs on CPU; keep BLAS/OpenMP from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (each takes minutes; .ci/run runs them after the suite)")


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (Transformer Engine / FP8 / NCCL path)")
    skip_slow = pytest.mark.skip(reason="slow: runs with --run-slow (.ci/run runs it after the suite)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _alfworld_data_as_the_test_found_it():
    """Importing the alfworld package sets ``$ALFWORLD_DATA`` to its download cache
    (``alfworld/info.py``): without this, every later test of the session would see an ALFWorld
    data directory a user gave, and the configuration check would look for its split folders."""
    before = os.environ.get("ALFWORLD_DATA")
    yield
    if before is None:
        os.environ.pop("ALFWORLD_DATA", None)
    else:
        os.environ["ALFWORLD_DATA"] = before
