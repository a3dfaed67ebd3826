"""Thin loader for the compiled kernels in ``fastbptt._C`` (backends ``"cpu"`` and ``"cuda"``).

The extension registers ``torch.ops.fastbptt.*_chunk`` (schemas in ``csrc/ops.cpp``) with a CPU
and, when built with CUDA, a CUDA implementation; the functions below adapt them to the kernel
contract of :mod:`fastbptt.reference`. Importing this module never fails: a missing extension
only makes the backends unavailable, with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cells import SPECS
from .dispatch import BACKENDS

try:
    from . import _C  # noqa: F401  (registers the ops)
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(exc)

REBUILD = "pip install --no-build-isolation -e ."
DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
          "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _register_fakes() -> None:
    """Shapes-only kernels of the chunk ops (meta tensors, torch.compile, opcheck)."""
    fake = torch.library.register_fake

    @fake("fastbptt::rnn_forward_chunk")
    def _rnn_forward(pre_in, h0, w_hh, valid, out, relu, path):
        return torch.empty_like(h0)

    @fake("fastbptt::rnn_backward_chunk")
    def _rnn_backward(out, w_hh, grad_out, grad_h_n, valid, relu, path):
        return torch.empty_like(out), torch.empty_like(grad_h_n)

    @fake("fastbptt::gru_forward_chunk")
    def _gru_forward(gi, h0, w_hh, b_hh, valid, out, gh_out, path):
        return torch.empty_like(h0)

    @fake("fastbptt::gru_backward_chunk")
    def _gru_backward(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid, path):
        return torch.empty_like(gi), torch.empty_like(gh), torch.empty_like(grad_h_n)

    @fake("fastbptt::lstm_forward_chunk")
    def _lstm_forward(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out, path):
        return torch.empty_like(h0), torch.empty_like(c0)

    @fake("fastbptt::lstm_backward_chunk")
    def _lstm_backward(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid, path):
        grad_w_hr = torch.empty_like(w_hr) if w_hr is not None else gates.new_empty(0)
        return torch.empty_like(gates), torch.empty_like(grad_h_n), torch.empty_like(c0), grad_w_hr

    # cell steps (csrc/cell_ops.cpp)
    def cell_grads(tensors, output_mask):
        return tuple(torch.empty_like(t) if wanted else t.new_empty(0) for t, wanted in zip(tensors, output_mask))

    def gate_bias(w_ih):  # the shape of a bias gradient
        return w_ih.new_empty(w_ih.shape[0])

    @fake("fastbptt::rnn_cell")
    def _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu, path):
        return torch.empty_like(hx)

    @fake("fastbptt::rnn_cell_backward")
    def _rnn_cell_backward(grad_hy, input, hx, w_ih, w_hh, hy, relu, output_mask, path):
        return cell_grads((input, hx, w_ih, w_hh, gate_bias(w_ih), gate_bias(w_ih)), output_mask) + (
            input.new_empty(input.shape[0], w_ih.shape[0]),)

    @fake("fastbptt::gru_cell")
    def _gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, path):
        gates = input.new_empty(input.shape[0], w_ih.shape[0])
        return torch.empty_like(hx), gates, torch.empty_like(gates)

    @fake("fastbptt::gru_cell_backward")
    def _gru_cell_backward(grad_hy, input, hx, w_ih, w_hh, gi, gh, output_mask, path):
        return cell_grads((input, hx, w_ih, w_hh, gate_bias(w_ih), gate_bias(w_ih)), output_mask) + (
            torch.empty_like(gi), torch.empty_like(gh))

    @fake("fastbptt::lstm_cell")
    def _lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh, path):
        return torch.empty_like(hx), torch.empty_like(cx), input.new_empty(input.shape[0], w_ih.shape[0])

    @fake("fastbptt::lstm_cell_backward")
    def _lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, output_mask, path):
        return cell_grads((input, hx, cx, w_ih, w_hh, gate_bias(w_ih), gate_bias(w_ih)), output_mask) + (
            torch.empty_like(gates),)


if _C is not None:
    _register_fakes()


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastbptt::gru_forward_chunk", dispatch_key)


def unavailable_reason(name: str) -> str:
    if _C is None:
        return f"the compiled extension fastbptt._C is not built or failed to load ({_IMPORT_ERROR}); " \
               f"build it with `{REBUILD}`"
    if name == "cpu":
        return "" if _has_kernel("CPU") else "fastbptt._C was built without CPU kernels"
    if not _has_kernel("CUDA"):
        return ("fastbptt._C was built without CUDA kernels (torch without CUDA, nvcc not found, or "
                f"FASTBPTT_CUDA=0 at build time); rebuild on a CUDA machine with `FASTBPTT_CUDA=1 {REBUILD}`")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return ""


def supports(name: str, cell: str, dtype: torch.dtype, hidden_size: int, proj_size: int) -> str:
    if dtype not in DTYPES[name]:
        return f"dtype {dtype} is not compiled (has {', '.join(str(d) for d in DTYPES[name])})"
    return ""


# Kernel paths (the registry in fastbptt/dispatch.py lists them and holds the rule). The CPU's
# small-batch and packed kernels compute in float32 (bfloat16 is widened to it).
FLOAT32_PATH_DTYPES = (torch.float32, torch.bfloat16)


def path_decline(name: str, path: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int,
                 proj_size: int) -> str:
    """'' when kernel ``path`` of backend ``name`` ("cpu", "cuda") can run the case, else why not."""
    if path in ("small-batch", "packed") and dtype not in FLOAT32_PATH_DTYPES:
        return f"the {path} kernels take float32 and bfloat16, not {dtype}"
    if path == "packed" and proj_size:
        return "the packed kernels exist for LSTM without projection (and for RNN and GRU)"
    if path == "persistent":
        return persistent_decline(cell, dtype, batch, hidden_size, proj_size)
    if path == "onednn":
        return onednn_decline(cell, dtype, batch, proj_size)
    return ""


def onednn_decline(cell: str, dtype: torch.dtype, batch: int, proj_size: int) -> str:
    """Why oneDNN's LSTM primitive cannot run the case here, or ''. torch.nn's CPU LSTM runs the same
    primitive under the same conditions, and not when the user turns oneDNN off."""
    if cell != "lstm":
        return "oneDNN's recurrent primitive is exposed by torch for the LSTM only"
    if proj_size:
        return "oneDNN's LSTM primitive has no projection (proj_size > 0)"
    if batch == 0:
        return "oneDNN's LSTM primitive takes no empty batch"
    if dtype != torch.float32:
        return f"the onednn path takes float32, not {dtype}"
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is turned off (torch.backends.mkldnn.enabled is False)"
    return ""


def packed_isa() -> str:
    """The vector ISA the CPU packed path's micro-kernel runs with in this process: "avx512" (its own
    AVX-512 register blocking, where the CPU has AVX-512 and ATen's CPU capability is AVX512, so
    ``ATEN_CPU_CAPABILITY=avx2`` caps it too) or "avx2" (AVX2+FMA, or portable code without AVX2);
    "" without the extension."""
    return _C.cpu_packed_isa() if _C is not None else ""


def persistent_decline(cell: str, dtype: torch.dtype, batch: int, hidden_size: int, proj_size: int = 0) -> str:
    """Why the persistent CUDA kernel cannot take the case on the current GPU, or ''. Its capacity
    (W_hh's slice in each block's shared memory, one co-resident block per SM at most) is
    computed from the device's properties by the extension."""
    if SPECS[cell].kernel == "rnn":
        return "there is no persistent kernel for the RNN cell yet"
    if proj_size:
        return "the persistent LSTM kernel does not support a projection (proj_size > 0)"
    return _C.persistent_decline(cell, str(dtype).removeprefix("torch."), batch, hidden_size)


