"""The backend registry's kernel paths: the names a user can force, the rule that picks a path
when none is forced, what each path declines, that the chosen path is the one that runs, and that
every path computes the same function (parity with torch.nn through the module)."""
import pytest
import torch

import fastbptt
from conftest import triton_interpreted
from fastbptt import dispatch
from helpers import TOLERANCES, Case, assert_parity, make_inputs, make_pair

CPU_REASON = dispatch.availability("cpu")
needs_cpu = pytest.mark.skipif(bool(CPU_REASON), reason=f"backend 'cpu' unavailable: {CPU_REASON}")
needs_triton = pytest.mark.skipif(not triton_interpreted(), reason="needs Triton with TRITON_INTERPRET=1")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def test_every_path_is_a_backend_choice():
    for spec in dispatch.BACKENDS.values():
        assert spec.name in dispatch.CHOICES
        for path in spec.paths:
            assert f"{spec.name}:{path.name}" in dispatch.CHOICES
    assert {"cpu:small-batch", "cpu:packed", "cpu:blas", "cuda:persistent", "cuda:standard", "triton:resident",
            "triton:streamed"} <= set(dispatch.CHOICES)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbptt.GRU(4, 6, backend="cuda:fastest")


def test_persistent_is_never_chosen_automatically_until_measured():
    persistent = dispatch.path_spec("cuda", "persistent")
    assert not any(persistent.auto_for(b) for b in (1, 8, 64))


@needs_cpu
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("cell,proj,dtype,batch,expected", [
    ("gru", 0, F32, 1, {"avx2": "small-batch", "avx512": "blas"}),   # measured per ISA (docs/cpu.md)
    ("lstm", 0, BF16, 2, {"avx2": "small-batch", "avx512": "blas"}),
    ("rnn_tanh", 0, F32, 2, {"avx2": "small-batch", "avx512": "blas"}),
    ("gru", 0, F32, 3, "packed"),
    ("lstm", 0, BF16, 64, "packed"),
    ("rnn_relu", 0, F32, 8, "packed"),
    ("lstm", 4, F32, 8, "blas"),       # the packed kernels have no projection
    ("gru", 0, F64, 1, "blas"),        # small-batch and packed compute in float32
])
def test_cpu_rule(cell, proj, dtype, batch, expected, isa, monkeypatch):
    monkeypatch.setattr(dispatch, "vector_isa", lambda backend: isa)
    want = expected[isa] if isinstance(expected, dict) else expected
    assert dispatch.choose_path("cpu", cell, dtype, batch, 16, proj) == want


def test_cpu_rule_follows_this_cpus_isa():
    """The ISA the rule reads is the one the packed kernels run with here."""
    if not CPU_REASON:
        assert dispatch.vector_isa("cpu") == fastbptt.native.packed_isa() in ("avx2", "avx512")
    assert dispatch.vector_isa("reference") == ""


@needs_cpu
@pytest.mark.parametrize("backend,cell,proj,dtype,reason", [
    ("cpu:packed", "gru", 0, F64, "take float32 and bfloat16"),
    ("cpu:small-batch", "rnn_tanh", 0, F64, "take float32 and bfloat16"),
    ("cpu:packed", "lstm", 4, F32, "packed kernels exist for LSTM without projection"),
])
def test_forced_path_that_declines_raises_with_the_reason(backend, cell, proj, dtype, reason):
    with pytest.raises(dispatch.BackendUnavailable, match=f"{backend}' cannot run this {cell} layer .*{reason}"):
        dispatch.choose_path(backend, cell, dtype, 4, 16, proj)
    case = Case(cell=cell, proj_size=proj)
    _, model = make_pair(case, backend, dtype)
    x, hx, _ = make_inputs(case, dtype)
    with pytest.raises(dispatch.BackendUnavailable, match=reason):
        model(x, hx)


@needs_cpu
@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 3)])
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_the_last_cpu_path_takes_every_case(cell, proj, dtype):
    last = dispatch.BACKENDS["cpu"].paths[-1].name
    assert dispatch.path_decline("cpu", last, cell, dtype, 5, 7, proj) == ""


@needs_cpu
@pytest.mark.parametrize("backend,batch,dtype,expected", [
    ("cpu", 1, F32, "small-batch" if CPU_REASON or dispatch.vector_isa("cpu") == "avx2" else "blas"),
    ("cpu", 4, F32, "packed"),
    ("cpu", 4, F64, "blas"),
    ("cpu:blas", 1, F32, "blas"),
    ("cpu:small-batch", 4, F32, "small-batch"),
])
def test_the_chosen_path_is_the_one_that_runs(monkeypatch, backend, batch, dtype, expected):
    from fastbptt import native

    seen = set()
    for name in ("gru_forward", "gru_backward"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, **kw: seen.add(kw["path"]) or _k(*a, **kw))
    model = fastbptt.GRU(3, 5, backend=backend).to(dtype)
    out, _ = model(torch.randn(4, batch, 3, dtype=dtype, requires_grad=True))
    out.sum().backward()
    assert seen == {expected}


