"""The fused C++ CPU kernels (backend "cpu"): parity with torch.nn and with the reference
backend, gradients, the registered chunk ops (opcheck), thread-count invariance, the memory
policies, and the kernels' own input checks."""
import os
import subprocess
import sys

import pytest
import torch

import fastbptt
from fastbptt import dispatch, reference
from fastbptt.bench.memory import saved_activation_bytes
from helpers import (CHUNK_OP_INPUT_ERRORS, TOLERANCES, Case, assert_lowp_parity, assert_parity, chunk_op_args,
                     make_inputs, make_pair, replace_arg, run)

_REASON = dispatch.availability("cpu")
pytestmark = pytest.mark.skipif(bool(_REASON), reason=f"backend 'cpu' unavailable: {_REASON}")

if not _REASON:
    from fastbptt import native

CELLS_PROJ = [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 3)]


# ----------------------------------------------------------------------------- parity with torch.nn

@pytest.mark.parametrize("cell,proj", CELLS_PROJ)
@pytest.mark.parametrize("layout", [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, with_hx=False),
    dict(packed=True, bidirectional=True),
    dict(packed=True, num_layers=2, batch_first=True),
    dict(unbatched=True),
    dict(bias=False, bidirectional=True),
])
@pytest.mark.parametrize("recompute", [True, False])
def test_parity_float64(cell, proj, layout, recompute):
    case = Case(cell=cell, proj_size=proj, recompute=recompute, steps=8, chunk_size=3, **layout)
    assert_parity(case, "cpu", torch.float64)


@pytest.mark.parametrize("cell,proj", CELLS_PROJ)
@pytest.mark.parametrize("chunk_size", [1, 3, 9, 20])  # one step, a non-divisor, T, more than T
@pytest.mark.parametrize("packed", [False, True])
def test_parity_chunk_sizes_float64(cell, proj, chunk_size, packed):
    case = Case(cell=cell, proj_size=proj, steps=9, chunk_size=chunk_size, packed=packed, bidirectional=True)
    assert_parity(case, "cpu", torch.float64)


@pytest.mark.parametrize("cell,proj", CELLS_PROJ)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_parity_float32(cell, proj, recompute, packed):
    # H = 37: vector bodies and scalar tails of the row loops both run
    case = Case(cell=cell, proj_size=proj, input_size=11, hidden_size=37, steps=12, batch=5, chunk_size=5,
                recompute=recompute, packed=packed, bidirectional=True)
    assert_parity(case, "cpu", torch.float32)


@pytest.mark.parametrize("cell,proj", CELLS_PROJ)
@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_error_within_torch_nn_error(cell, proj, packed):
    # relu is left one-directional: its bidirectional bfloat16 gradients exceed the bound on the
    # reference backend as well (the same numbers, so the chunked op, not this kernel)
    case = Case(cell=cell, proj_size=proj, input_size=8, hidden_size=16, steps=10, batch=4, chunk_size=4,
                packed=packed, bidirectional=cell != "rnn_relu")
    assert_lowp_parity(case, "cpu", torch.bfloat16)


