"""Bad input gets a clear error naming the argument; where torch.nn raises for the same input,
fastbptt raises the same exception type with the same message."""
import re

import pytest
import torch

import fastbptt
from fastbptt import dispatch
from fastbptt.dispatch import BackendUnavailable

PAIRS = [(torch.nn.RNN, fastbptt.RNN), (torch.nn.GRU, fastbptt.GRU), (torch.nn.LSTM, fastbptt.LSTM)]


def state(cls, *shape, dtype=torch.float32):
    h = torch.randn(*shape, dtype=dtype)
    return (h, torch.randn(*shape)) if cls in (torch.nn.LSTM, fastbptt.LSTM) else h


FORWARD_CASES = {
    "input feature size": lambda M: M(4, 6)(torch.randn(5, 3, 7)),
    "hx batch": lambda M: M(4, 6)(torch.randn(5, 3, 4), state(M, 1, 2, 6)),
    "hx layers": lambda M: M(4, 6, num_layers=2)(torch.randn(5, 3, 4), state(M, 1, 3, 6)),
    "hx hidden size": lambda M: M(4, 6)(torch.randn(5, 3, 4), state(M, 1, 3, 5)),
    "input 4-D": lambda M: M(4, 6)(torch.randn(5, 3, 4, 1)),
    "input 1-D": lambda M: M(4, 6)(torch.randn(4)),
    "hx 2-D for batched input": lambda M: M(4, 6)(torch.randn(5, 3, 4), state(M, 3, 6)),
    "hx 3-D for unbatched input": lambda M: M(4, 6)(torch.randn(5, 4), state(M, 1, 1, 6)),
    "input dtype vs weights": lambda M: M(4, 6)(torch.randn(5, 3, 4, dtype=torch.float64)),
    "integer input": lambda M: M(4, 6)(torch.ones(5, 3, 4, dtype=torch.long)),
    "empty sequence": lambda M: M(4, 6)(torch.randn(0, 3, 4)),
    "batch_first hx batch": lambda M: M(4, 6, batch_first=True)(torch.randn(3, 5, 4), state(M, 1, 5, 6)),
}

CONSTRUCTOR_CASES = {
    "dropout out of range": lambda M: M(4, 6, dropout=1.5),
    "hidden_size zero": lambda M: M(4, 0),
    "num_layers zero": lambda M: M(4, 6, num_layers=0),
    "hidden_size float": lambda M: M(4, 6.0),
    "input_size negative": lambda M: M(-1, 6),
    "proj_size on GRU/RNN or >= hidden": lambda M: M(4, 6, proj_size=6),
}


def raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", list(FORWARD_CASES) + list(CONSTRUCTOR_CASES))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_same_error_as_torch_nn(pair, case):
    fn = FORWARD_CASES.get(case) or CONSTRUCTOR_CASES[case]
    expected, actual = raised(lambda: fn(pair[0])), raised(lambda: fn(pair[1]))
    assert type(actual) is type(expected), (actual, expected)
    # fastbptt may add detail, but says what torch.nn says
    assert str(actual).startswith(str(expected)), (str(actual), str(expected))


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        fastbptt.RNN(4, 6, nonlinearity="sigmoid")


@pytest.mark.parametrize("cls", [fastbptt.RNN, fastbptt.GRU, fastbptt.LSTM])
def test_hx_dtype_mismatch_names_hx(cls):
    with pytest.raises(RuntimeError, match=r"Expected hx to have dtype torch.float32 like the input, got torch.float64"):
        cls(4, 6)(torch.randn(5, 3, 4), state(cls, 1, 3, 6, dtype=torch.float64))


def test_lstm_hx_must_be_a_pair():
    with pytest.raises(TypeError, match=r"LSTM expects hx as a tuple \(h_0, c_0\)"):
        fastbptt.LSTM(4, 6)(torch.randn(5, 3, 4), torch.randn(1, 3, 6))


@pytest.mark.parametrize("value,exc,match", [(0, ValueError, re.escape("must lie in [1, 2**63 - 1], got 0")),
                                             (-3, ValueError, re.escape("must lie in [1, 2**63 - 1], got -3")),
                                             (2**63, ValueError, re.escape("must lie in [1, 2**63 - 1], got 9223")),
                                             (2.5, TypeError, "chunk_size should be of type int"),
                                             (True, TypeError, "chunk_size should be of type int")])
