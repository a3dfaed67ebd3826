"""Drop-in behaviour: same parameters and initialisation as torch.nn, state_dict both ways,
isinstance, whole-model torch.save/torch.load, convert(), autocast dtypes, the meta device, repr,
and the info command."""
import io
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
    assert repr(fast) == "fastbptt." + repr(ref)  # torch's repr, naming the module as fastbptt's


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_isinstance_of_the_torch_class(pair):
    assert isinstance(pair[1](5, 7), pair[0]) and isinstance(pair[1](5, 7), torch.nn.RNNBase)
    others = [torch_cls for torch_cls, _ in PAIRS if torch_cls is not pair[0]]
    assert not any(isinstance(pair[1](5, 7), other) for other in others)


def test_repr_inside_a_model_names_fastbptt():
    model = fastbptt.convert(Tagger())
    assert "(rnn): fastbptt.LSTM(4, 6, num_layers=2, batch_first=True)" in repr(model)
    assert "(1): fastbptt.RNN(5, 3)" in repr(model)

    class MyGRU(fastbptt.GRU):  # a user's subclass keeps its own name
        pass
    assert repr(MyGRU(2, 3)) == "MyGRU(2, 3)"


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


@pytest.mark.parametrize("cls", [fastbptt.GRU, fastbptt.LSTM], ids=lambda c: c.__name__)
def test_auto_memory_policy_keeps_gates_up_to_its_limit(cls, monkeypatch):
    """recompute='auto', the default, keeps the gate pre-activations of a layer call while they take at
    most AUTO_KEEP_GATES_BYTES, and recomputes them above it."""
    from fastbptt.bench.memory import saved_activation_bytes

    steps, batch, inp, hidden = 16, 4, 3, 8
    x = torch.randn(steps, batch, inp, requires_grad=True)

    def kept(recompute):
        model = cls(inp, hidden, backend="reference", recompute=recompute)
        return saved_activation_bytes(lambda: model(x), exclude=[x, *model.parameters()])

    assert cls(inp, hidden).recompute == "auto"
    gate_bytes = steps * batch * fastbptt.cells.SPECS[cls.__name__.lower()].saved_width(hidden) * 4
    assert kept(False) >= kept(True) + gate_bytes
    monkeypatch.setattr(fastbptt.ops, "AUTO_KEEP_GATES_BYTES", gate_bytes)
    assert kept("auto") == kept(False)
    monkeypatch.setattr(fastbptt.ops, "AUTO_KEEP_GATES_BYTES", gate_bytes - 1)
    assert kept("auto") == kept(True)


def test_extra_keywords_and_repr():
    m = fastbptt.GRU(4, 8, chunk_size=16, recompute=False, backend="reference")
    assert (m.chunk_size, m.recompute, m.backend) == (16, False, "reference")
    assert repr(m) == "fastbptt.GRU(4, 8, chunk_size=16, recompute=False, backend='reference')"
    assert repr(fastbptt.GRU(4, 8, recompute=True)) == "fastbptt.GRU(4, 8, recompute=True)"
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
    assert isinstance(model.rnn, torch.nn.LSTM) and isinstance(model.blocks[1], torch.nn.RNN)  # still torch's kind
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


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pair,kwargs", [(PAIRS[0], {}), (PAIRS[0], dict(nonlinearity="relu")), (PAIRS[1], {}),
                                         (PAIRS[2], {}), (PAIRS[2], dict(proj_size=3, bidirectional=True))],
                         ids=["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm-proj"])
def test_autocast_returns_torch_dtypes(pair, kwargs, autocast_dtype):
    """CPU autocast: the dtypes torch.nn returns (low precision for RNN and LSTM, float32 for GRU),
    values within low-precision error of torch.nn's, and float32 parameter gradients."""
    ref, model = pair[0](4, 6, **kwargs), pair[1](4, 6, **kwargs)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out, hidden = model(x)
        try:
            ref_out, ref_hidden = ref(x)
        except RuntimeError as exc:  # oneDNN's float16 LSTM needs AVX512-FP16 or AMX-FP16
            pytest.skip(f"torch.nn's own {pair[0].__name__} fails under {autocast_dtype} autocast here: {exc}")
    states, ref_states = (hidden, ref_hidden) if isinstance(hidden, tuple) else ((hidden,), (ref_hidden,))
    assert [t.dtype for t in (out, *states)] == [t.dtype for t in (ref_out, *ref_states)]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert model.weight_hh_l0.grad.dtype == torch.float32


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_whole_model_torch_load_with_weights_only(pair, tmp_path):
    """torch.save(model) then torch.load(path) with its default weights_only=True: a model whose
    other classes the user allow-listed loads once fastbptt is imported."""
    model = torch.nn.Sequential(pair[1](5, 7, 2, chunk_size=3))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with torch.serialization.safe_globals([torch.nn.Sequential]):
        loaded = torch.load(path)
    assert type(loaded[0]) is pair[1] and loaded[0].chunk_size == 3
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(loaded[0](x)[0], model[0](x)[0])
    code = ("import sys, torch, fastbptt\n"  # a fresh process: importing fastbptt is all it takes
            "torch.serialization.add_safe_globals([torch.nn.Sequential])\n"
            "assert type(torch.load(sys.argv[1])[0]).__module__ == 'fastbptt.nn'\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_meta_device_propagates_shapes(pair):
    """Deferred initialisation (device="meta", FSDP): shapes and dtypes as torch.nn gives them, forward and backward."""
    ref, model = pair[0](5, 7, 2, bidirectional=True, device="meta"), pair[1](5, 7, 2, bidirectional=True, device="meta")
    x = torch.randn(6, 3, 5, device="meta", requires_grad=True)
    out, hidden = model(x)
    ref_out, ref_hidden = ref(x)
    flat = lambda t: t if isinstance(t, tuple) else (t,)
    assert [(t.shape, t.dtype, t.device) for t in (out, *flat(hidden))] == [
        (t.shape, t.dtype, t.device) for t in (ref_out, *flat(ref_hidden))]
    out.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad.shape == p.shape for p in model.parameters())


def test_zero_batch():
    out, (h, c) = fastbptt.LSTM(4, 6)(torch.randn(5, 0, 4))
    assert out.shape == (5, 0, 6) and h.shape == (1, 0, 6) and c.shape == (1, 0, 6)
    with torch.no_grad():
        out, h = fastbptt.GRU(4, 6)(torch.randn(5, 0, 4))
    assert out.shape == (5, 0, 6) and h.shape == (1, 0, 6)


def test_info_reports_every_backend():
    text = info.report()
    for name in ("reference", "cpu", "cuda", "triton"):
        assert f"  {name} " in text
    for spec in dispatch.BACKENDS.values():  # every kernel path, with when the rule takes it
        for path in spec.paths:
            assert f"    {spec.name}:{path.name} " in text
    assert "cuda:persistent    only when forced" in text and "cpu:small-batch    B <= 2 on avx2" in text
    assert "cpu:packed         B >= 3" in text
    if not dispatch.availability("cpu"):  # what a path declines is asked of the backend itself
        assert "declines: the packed kernels exist for LSTM without projection (and for RNN and GRU)" in text
        assert f"micro-kernel ISA here: {fastbptt.native.packed_isa()}" in text
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
