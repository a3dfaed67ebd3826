"""The cell specification table: it agrees with torch.nn's modules, and the op layer and its fake
kernels read it (gate count, saved width, cell state)."""
import pytest
import torch

from fastbptt import cells
from fastbptt.nn import TORCH_MODULE_OF_CELL, cell_kwargs


@pytest.mark.parametrize("cell", cells.CELLS)
def test_spec_agrees_with_torch_nn(cell):
    spec = cells.SPECS[cell]
    module = TORCH_MODULE_OF_CELL[cell](3, 5, **cell_kwargs(cell))
    assert module.mode == spec.mode and cells.CELL_OF_MODE[module.mode] == cell
    assert module.weight_ih_l0.shape == (spec.num_gates * 5, 3)
    assert spec.has_cell_state == isinstance(module, torch.nn.LSTM)
    assert spec.relu == (getattr(module, "nonlinearity", "tanh") == "relu")


def test_unknown_cell_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cell must be one of \('rnn_tanh', 'rnn_relu', 'gru', 'lstm'\), got 'mgu'"):
        cells.spec("mgu")


@pytest.mark.parametrize("cell", cells.CELLS)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_ops_keep_the_saved_width_of_the_spec(cell, recompute, device):
    """The real op and its fake kernel (meta tensors) keep [T, B, saved width] gates with recompute
    off and nothing with it on; LSTM also keeps the cell state at each chunk boundary, both ends included."""
    spec = cells.SPECS[cell]
    steps, batch, inp, hidden, chunk = 7, 2, 3, 4, 3
    g = spec.num_gates * hidden
    t = lambda *s: torch.randn(*s, device=device)
    x, h0, w_ih, w_hh, b = t(steps, batch, inp), t(batch, hidden), t(g, inp), t(g, hidden), t(g)
    op = getattr(torch.ops.fastbptt, cell)
    if spec.has_cell_state:
        out, h_n, c_n, c_chunks, gates = op(x, h0, t(batch, hidden), w_ih, w_hh, b, b, None, None, False, chunk,
                                            recompute, "reference")
        assert c_n.shape == (batch, hidden) and c_chunks.shape == (4, batch, hidden)
    else:
        out, h_n, gates = op(x, h0, w_ih, w_hh, b, b, None, False, chunk, recompute, "reference")
    assert out.shape == (steps, batch, hidden) and h_n.shape == (batch, hidden)
    expected = (0,) if recompute or not spec.saved_per_unit else (steps, batch, spec.saved_width(hidden))
    assert tuple(gates.shape) == expected
