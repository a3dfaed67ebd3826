"""Plain-PyTorch reference backend: the oracle for every fused kernel.

Every backend implements the same six functions with the same signatures. They cover only
the *sequential* part of a layer over one chunk of ``C`` steps; the autograd op
(:mod:`fastbptt.ops.recurrence`) does the parallel part (input projection, recompute of the
gate pre-activations, weight gradients) as large matrix products around them.

The kernel contract
-------------------
* Tensors are in *processing order* (already flipped for the reverse direction), contiguous,
  all of one floating dtype and on one device. ``B`` batch, ``H`` hidden, ``P`` the LSTM's
  output size (``P = H`` without projection).
* ``valid: [C, B] bool`` or ``None`` (every row valid). At an invalid step a row keeps its
  state, writes zeros to ``out`` and gets no gate gradient; the carried state gradient passes
  through unchanged. This handles variable-length batches in both directions.
* Forward kernels write ``out`` in place and return fresh final-state tensors.
* Backward kernels take the gradient of the chunk's outputs and of its final state and
  return the gate gradients of the chunk and the gradient of its initial state.
* Low-precision inputs (bfloat16, float16) are computed in float32 and rounded once on the way
  out, by the reference as by the fused kernels.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from . import cells

LOW_PRECISION = (torch.float16, torch.bfloat16)


def float32_compute(kernel):
    """Runs ``kernel`` in float32 when given float16/bfloat16 tensors, rounding once on the way
    out; the in-place outputs (``out``, ``gh_out``, ``gates_out``) are written back."""
    names = list(inspect.signature(kernel).parameters)
    in_place = [i for i, n in enumerate(names) if n in ("out", "gh_out", "gates_out")]

    @functools.wraps(kernel)
    def wrapper(*args):
        dtype = args[0].dtype
        if dtype not in LOW_PRECISION:
            return kernel(*args)
        up = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        result = kernel(*up)
        for i in in_place:
            if i < len(args) and args[i] is not None:
                args[i].copy_(up[i])
        down = lambda t: t.to(dtype) if isinstance(t, Tensor) else t
        return tuple(map(down, result)) if isinstance(result, tuple) else down(result)
    return wrapper


def valid_mask(lengths: Optional[Tensor], steps: int, reverse: bool, device: torch.device) -> Optional[Tensor]:
    """[T, B] bool in processing order: step t of row b is real iff t < lengths[b] in time order."""
    if lengths is None:
        return None
    mask = torch.arange(steps, device=device)[:, None] < lengths.to(device)[None, :]
    return mask.flip(0).contiguous() if reverse else mask


def _keep(valid: Optional[Tensor], t: int, new: Tensor, old: Tensor) -> Tensor:
    """Rows that are invalid at step t keep their old state."""
    return new if valid is None else torch.where(valid[t, :, None], new, old)


def _zero_invalid(valid: Optional[Tensor], t: int, x: Tensor) -> Tensor:
    return x if valid is None else x * valid[t, :, None].to(x.dtype)


@float32_compute
def rnn_forward(pre_in: Tensor, h0: Tensor, w_hh: Tensor, valid: Optional[Tensor], out: Tensor,
                relu: bool) -> Tensor:
    """pre_in: [C, B, H] = x W_ih^T + b_ih + b_hh; h0: [B, H]; w_hh: [H, H]; out: [C, B, H].

    Returns h_n: [B, H].
    """
    h = h0
    for t in range(pre_in.shape[0]):
        h = _keep(valid, t, cells.rnn_step(pre_in[t] + h @ w_hh.t(), relu), h)
        out[t] = _zero_invalid(valid, t, h)
    return h.clone()


@float32_compute
def rnn_backward(out: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor,
                 valid: Optional[Tensor], relu: bool) -> tuple[Tensor, Tensor]:
    """out: [C, B, H] this chunk's outputs. Returns (grad_pre [C, B, H], grad_h0 [B, H])."""
    grad_pre = torch.empty_like(out)
    dh = grad_h_n
    for t in reversed(range(out.shape[0])):
        d_pre = _zero_invalid(valid, t, cells.rnn_step_backward(out[t], dh + grad_out[t], relu))
        grad_pre[t] = d_pre
        dh = _keep(valid, t, d_pre @ w_hh, dh)
    return grad_pre, dh.clone()


@float32_compute
def gru_forward(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], valid: Optional[Tensor],
                out: Tensor, gh_out: Optional[Tensor] = None) -> Tensor:
    """gi: [C, B, 3H] = x W_ih^T + b_ih; h0: [B, H]; w_hh: [3H, H]; b_hh: [3H] or None.

    Writes out: [C, B, H] and, when given, gh_out: [C, B, 3H] = h_{t-1} W_hh^T + b_hh.
    Returns h_n: [B, H].
    """
    h = h0
    for t in range(gi.shape[0]):
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        if gh_out is not None:
            gh_out[t] = gh
        h = _keep(valid, t, cells.gru_step(gi[t], gh, h), h)
        out[t] = _zero_invalid(valid, t, h)
    return h.clone()