@needs_cpu
@pytest.mark.parametrize("path,cells", [
    ("small-batch", ("rnn_relu", "gru", "lstm")),
    ("packed", ("rnn_tanh", "gru", "lstm")),
    ("blas", ("rnn_tanh", "gru", "lstm")),
])
def test_every_cpu_path_matches_torch_nn(path, cells):
    for cell in cells:
        for case in (Case(cell=cell, batch=5, packed=True, bidirectional=True, num_layers=2),
                     Case(cell=cell, batch=1, chunk_size=2, recompute=False)):
            assert_parity(case, f"cpu:{path}", F32, tolerance=TOLERANCES[F32])


@needs_triton
@pytest.mark.parametrize("hidden,proj,expected", [(32, 0, "resident"), (33, 0, "streamed"), (16, 40, "streamed")])
def test_triton_rule(hidden, proj, expected):
    assert dispatch.choose_path("triton", "lstm", F32, 4, hidden, proj) == expected


@needs_triton
def test_triton_forced_resident_declines_what_does_not_fit_one_tile():
    with pytest.raises(dispatch.BackendUnavailable, match="does not fit one 32-wide tile"):
        dispatch.choose_path("triton:resident", "gru", F32, 4, 64)


@needs_triton
@pytest.mark.parametrize("path", ["resident", "streamed"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_every_triton_path_matches_torch_nn(path, cell):
    assert_parity(Case(cell=cell, packed=True, bidirectional=True), f"triton:{path}", F32)


# ----------------------------------------------------------------------------- the onednn path (LSTM, whole layers)

INFER, KEEP = dispatch.INFERENCE, dispatch.TRAIN_KEEP


@needs_cpu
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("heap_reuses", [False, True])
@pytest.mark.parametrize("cell,proj,dtype,batch,hidden,call,expected", [
    ("lstm", 0, F32, 32, 1024, INFER, "onednn"),  # measured: as fast as torch.nn where packed was slower
    ("lstm", 0, F32, 8, 128, INFER, "onednn"),
    ("lstm", 0, F32, 8, 129, INFER, "packed"),    # small batches with a larger W_hh: packed was faster or even
    ("lstm", 0, F32, 20, 200, INFER, "packed"),
    ("lstm", 0, F32, 31, 512, INFER, "packed"),
    ("lstm", 0, F32, 7, 16, INFER, "packed"),
    # training that keeps its gates: oneDNN's workspace, at B=1 and, where the heap hands it back without
    # page faults, at every batch; under glibc's defaults packed was ahead from B=8
    ("lstm", 0, F32, 1, 1024, KEEP, {"avx2": "small-batch", "avx512": "onednn"}),
    ("lstm", 0, F32, 3, 1024, KEEP, {False: "packed", True: "onednn"}),
    ("lstm", 0, F32, 0, 1024, KEEP, {"avx2": "small-batch", "avx512": "blas"}),  # oneDNN takes no empty batch
    ("lstm", 0, F32, 64, 256, KEEP, {False: "packed", True: "onednn"}),
    ("lstm", 0, F32, 64, 256, "", "packed"),      # recompute on, or variable lengths
    ("lstm", 0, F32, 64, 256, None, "packed"),    # inside the ops: the entry point pins the path
    ("gru", 0, F32, 64, 256, KEEP, "packed"),     # oneDNN's recurrent primitive is torch's for the LSTM only
    ("lstm", 4, F32, 64, 256, INFER, "blas"),     # no projection
    ("lstm", 0, BF16, 64, 256, KEEP, "packed"),   # float32 only
])
def test_cpu_whole_layer_rule(cell, proj, dtype, batch, hidden, call, expected, heap_reuses, isa, monkeypatch):
    monkeypatch.setattr(dispatch, "vector_isa", lambda backend: isa)
    monkeypatch.setattr(dispatch, "heap_reuses_large_blocks", lambda: heap_reuses)
    if isinstance(expected, dict):
        expected = expected[isa] if isa in expected else expected[heap_reuses]
    assert dispatch.choose_path("cpu", cell, dtype, batch, hidden, proj, call=call) == expected


@needs_cpu
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() sets that flag too
def test_onednn_path_follows_torch_backends_mkldnn_enabled():
    """Turning oneDNN off turns it off for fastbptt as for torch.nn: the next path takes the call."""
    assert dispatch.layer_kernel("cpu", "lstm", F32, 32, 64, 0, INFER) == "cpu:onednn"
    with torch.backends.mkldnn.flags(enabled=False):
        assert dispatch.layer_kernel("cpu", "lstm", F32, 32, 64, 0, INFER) == "cpu:packed"
        with pytest.raises(dispatch.BackendUnavailable, match="torch.backends.mkldnn.enabled is False"):
            dispatch.choose_path("cpu:onednn", "lstm", F32, 32, 64)


@needs_cpu
@pytest.mark.parametrize("batch,grad,recompute,heap_reuses,expected", [
    (33, False, "auto", False, "onednn"),
    (33, True, "auto", False, "packed"),
    (33, True, "auto", True, "onednn"),
    (33, True, False, True, "onednn"),
    (33, True, True, True, "packed"),     # recompute: the onednn path cannot
    (5, False, "auto", False, "packed"),
])
def test_the_rule_runs_onednn_for_the_calls_it_takes(monkeypatch, batch, grad, recompute, heap_reuses, expected):
    from fastbptt import native

    monkeypatch.setattr(dispatch, "heap_reuses_large_blocks", lambda: heap_reuses)
    seen = set()
    for name in ("lstm_layer_chunk", "lstm_layer_train", "lstm_layer_backward"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel: seen.add("onednn") or _k(*a))
    for name in ("lstm_forward", "lstm_backward"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, **kw: seen.add(kw["path"]) or _k(*a, **kw))
    model = fastbptt.LSTM(3, 5, num_layers=2, bidirectional=True, recompute=recompute)
    with torch.set_grad_enabled(grad):
        out, _ = model(torch.randn(4, batch, 3))
    if grad:
        out.sum().backward()
    assert seen == {expected}


@needs_cpu
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True), dict(bias=False),
                                    dict(batch_first=True), dict(num_layers=2, dropout=0.5)])
