"""The CUDA backend (csrc/cuda): parity with torch.nn (cuDNN) and with the reference in float64 on
the GPU, low precision within torch.nn's own error, determinism, torch.compile, CUDA graph
capture of a training step, and the persistent path forced with backend="cuda:persistent".

Every GPU test skips cleanly without a CUDA device or without the compiled CUDA kernels; nothing
here touches the GPU at import or collection time. The first test runs everywhere: it checks the
compile-check script that CI runs without a GPU.
"""
import glob
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import fastbptt
from conftest import requires_cuda
from fastbptt import dispatch, native
from fastbptt.nn import MODULE_OF_CELL, TORCH_MODULE_OF_CELL, cell_kwargs
from helpers import (CHUNK_OP_INPUT_ERRORS, GPU_F32_TOLERANCE, TOLERANCES, Case, assert_compile_matches_eager,
                     assert_lowp_parity, assert_parity, assert_results_close, chunk_op_args, make_inputs, make_pair,
                     replace_arg, run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_script_covers_every_cuda_source():
    script = os.path.join(ROOT, "scripts", "check_cuda_compile.sh")
    assert os.access(script, os.X_OK), "scripts/check_cuda_compile.sh must exist and be executable"
    listed = subprocess.run(["bash", script, "--list"], cwd=ROOT, capture_output=True, text=True, check=True)
    expected = sorted(["csrc/ops.cpp"] + [os.path.relpath(p, ROOT) for ext in ("cu", "cpp")
                                          for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", f"*.{ext}"))])
    assert expected, "no CUDA sources found"
    assert sorted(listed.stdout.split()) == expected


GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _gpu_check(*args, **env):
    return subprocess.run(["bash", GPU_CHECK, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_gpu_check_usage_and_bad_options():
    assert os.access(GPU_CHECK, os.X_OK), "scripts/gpu_check.sh must exist and be executable"
    shown = _gpu_check("--help")
    assert shown.returncode == 0 and "--quick" in shown.stdout and "TIME_LIMIT" in shown.stdout
    bad = _gpu_check("--fast")
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr


@pytest.mark.skipif("torch.cuda.is_available()", reason="checks the answer on a machine without a GPU")
def test_gpu_check_without_a_gpu_stops_with_the_reason(tmp_path):
    done = _gpu_check("--quick", OUT=str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    reason = "no CUDA GPU is visible to torch"
    assert reason in done.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "| machine | failed |" in summary and reason in summary
    assert reason in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.skipif("torch.cuda.is_available()", reason="checks the answer on a machine without a GPU")
def test_gpu_check_installs_carried_wheels_before_anything_else(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "carried_probe-1.0.dist-info"
    with zipfile.ZipFile(wheels / "carried_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("carried_probe.py", "")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    done = _gpu_check("--quick", OUT=str(tmp_path / "out"), WHEELS=str(wheels))
    assert "installed the carried wheels: carried_probe-1.0-py3-none-any.whl" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stdout  # and then stops for want of a GPU


def test_gpu_check_stops_when_carried_wheels_do_not_install(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    done = _gpu_check("--quick", OUT=str(tmp_path / "out"), WHEELS=str(wheels))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"installing the wheels in {wheels} failed" in done.stdout


def _cuda_backend_reason() -> str:
    return dispatch.availability("cuda")


requires_cuda_backend = pytest.mark.skipif("not torch.cuda.is_available() or bool(_cuda_backend_reason())",
                                           reason="needs a CUDA GPU and fastbptt._C built with CUDA kernels")


def gpu_test(f):
    """Marks a test that needs a GPU and the CUDA kernels (the CPU test above runs everywhere)."""
    return requires_cuda(requires_cuda_backend(pytest.mark.cuda(f)))




@pytest.fixture(params=["cuda:standard", "cuda:persistent"])
def cuda_backend(request):
    """The standard path, and the persistent one where it exists (GRU, LSTM without projection):
    elsewhere the rule's choice ("cuda")."""
    return request.param


def backend_for(case: Case, backend: str) -> str:
    if backend == "cuda:persistent" and (case.cell.startswith("rnn") or case.proj_size):
        return "cuda"
    return backend


CASES = [
    Case(cell="gru", input_size=48, hidden_size=96, batch=16, steps=40, chunk_size=16),
    Case(cell="gru", input_size=32, hidden_size=70, batch=13, steps=33, chunk_size=10, packed=True, bidirectional=True,
         num_layers=2),
    Case(cell="lstm", input_size=40, hidden_size=64, batch=9, steps=30, chunk_size=8, packed=True, bidirectional=True),
    Case(cell="lstm", input_size=32, hidden_size=64, proj_size=24, batch=8, steps=24, num_layers=2, chunk_size=7),
    Case(cell="lstm", input_size=32, hidden_size=48, proj_size=20, batch=5, steps=21, packed=True, bidirectional=True,
         recompute=False),
    Case(cell="rnn_tanh", input_size=32, hidden_size=80, batch=16, steps=36, packed=True, num_layers=2),
    Case(cell="rnn_relu", input_size=32, hidden_size=64, batch=7, steps=30, recompute=False, bidirectional=True),
    Case(cell="gru", input_size=16, hidden_size=40, batch=4, steps=25, recompute=False, batch_first=True,
         packed=True),
]
SMALL = [Case(cell=c, proj_size=p, packed=True, bidirectional=True, num_layers=2)
         for c, p in [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 4)]]


def _id(case: Case) -> str:
    flags = "".join(k[0] for k in ("packed", "bidirectional") if getattr(case, k))
    return f"{case.cell}{'-P' + str(case.proj_size) if case.proj_size else ''}-H{case.hidden_size}-B{case.batch}" \
           f"-L{case.num_layers}{'-' + flags if flags else ''}{'' if case.recompute else '-norecompute'}"


@gpu_test
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_parity_with_cudnn_float32(case, no_tf32, cuda_backend):
    assert_parity(case, backend_for(case, cuda_backend), torch.float32, device="cuda", tolerance=GPU_F32_TOLERANCE)


@gpu_test
@pytest.mark.parametrize("case", CASES + SMALL, ids=_id)
def test_parity_float64_with_torch_nn_and_reference(case):
    assert_parity(case, "cuda", torch.float64, device="cuda")
    _, ref = make_pair(case, "reference", torch.float64, "cuda")
    _, fast = make_pair(case, "cuda", torch.float64, "cuda")
    x, hx, lengths = make_inputs(case, torch.float64, "cuda")
    assert_results_close(run(fast, case, x, hx, lengths), run(ref, case, x, hx, lengths), *TOLERANCES[torch.float64],
                         label="cuda vs reference")


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[:6], ids=_id)
def test_low_precision_within_torch_nn_error(case, dtype, cuda_backend):
    assert_lowp_parity(case, backend_for(case, cuda_backend), dtype, device="cuda")


@gpu_test
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_id)
def test_two_runs_are_bitwise_equal(case, cuda_backend):
    _, fast = make_pair(case, backend_for(case, cuda_backend), torch.float32, "cuda")
    x, hx, lengths = make_inputs(case, torch.float32, "cuda")
    first, second = run(fast, case, x, hx, lengths), run(fast, case, x, hx, lengths)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@gpu_test
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_torch_compile_fullgraph_matches_eager(cell):
    cls = {"gru": fastbptt.GRU, "lstm": fastbptt.LSTM, "rnn_tanh": fastbptt.RNN}[cell]
    model = cls(8, 16, num_layers=2, bidirectional=True, batch_first=True, backend="cuda").cuda()
    assert_compile_matches_eager(model, torch.randn(3, 11, 8, device="cuda", requires_grad=True))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 4)])
def test_autocast_returns_cudnn_dtypes(cell, proj, dtype):
    """Under CUDA autocast, the output and state dtypes torch.nn (cuDNN) returns."""
    kwargs = dict(cell_kwargs(cell), **({"proj_size": proj} if proj else {}))
    ref = TORCH_MODULE_OF_CELL[cell](8, 16, **kwargs).cuda()
    fast = MODULE_OF_CELL[cell](8, 16, **kwargs).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        got, want = fast(x), ref(x)
    flat = lambda result: [result[0], *(result[1] if isinstance(result[1], tuple) else (result[1],))]
    assert [t.dtype for t in flat(got)] == [t.dtype for t in flat(want)]


@gpu_test
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_relu"])
def test_cuda_graph_capture_of_a_training_step(cell, cuda_backend):
    """Forward + backward captured once and replayed on new data gives the eager gradients."""
    torch.manual_seed(0)
    backend = backend_for(Case(cell=cell), cuda_backend)
    model = MODULE_OF_CELL[cell](8, 32, num_layers=2, chunk_size=5, backend=backend, **cell_kwargs(cell)).cuda()
    static_x = torch.randn(12, 4, 8, device="cuda")

    def step():
        out, _ = model(static_x)
        (out * out).sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph (allocator, lazy initialisation)
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    captured = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    out, _ = model(new_x)
    (out * out).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(captured[name], p.grad, msg=name)


# ----------------------------------------------------------------------------- persistent path

PERSISTENT_CASES = [  # hidden sizes and batches that are not multiples of the kernels' tiles
    Case(cell="gru", input_size=8, hidden_size=1, batch=1, steps=9, chunk_size=4),
    Case(cell="gru", input_size=16, hidden_size=37, batch=3, steps=17, chunk_size=5, packed=True),
    Case(cell="gru", input_size=32, hidden_size=300, batch=13, steps=20, chunk_size=8, bidirectional=True),
    Case(cell="gru", input_size=32, hidden_size=1000, batch=9, steps=12, chunk_size=12, packed=True, bias=False),
    Case(cell="gru", input_size=16, hidden_size=133, batch=70, steps=10, chunk_size=3, recompute=False),
    Case(cell="lstm", input_size=8, hidden_size=5, batch=2, steps=9, chunk_size=4),
    Case(cell="lstm", input_size=16, hidden_size=150, batch=11, steps=17, chunk_size=6, packed=True,
         bidirectional=True),
    Case(cell="lstm", input_size=32, hidden_size=700, batch=9, steps=12, chunk_size=12, num_layers=2,
         recompute=False),
]

@gpu_test
@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=_id)
def test_persistent_parity(case, no_tf32):
    assert_parity(case, "cuda:persistent", torch.float32, device="cuda", tolerance=GPU_F32_TOLERANCE)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PERSISTENT_CASES[1:4] + PERSISTENT_CASES[6:], ids=_id)
def test_persistent_low_precision(case, dtype):
    assert_lowp_parity(case, "cuda:persistent", dtype, device="cuda")


@gpu_test
def test_persistent_declines_cleanly_above_capacity(no_tf32):
    """Forced: a clear error before anything is launched. The rule: the standard path runs instead."""
    case = Case(cell="gru", input_size=4, hidden_size=8192, batch=2, steps=3, chunk_size=3)
    assert "shared memory" in native.persistent_decline("gru", torch.float32, 2, 8192)
    assert 0 < native.persistent_capacity("gru", torch.float32, 2) < 8192
    _, fast = make_pair(case, "cuda:persistent", torch.float32, "cuda")
    x, hx, _ = make_inputs(case, torch.float32, "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="cuda:persistent' cannot run this gru layer"):
        fast(x, hx)
    assert dispatch.choose_path("cuda", "gru", torch.float32, 2, 8192) == "standard"
    assert_parity(case, "cuda", torch.float32, device="cuda", tolerance=GPU_F32_TOLERANCE)


@gpu_test
@pytest.mark.parametrize("case,dtype,reason", [
    (Case(cell="gru"), torch.float64, "float64 is not supported"),
    (Case(cell="lstm", proj_size=4), torch.float32, "does not support a projection"),
    (Case(cell="rnn_tanh"), torch.float32, "no persistent kernel"),
], ids=["float64", "lstm-proj", "rnn"])
def test_persistent_declines_what_it_cannot_run(case, dtype, reason):
    _, fast = make_pair(case, "cuda:persistent", dtype, "cuda")
    x, hx, _ = make_inputs(case, dtype, "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match=reason):
        fast(x, hx)
    assert_parity(case, "cuda", dtype, device="cuda", tolerance=None if dtype == torch.float64 else GPU_F32_TOLERANCE)


@gpu_test
@pytest.mark.parametrize("name,index,bad,message", CHUNK_OP_INPUT_ERRORS + [
    ("rnn_forward_chunk", 1, lambda a: a.cpu(), r"expected h0 on cuda:0 like the first input, got cpu"),
    ("gru_backward_chunk", 0, lambda a: a.cpu(), r"expected gi on CUDA, got a tensor on cpu"),
])
def test_chunk_op_input_errors(name, index, bad, message):
    """The CUDA ops reject bad arguments with the CPU ops' messages (one helper: csrc/checks.h)."""
    op, args = chunk_op_args(name, path="standard", device="cuda")
    with pytest.raises(RuntimeError, match=message):
        op(*replace_arg(args, index, bad(args[index])))


@gpu_test
@pytest.mark.parametrize("name", ["gru_forward_chunk", "lstm_backward_chunk"])
def test_chunk_op_rejects_an_unknown_path(name):
    x = torch.zeros(2, 1, 12 if name.startswith("lstm") else 9, device="cuda")
    h = torch.zeros(1, 3, device="cuda")
    w = torch.zeros(x.shape[-1], 3, device="cuda")
    op = getattr(torch.ops.fastbptt, name)
    args = ((x, h, w, None, None, torch.zeros(2, 1, 3, device="cuda"), None, "fastest") if name.startswith("gru") else
            (x, h, w, None, torch.zeros(2, 1, 3, device="cuda"), h, h, None, "fastest"))
    with pytest.raises(RuntimeError, match="path must be standard or persistent, got 'fastest'"):
        op(*args)