# ----------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 24)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_at_larger_sizes(cell, proj, dtype):
    case = Case(cell=cell, proj_size=proj, input_size=40, hidden_size=67, steps=50, batch=9, chunk_size=16,
                packed=True, bidirectional=True, num_layers=2)
    _, fast_ref = make_pair(case, "reference", dtype)
    _, fast_cpu = make_pair(case, "cpu", dtype)
    x, hx, lengths = make_inputs(case, dtype)
    expected, actual = run(fast_ref, case, x, hx, lengths), run(fast_cpu, case, x, hx, lengths)
    atol, rtol = TOLERANCES[dtype]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("cell,proj", CELLS_PROJ)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_with_lengths(cell, proj, reverse):
    g = torch.Generator().manual_seed(3)
    gates, steps, batch, inp, hidden = {"gru": 3, "lstm": 4}.get(cell, 1), 5, 3, 3, 4
    out = proj or hidden
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    x, h0, w_ih, w_hh = rnd(steps, batch, inp), rnd(batch, out), rnd(gates * hidden, inp), rnd(gates * hidden, out)
    b_ih, b_hh = rnd(gates * hidden), rnd(gates * hidden)
    extra = (rnd(batch, hidden),) + ((rnd(proj, hidden),) if proj else ()) if cell == "lstm" else ()
    lengths = torch.tensor([steps, 2, 4])

    def f(x, h0, w_ih, w_hh, b_ih, b_hh, *rest):
        kw = dict(lengths=lengths, reverse=reverse, chunk_size=2, backend="cpu")
        if cell == "lstm":
            kw.update(cx=rest[0], weight_hr=rest[1] if proj else None)
        return fastbptt.recurrent_layer(cell, x, h0, w_ih, w_hh, b_ih, b_hh, **kw)

    assert torch.autograd.gradcheck(f, (x, h0, w_ih, w_hh, b_ih, b_hh) + extra, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the chunk ops

CHUNK_OPS = [("rnn_forward_chunk", False), ("rnn_backward_chunk", False), ("gru_forward_chunk", False),
             ("gru_backward_chunk", False), ("lstm_forward_chunk", False), ("lstm_forward_chunk", True),
             ("lstm_backward_chunk", False), ("lstm_backward_chunk", True)]


def assert_op_matches_reference_kernel(name, args, tolerance):
    """The native kernel of op ``name`` on ``args`` (the path last) against the reference kernel on
    copies of them (no path): results and the in-place outputs."""
    kernel = name.replace("_chunk", "")
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args[:-1])
    actual = getattr(native, kernel)(*args)
    expected = getattr(reference, kernel)(*ref_args)
    flat = lambda r: [t for t in (r if isinstance(r, tuple) else (r,)) if t is not None]
    in_place = [i for i, a in enumerate(ref_args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    got, want = flat(actual) + [args[i] for i in in_place], flat(expected) + [ref_args[i] for i in in_place]
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=tolerance[0], rtol=tolerance[1],
                                   msg=lambda m: f"{name} on the {args[-1]} path: {m}")


@pytest.mark.parametrize("name,proj", CHUNK_OPS)
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_small_batch_products_match_reference_kernels(name, proj, batch, masked):
    """The small-batch path (per-step products as matrix-vector kernels, float32), chosen for one or
    two rows, is right at any batch size."""
    _, args = chunk_op_args(name, torch.float32, proj=proj, masked=masked, batch=batch, hidden=37,
                            path="small-batch")
    assert_op_matches_reference_kernel(name, args, TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["rnn_forward_chunk", "gru_forward_chunk", "lstm_forward_chunk"])
@pytest.mark.parametrize("batch", [1, 4, 5, 15, 33])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden", [37, 40])
def test_packed_step_forward_matches_reference_kernels(name, batch, masked, saved, threads, hidden):
    """float32 RNN / GRU / LSTM forward with W_hh packed per thread (csrc/cpu/packed_step.cpp): H = 37 is not a
    multiple of the 16-column panels, a thread's panel count is odd or even, and B is not a multiple of
    the micro-kernel's rows (AVX2: 6, AVX-512: 8); K = H is packed in 8 x 8 transposes and a remainder
    (37) or transposes only (40); with and without padding and gh_out / gates_out; the blas path on the
    same case for comparison. test_packed_step_avx2_kernels runs this under AVX2."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for path in ("packed", "blas"):
            _, args = chunk_op_args(name, torch.float32, masked=masked, batch=batch, hidden=hidden, path=path)
            if not saved:
                args = args[:-2] + (None, path)
            assert_op_matches_reference_kernel(name, args, TOLERANCES[torch.float32])
            if masked:  # padded rows write zeros
                valid, out = args[-4], args[-3]
                assert (out[~valid] == 0).all()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["rnn_backward_chunk", "gru_backward_chunk", "lstm_backward_chunk"])
@pytest.mark.parametrize("batch", [4, 15, 33])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_step_backward_matches_reference_kernels(name, batch, masked, threads):
    """The packed backward (W_hh packed by columns, one parallel region per step): H = 37 splits into
    slices that are not multiples of the 16-column panels; padded rows pass dh (and dc) through and get
    zero gate gradients; the blas path on the same case for comparison."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for path in ("packed", "blas"):
            _, args = chunk_op_args(name, torch.float32, masked=masked, batch=batch, hidden=37, path=path)
            assert_op_matches_reference_kernel(name, args, TOLERANCES[torch.float32])
    finally:
        torch.set_num_threads(before)


def test_packed_isa_follows_aten_capability():
    """The packed micro-kernel runs AVX-512 only where ATen's own kernels do."""
    isa = native.packed_isa()
    assert isa in ("avx2", "avx512")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert isa == "avx2"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the AVX2 kernels are the ones tested in-process on this CPU")
def test_packed_step_avx2_kernels():
    """On an AVX-512 machine the packed path runs its AVX-512 variant; ATEN_CPU_CAPABILITY=avx2 selects
    the AVX2 one, the variant an AVX2-only CPU runs: the packed-step tests again, in such a process."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    tests = [f"{__file__}::{name}" for name in ("test_packed_isa_follows_aten_capability",
                                                "test_packed_step_forward_matches_reference_kernels",
                                                "test_packed_step_backward_matches_reference_kernels")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                            capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("name,proj", CHUNK_OPS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("path", ["blas", "small-batch", "packed"])
def test_opcheck_chunk_ops(name, proj, masked, path):
    if path == "packed" and proj:
        pytest.skip("the packed kernels exist for LSTM without projection")
    op, args = chunk_op_args(name, torch.float64 if path == "blas" else torch.float32, proj=proj,
                             masked=masked, path=path)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name,proj", CHUNK_OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunk_ops_match_reference_kernels(name, proj, dtype):
    """Each op against the reference kernel, including the in-place outputs."""
    _, args = chunk_op_args(name, dtype, proj=proj)
    assert_op_matches_reference_kernel(name, args, TOLERANCES.get(dtype, (1e-2, 1e-2)))


def test_thread_count_invariance():
    """1 and 2 threads give the same outputs and gradients (float32, large enough to split rows)."""
    before = torch.get_num_threads()
    results = []
    for cell, proj in [("gru", 0), ("lstm", 16), ("rnn_tanh", 0)]:
        case = Case(cell=cell, proj_size=proj, input_size=48, hidden_size=96, steps=20, batch=64, chunk_size=8,
                    packed=True, bidirectional=True)
        per_threads = []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                _, fast = make_pair(case, "cpu", torch.float32)
                x, hx, lengths = make_inputs(case, torch.float32)
                per_threads.append(run(fast, case, x, hx, lengths))
        finally:
            torch.set_num_threads(before)
        results.append((cell, per_threads))
    atol, rtol = TOLERANCES[torch.float32]
    for cell, (one, two) in results:
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=atol, rtol=rtol, msg=lambda m, k=key: f"{cell} {k}: {m}")


# ----------------------------------------------------------------------------- memory policies

@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_memory_policies(cell):
    """recompute=True keeps at most 1.25x the output's bytes; recompute=False also keeps the gates."""
    steps, batch, inp, hidden = 128, 8, 16, 32
    cls = {"gru": fastbptt.GRU, "lstm": fastbptt.LSTM}[cell]
    x = torch.randn(steps, batch, inp, requires_grad=True)
    out_bytes = steps * batch * hidden * 4
    kept = {}
    for recompute in (True, False):
        model = cls(inp, hidden, backend="cpu", recompute=recompute)
        kept[recompute] = saved_activation_bytes(lambda: model(x), exclude=[x, *model.parameters()])
    assert kept[True] <= 1.25 * out_bytes, kept[True] / out_bytes
    gate_bytes = steps * batch * {"gru": 6, "lstm": 4}[cell] * hidden * 4
    assert kept[False] >= out_bytes + gate_bytes, kept[False] / out_bytes


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 2 * 4 * 3 * 10 * 4])  # default; 2 steps of [4, 3*10] float32
def test_inference_keeps_nothing_and_matches_training_forward(chunk_bytes, monkeypatch):
    """CPU inference runs in chunks of INFERENCE_CHUNK_BYTES of input projection (one chunk here by
    default, 2 steps with the small setting); the results are the training forward's."""
    from fastbptt.ops import recurrence

    monkeypatch.setattr(fastbptt.ops, "INFERENCE_CHUNK_BYTES", chunk_bytes)
    sizes = []
    bounds = recurrence.chunk_bounds
    monkeypatch.setattr(recurrence, "chunk_bounds", lambda steps, size: sizes.append(size) or bounds(steps, size))
    model = fastbptt.GRU(6, 10, num_layers=2, backend="cpu", chunk_size=3)
    x = torch.randn(11, 4, 6)
    with torch.no_grad():
        assert saved_activation_bytes(lambda: model(x)) == 0
        assert set(sizes) == {11 if chunk_bytes == 8 << 20 else 2}
        out_ng, h_ng = model(x)
    out, h = model(x)
    torch.testing.assert_close(out_ng, out.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_ng, h.detach(), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- saturated gates

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["blas", "packed", "small-batch"])
def test_saturated_gates_are_exact(dtype, path):
    """Saturated gates are exactly 0, 1 or -1, never a denormal such as sigmoid(-100) = 6e-39
    (csrc/cpu/cells/activation.h: a denormal constant there slowed whole row passes)."""
    ops = torch.ops.fastbptt
    C, B, H = 2, 3, 8
    big = torch.full((C, B, H), 100.0, dtype=dtype)
    h0 = torch.rand(B, H, dtype=dtype) + 0.5
    c0 = torch.rand(B, H, dtype=dtype) + 0.5
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype)
    out = zeros(C, B, H)
    # LSTM: i = 1, f = 0, g = 1, o = 0 -> c' = 1 and h' = 0 exactly
    h, c = ops.lstm_forward_chunk(torch.cat([big, -big, big, -big], -1), h0, c0, zeros(4 * H, H), None, None,
                                  out, None, path)
    assert torch.equal(c, torch.ones_like(c)) and torch.equal(h, zeros(B, H)) and torch.equal(out, zeros(C, B, H))
    # GRU: r = 0, z = 1 -> h' = h exactly; then z = 0, n = tanh(-100) -> h' = -1 exactly
    gi = torch.cat([-big, big, big], -1)
    h = ops.gru_forward_chunk(gi, h0, zeros(3 * H, H), None, None, out, None, path)
    assert torch.equal(h, h0)
    h = ops.gru_forward_chunk(torch.cat([-big, -big, -big], -1), h0, zeros(3 * H, H), None, None, out, None, path)
    assert torch.equal(h, -torch.ones_like(h)) and torch.equal(out, -torch.ones_like(out))
    h = ops.rnn_forward_chunk(-big, h0, zeros(H, H), None, out, False, path)
    assert torch.equal(h, -torch.ones_like(h))