@pytest.mark.parametrize("chunk_bytes", [16 << 20, 3 * 9 * 4 * 7 * 4])  # default; 3 steps of [9, 4*7] float32
def test_onednn_inference_matches_torch_nn_and_the_reference(kwargs, chunk_bytes, monkeypatch):
    """Outputs and final states of the onednn path against torch.nn (the same primitive) and the
    reference backend, over one chunk and over chunks of 3 steps (the carried state crosses them; the
    reverse direction runs them from the last). Its chunks are sized by the whole-layer budget."""
    from fastbptt import native

    monkeypatch.setattr(fastbptt.ops, "WHOLE_LAYER_INFERENCE_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(fastbptt.ops, "INFERENCE_CHUNK_BYTES", 1 << 40)  # the other paths' budget: no say here
    steps_run = []
    chunk = native.lstm_layer_chunk
    monkeypatch.setattr(native, "lstm_layer_chunk", lambda x, *a: steps_run.append(x.shape[0]) or chunk(x, *a))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 7, **kwargs).eval()
    fast = {b: fastbptt.LSTM(6, 7, **kwargs, backend=b).eval() for b in ("cpu:onednn", "reference")}
    for model in fast.values():
        model.load_state_dict(ref.state_dict())
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn((9, 11, 6) if kwargs.get("batch_first") else (11, 9, 6))
    state = (torch.randn(layers, 9, 7), torch.randn(layers, 9, 7))
    with torch.no_grad():
        expected = ref(x, state)
        for backend, model in fast.items():
            out, (h, c) = model(x, state)
            tol = dict(atol=0, rtol=0) if backend == "cpu:onednn" else dict(atol=2e-6, rtol=2e-5)
            torch.testing.assert_close(out, expected[0], **tol)
            torch.testing.assert_close(h, expected[1][0], **tol)
            torch.testing.assert_close(c, expected[1][1], **tol)
    assert steps_run == [11] * layers if chunk_bytes == 16 << 20 else [3, 3, 3, 2] * layers


@needs_cpu
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True), dict(bias=False),
                                    dict(batch_first=True, num_layers=2, dropout=0.5)])
