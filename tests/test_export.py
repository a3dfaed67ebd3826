"""Export paths a program uses on an nn.LSTM, with fastbptt's modules in its place: ONNX (both
exporters, run by onnxruntime), torch.jit.trace and torch.export, each against eager torch.nn."""
import warnings

import pytest
import torch

import fastbptt

# (fastbptt class, torch.nn class, constructor keywords). LSTM projections are left out: torch.nn's
# own LSTM with proj_size does not export to ONNX (the TorchScript exporter refuses it, the dynamo
# exporter writes an LSTM node onnxruntime rejects), and fastbptt exports what torch.nn exports.
CASES = [
    (fastbptt.RNN, torch.nn.RNN, dict(nonlinearity="relu")),
    (fastbptt.RNN, torch.nn.RNN, dict(num_layers=2, bidirectional=True)),
    (fastbptt.GRU, torch.nn.GRU, dict(batch_first=True)),
    (fastbptt.GRU, torch.nn.GRU, dict(num_layers=2, bidirectional=True, bias=False)),
    (fastbptt.LSTM, torch.nn.LSTM, dict()),
    (fastbptt.LSTM, torch.nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
]
IDS = ["rnn-relu", "rnn-2l-bi", "gru-bf", "gru-2l-bi-nobias", "lstm", "lstm-2l-bi-bf"]


class Tagger(torch.nn.Module):
    """A recurrent layer between two linear layers, as in a sequence tagger."""

    def __init__(self, rnn: torch.nn.Module):
        super().__init__()
        self.embed = torch.nn.Linear(5, 4)
        self.rnn = rnn
        self.head = torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def pair(fast_cls, torch_cls, kwargs):
    """(fastbptt model, the same model on torch.nn, an input)."""
    torch.manual_seed(0)
    ref = Tagger(torch_cls(4, 6, **kwargs)).eval()
    fast = Tagger(fast_cls(4, 6, **kwargs)).eval()
    fast.load_state_dict(ref.state_dict())
    return fast, ref, torch.randn(7, 2, 5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("fast_cls,torch_cls,kwargs", CASES, ids=IDS)
def test_onnx_export_runs_in_onnxruntime(fast_cls, torch_cls, kwargs, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    fast, ref, x = pair(fast_cls, torch_cls, kwargs)
    onnx = pytest.importorskip("onnx")
    paths = {}
    for name, model in (("fastbptt", fast), ("torch.nn", ref)):
        paths[name] = str(tmp_path / f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation notes
            torch.onnx.export(model, (x,), paths[name], dynamo=dynamo)
    session = ort.InferenceSession(paths["fastbptt"], providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ref(x).detach(), atol=1e-5, rtol=1e-4)
    # the same graph as torch.nn's export: ONNX's own LSTM/GRU/RNN operators, or the same unrolled ops
    op_types = {name: sorted(node.op_type for node in onnx.load(path).graph.node) for name, path in paths.items()}
    assert op_types["fastbptt"] == op_types["torch.nn"]


@pytest.mark.parametrize("fast_cls,torch_cls,kwargs", CASES, ids=IDS)
def test_jit_trace(fast_cls, torch_cls, kwargs):
    """torch.jit.trace passes its own check (the trace is the same on a second run) and the traced
    module gives torch.nn's results on a new input."""
    fast, ref, x = pair(fast_cls, torch_cls, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(fast, (x,), check_trace=True)
    x2 = torch.randn(7, 2, 5)
    torch.testing.assert_close(traced(x2), ref(x2))


@pytest.mark.parametrize("fast_cls,torch_cls,kwargs", CASES[::2], ids=IDS[::2])
def test_torch_export_keeps_the_fused_ops(fast_cls, torch_cls, kwargs):
    """torch.export records fastbptt's custom ops (their fake kernels give the shapes), and the
    exported program runs forward and backward like the eager module."""
    fast, ref, x = pair(fast_cls, torch_cls, kwargs)
    program = torch.export.export(fast.train(), (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any(t.startswith("fastbptt.") for t in targets), sorted(targets)
    torch.testing.assert_close(program.module()(x), ref(x))