@float32_compute
def gru_backward(gi: Tensor, gh: Tensor, h_prev: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor,
                 valid: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """gi, gh: [C, B, 3H]; h_prev: [C, B, H] the state each step started from.

    Returns (grad_gi [C, B, 3H], grad_gh [C, B, 3H], grad_h0 [B, H]).
    """
    grad_gi, grad_gh = torch.empty_like(gi), torch.empty_like(gh)
    dh = grad_h_n
    for t in reversed(range(gi.shape[0])):
        d_gi, d_gh, dh_direct = cells.gru_step_backward(gi[t], gh[t], h_prev[t], dh + grad_out[t])
        grad_gi[t] = _zero_invalid(valid, t, d_gi)
        grad_gh[t] = _zero_invalid(valid, t, d_gh)
        dh = _keep(valid, t, dh_direct + d_gh @ w_hh, dh)
    return grad_gi, grad_gh, dh.clone()


@float32_compute
def lstm_forward(gates_in: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                 valid: Optional[Tensor], out: Tensor, gates_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """gates_in: [C, B, 4H] = x W_ih^T + b_ih + b_hh; h0: [B, P]; c0: [B, H]; w_hh: [4H, P];
    w_hr: [P, H] or None. Writes out: [C, B, P] and, when given, gates_out: [C, B, 4H] (the full
    pre-activations). Returns (h_n [B, P], c_n [B, H]).
    """
    h, c = h0, c0
    for t in range(gates_in.shape[0]):
        gates = gates_in[t] + h @ w_hh.t()
        if gates_out is not None:
            gates_out[t] = gates
        m, c_new = cells.lstm_step(gates, c)
        h_new = m if w_hr is None else m @ w_hr.t()
        h, c = _keep(valid, t, h_new, h), _keep(valid, t, c_new, c)
        out[t] = _zero_invalid(valid, t, h)
    return h.clone(), c.clone()


@float32_compute
def lstm_backward(gates: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], grad_out: Tensor,
                  grad_h_n: Tensor, grad_c_n: Tensor,
                  valid: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """gates: [C, B, 4H] full pre-activations; c0: [B, H] the cell state at the chunk's start.

    Recomputes the chunk's cell states from c0, then walks back. Returns
    (grad_gates [C, B, 4H], grad_h0 [B, P], grad_c0 [B, H], grad_w_hr [P, H] or None).
    """
    steps = gates.shape[0]
    c_states = [c0]  # c_states[t] is the state step t started from
    for t in range(steps):
        _, c_new = cells.lstm_step(gates[t], c_states[-1])
        c_states.append(_keep(valid, t, c_new, c_states[-1]))
    grad_gates = torch.empty_like(gates)
    grad_w_hr = None if w_hr is None else torch.zeros_like(w_hr)
    dh, dc = grad_h_n, grad_c_n
    for t in reversed(range(steps)):
        dh_t = _zero_invalid(valid, t, dh + grad_out[t])
        c_prev, c = c_states[t], c_states[t + 1]
        if w_hr is None:
            dm = dh_t
        else:
            m = torch.sigmoid(gates[t].chunk(4, -1)[3]) * torch.tanh(c)
            grad_w_hr += dh_t.t() @ m
            dm = dh_t @ w_hr
        d_gates, dc_prev = cells.lstm_step_backward(gates[t], c_prev, c, dm, _zero_invalid(valid, t, dc))
        grad_gates[t] = d_gates
        dh = _keep(valid, t, d_gates @ w_hh, dh)
        dc = _keep(valid, t, dc_prev, dc)
    return grad_gates, dh.clone(), dc.clone(), grad_w_hr


# ----------------------------------------------------------------------------- whole layer, differentiable

def layer(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
          b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
          reverse: bool) -> tuple[Tensor, ...]:
    """One layer in one direction as plain autograd ops, differentiable to any order: the backward
    of the fused ops when a graph of the gradients is asked for (``create_graph=True``,
    ``torch.func.grad``, hessians).

    x: [T, B, I] in time order; the arguments as in :func:`fastbptt.ops.recurrent_layer`.
    Returns (output [T, B, P], h_n [B, P]) and, for LSTM, c_n [B, H].
    """
    spec = cells.SPECS[cell]
    steps = x.shape[0]
    valid = valid_mask(lengths, steps, False, x.device)  # time order: the loop below indexes by time
    gi = torch.nn.functional.linear(x, w_ih, b_ih)  # [T, B, G*H]
    h, c = h0, c0
    outputs = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        if spec.kernel == "gru":
            h_new = cells.gru_step(gi[t], gh, h)
        elif spec.kernel == "lstm":
            m, c_new = cells.lstm_step(gi[t] + gh, c)
            h_new = m if w_hr is None else m @ w_hr.t()
            c = _keep(valid, t, c_new, c)
        else:
            h_new = cells.rnn_step(gi[t] + gh, spec.relu)
        h = _keep(valid, t, h_new, h)
        outputs[t] = _zero_invalid(valid, t, h)
    output = torch.stack(outputs)
    return (output, h, c) if spec.has_cell_state else (output, h)