TANH_MAX_ULP = 7  # csrc/cpu/cells/activation.h: tanh_act


@pytest.mark.parametrize("path,batch", [("blas", 16), ("packed", 16), ("small-batch", 2)])
def test_tanh_within_a_few_ulp(path, batch):
    """The kernels' float32 tanh (read through an RNN step with W_hh = 0 and h0 = 0: out = tanh(pre))
    is within TANH_MAX_ULP of the correctly rounded tanh from 1e-38 to past saturation, odd, exactly x
    for tiny x and exactly +-1 where tanh rounds to 1."""
    H = 64
    magnitudes = torch.cat([torch.logspace(-38, 1.5, 40000, dtype=torch.float64),
                            torch.linspace(0, 10, 25536, dtype=torch.float64)]).float()
    x = torch.cat([magnitudes, -magnitudes])
    steps = x.numel() // (batch * H)
    x = x[:steps * batch * H].view(steps, batch, H)
    out = torch.empty_like(x)
    torch.ops.fastbptt.rnn_forward_chunk(x, torch.zeros(batch, H), torch.zeros(H, H), None, out, False, path)
    exact = torch.tanh(x.double())
    rounded = exact.float().abs()
    ulp = torch.where(rounded == 1, 2.0 ** -24, torch.nextafter(rounded, torch.tensor(2.0)) - rounded).double()
    err_ulp = ((out.double() - exact).abs() / ulp).max().item()
    assert err_ulp <= TANH_MAX_ULP, f"tanh off by {err_ulp:.2f} ulp on the {path} path"
    assert out.abs().max().item() <= 1.0
    flat_x, flat_out = x.flatten(), out.flatten()
    half = flat_x.numel() // 2  # the first half of x is the magnitudes, the second their negatives
    assert torch.equal(flat_out[half:2 * half], -flat_out[:half])
    tiny = flat_x.abs() < 1e-4
    assert torch.equal(flat_out[tiny], flat_x[tiny])
    saturated = flat_x.abs() >= 9.1
    assert torch.equal(flat_out[saturated], flat_x[saturated].sign())


