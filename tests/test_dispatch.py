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
    persistent = next(p for p in dispatch.BACKENDS["cuda"].paths if p.name == "persistent")
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