def persistent_capacity(cell: str, dtype: torch.dtype, batch: int, limit: int = 1 << 16) -> int:
    """The largest hidden size the persistent kernel takes at this batch on the current GPU (0:
    none), found by bisection: the kernel's demand grows with H."""
    if persistent_decline(cell, dtype, batch, 1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if not persistent_decline(cell, dtype, batch, mid) else (lo, mid - 1)
    return lo


# The kernel contract of fastbptt.reference, with the kernel path as a last keyword.

def rnn_forward(pre_in: Tensor, h0: Tensor, w_hh: Tensor, valid: Optional[Tensor], out: Tensor, relu: bool,
                path: str = "") -> Tensor:
    return torch.ops.fastbptt.rnn_forward_chunk(pre_in, h0, w_hh, valid, out, relu, _path(pre_in, path))


def rnn_backward(out, w_hh, grad_out, grad_h_n, valid, relu, path: str = ""):
    return torch.ops.fastbptt.rnn_backward_chunk(out, w_hh, grad_out, grad_h_n, valid, relu, _path(out, path))


def gru_forward(gi, h0, w_hh, b_hh, valid, out, gh_out=None, path: str = ""):
    return torch.ops.fastbptt.gru_forward_chunk(gi, h0, w_hh, b_hh, valid, out, gh_out, _path(gi, path))


def gru_backward(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid, path: str = ""):
    return torch.ops.fastbptt.gru_backward_chunk(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid, _path(gi, path))


def lstm_forward(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out=None, path: str = ""):
    return torch.ops.fastbptt.lstm_forward_chunk(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out,
                                                 _path(gates_in, path))


def lstm_backward(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid, path: str = ""):
    grad_gates, grad_h0, grad_c0, grad_w_hr = torch.ops.fastbptt.lstm_backward_chunk(
        gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid, _path(gates, path))
    return grad_gates, grad_h0, grad_c0, (grad_w_hr if w_hr is not None else None)


def _path(like: Tensor, path: str) -> str:
    """A direct call without a path (tests) runs the backend's last path, which takes every case."""
    return path or BACKENDS[like.device.type].paths[-1].name


# mode 2 of aten::mkldnn_rnn_layer and its backward (cuDNN's numbering: RNN_RELU, RNN_TANH, LSTM, GRU)
ONEDNN_LSTM_MODE = 2


def _onednn_biases(x: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, bool]:
    if b_ih is None:
        return x.new_empty(0), x.new_empty(0), False
    return b_ih, b_hh, True


def _onednn_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], reverse: bool, train: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One call of oneDNN's LSTM primitive over x: (output, h_n, c_n, workspace; empty unless ``train``)."""
    b_ih, b_hh, has_bias = _onednn_biases(x, b_ih, b_hh)
    return torch.ops.aten.mkldnn_rnn_layer(
        x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh, h0.contiguous(), c0.contiguous(), reverse,
        [], ONEDNN_LSTM_MODE, h0.shape[-1], 1, has_bias, False, False, train)


