import os

import pytest
import torch

# Triton runs CPU tensors only in its interpreter, chosen when its kernels are first loaded: turn it
# on before anything loads them, unless a GPU is there to run them compiled.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from fastbptt import dispatch  # noqa: E402


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
    """Backends the CPU parity suites run: the reference and the C++ kernels when built (Triton's
    interpreter has its own, smaller suite in test_triton.py)."""
    names = ["reference"]
    if not dispatch.availability("cpu"):
        names.append("cpu")
    return names


def parity_targets() -> list:
    """(backend, device) pairs the parity suite runs, as pytest params: the reference and the C++
    kernels on CPU; where a GPU is visible, also the CUDA kernels and compiled Triton on CUDA
    tensors, marked ``cuda`` (``pytest -m cuda`` selects them). A GPU target is listed even when its
    backend cannot load, so that a broken build fails these tests instead of dropping them."""
    targets = [pytest.param(name, "cpu", id=name) for name in cpu_backends()]
    if torch.cuda.is_available():
        interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                         reason="compiled Triton needed (TRITON_INTERPRET=1 is set)")
        targets += [pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
                    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.cuda, interpreted])]
    return targets


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and not dispatch.availability("triton")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    """float32 products in full precision on the GPU, for comparisons against cuDNN."""
    cudnn = torch.backends.cudnn
    # cuDNN's flags through their context manager: PyTorch's own test utilities (test_module_db.py
    # imports them) freeze plain assignment to them
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
