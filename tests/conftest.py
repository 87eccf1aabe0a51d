import os

# Both implementations get one BLAS / intra-op thread per pytest-xdist worker: with
# `-n auto` on 2 cores, more threads than cores only makes torch's OpenMP pool thrash.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest

try:
    import torch
    torch.set_num_threads(1)
except ImportError:  # manual/ runs without torch
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (long benchmarks and training runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