def test_onednn_training_matches_torch_nn_bit_for_bit_and_the_reference(kwargs):
    """Forced, the onednn path trains any LSTM without projection on sequences of one length by
    torch.nn's own primitive: outputs, final states and every gradient equal torch.nn's exactly (the
    same dropout masks from the same seed), and the reference's to float32 tolerance."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 7, **kwargs)
    fast = {b: fastbptt.LSTM(6, 7, **kwargs, backend=b) for b in ("cpu:onednn", "reference")}
    for model in fast.values():
        model.load_state_dict(ref.state_dict())
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn((9, 11, 6) if kwargs.get("batch_first") else (11, 9, 6), requires_grad=True)
    h0, c0 = (torch.randn(layers, 9, 7, requires_grad=True) for _ in range(2))

    def run(model):
        torch.manual_seed(1)
        out, (h, c) = model(x, (h0, c0))
        grads = torch.autograd.grad((out.sin().sum() + h.square().sum() + c.cos().sum()),
                                    (x, h0, c0, *model.parameters()))
        return (out, h, c) + grads

    expected = run(ref)
    for backend, model in fast.items():
        if backend == "reference" and kwargs.get("dropout"):
            continue  # other masks: the reference draws them per layer as the modules do, torch.nn in C++
        tol = dict(atol=0, rtol=0) if backend == "cpu:onednn" else dict(atol=2e-5, rtol=2e-5)
        for got, want in zip(run(model), expected, strict=True):
            torch.testing.assert_close(got, want, **tol)


@needs_cpu
@pytest.mark.parametrize("cell,grad,recompute,packed,reason", [
    ("lstm", True, True, False, r"training that keeps its workspace \(recompute=False or 'auto', not True\)"),
    ("lstm", True, "auto", True, "runs sequences of one length only"),
    ("lstm", False, "auto", True, "runs sequences of one length only"),
    ("gru", False, "auto", False, "exposed by torch for the LSTM only"),
])
def test_forced_onednn_declines_what_it_cannot_run(cell, grad, recompute, packed, reason):
    model = (fastbptt.LSTM if cell == "lstm" else fastbptt.GRU)(3, 5, backend="cpu:onednn", recompute=recompute)
    x = torch.randn(4, 2, 3, requires_grad=grad)
    inp = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 2]), enforce_sorted=False) if packed else x
    with pytest.raises(dispatch.BackendUnavailable, match=reason), torch.set_grad_enabled(grad):
        model(inp)


@needs_cpu
def test_forced_onednn_keeps_its_workspace_under_auto_above_the_gate_budget(monkeypatch):
    """recompute="auto" would recompute gates above AUTO_KEEP_GATES_BYTES; a named onednn path keeps its
    workspace instead (it cannot recompute), as torch.nn does."""
    monkeypatch.setattr(fastbptt.ops, "AUTO_KEEP_GATES_BYTES", 0)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5)
    fast = fastbptt.LSTM(3, 5, backend="cpu:onednn")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, requires_grad=True)
    grads = [torch.autograd.grad(m(x)[0].sum(), (x, *m.parameters())) for m in (ref, fast)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_cpu
def test_the_op_refuses_what_the_onednn_path_cannot_train():
    """Called directly (not through a module, whose entry point raises first or sets the chunk size),
    the op refuses a backward that would recompute, and training in more than one chunk."""
    x = torch.randn(3, 2, 4, requires_grad=True)
    h = torch.zeros(2, 5)
    args = (x, h, h, torch.randn(20, 4), torch.randn(20, 5), None, None, None, None, False)
    out = torch.ops.fastbptt.lstm(*args, 2, True, "cpu:onednn")
    with pytest.raises(RuntimeError, match=r"trains only keeping its workspace \(recompute=False\)"):
        out[0].sum().backward()
    with pytest.raises(RuntimeError, match="trains a layer as one chunk .* got chunk_size=2 for 3 steps"):
        torch.ops.fastbptt.lstm(*args, 2, False, "cpu:onednn")


@needs_cpu
def test_packed_sequences_in_inference_run_the_next_path(monkeypatch):
    """Variable lengths are not the onednn path's: the rule gives them to the packed kernels."""
    from fastbptt import native

    seen = set()
    kernel = native.lstm_forward
    monkeypatch.setattr(native, "lstm_forward", lambda *a, **kw: seen.add(kw["path"]) or kernel(*a, **kw))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5)
    fast = fastbptt.LSTM(3, 5)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 40, 3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.randint(1, 7, (40,)), enforce_sorted=False)
    with torch.no_grad():
        out_e, (h_e, c_e) = ref(packed)
        out_a, (h_a, c_a) = fast(packed)
    assert seen == {"packed"}
    for a, e in ((out_a.data, out_e.data), (h_a, h_e), (c_a, c_e)):
        torch.testing.assert_close(a, e, atol=2e-6, rtol=2e-5)


@needs_cpu
def test_compiled_lstm_inference_with_symbolic_sizes():
    """Under torch.compile the ops pick their path when they run (sizes may be symbolic there)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6)
    fast = fastbptt.LSTM(4, 6)
    fast.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        for batch in (33, 40):
            x = torch.randn(5, batch, 4)
            torch.testing.assert_close(compiled(x)[0], ref(x)[0], atol=2e-6, rtol=2e-5)
