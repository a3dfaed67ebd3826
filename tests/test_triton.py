"""Triton backend: parity with torch.nn and with the reference kernels, and the dispatch seam.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, switched on by conftest.py
before anything loads Triton), at tiny shapes. The same kernels run compiled on a CUDA GPU at
realistic shapes in the ``cuda`` tests, which skip without one.
"""
from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:  # run alone, without conftest.py; a GPU run sets it to 0
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastbptt  # noqa: E402
from fastbptt import dispatch, reference  # noqa: E402

from conftest import requires_cuda, triton_interpreted  # noqa: E402
from helpers import (GPU_F32_TOLERANCE, Case, assert_lowp_parity, assert_parity, make_inputs,  # noqa: E402
                     make_pair, run)

triton_kernels = pytest.importorskip("fastbptt.triton")

interpreted = pytest.mark.skipif(not triton_interpreted(), reason="needs Triton with TRITON_INTERPRET=1")
pytestmark = pytest.mark.triton

F32 = torch.float32
CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")


@pytest.fixture
def streamed(monkeypatch):
    """Tiles of 16 so that H > 16 takes the streamed-weights path and B > 16 uses several programs."""
    from fastbptt.triton import common
    monkeypatch.setattr(common, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(common, "MAX_BLOCK_B", 16)


@pytest.fixture(autouse=True)
def nan_fresh_memory(monkeypatch):
    """Fresh float allocations come filled with NaN, so a kernel reading scratch or output memory
    it has not written shows up as NaN in the results."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(empty_like(*a, **k)))


# ----------------------------------------------------------------------------- kernels vs reference

def _close(actual, expected, dtype, label):
    if expected is None:
        assert actual is None, label
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, label
    # float32: both compute in float32; low precision: both round once, so at most an ulp apart
    atol, rtol = (2e-6, 2e-5) if dtype == F32 else ((1e-2, 1e-2) if dtype == torch.bfloat16 else (2e-3, 2e-3))
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{label}: {m}")


def _chunk_inputs(cell, steps, batch, hidden, proj, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
    out_size = proj or hidden
    d = dict(
        gates=rand(steps, batch, gates * hidden),
        h0=rand(batch, out_size), c0=rand(batch, hidden),
        w_hh=rand(gates * hidden, out_size, scale=out_size ** -0.5),
        w_hr=rand(proj, hidden, scale=hidden ** -0.5) if proj else None,
        b_hh=rand(gates * hidden),
        grad_out=rand(steps, batch, out_size), grad_h=rand(batch, out_size), grad_c=rand(batch, hidden),
        h_prev=rand(steps, batch, out_size),
        valid=(torch.rand(steps, batch, generator=g) > 0.3) if masked else None,
    )
    return d


def _compare_chunk(cell, steps, batch, hidden, dtype, masked, proj=0, bias=True, path="streamed"):
    """Forward and backward chunk kernels of the Triton backend, on kernel ``path``, against the
    reference's."""
    d = _chunk_inputs(cell, steps, batch, hidden, proj, dtype, masked)
    out_size = proj or hidden
    outs = {}
    for name, mod in (("ref", reference), ("tri", triton_kernels)):
        kw = {"path": path} if mod is triton_kernels else {}
        out = torch.full((steps, batch, out_size), float("nan"), dtype=dtype)
        res = {"out": out}
        if cell == "gru":
            gh = torch.full_like(d["gates"], float("nan"))
            b_hh = d["b_hh"] if bias else None
            res["h_n"] = mod.gru_forward(d["gates"], d["h0"], d["w_hh"], b_hh, d["valid"], out, gh, **kw)
            res["gh"] = gh
            # the backward takes the reference's gh so that both walk back from the same numbers
            gh_in = outs["ref"]["gh"] if name == "tri" else gh
            res["back"] = mod.gru_backward(d["gates"], gh_in, d["h_prev"], d["w_hh"], d["grad_out"], d["grad_h"],
                                           d["valid"], **kw)
        elif cell == "lstm":
            pre = torch.full_like(d["gates"], float("nan"))
            res["h_n"] = mod.lstm_forward(d["gates"], d["h0"], d["c0"], d["w_hh"], d["w_hr"], d["valid"], out, pre,
                                          **kw)
            res["pre"] = pre
            res["back"] = mod.lstm_backward(d["gates"], d["c0"], d["w_hh"], d["w_hr"], d["grad_out"], d["grad_h"],
                                            d["grad_c"], d["valid"], **kw)
        else:
            relu = cell == "rnn_relu"
            res["h_n"] = mod.rnn_forward(d["gates"], d["h0"], d["w_hh"], d["valid"], out, relu, **kw)
            out_in = outs["ref"]["out"] if name == "tri" else out
            res["back"] = mod.rnn_backward(out_in, d["w_hh"], d["grad_out"], d["grad_h"], d["valid"], relu, **kw)
        outs[name] = res
    ref, tri = outs["ref"], outs["tri"]
    for key in ref:
        exp, act = ref[key], tri[key]
        exp, act = (exp, act) if isinstance(exp, tuple) else ((exp,), (act,))
        assert len(exp) == len(act), key
        for i, (a, e) in enumerate(zip(act, exp)):
            _close(a, e, dtype, f"{cell} {key}[{i}]")


PATHS = ("resident", "streamed")


@interpreted
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_chunk_kernels_match_reference(cell, masked, path):
    _compare_chunk(cell, steps=5, batch=3, hidden=13, dtype=F32, masked=masked, path=path)


@interpreted
@pytest.mark.parametrize("cell", CELLS)
def test_chunk_kernels_streamed_weights_and_batch_tiles(cell, streamed):
    # H=20 > 16: two hidden tiles, weights streamed; B=17 > 16: two batch programs; both ragged
    _compare_chunk(cell, steps=3, batch=17, hidden=20, dtype=F32, masked=True)


@interpreted
@pytest.mark.parametrize("proj", [5, 20])
def test_chunk_kernels_lstm_projection(proj, streamed):
    # P < H and P > H; H=18 spans two tiles, so the projection reads m across tiles
    _compare_chunk("lstm", steps=4, batch=3, hidden=18, dtype=F32, masked=True, proj=proj)


@interpreted
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("path", PATHS)
def test_chunk_kernels_without_bias_or_mask(cell, path):
    _compare_chunk(cell, steps=4, batch=2, hidden=16, dtype=F32, masked=False, bias=False, path=path)


@interpreted
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_chunk_kernels_low_precision(cell, dtype, path):
    _compare_chunk(cell, steps=4, batch=3, hidden=12, dtype=dtype, masked=True, path=path)


# ----------------------------------------------------------------------------- modules vs torch.nn

PARITY_CASES = [
    Case(),
    Case(packed=True),
    Case(bidirectional=True, packed=True),
    Case(num_layers=2, batch_first=True),
    Case(recompute=False, packed=True, bidirectional=True),
    Case(chunk_size=1),
    Case(chunk_size=16, with_hx=False, bias=False),
    Case(unbatched=True),
]


def _fit(case: Case, cell: str) -> Case:
    return dataclasses.replace(case, cell=cell, steps=6, hidden_size=13, input_size=5, batch=3)


@interpreted
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"p{int(c.packed)}b{int(c.bidirectional)}"
                         f"l{c.num_layers}r{int(c.recompute)}c{c.chunk_size}h{int(c.with_hx)}u{int(c.unbatched)}")