def lstm_layer_chunk(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                     b_hh: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Inference of one chunk of an LSTM layer, input projection included, by oneDNN's LSTM primitive
    (the "onednn" path; what torch.nn's CPU LSTM runs). x: [C, B, I] in time order; h0, c0: [B, H];
    ``reverse`` runs the steps from C-1 down to 0. Returns (output [C, B, H] in time order, h_n, c_n)."""
    output, h_n, c_n, _ = _onednn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, False)
    return output, h_n, c_n


def lstm_layer_train(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                     b_hh: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward of a whole LSTM layer for training by oneDNN's primitive (the "onednn" path), as torch.nn's
    CPU LSTM runs it. x: [T, B, I] in time order; h0, c0: [B, H]; ``reverse`` runs the steps from T-1 down
    to 0. Returns (output [T, B, H] in time order, h_n, c_n, workspace): the workspace (uint8, about
    60 bytes per step, row and hidden unit: the gates and states oneDNN's backward reads) is the kept state."""
    with torch.enable_grad():  # the primitive returns its workspace only with grad mode on
        return _onednn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, True)


def lstm_layer_backward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor], reverse: bool, output: Tensor, h_n: Tensor, c_n: Tensor,
                        workspace: Tensor, grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor):
    """The backward of :func:`lstm_layer_train` from its outputs and workspace. Returns the gradients of
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh), the biases' None without biases."""
    b_ih_, b_hh_, has_bias = _onednn_biases(x, b_ih, b_hh)
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = torch.ops.aten.mkldnn_rnn_layer_backward(
        x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih_, b_hh_, h0.contiguous(), c0.contiguous(),
        output.contiguous(), h_n.contiguous(), c_n.contiguous(), grad_output.contiguous(), grad_h_n.contiguous(),
        grad_c_n.contiguous(), reverse, ONEDNN_LSTM_MODE, h0.shape[-1], 1, has_bias, True, False, [], False,
        workspace)
    return dx, dh0, dc0, dw_ih, dw_hh, (db_ih if has_bias else None), (db_hh if has_bias else None)
