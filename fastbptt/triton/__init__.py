"""Triton backend (``backend="triton"``): fused recurrent kernels, one launch per chunk.

Implements the kernel contract of :mod:`fastbptt.reference` (the six ``*_forward`` /
``*_backward`` functions below) for tanh/relu RNN, GRU and LSTM (with or without projection) in
float32, float16 and bfloat16. The orchestrator (:mod:`fastbptt.ops.recurrence`) does the input
projection, the recompute and the weight gradients as large products around these kernels.

Importing this module never fails and never imports Triton's kernels: a missing Triton only
makes the backend unavailable, with the reason. The kernel modules are loaded on first use,
because ``triton.jit`` fixes at that moment whether they run compiled (CUDA) or in Triton's
interpreter (``TRITON_INTERPRET=1``, the only way they run on CPU tensors).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ..dispatch import BACKENDS

INSTALL = "pip install triton (or pip install 'fastbptt[triton]')"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(name: str = "triton") -> str:
    """'' when the Triton kernels can run here, else why not and how to fix it."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed; install it with `{INSTALL}`"
    if interpreter_requested():
        return ""  # not imported here: importing Triton is what fixes interpreted vs compiled
    if not torch.cuda.is_available():
        return ("no CUDA device is available, and Triton runs on CPU tensors only in its interpreter: "
                "set TRITON_INTERPRET=1 in the environment before Triton is first imported (the tests do this)")
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install or a Triton too old for this torch
        return f"Triton is installed but failed to import ({exc}); reinstall it with `{INSTALL}`"
    return ""


def supports(name: str, cell: str, dtype: torch.dtype, hidden_size: int, proj_size: int) -> str:
    """'' when the kernels take this case, else the reason (``backend="auto"`` then moves on)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (takes {', '.join(str(d) for d in DTYPES)})"
    return ""


def path_decline(name: str, path: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int,
                 proj_size: int) -> str:
    """'' when kernel ``path`` ("resident", "streamed") takes the case, else why not."""
    if path == "resident":
        from .common import MAX_BLOCK_N, fits_one_tile  # imports Triton: only once kernels are wanted

        if not fits_one_tile(hidden_size, proj_size or hidden_size):
            return f"hidden size {max(hidden_size, proj_size)} does not fit one {MAX_BLOCK_N}-wide tile"
    return ""


def _kernels(cell: str):
    return importlib.import_module(f"{__name__}.{cell}")


# The kernel contract of fastbptt.reference, with the kernel path as a last keyword; a direct call
# without one (tests) runs the backend's last path, which takes every case.
DEFAULT_PATH = BACKENDS["triton"].paths[-1].name


def rnn_forward(pre_in: Tensor, h0: Tensor, w_hh: Tensor, valid: Optional[Tensor], out: Tensor,
                relu: bool, path: str = DEFAULT_PATH) -> Tensor:
    return _kernels("rnn").rnn_forward(pre_in, h0, w_hh, valid, out, relu, path)


def rnn_backward(out: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor, valid: Optional[Tensor],
                 relu: bool, path: str = DEFAULT_PATH) -> tuple[Tensor, Tensor]:
    return _kernels("rnn").rnn_backward(out, w_hh, grad_out, grad_h_n, valid, relu, path)


def gru_forward(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], valid: Optional[Tensor],
                out: Tensor, gh_out: Optional[Tensor] = None, path: str = DEFAULT_PATH) -> Tensor:
    return _kernels("gru").gru_forward(gi, h0, w_hh, b_hh, valid, out, gh_out, path)


def gru_backward(gi: Tensor, gh: Tensor, h_prev: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor,
                 valid: Optional[Tensor], path: str = DEFAULT_PATH) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels("gru").gru_backward(gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid, path)


def lstm_forward(gates_in: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                 valid: Optional[Tensor], out: Tensor, gates_out: Optional[Tensor] = None,
                 path: str = DEFAULT_PATH) -> tuple[Tensor, Tensor]:
    return _kernels("lstm").lstm_forward(gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out, path)


def lstm_backward(gates: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], grad_out: Tensor,
                  grad_h_n: Tensor, grad_c_n: Tensor, valid: Optional[Tensor],
                  path: str = DEFAULT_PATH) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    return _kernels("lstm").lstm_backward(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid, path)