def test_parity_with_torch_nn(cell, case):
    assert_parity(_fit(case, cell), "triton", F32)


@interpreted
@pytest.mark.parametrize("case", [Case(cell="lstm", proj_size=4, packed=True, bidirectional=True),
                                  Case(cell="lstm", proj_size=7, num_layers=2, recompute=False, chunk_size=2)])
def test_parity_lstm_projection(case):
    assert_parity(dataclasses.replace(case, steps=6, hidden_size=9, batch=3), "triton", F32)


@interpreted
@pytest.mark.parametrize("cell", CELLS)
def test_parity_ragged_sizes_streamed(cell, streamed):
    # hidden 17 and batch 3 are not multiples of the 16-wide tiles; two hidden tiles per step
    assert_parity(Case(cell=cell, steps=4, batch=3, hidden_size=17, input_size=4, packed=True, chunk_size=3),
                  "triton", F32)


@interpreted
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parity(cell, dtype):
    assert_lowp_parity(Case(cell=cell, steps=5, batch=3, hidden_size=12, packed=True, chunk_size=2), "triton", dtype)


@interpreted
def test_matches_reference_backend_on_module():
    case = Case(cell="gru", steps=6, batch=3, hidden_size=10, packed=True, bidirectional=True, num_layers=2)
    x, hx, lengths = make_inputs(case, F32)
    _, ref = make_pair(case, "reference", F32)
    _, tri = make_pair(case, "triton", F32)
    expected, actual = run(ref, case, x, hx, lengths), run(tri, case, x, hx, lengths)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=2e-6, rtol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------- the dispatch seam