def test_bad_chunk_size(value, exc, match):
    with pytest.raises(exc, match=match):
        fastbptt.GRU(4, 6, chunk_size=value)


def test_largest_chunk_size_runs():
    out, _ = fastbptt.GRU(4, 6, chunk_size=2**63 - 1)(torch.randn(5, 3, 4, requires_grad=True))
    out.sum().backward()


@pytest.mark.parametrize("cls", [fastbptt.RNN, fastbptt.GRU, fastbptt.LSTM])
def test_output_edited_in_place_says_why(cls):
    out, _ = cls(4, 6)(torch.randn(5, 3, 4, requires_grad=True))
    out.mul_(2)
    with pytest.raises(RuntimeError, match=r"output was modified in place before the backward.*out.clone\(\)"):
        out.sum().backward()


def test_unknown_backend():
    with pytest.raises(ValueError, match=re.escape("backend must be one of 'auto', 'reference'")):
        fastbptt.GRU(4, 6, backend="cudnn")


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_recompute(bad):
    with pytest.raises(ValueError, match=re.escape(f"recompute must be True, False or 'auto', got {bad!r}")):
        fastbptt.LSTM(4, 6, recompute=bad)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", dispatch.BackendSpec("cpu", "fastbptt._missing", ("cpu",), "x"))
    dispatch._load.cache_clear()
    try:
        model = fastbptt.GRU(4, 6, backend="cpu")
        with pytest.raises(BackendUnavailable, match=r"backend 'cpu' cannot run this gru layer: .*_missing"):
            model(torch.randn(5, 3, 4))
        # auto falls back to the next backend that can take the case
        assert dispatch.resolve("auto", "gru", torch.randn(1, 1, 1), 6) == "reference"
    finally:
        dispatch._load.cache_clear()


def test_backend_on_wrong_device_says_why():
    with pytest.raises(BackendUnavailable, match="does not run on cpu tensors"):
        fastbptt.GRU(4, 6, backend="cuda")(torch.randn(5, 3, 4))


class TestLayerFunction:
    """fastbptt.recurrent_layer: the functional entry point checks what the modules check."""

    def args(self, **over):
        a = dict(x=torch.randn(5, 3, 4), hx=torch.randn(3, 6), weight_ih=torch.randn(18, 4),
                 weight_hh=torch.randn(18, 6))
        a.update(over)
        return a

    def call(self, cell="gru", **kw):
        a = self.args(**{k: v for k, v in kw.items() if k in ("x", "hx", "weight_ih", "weight_hh")})
        rest = {k: v for k, v in kw.items() if k not in a}
        return fastbptt.recurrent_layer(cell, a["x"], a["hx"], a["weight_ih"], a["weight_hh"], **rest)

    def test_ok(self):
        out, h = self.call()
        assert out.shape == (5, 3, 6) and h.shape == (3, 6)

    @pytest.mark.parametrize("kw,match", [
        (dict(hx=torch.randn(2, 6)), r"Expected hidden state hx size \(3, 6\), got \(2, 6\)"),
        (dict(weight_ih=torch.randn(18, 5)), r"Expected weight_ih size \(18, 4\), got \(18, 5\)"),
        (dict(weight_hh=torch.randn(18, 6, dtype=torch.float64)), "Expected weight_hh to have dtype torch.float32"),
        (dict(x=torch.randn(5, 4)), r"input must have 3 dimensions \[T, B, input_size\], got 2"),
        (dict(lengths=torch.tensor([5, 2])), "Expected lengths to be a 1-D int64 tensor of size 3"),
        (dict(lengths=torch.tensor([5, 2, 6])), r"lengths must lie in \[1, 5\]"),
        (dict(lengths=torch.tensor([5, 0, 1])), r"lengths must lie in \[1, 5\]"),
    ])
    def test_errors(self, kw, match):
        with pytest.raises((RuntimeError, ValueError), match=match):
            self.call(**kw)

    def test_lstm_needs_cell_state(self):
        with pytest.raises(ValueError, match="an LSTM layer needs the cell state cx"):
            self.call("lstm", weight_ih=torch.randn(24, 4), weight_hh=torch.randn(24, 6))

    def test_unknown_cell(self):
        with pytest.raises(ValueError, match="cell must be one of"):
            self.call("mlstm")
