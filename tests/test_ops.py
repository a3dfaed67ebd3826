"""The custom ops themselves: registration (opcheck), gradients (gradcheck and gradgradcheck in
float64, torch.func transforms), torch.compile, the activation-memory bound, and random shapes (hypothesis)."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbptt
from conftest import cpu_backends
from fastbptt.bench.memory import saved_activation_bytes
from fastbptt.nn import MODULE_OF_CELL, TORCH_MODULE_OF_CELL, cell_kwargs
from fastbptt.ops import chunk_bounds, library, recurrent_layer
from helpers import Case, assert_compile_matches_eager, assert_parity

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def op_args(cell, backend, *, steps=5, batch=3, inp=4, hidden=5, proj=0, lengths=True, reverse=False, chunk=2,
            recompute=True, dtype=torch.float64, requires_grad=True):
    """Positional arguments of torch.ops.fastbptt.<cell> for a small random case."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(requires_grad)
    out = proj or hidden
    x, h0 = rnd(steps, batch, inp), rnd(batch, out)
    w_ih, w_hh = rnd(GATES[cell] * hidden, inp), rnd(GATES[cell] * hidden, out)
    b_ih, b_hh = rnd(GATES[cell] * hidden), rnd(GATES[cell] * hidden)
    lens = torch.tensor([steps, 2, steps - 1][:batch]) if lengths else None
    options = (lens, reverse, chunk, recompute, backend)
    if cell == "lstm":
        w_hr = rnd(proj, hidden) if proj else None
        return (x, h0, rnd(batch, hidden), w_ih, w_hh, b_ih, b_hh, w_hr) + options
    return (x, h0, w_ih, w_hh, b_ih, b_hh) + options


def op(cell):
    return getattr(torch.ops.fastbptt, cell)