def test_tanh_coefficients_come_from_the_fit():
    """activation.h's tanh coefficients are those scripts/fit_tanh.py prints, and the fit is within
    an ulp of tanh in float64 (its float32 accuracy: test_tanh_within_a_few_ulp)."""
    import importlib.util
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_tanh", root / "scripts" / "fit_tanh.py")
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    p, q, error = fit_tanh.fit()
    assert error < 1e-7
    header = (root / "csrc" / "cpu" / "cells" / "activation.h").read_text()
    body = header[header.index("float tanh_act(float x)"):]
    body = body[:body.index("\n}\n")]
    assert f"kClamp = {fit_tanh.CLAMP}f" in body

    def horner(name):  # the constants of `name = c; name = name * s + c; ...`, highest degree first
        terms = re.findall(rf"\b{name} = (?:{name} \* s )?([-+]?) ?([0-9.e+-]+)f;", body)
        return [float(sign + value) for sign, value in terms][::-1]
    assert horner("p") == pytest.approx(list(p), rel=1e-6)
    assert horner("q") == pytest.approx(list(q), rel=1e-6)


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("name,index,bad,message", CHUNK_OP_INPUT_ERRORS)
def test_kernel_input_errors(name, index, bad, message):
    op, args = chunk_op_args(name)
    with pytest.raises(RuntimeError, match=message):
        op(*replace_arg(args, index, bad(args[index])))


