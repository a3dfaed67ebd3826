"""Parity of fastbptt.RNN/GRU/LSTM with torch.nn on CPU, for every backend that runs here:
outputs, final states and the gradients of input, initial states and every parameter."""
import itertools

import pytest
import torch

from conftest import cpu_backends
from helpers import Case, assert_lowp_parity, assert_parity

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


# The full product: every cell x layers x direction x input kind (batched, unbatched, packed)
# x dtype x batch_first x bias x with/without hx.
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell_proj,layers,bidirectional,kind,dtype,flags",
                         list(itertools.product(CELLS, LAYERS, [False, True], INPUT_KINDS, DTYPES, FLAGS)), ids=_ids)
def test_parity(backend, cell_proj, layers, bidirectional, kind, dtype, flags):
    assert_parity(make_case(*cell_proj, layers, bidirectional, kind, *flags), backend, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell_proj", CELLS, ids=_ids)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])  # one step, a non-divisor of T=7, T, more than T
@pytest.mark.parametrize("recompute", [True, False])
def test_chunk_size_and_memory_policy_do_not_change_results(backend, cell_proj, chunk_size, recompute):
    case = make_case(*cell_proj, 2, True, "packed", False, True, True, chunk_size=chunk_size, recompute=recompute)
    assert_parity(case, backend, torch.float64)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell_proj", CELLS, ids=_ids)
def test_bfloat16_error_within_torch_nn_error(backend, cell_proj):
    case = make_case(*cell_proj, 2, True, "packed", False, True, True, steps=12, hidden_size=16, chunk_size=5)
    assert_lowp_parity(case, backend, torch.bfloat16)


@pytest.mark.parametrize("backend", cpu_backends())
def test_dropout_between_layers(backend):
    """Dropout acts between layers in training only: eval matches torch.nn, training differs
    from eval and is reproducible under the same seed."""
    case = Case(cell="gru", num_layers=3)
    ref, fast = make_pair_with_dropout(case, backend, p=0.5)
    x = torch.randn(7, 3, case.input_size, dtype=torch.float64)
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
    ref = TORCH_CLASS[case.cell](case.input_size, case.hidden_size, case.num_layers, dropout=p).double()
    fast = FAST_CLASS[case.cell](case.input_size, case.hidden_size, case.num_layers, dropout=p, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast
