"""fastbptt.RNNCell / GRUCell / LSTMCell against torch.nn's cells, and their ops
(``fastbptt::*_cell``): parity of the output and of every gradient per backend and dtype, float64
gradcheck and gradgradcheck, opcheck, torch.compile, the dispatch seam (a case the kernels decline
runs on the next backend), and the drop-in contract (state_dict, isinstance, torch.load, convert,
autocast, errors). PyTorch's own module samples for the cells run in test_module_db.py."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastbptt
from conftest import cpu_backends, triton_interpreted
from fastbptt import dispatch
from fastbptt.nn import CELL_MODULE_OF_CELL, TORCH_CELL_MODULE_OF_CELL, cell_kwargs
from fastbptt.ops.cell import cell_step
from helpers import LOWP_ATOL, LOWP_FACTOR, TOLERANCES

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
INPUT, HIDDEN = 5, 6
native = pytest.mark.skipif(bool(dispatch.availability("cpu")), reason="fastbptt._C is not built")


def backends() -> list[str]:
    names = cpu_backends()
    if triton_interpreted():
        names.append("triton")
    return names


def make_pair(cell: str, backend: str = "auto", dtype=torch.float64, bias: bool = True, seed: int = 0):
    """torch.nn's cell and fastbptt's with the same weights."""
    torch.manual_seed(seed)
    ref = TORCH_CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, bias=bias, **cell_kwargs(cell)).to(dtype)
    fast = CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, bias=bias, backend=backend, **cell_kwargs(cell)).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def make_inputs(cell: str, batch, dtype=torch.float64, with_hx: bool = True, seed: int = 1):
    """input [B, I] (or [I] for batch=None) and hx (a tuple for LSTM), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    leaf = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    x = leaf(*lead, INPUT)
    if not with_hx:
        return x, None
    hx = (leaf(*lead, HIDDEN), leaf(*lead, HIDDEN)) if cell == "lstm" else leaf(*lead, HIDDEN)
    return x, hx


def clone_inputs(x, hx):
    c = lambda t: t.detach().clone().requires_grad_()
    return c(x), (None if hx is None else tuple(map(c, hx)) if isinstance(hx, tuple) else c(hx))


def run(module, x, hx, seed: int = 2) -> dict:
    """Output(s) and the gradients of x, hx and every parameter for a random output gradient."""
    out = module(x, hx)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result["grad_input"] = x.grad
    states = hx if isinstance(hx, tuple) else (hx,)
    for i, s in enumerate(states):
        if s is not None:
            result[f"grad_hx{i}"] = s.grad
    for name, p in module.named_parameters():
        result[f"grad_{name}"] = p.grad
    return result


def assert_close_results(actual: dict, expected: dict, atol: float, rtol: float, label: str) -> None:
    assert actual.keys() == expected.keys(), label
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=rtol,
                                   msg=lambda m, key=key: f"{label} {key}: {m}")


# ----------------------------------------------------------------------------- parity with torch.nn

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, 3, None], ids=["B1", "B3", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parity_with_torch_nn(backend, cell, batch, bias, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, float16 and bfloat16")
    ref, fast = make_pair(cell, backend, dtype, bias)
    x, hx = make_inputs(cell, batch, dtype)
    expected = run(ref, x, hx)
    actual = run(fast, *clone_inputs(x, hx))
    assert_close_results(actual, expected, *TOLERANCES[dtype], label=f"{backend} {cell} {dtype}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("cell", CELLS)
def test_hx_defaults_to_zeros(backend, cell):
    dtype = torch.float32
    ref, fast = make_pair(cell, backend, dtype)
    x, _ = make_inputs(cell, 3, dtype, with_hx=False)
    assert_close_results(run(fast, *clone_inputs(x, None)), run(ref, x, None), *TOLERANCES[dtype],
                         label=f"{backend} {cell}")


@pytest.mark.parametrize("backend", cpu_backends() + [f"{b}:small-batch" for b in cpu_backends() if b == "cpu"])
@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_error_within_torch_nns_own(backend, cell):
    """bfloat16: the error against a float64 oracle is within LOWP_FACTOR x torch.nn's own."""
    dtype = torch.bfloat16
    ref64, _ = make_pair(cell, "reference", torch.float64)
    ref, fast = make_pair(cell, backend, dtype)
    x, hx = make_inputs(cell, 4)
    oracle = run(ref64, x, hx)
    low = lambda t: t.detach().to(dtype).requires_grad_()
    lowp = lambda: (low(x), tuple(map(low, hx)) if isinstance(hx, tuple) else low(hx))
    torch_res, fast_res = run(ref, *lowp()), run(fast, *lowp())
    for key, value in fast_res.items():
        assert value.dtype == torch_res[key].dtype == dtype, key
        err = (value.double() - oracle[key]).abs().max().item()
        bound = LOWP_FACTOR * (torch_res[key].double() - oracle[key]).abs().max().item() + LOWP_ATOL[dtype]
        assert err <= bound, f"{backend} {cell} {key}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("cell", CELLS)
def test_a_loop_of_steps_matches_torch_nn(cell):
    """Twelve steps carried through one graph, the shape of a per-step training loop."""
    ref, fast = make_pair(cell)
    xs = torch.randn(12, 3, INPUT, dtype=torch.float64)

    def loop(module):
        state = None
        outs = []
        for x_t in xs:
            state = module(x_t, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        loss = torch.stack(outs).pow(2).sum()
        return loss, torch.autograd.grad(loss, list(module.parameters()))

    (loss_r, grads_r), (loss_f, grads_f) = loop(ref), loop(fast)
    torch.testing.assert_close(loss_f, loss_r)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- gradients, ops, compile

def step_function(cell: str, backend: str, bias: bool = True):
    """(f, inputs): f(*inputs) is one cell step through cell_step, inputs all float64 leaves."""
    gen = torch.Generator().manual_seed(3)
    gates = fastbptt.cells.spec(cell).num_gates
    leaf = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    x, hx, cx = leaf(2, 3), leaf(2, 4), leaf(2, 4)
    w_ih, w_hh = leaf(gates * 4, 3), leaf(gates * 4, 4)
    biases = (leaf(gates * 4), leaf(gates * 4)) if bias else (None, None)
    if cell == "lstm":
        return (lambda x, hx, cx, *w: cell_step(cell, x, hx, *w, *biases[len(w) - 2:], cx=cx, backend=backend)
                ), (x, hx, cx, w_ih, w_hh, *(b for b in biases if b is not None))
    return (lambda x, hx, *w: cell_step(cell, x, hx, *w, *biases[len(w) - 2:], backend=backend)
            ), (x, hx, w_ih, w_hh, *(b for b in biases if b is not None))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_and_gradgradcheck_float64(backend, cell, bias):
    f, inputs = step_function(cell, backend, bias)
    if cell == "rnn_relu":  # keep pre-activations away from relu's kink, where finite differences straddle it
        with torch.no_grad():
            inputs[0].mul_(0.1)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def native_op_args(cell: str, path: str = "blas", dtype=torch.float64, batch: int = 3):
    """(op, args) of the forward op of ``cell`` on a small random case."""
    gen = torch.Generator().manual_seed(4)
    gates = fastbptt.cells.spec(cell).num_gates
    leaf = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    x, hx, cx = leaf(batch, 3), leaf(batch, 4), leaf(batch, 4)
    w_ih, w_hh, b_ih, b_hh = leaf(gates * 4, 3), leaf(gates * 4, 4), leaf(gates * 4), leaf(gates * 4)
    if cell == "lstm":
        return torch.ops.fastbptt.lstm_cell, (x, hx, cx, w_ih, w_hh, b_ih, b_hh, path)
    if cell == "gru":
        return torch.ops.fastbptt.gru_cell, (x, hx, w_ih, w_hh, b_ih, b_hh, path)
    return torch.ops.fastbptt.rnn_cell, (x, hx, w_ih, w_hh, b_ih, b_hh, cell == "rnn_relu", path)


@native
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path,dtype", [("blas", torch.float64), ("blas", torch.float32),
                                        ("small-batch", torch.float32)])
def test_opcheck(cell, path, dtype):
    op, args = native_op_args(cell, path, dtype)
    torch.library.opcheck(op, args)


@native
@pytest.mark.parametrize("cell", CELLS)
def test_backward_op_computes_only_the_gradients_asked_for(cell):
    """Each gradient alone, the rest empty; then the gate gradients, from which the weight
    gradients are products (what a chain of steps sums over many steps at once)."""
    op, args = native_op_args(cell)
    lstm = cell == "lstm"
    n_diff = 7 if lstm else 6
    diff, path = args[:n_diff], args[-1]
    outputs = op(*args)
    states = outputs[:2] if lstm else (outputs if cell.startswith("rnn") else outputs[0],)
    expected = torch.autograd.grad([s.sum() for s in states], diff)
    grad_states = tuple(torch.ones_like(s) for s in states)
    backward = getattr(torch.ops.fastbptt, f"{op.__name__}_backward")
    with torch.no_grad():
        for wanted in range(n_diff):
            mask = [i == wanted for i in range(n_diff)]
            if lstm:
                grads = backward(*grad_states, *diff[:5], outputs[2], mask, path)
            elif cell == "gru":
                grads = backward(*grad_states, *diff[:4], outputs[1], outputs[2], mask, path)
            else:
                grads = backward(*grad_states, *diff[:4], outputs, args[-2], mask, path)
            for i, g in enumerate(grads[:n_diff]):
                if i == wanted:
                    torch.testing.assert_close(g, expected[i])
                else:
                    assert g.numel() == 0, (i, g.shape)
            d_in, d_hid = grads[n_diff], grads[-1]   # the GRU's gi and gh; one gradient for the others
            assert len(grads) == n_diff + (2 if cell == "gru" else 1)
            x, hx, w = diff[0], diff[1], n_diff - 4
            torch.testing.assert_close(d_in.t() @ x, expected[w])
            torch.testing.assert_close(d_hid.t() @ hx, expected[w + 1])
            torch.testing.assert_close(d_in.sum(0), expected[w + 2])
            torch.testing.assert_close(d_hid.sum(0), expected[w + 3])


class CellLoop(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.cell = CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, **cell_kwargs(cell)).double()

    def forward(self, xs):
        state = None
        for x_t in xs.unbind(0):
            state = self.cell(x_t, state)
        return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_compile_fullgraph_matches_eager(cell):
    torch._dynamo.reset()
    model = CellLoop(cell)
    xs = torch.randn(4, 3, INPUT, dtype=torch.float64, requires_grad=True)
    out_e = model(xs)
    grads_e = torch.autograd.grad(out_e.sum(), [xs, *model.parameters()])
    out_c = torch.compile(model, fullgraph=True)(xs)
    grads_c = torch.autograd.grad(out_c.sum(), [xs, *model.parameters()])
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_func_grad_runs_the_reference_maths(cell):
    ref, fast = make_pair(cell)
    x, hx = make_inputs(cell, 3)
    params = dict(fast.named_parameters())

    def loss(p, module):
        out = torch.func.functional_call(module, p, (x.detach(), hx))
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    g_fast = torch.func.grad(loss)(params, fast)
    g_ref = torch.func.grad(loss)(dict(ref.named_parameters()), ref)
    for name in params:
        torch.testing.assert_close(g_fast[name], g_ref[name])


# ----------------------------------------------------------------------------- dispatch seam

@native
@pytest.mark.parametrize("batch,path", [(1, "small-batch"), (2, "small-batch"), (32, "blas")])
def test_the_rule_takes_no_per_call_packing_for_a_single_step(batch, path):
    if batch == 2 and dispatch.vector_isa("cpu") != "avx2":
        path = "blas"  # one row takes the fused cell step everywhere, two only on AVX2 (fastbptt/dispatch.py)
    for cell in ("gru", "lstm"):
        assert dispatch.cell_kernel("auto", cell, "cpu", torch.float32, batch, 64) == f"cpu:{path}"
        assert dispatch.choose_path("cpu", cell, torch.float32, 32, 64) == "packed"  # layers still pack
    assert dispatch.cell_kernel("cpu:packed", "gru", "cpu", torch.float32, 32, 64) == "cpu:packed"
    assert dispatch.cell_kernel("auto", "gru", "cpu", torch.float64, 1, 64) == "cpu:blas"


@native
@pytest.mark.parametrize("cell", CELLS)
def test_forced_kernel_paths_match_torch_nn(cell):
    for backend in ("cpu:small-batch", "cpu:blas", "cpu:packed"):
        ref, fast = make_pair(cell, backend, torch.float32)
        x, hx = make_inputs(cell, 2, torch.float32)
        assert_close_results(run(fast, *clone_inputs(x, hx)), run(ref, x, hx), *TOLERANCES[torch.float32],
                             label=backend)


# ----------------------------------------------------------------------------- the fused CPU cell step
#
# The small-batch path runs float32 steps whose tensors are contiguous on the fused cell-step kernels
# (csrc/cpu/cell_step.cpp), everything else on the chunk kernels. Shapes that reach every block of
# them: batch rows in pairs and alone (1, 2, 5), units in blocks of 8 and a tail (H = 70), column
# blocks of 64 with a tail of 8 and a remainder (I = 77, H = 70).

def fused_case(cell: str, batch: int, input_size: int, hidden: int, bias: bool, dtype=torch.float32):
    ref = TORCH_CELL_MODULE_OF_CELL[cell](input_size, hidden, bias=bias, **cell_kwargs(cell)).to(dtype)
    fast = CELL_MODULE_OF_CELL[cell](input_size, hidden, bias=bias, backend="cpu:small-batch",
                                     **cell_kwargs(cell)).to(dtype)
    fast.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(5)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    hx = (leaf(batch, hidden), leaf(batch, hidden)) if cell == "lstm" else leaf(batch, hidden)
    return ref, fast, leaf(batch, input_size), hx


@native
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("input_size,hidden", [(77, 70), (3, 4)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_cell_step_matches_torch_nn(cell, batch, input_size, hidden, bias):
    ref, fast, x, hx = fused_case(cell, batch, input_size, hidden, bias)
    assert_close_results(run(fast, *clone_inputs(x, hx)), run(ref, x, hx), *TOLERANCES[torch.float32],
                         label=f"{cell} B={batch}")


@native
@pytest.mark.parametrize("cell", CELLS)
def test_fused_cell_step_gives_the_same_bits_on_any_thread_count(cell):
    """Each value is one sum in a fixed order; threads only split the units and columns."""
    _, fast, x, hx = fused_case(cell, 3, 77, 70, True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(fast, *clone_inputs(x, hx)))
            fast.zero_grad()
    finally:
        torch.set_num_threads(threads)
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


@native
@pytest.mark.parametrize("cell", CELLS)
def test_the_small_batch_path_runs_what_the_fused_step_declines_on_the_chunk_kernels(cell):
    """Non-contiguous weights take the chunk kernels (the seam), as bfloat16 does (tested below): they
    agree with torch.nn."""
    ref, fast, x, hx = fused_case(cell, 2, 77, 70, True)
    lstm = cell == "lstm"
    states = hx if lstm else (hx,)
    weights = [p.detach().t().contiguous().t() if p.dim() == 2 else p.detach() for p in fast.parameters()]
    assert not weights[0].is_contiguous()
    fused = cell_step(cell, x, states[0], *weights, cx=states[1] if lstm else None, backend="cpu:small-batch")
    expected = ref(x, hx)
    torch.testing.assert_close(fused, expected, **dict(zip(("atol", "rtol"), TOLERANCES[torch.float32])))


@pytest.mark.parametrize("cell", CELLS)
def test_a_dtype_the_kernels_decline_runs_on_the_next_backend(cell):
    """float16 on CPU: the C++ kernels are not compiled for it, so 'auto' runs the reference, which
    agrees with torch.nn in float16; forcing 'cpu' says why it cannot."""
    ref, fast = make_pair(cell, "auto", torch.float16)
    x, hx = make_inputs(cell, 3, torch.float16)
    assert dispatch.cell_kernel("auto", cell, "cpu", torch.float16, 3, HIDDEN) == "reference"
    expected, actual = run(ref, x, hx), run(fast, *clone_inputs(x, hx))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=2e-2, rtol=2e-2, msg=key)
    if not dispatch.availability("cpu"):
        _, forced = make_pair(cell, "cpu", torch.float16)
        with pytest.raises(dispatch.BackendUnavailable, match="float16"):
            forced(*clone_inputs(x, hx))


# ----------------------------------------------------------------------------- the drop-in contract

@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_moves_both_ways_and_isinstance_holds(cell):
    ref, fast = make_pair(cell)
    assert isinstance(fast, TORCH_CELL_MODULE_OF_CELL[cell])
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    back = TORCH_CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, **cell_kwargs(cell)).double()
    back.load_state_dict(fast.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_a_whole_model_round_trips_through_torch_load(cell):
    _, fast = make_pair(cell, "reference")
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True, torch's default
    assert type(loaded) is type(fast) and loaded.backend == "reference"
    x, hx = make_inputs(cell, 2)
    torch.testing.assert_close(loaded(x, hx), fast(x, hx))


class _Scaled(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


@pytest.mark.parametrize("cell", CELLS)
def test_parametrized_and_substituted_weights_are_the_ones_a_step_uses(cell):
    """The cells read their weights from the module's parameter table; a parametrized weight
    (torch.nn.utils.parametrize) and torch.func.functional_call's substitutes must still be the ones
    a step uses, with torch.nn's outputs and gradients."""
    ref, fast = make_pair(cell)
    for module in (ref, fast):
        torch.nn.utils.parametrize.register_parametrization(module, "weight_hh", _Scaled())
    x, hx = make_inputs(cell, 3)
    assert_close_results(run(fast, x, hx), run(ref, *clone_inputs(x, hx)), 1e-12, 1e-10, "parametrized")

    ref, fast = make_pair(cell)
    substitutes = {name: 2 * p.detach() for name, p in ref.named_parameters()}
    x, hx = make_inputs(cell, 3)
    want = torch.func.functional_call(ref, substitutes, (x, hx))
    got = torch.func.functional_call(fast, substitutes, (x, hx))
    torch.testing.assert_close(got, want)
    assert not torch.allclose((got[0] if isinstance(got, tuple) else got),
                              (fast(x, hx)[0] if cell == "lstm" else fast(x, hx)))


def test_convert_swaps_the_cells_and_keeps_their_parameters():
    model = nn.ModuleDict({"rnn": nn.RNNCell(3, 4, nonlinearity="relu"), "gru": nn.GRUCell(3, 4),
                           "lstm": nn.LSTMCell(3, 4), "layer": nn.GRU(3, 4)})
    params = {n: p for n, p in model.named_parameters()}
    fastbptt.convert(model, backend="reference", chunk_size=8)
    assert type(model["rnn"]) is fastbptt.RNNCell and model["rnn"].nonlinearity == "relu"
    assert type(model["gru"]) is fastbptt.GRUCell and type(model["lstm"]) is fastbptt.LSTMCell
    assert model["gru"].backend == "reference" and model["layer"].chunk_size == 8
    assert all(p is params[n] for n, p in model.named_parameters())
    assert repr(model["gru"]) == "fastbptt.GRUCell(3, 4, backend='reference')"


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_gives_torch_nns_dtypes_and_values(cell):
    ref, fast = make_pair(cell, dtype=torch.float32)
    x, hx = make_inputs(cell, 3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = ref(x, hx), fast(x, hx)
    for a, b in zip(actual if isinstance(actual, tuple) else (actual,),
                    expected if isinstance(expected, tuple) else (expected,)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbptt.GRUCell(3, 4, backend="gpu")
    cell = fastbptt.GRUCell(3, 4)
    with pytest.raises(RuntimeError, match="Expected hx to have dtype torch.float32 like the input, got torch.float64"):
        cell(torch.randn(2, 3), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="parameters to have dtype torch.float64"):
        cell(torch.randn(2, 3, dtype=torch.float64))
    rnn = fastbptt.RNNCell(3, 4)
    rnn.nonlinearity = "sigmoid"
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: sigmoid"):
        rnn(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="lstm_cell expects two hidden states"):
        fastbptt.LSTMCell(3, 4)(torch.randn(2, 3), (torch.randn(2, 4),))
    with pytest.raises(RuntimeError, match=r"Expected weight_hh size \(12, 4\), got \(12, 5\)"):
        cell_step("gru", torch.randn(2, 3), torch.randn(2, 4), torch.randn(12, 3), torch.randn(12, 5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpu_parity_with_torch_nn(backend, cell, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, float16 and bfloat16")
    ref, fast = make_pair(cell, backend, dtype)
    ref, fast = ref.cuda(), fast.cuda()
    x, hx = make_inputs(cell, 3, dtype)
    x, hx = clone_inputs(x.cuda(), tuple(h.cuda() for h in hx) if isinstance(hx, tuple) else hx.cuda())
    expected = run(ref, x, hx)
    actual = run(fast, *clone_inputs(x, hx))
    assert_close_results(actual, expected, 1e-4 if dtype == torch.float32 else 1e-10,
                         1e-3 if dtype == torch.float32 else 1e-8, label=f"{backend} {cell} {dtype}")
