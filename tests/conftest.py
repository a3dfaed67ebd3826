import os

import pytest
import torch

from fastbptt import dispatch


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the full (slow) grids")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full grid: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here: the reference, the C++ kernels when built, and
    Triton when its interpreter is on."""
    names = ["reference"]
    if not dispatch.availability("cpu"):
        names.append("cpu")
    return names


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and not dispatch.availability("triton")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
