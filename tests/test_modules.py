"""Drop-in behaviour: same parameters and initialisation as torch.nn, state_dict both ways,
convert(), autocast, repr, and the info command."""
import subprocess
import sys

import pytest
import torch

import fastbptt
from fastbptt import dispatch, info

PAIRS = [(torch.nn.RNN, fastbptt.RNN), (torch.nn.GRU, fastbptt.GRU), (torch.nn.LSTM, fastbptt.LSTM)]
CONFIGS = [dict(), dict(num_layers=3, bidirectional=True, bias=False), dict(num_layers=2, batch_first=True, dropout=0.1)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("config", CONFIGS)
def test_same_parameters_and_initialisation(pair, config):
    torch.manual_seed(0)
    ref = pair[0](5, 7, **config)
    torch.manual_seed(0)
    fast = pair[1](5, 7, **config)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in fast.named_parameters()]
    for (_, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b)
    assert repr(ref) == repr(fast)


def test_lstm_projection_parameters():
    ref, fast = torch.nn.LSTM(5, 7, 2, proj_size=3, bidirectional=True), fastbptt.LSTM(5, 7, 2, proj_size=3,
                                                                                           bidirectional=True)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in fast.named_parameters()]


def test_positional_arguments_like_torch():
    # RNN(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional)
    ref, fast = torch.nn.RNN(3, 4, 2, "relu", False, True, 0.0, True), fastbptt.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert (fast.mode, fast.bias, fast.batch_first, fast.bidirectional) == (ref.mode, ref.bias, ref.batch_first,
                                                                             ref.bidirectional)
    assert fast.nonlinearity == "relu"


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_state_dict_both_ways(pair):
    x = torch.randn(6, 2, 5)
    ref, fast = pair[0](5, 7, 2), pair[1](5, 7, 2)
    fast.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fast(x)[0], ref(x)[0])
    ref2 = pair[0](5, 7, 2)
    ref2.load_state_dict(pair[1](5, 7, 2).state_dict())  # loads without key or shape errors
    fast.load_state_dict(ref2.state_dict())
    torch.testing.assert_close(fast(x)[0], ref2(x)[0])


def test_extra_keywords_and_repr():
    m = fastbptt.GRU(4, 8, chunk_size=16, recompute=False, backend="reference")
    assert (m.chunk_size, m.recompute, m.backend) == (16, False, "reference")
    assert repr(m) == "GRU(4, 8, chunk_size=16, recompute=False, backend='reference')"
    with pytest.raises(TypeError):
        fastbptt.GRU(4, 8, 1, True, False, 0.0, False, None, None, 16)  # chunk_size is keyword-only


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.rnn = torch.nn.LSTM(4, 6, 2, batch_first=True)
        self.blocks = torch.nn.ModuleList([torch.nn.GRU(6, 5), torch.nn.RNN(5, 3, nonlinearity="relu")])

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        y, _ = self.blocks[0](y)
        return self.blocks[1](y)[0]


def test_convert_keeps_weights_and_results():
    model = Tagger().double()
    tokens = torch.randint(0, 10, (3, 7))
    expected = model(tokens)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fastbptt.convert(model, chunk_size=4) is model
    assert isinstance(model.rnn, fastbptt.LSTM) and isinstance(model.blocks[0], fastbptt.GRU)
    assert isinstance(model.blocks[1], fastbptt.RNN) and model.blocks[1].nonlinearity == "relu"
    assert model.rnn.chunk_size == 4
    assert all(a is b for a, b in zip(params, model.parameters()))  # same objects: the optimizer still works
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model(tokens), expected)
    model(tokens).sum().backward()
    optimizer.step()


def test_convert_rejects_bad_options():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbptt.convert(Tagger(), backend="fast")


def test_autocast_runs_in_low_precision_like_torch():
    model, ref = fastbptt.GRU(4, 6), torch.nn.GRU(4, 6)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = model(x)
        ref_out, _ = ref(x)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert model.weight_hh_l0.grad.dtype == torch.float32


def test_zero_batch():
    out, (h, c) = fastbptt.LSTM(4, 6)(torch.randn(5, 0, 4))
    assert out.shape == (5, 0, 6) and h.shape == (1, 0, 6) and c.shape == (1, 0, 6)


def test_info_reports_every_backend():
    text = info.report()
    for name in ("reference", "cpu", "cuda", "triton"):
        assert f"  {name} " in text
    for spec in dispatch.BACKENDS.values():  # every kernel path, with when the rule takes it
        for path in spec.paths:
            assert f"    {spec.name}:{path.name} " in text
    assert "cuda:persistent    only when forced" in text and "cpu:small-batch    B <= 2" in text
    if not dispatch.availability("cpu"):  # what a path declines is asked of the backend itself
        assert "declines: the packed forward exists for GRU and for LSTM without projection" in text
    assert "torch" in text and "backend='auto' picks" in text
    out = subprocess.run([sys.executable, "-m", "fastbptt.info"], capture_output=True, text=True, check=True).stdout
    assert "backends (BACKEND:PATH forces" in out


def test_works_without_the_compiled_extension():
    """With fastbptt._C unimportable, the package still imports, says why, and runs on the reference."""
    code = (
        "import sys; sys.modules['fastbptt._C'] = None\n"
        "import torch, fastbptt\n"
        "from fastbptt import dispatch\n"
        "reason = dispatch.availability('cpu')\n"
        "assert 'pip install --no-build-isolation -e .' in reason, reason\n"
        "assert dispatch.resolve('auto', 'gru', torch.zeros(1, 1, 1), 4) == 'reference'\n"
        "ref = torch.nn.GRU(3, 4); m = fastbptt.GRU(3, 4); m.load_state_dict(ref.state_dict())\n"
        "x = torch.randn(5, 2, 3)\n"
        "torch.testing.assert_close(m(x)[0], ref(x)[0])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