def test_supports_declines_float64_and_takes_the_rest():
    assert "float64" in triton_kernels.supports("triton", "gru", torch.float64, 8, 0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cell in CELLS:
            assert triton_kernels.supports("triton", cell, dtype, 8, 0) == ""
    assert triton_kernels.supports("triton", "lstm", torch.float32, 8, 4) == ""


@interpreted
def test_auto_falls_back_when_triton_declines(monkeypatch):
    # on CPU, auto never tries Triton; put it first to exercise the seam as on a GPU
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ("triton", "reference"))
    x32, x64 = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.float64)
    assert dispatch.resolve("auto", "gru", x32, 4) == "triton"
    assert dispatch.resolve("auto", "gru", x64, 4) == "reference"
    with pytest.raises(dispatch.BackendUnavailable, match="float64"):
        dispatch.resolve("triton", "gru", x64, 4)
    # and a float64 module on auto runs (through the reference) and matches torch.nn
    assert_parity(Case(cell="gru", steps=4, batch=2), "auto", torch.float64)


def test_auto_never_picks_triton_for_cpu_tensors():
    assert "triton" not in dispatch.PREFERENCE["cpu"]
    assert dispatch.resolve("auto", "gru", torch.zeros(2, 1, 3), 4) != "triton"


@pytest.fixture
def fresh_registry():
    dispatch._load.cache_clear()
    yield
    dispatch._load.cache_clear()


def test_clear_error_when_triton_is_not_installed(monkeypatch, fresh_registry):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    reason = triton_kernels.unavailable_reason("triton")
    assert "not installed" in reason and "pip install triton" in reason and "fastbptt[triton]" in reason
    with pytest.raises(dispatch.BackendUnavailable, match="pip install triton"):
        dispatch.kernels("triton")
    rnn = fastbptt.GRU(3, 4, backend="triton")
    with pytest.raises(dispatch.BackendUnavailable, match="Triton is not installed"):
        rnn(torch.zeros(2, 1, 3))


def test_clear_error_on_cpu_without_interpreter(monkeypatch, fresh_registry):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = triton_kernels.unavailable_reason("triton")
    assert "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET=1"):
        fastbptt.GRU(3, 4, backend="triton")(torch.zeros(2, 1, 3))


@interpreted
def test_chunk_outputs_are_fresh_and_inputs_untouched():
    d = _chunk_inputs("gru", 3, 2, 8, 0, F32, masked=True)
    saved = {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}
    out = torch.empty(3, 2, 8)
    h_n = triton_kernels.gru_forward(d["gates"], d["h0"], d["w_hh"], d["b_hh"], d["valid"], out, None)
    assert h_n.data_ptr() != d["h0"].data_ptr() and h_n.is_contiguous()
    for k, v in saved.items():
        assert torch.equal(d[k], v), k


# ----------------------------------------------------------------------------- CUDA, realistic shapes

GPU_CASES = [
    Case(cell="gru", input_size=128, hidden_size=256, batch=16, steps=64, chunk_size=32),
    Case(cell="lstm", input_size=96, hidden_size=200, batch=33, steps=40, chunk_size=16, packed=True,
         bidirectional=True),
    Case(cell="lstm", input_size=64, hidden_size=128, proj_size=48, batch=8, steps=32, num_layers=2),
    Case(cell="rnn_tanh", input_size=64, hidden_size=320, batch=16, steps=48, packed=True),
    Case(cell="rnn_relu", input_size=64, hidden_size=96, batch=64, steps=48, recompute=False),
    Case(cell="gru", input_size=64, hidden_size=768, batch=16, steps=32, chunk_size=16, bidirectional=True),
]




@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.cell}-H{c.hidden_size}-B{c.batch}")
def test_cuda_parity_float32(case, no_tf32):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needed (TRITON_INTERPRET=1 is set)")
    assert_parity(case, "triton", F32, device="cuda", tolerance=GPU_F32_TOLERANCE)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES[:4], ids=lambda c: f"{c.cell}-H{c.hidden_size}-B{c.batch}")
def test_cuda_low_precision_parity(case, dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needed (TRITON_INTERPRET=1 is set)")
    assert_lowp_parity(case, "triton", dtype, device="cuda")


@requires_cuda
@pytest.mark.cuda
def test_cuda_auto_picks_triton_without_the_extension(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needed (TRITON_INTERPRET=1 is set)")
    monkeypatch.setitem(dispatch.PREFERENCE, "cuda", ("triton", "reference"))
    x = torch.zeros(2, 1, 3, device="cuda")
    assert dispatch.resolve("auto", "gru", x, 4) == "triton"
