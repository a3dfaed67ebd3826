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
    def _rnn_forward(pre_in, h0, w_hh, valid, out, relu):
        return torch.empty_like(h0)

    @fake("fastbptt::rnn_backward_chunk")
    def _rnn_backward(out, w_hh, grad_out, grad_h_n, valid, relu):
        return torch.empty_like(out), torch.empty_like(grad_h_n)

    @fake("fastbptt::gru_forward_chunk")
    def _gru_forward(gi, h0, w_hh, b_hh, valid, out, gh_out):
        return torch.empty_like(h0)

    @fake("fastbptt::gru_backward_chunk")
    def _gru_backward(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid):
        return torch.empty_like(gi), torch.empty_like(gh), torch.empty_like(grad_h_n)

    @fake("fastbptt::lstm_forward_chunk")
    def _lstm_forward(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out):
        return torch.empty_like(h0), torch.empty_like(c0)

    @fake("fastbptt::lstm_backward_chunk")
    def _lstm_backward(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid):
        grad_w_hr = torch.empty_like(w_hr) if w_hr is not None else gates.new_empty(0)
        return torch.empty_like(gates), torch.empty_like(grad_h_n), torch.empty_like(c0), grad_w_hr


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


def rnn_forward(pre_in: Tensor, h0: Tensor, w_hh: Tensor, valid: Optional[Tensor], out: Tensor, relu: bool) -> Tensor:
    return torch.ops.fastbptt.rnn_forward_chunk(pre_in, h0, w_hh, valid, out, relu)


def rnn_backward(out, w_hh, grad_out, grad_h_n, valid, relu):
    return torch.ops.fastbptt.rnn_backward_chunk(out, w_hh, grad_out, grad_h_n, valid, relu)


def gru_forward(gi, h0, w_hh, b_hh, valid, out, gh_out=None):
    return torch.ops.fastbptt.gru_forward_chunk(gi, h0, w_hh, b_hh, valid, out, gh_out)


def gru_backward(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid):
    return torch.ops.fastbptt.gru_backward_chunk(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid)


def lstm_forward(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out=None):
    return torch.ops.fastbptt.lstm_forward_chunk(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out)


def lstm_backward(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid):
    grad_gates, grad_h0, grad_c0, grad_w_hr = torch.ops.fastbptt.lstm_backward_chunk(
        gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid)
    return grad_gates, grad_h0, grad_c0, (grad_w_hr if w_hr is not None else None)
