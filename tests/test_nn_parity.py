"""Parity of fastbptt.RNN/GRU/LSTM with torch.nn for every backend and device that runs here
(CPU; with a GPU also the CUDA and Triton kernels on CUDA tensors): outputs, final states and the
gradients of input, initial states and every parameter."""
import itertools

import pytest
import torch

from conftest import parity_targets
from fastbptt import dispatch
from helpers import Case, assert_lowp_parity, assert_parity

# float32 on the GPU in full precision: cuDNN would otherwise take TF32 products
pytestmark = pytest.mark.usefixtures("no_tf32")

CELLS = [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 4)]  # (cell, proj_size)
LAYERS = [1, 2, 3]
INPUT_KINDS = ["batched", "unbatched", "packed"]
DTYPES = [torch.float32, torch.float64]
FLAGS = list(itertools.product([False, True], repeat=3))  # batch_first, bias, with_hx


def make_case(cell, proj, layers, bidirectional, kind, batch_first, bias, with_hx, **kw) -> Case:
    return Case(cell=cell, proj_size=proj, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                bias=bias, with_hx=with_hx, unbatched=kind == "unbatched", packed=kind == "packed", **kw)


def _ids(v):
    return getattr(v, "__name__", None) or str(v).replace("torch.", "")


def skip_if_declined(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    """A backend that loads but declines the case by design (Triton: float64) is skipped with its
    reason; one that cannot load at all is not, so that its tests fail."""
    if dispatch.availability(backend):
        return
    reason = dispatch.decline_reason(backend, case.cell, device, dtype, case.hidden_size, case.proj_size)
    if reason:
        pytest.skip(f"{backend} declines {dtype}: {reason}")


def tightest_dtype(backend: str, device: str) -> torch.dtype:
    """float64 where the backend takes it (the tightest check), else float32 (Triton)."""
    declines = dispatch.decline_reason(backend, "gru", device, torch.float64, 8)
    return torch.float32 if declines else torch.float64


def check_parity(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    skip_if_declined(case, backend, device, dtype)
    assert_parity(case, backend, dtype, device=device)


# The full product: every cell x layers x direction x input kind (batched, unbatched, packed)
# x dtype x batch_first x bias x with/without hx.
@pytest.mark.parametrize("backend,device", parity_targets())
@pytest.mark.parametrize("cell_proj,layers,bidirectional,kind,dtype,flags",
                         list(itertools.product(CELLS, LAYERS, [False, True], INPUT_KINDS, DTYPES, FLAGS)), ids=_ids)
def test_parity(backend, device, cell_proj, layers, bidirectional, kind, dtype, flags):
    check_parity(make_case(*cell_proj, layers, bidirectional, kind, *flags), backend, device, dtype)


@pytest.mark.parametrize("backend,device", parity_targets())
@pytest.mark.parametrize("cell_proj", CELLS, ids=_ids)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])  # one step, a non-divisor of T=7, T, more than T
@pytest.mark.parametrize("recompute", [True, False])
def test_chunk_size_and_memory_policy_do_not_change_results(backend, device, cell_proj, chunk_size, recompute):
    case = make_case(*cell_proj, 2, True, "packed", False, True, True, chunk_size=chunk_size, recompute=recompute)
    check_parity(case, backend, device, tightest_dtype(backend, device))


@pytest.mark.parametrize("backend,device", parity_targets())
@pytest.mark.parametrize("cell_proj", CELLS, ids=_ids)
def test_bfloat16_error_within_torch_nn_error(backend, device, cell_proj):
    case = make_case(*cell_proj, 2, True, "packed", False, True, True, steps=12, hidden_size=16, chunk_size=5)
    skip_if_declined(case, backend, device, torch.bfloat16)
    assert_lowp_parity(case, backend, torch.bfloat16, device=device)


@pytest.mark.parametrize("backend,device", parity_targets())
def test_dropout_between_layers(backend, device):
    """Dropout acts between layers in training only: eval matches torch.nn, training differs
    from eval and is reproducible under the same seed."""
    case = Case(cell="gru", num_layers=3)
    dtype = tightest_dtype(backend, device)
    skip_if_declined(case, backend, device, dtype)
    ref, fast = (m.to(device, dtype) for m in make_pair_with_dropout(case, backend, p=0.5))
    x = torch.randn(7, 3, case.input_size, dtype=dtype, device=device)
    ref.eval(), fast.eval()
    torch.testing.assert_close(fast(x)[0], ref(x)[0])
    fast.train()
    torch.manual_seed(0)
    a = fast(x)[0]
    torch.manual_seed(0)
    b = fast(x)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, ref(x)[0])


def make_pair_with_dropout(case, backend, p):
    from helpers import FAST_CLASS, TORCH_CLASS
    ref = TORCH_CLASS[case.cell](case.input_size, case.hidden_size, case.num_layers, dropout=p)
    fast = FAST_CLASS[case.cell](case.input_size, case.hidden_size, case.num_layers, dropout=p, backend=backend)
    fast.load_state_dict(ref.state_dict())
    return ref, fast