def through(door, cell):
    """The layer op of ``cell`` through a door: "op" (the registered op, as torch.compile, tensor subclasses
    and dispatch modes see it) or "eager" (library.run_layer's plain eager path, which the modules take)."""
    return op(cell) if door == "op" else functools.partial(library.run_layer, cell, needs_grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("recompute", [True, False])
def test_opcheck(backend, cell, recompute):
    args = op_args(cell, backend, recompute=recompute, proj=3 if cell == "lstm" else 0)
    torch.library.opcheck(op(cell), args)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="backend 'cpu' unavailable")
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_onednn_inference(reverse):
    """The LSTM op on the inference-only onednn path (float32, no lengths, nothing requires grad)."""
    args = op_args("lstm", "cpu:onednn", lengths=False, reverse=reverse, dtype=torch.float32, requires_grad=False)
    torch.library.opcheck(op("lstm"), args)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="backend 'cpu' unavailable")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_onednn_training(reverse, bias):
    """The LSTM op training on the onednn path: one chunk, its workspace kept (uint8, of a size the fake
    kernel leaves symbolic) in place of the gates. oneDNN leaves the workspace's padding uninitialised,
    so its bytes differ from call to call and opcheck's AOT test, which compares every output exactly,
    cannot pass; test_torch_compile_trains_on_a_forced_onednn_path checks what it would."""
    args = list(op_args("lstm", "cpu:onednn", lengths=False, reverse=reverse, dtype=torch.float32, chunk=5,
                        recompute=False))
    if not bias:
        args[5] = args[6] = None
    torch.library.opcheck(op("lstm"), tuple(args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="backend 'cpu' unavailable")
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_onednn_training_float32(reverse):
    """The onednn path runs float32 only, so its gradients are checked against finite differences
    there, with a step and tolerances for float32."""
    args = op_args("lstm", "cpu:onednn", steps=4, inp=3, hidden=3, lengths=False, reverse=reverse, chunk=4,
                   recompute=False, dtype=torch.float32)

    def f(*tensors):
        return op("lstm")(*tensors, *args[len(tensors):])[:3]

    tensors = tuple(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    assert torch.autograd.gradcheck(f, tensors, eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=False)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 3)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("door", ["op", "eager"])
def test_gradcheck_float64(backend, cell, proj, reverse, recompute, door):
    args = op_args(cell, backend, steps=4, inp=3, hidden=3, proj=min(proj, 2), reverse=reverse, recompute=recompute)
    n_out = 3 if cell == "lstm" else 2  # differentiable outputs: output, h_n (, c_n)

    def f(*tensors):
        return through(door, cell)(*tensors, *args[len(tensors):])[:n_out]

    tensors = tuple(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 2)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("door", ["op", "eager"])
def test_gradgradcheck_float64(backend, cell, proj, reverse, door):
    """Second derivatives (create_graph=True): the backward is itself differentiable."""
    args = op_args(cell, backend, steps=3, batch=3, inp=2, hidden=2, proj=proj, reverse=reverse)
    n_out = 3 if cell == "lstm" else 2

    def f(*tensors):
        return through(door, cell)(*tensors, *args[len(tensors):])[:n_out]

    tensors = tuple(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    assert torch.autograd.gradgradcheck(f, tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("recompute", [True, False])
def test_eager_door_matches_the_op(backend, cell, recompute):
    """In plain eager mode a layer call skips the dispatcher (library.run_layer): outputs and every gradient
    are the registered op's bit for bit, and autograd records its own node."""
    args = op_args(cell, backend, recompute=recompute, proj=3 if cell == "lstm" else 0, dtype=torch.float32)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    n_out = 3 if cell == "lstm" else 2
    results = {}
    for door in ("op", "eager"):
        outs = through(door, cell)(*args)[:n_out]
        results[door] = outs + torch.autograd.grad(sum((o * o).sum() for o in outs), tensors)
        results[door + " node"] = outs[0].grad_fn.name()
    assert results["eager node"] == f"fastbptt_{cell}Backward"
    assert results["op node"].startswith(f"GeneratedBackwardFor_fastbptt_{cell}")
    for got, want in zip(results["eager"], results["op"]):
        assert torch.equal(got, want)
    with torch.no_grad():   # nothing needs a gradient: the implementation alone, no autograd node
        assert library.run_layer(cell, *args, needs_grad=False)[0].grad_fn is None


def test_modes_and_subclasses_see_the_op():
    """A dispatch mode (FakeTensorMode, FlopCounterMode, profilers of operators) sees one fastbptt op per
    layer call, not the ops it is made of, and so does a tensor subclass; plain eager calls take the eager door."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    x, h0 = torch.randn(4, 2, 3, requires_grad=True), torch.randn(2, 5)
    weights = torch.randn(15, 3), torch.randn(15, 5)
    with Record():
        out, _ = recurrent_layer("gru", x, h0, *weights)
    assert "fastbptt::gru" in seen
    assert out.grad_fn.name().startswith("GeneratedBackwardFor_fastbptt_gru")
    assert recurrent_layer("gru", x, h0, *weights)[0].grad_fn.name() == "fastbptt_gruBackward"

    class Tagged(torch.Tensor):
        pass

    tagged = x.detach().as_subclass(Tagged).requires_grad_()
    node = recurrent_layer("gru", tagged, h0, *weights)[0].grad_fn   # the subclass's alias of the op's output
    assert node.next_functions[0][0].name().startswith("GeneratedBackwardFor_fastbptt_gru")


@pytest.mark.parametrize("cell", CELLS)
def test_second_order_matches_torch_nn(cell):
    """Gradient penalty, torch.func.grad of a grad and hessian as torch.nn gives them; vmap too."""
    from torch.func import functional_call, grad, vmap
    kwargs = dict(num_layers=2, bidirectional=True, **cell_kwargs(cell))
    if cell == "lstm":
        kwargs["proj_size"] = 2
    torch.manual_seed(0)
    ref = TORCH_MODULE_OF_CELL[cell](3, 4, **kwargs).double()
    fast = MODULE_OF_CELL[cell](3, 4, chunk_size=2, **kwargs).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)

    def penalty_grads(model):  # the gradient of a penalty on d(loss)/dx
        out, _ = model(x)
        (dx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return (dx,) + torch.autograd.grad(dx.pow(2).sum(), [x, *model.parameters()])

    for got, want in zip(penalty_grads(fast), penalty_grads(ref)):
        torch.testing.assert_close(got, want)

    def grad_of_grad(model):
        params = dict(model.named_parameters())
        loss = lambda inp: functional_call(model, params, (inp,))[0].pow(2).sum()
        return grad(lambda inp: grad(loss)(inp).pow(2).sum())(x.detach())

    torch.testing.assert_close(grad_of_grad(fast), grad_of_grad(ref))
    small = x.detach()[:3, :1]
    hessian = lambda model: torch.autograd.functional.hessian(lambda inp: model(inp)[0].sum(), small)
    torch.testing.assert_close(hessian(fast), hessian(ref))
    # vmap over unbatched calls (torch.nn's RNNs have no batching rule: compare with a loop)
    batched = vmap(lambda inp: fast(inp)[0], in_dims=1)(x.detach())
    torch.testing.assert_close(batched, torch.stack([ref(row)[0] for row in x.detach().unbind(1)]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_compile_fullgraph_matches_eager(backend, cell):
    model = {"gru": fastbptt.GRU, "lstm": fastbptt.LSTM}[cell](4, 6, num_layers=2, bidirectional=True,
                                                              batch_first=True, backend=backend)
    assert_compile_matches_eager(model, torch.randn(3, 7, 4, requires_grad=True))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="backend 'cpu' unavailable")
def test_torch_compile_trains_on_a_forced_onednn_path():
    """Named, the onednn path trains under torch.compile too: one call per layer over more steps than a
    chunk, its workspace of symbolic size passed from the forward to the backward."""
    model = fastbptt.LSTM(4, 6, num_layers=2, bidirectional=True, backend="cpu:onednn")
    assert_compile_matches_eager(model, torch.randn(40, 3, 4, requires_grad=True))


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_torch_compile_with_dynamo_defaults_matches_eager(cell):
    """Without allow_rnn dynamo graph-breaks at any torch.nn RNN, fastbptt's included: the module
    then runs eagerly inside the compiled model, with the same results."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), MODULE_OF_CELL[cell](4, 6, **cell_kwargs(cell)))
    assert_compile_matches_eager(model, torch.randn(7, 3, 4, requires_grad=True), fullgraph=False)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,torch_ratio", [("gru", 7.0), ("lstm", 16.0)])
def test_saved_activations_near_output_size(backend, cell, torch_ratio):
    """With recompute=True fastbptt keeps at most 1.25x the output's bytes for backward; torch.nn about 7x / 16x."""
    steps, batch, inp, hidden = 256, 8, 16, 32
    fast_cls, torch_cls = {"gru": (fastbptt.GRU, torch.nn.GRU), "lstm": (fastbptt.LSTM, torch.nn.LSTM)}[cell]
    fast, ref = fast_cls(inp, hidden, backend=backend, recompute=True), torch_cls(inp, hidden)
    x = torch.randn(steps, batch, inp, requires_grad=True)
    out_bytes = steps * batch * hidden * 4
    kept = saved_activation_bytes(lambda: fast(x), exclude=[x, *fast.parameters()])
    kept_torch = saved_activation_bytes(lambda: ref(x), exclude=[x, *ref.parameters()])
    assert kept <= 1.25 * out_bytes, kept / out_bytes
    assert kept_torch >= 0.9 * torch_ratio * out_bytes  # the baseline the bound is measured against


@pytest.mark.parametrize("backend", cpu_backends())
def test_nothing_saved_without_grad(backend):
    model = fastbptt.LSTM(4, 8, backend=backend)
    x = torch.randn(20, 2, 4)
    with torch.no_grad():
        assert saved_activation_bytes(lambda: model(x)) == 0
    with torch.inference_mode():
        out, _ = model(x)
    assert not out.requires_grad


@settings(max_examples=25, deadline=None)
@given(cell=st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"]), steps=st.integers(1, 9),
       batch=st.integers(1, 4), input_size=st.integers(1, 6), hidden=st.integers(1, 7),
       layers=st.integers(1, 2), bidirectional=st.booleans(), packed=st.booleans(), chunk=st.integers(1, 10),
       proj=st.integers(0, 3), backend=st.sampled_from(cpu_backends()))
def test_random_shapes(cell, steps, batch, input_size, hidden, layers, bidirectional, packed, chunk, proj, backend):
    proj = proj if cell == "lstm" and proj < hidden else 0
    case = Case(cell=cell, steps=steps, batch=batch, input_size=input_size, hidden_size=hidden, num_layers=layers,
                bidirectional=bidirectional, packed=packed, chunk_size=chunk, proj_size=proj)
    assert_parity(case, backend, torch.float64)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 600), chunk=st.integers(1, 80))
def test_chunks_are_the_fewest_of_near_equal_length(steps, chunk):
    """A layer call runs ceil(T / chunk_size) chunks (the memory bound of full chunks), each at most
    chunk_size steps and of equal length to within one step, the first a longest one (buffers reused by
    every chunk are sized by it)."""
    bounds = chunk_bounds(steps, chunk)
    lengths = [s1 - s0 for s0, s1 in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert len(bounds) == -(-steps // chunk)
    assert max(lengths) <= chunk and max(lengths) - min(lengths) <= 1 and lengths[0] == max(lengths)


def test_no_short_last_chunk():
    assert chunk_bounds(35, 32) == [(0, 18), (18, 35)]
    assert chunk_bounds(128, 32) == [(0, 32), (32, 64), (64, 96), (96, 128)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,used", [("gru", "output"), ("gru", "h_n"), ("lstm", "output"), ("lstm", "h_n"),
                                       ("lstm", "c_n")])
@pytest.mark.parametrize("recompute", [True, False])
def test_gradients_when_only_one_output_is_used(backend, cell, used, recompute):
    """Autograd gives no gradient for an unused output; the backward then takes zeros for it."""
    torch.manual_seed(0)
    fast_cls, torch_cls = {"gru": (fastbptt.GRU, torch.nn.GRU), "lstm": (fastbptt.LSTM, torch.nn.LSTM)}[cell]
    fast = fast_cls(3, 5, backend=backend, recompute=recompute, chunk_size=2).double()
    ref = torch_cls(3, 5).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)

    def loss(out):
        output, state = out
        h_n, c_n = state if cell == "lstm" else (state, None)
        return {"output": output, "h_n": h_n, "c_n": c_n}[used].square().sum()

    got = torch.autograd.grad(loss(fast(x)), [x, *fast.parameters()])
    want = torch.autograd.grad(loss(ref(x)), [x, *ref.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