@pytest.mark.parametrize("name,dtype,proj,path,message", [
    ("gru_forward_chunk", torch.float64, False, "fastest", r"path must be small-batch, packed or blas, got 'fastest'"),
    ("gru_backward_chunk", torch.float64, False, "packed", r"the packed kernels take float32 and bfloat16, got Double"),
    ("rnn_forward_chunk", torch.float64, False, "small-batch", r"the small-batch kernels take float32 and bfloat16"),
    ("lstm_forward_chunk", torch.float32, True, "packed", r"packed kernels exist for LSTM without projection"),
    ("lstm_backward_chunk", torch.float32, True, "packed", r"packed kernels exist for LSTM without projection"),
])
def test_kernel_path_errors(name, dtype, proj, path, message):
    """A path a kernel cannot run is an error naming it, never a silent switch to another."""
    op, args = chunk_op_args(name, dtype, proj=proj, path=path)
    with pytest.raises(RuntimeError, match=message):
        op(*args)


def test_out_must_be_contiguous():
    op, args = chunk_op_args("rnn_forward_chunk")
    out = torch.empty(args[4].shape[::-1], dtype=args[4].dtype).permute(2, 1, 0)
    with pytest.raises(RuntimeError, match="expected out to be contiguous"):
        op(*replace_arg(args, 4, out))
