"""Chunk-recompute autograd ops, one per cell type, registered with ``torch.library``.

``fastbptt::{rnn_tanh, rnn_relu, gru, lstm}`` run one layer in one direction over a whole
``[T, B, I]`` sequence; ``fastbptt::*_backward`` are their gradients. Both are opaque custom
ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through a
model that uses them.

What the forward keeps for the backward (recompute on, the default): the input, the output,
the initial state and, for LSTM, the cell state at each chunk boundary. The backward walks the
chunks in reverse; per chunk it

1. recomputes the gate pre-activations as two big products: ``gi = x W_ih^T`` and
   ``gh = h_prev W_hh^T``, where ``h_prev`` is the saved output shifted by one step;
2. runs the backend's sequential backward kernel (the only per-step work);
3. accumulates ``dW_ih``, ``dW_hh`` and the biases as ``[G*H, C*B] x [C*B, *]`` products and
   computes ``dx = d_gi W_ih`` for the chunk.

With recompute off the forward also keeps the gate pre-activations (more memory, no step 1).
All time loops here run in *processing order*; the reverse direction flips chunks on the way in
and out, and a variable-length batch is a ``valid: [T, B]`` mask (see :mod:`fastbptt.reference`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import cells, dispatch
from ..reference import valid_mask

EMPTY = (0,)


# ----------------------------------------------------------------------------- helpers

def chunk_bounds(steps: int, chunk_size: int) -> list[tuple[int, int]]:
    """The fewest chunks of at most ``chunk_size`` steps, of equal length to within one step.

    Equal chunks rather than full ones and a remainder: a short last chunk (35 steps in chunks of 32:
    32 + 3) runs its products on a few rows, at a fraction of the rate, and pays every per-chunk cost
    for little work. The count, and so the memory bound, is that of full chunks. The first chunk is
    a longest one (buffers reused by every chunk are sized by it).
    """
    count = -(-steps // chunk_size)
    starts = [-(-steps * k // count) for k in range(count)] + [steps]
    return list(zip(starts[:-1], starts[1:]))


def time_slice(t: Tensor, s0: int, s1: int, reverse: bool) -> Tensor:
    """Rows s0..s1 of ``t`` in processing order (a view forward, a flipped copy in reverse)."""
    steps = t.shape[0]
    return t[steps - s1:steps - s0].flip(0) if reverse else t[s0:s1]


def previous_states(out_p: Tensor, h0: Tensor, valid: Optional[Tensor], s0: int, s1: int) -> Tensor:
    """h_prev: [C, B, P], the state each step of the chunk started from.

    The output of step s-1, except where that step was padding: a row's padding precedes its
    real steps only in reverse processing, and there the state was still h0.
    """
    prev = out_p[s0 - 1:s1 - 1] if s0 > 0 else torch.cat([h0[None], out_p[:s1 - 1]])
    if valid is None:
        return prev
    prev_valid = valid[s0 - 1:s1 - 1] if s0 > 0 else torch.cat([valid.new_zeros(1, valid.shape[1]), valid[:s1 - 1]])
    return torch.where(prev_valid[..., None], prev, h0)


def input_bias(spec: cells.CellSpec, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None:
        return None
    return b_ih + b_hh if spec.folds_hidden_bias else b_ih


def flatten(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out = x W^T (+ bias)`` written into the contiguous ``out: [..., N]`` (no temporary)."""
    out2, x2 = out.view(-1, out.shape[-1]), flatten(x)
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)
    return out


class _GradAccumulator:
    """Weight and bias gradients summed over chunks, in place: float32/64 inputs accumulate in
    their own dtype (exact sums), float16/bfloat16 in float32."""

    def __init__(self, like: Tensor, wanted: bool):
        self.wanted = wanted
        self.total = None
        self.like = like
        self.low_precision = like.dtype in (torch.float16, torch.bfloat16)

    def add_product(self, a: Tensor, b: Tensor) -> None:   # a: [C, B, N], b: [C, B, K] -> [N, K]
        if not self.wanted:
            return
        a2, b2 = flatten(a).t(), flatten(b)
        if self.low_precision:  # products and sums in float32, rounded once in result()
            a2, b2 = a2.float(), b2.float()
        if self.total is None:
            self.total = a2 @ b2
        else:
            self.total.addmm_(a2, b2)

    def row_sum(self, a: Tensor) -> Tensor:                # a: [C, B, N] -> [N], in the accumulation dtype
        return flatten(a).sum(0, dtype=torch.float32 if self.low_precision else None)

    def add(self, t: Optional[Tensor]) -> None:
        if self.wanted and t is not None:
            self._add(t)

    def _add(self, t: Tensor) -> None:
        if self.total is None:
            self.total = t.float() if self.low_precision else t
        else:
            self.total.add_(t)

    def result(self) -> Tensor:
        if not self.wanted:
            return self.like.new_empty(EMPTY)
        return (self.total if self.total is not None else torch.zeros_like(self.like)).to(self.like.dtype)


def add_bias_sums(acc_ih: _GradAccumulator, acc_hh: _GradAccumulator, d_in: Tensor, d_hid: Tensor) -> None:
    """The bias gradients of a block of steps: row sums of the gate gradients ``d_in`` (of x W_ih^T + b_ih)
    and ``d_hid`` (of h W_hh^T + b_hh); one sum serves both where they are one tensor (RNN, LSTM)."""
    if acc_ih.wanted or acc_hh.wanted:
        sum_in = acc_ih.row_sum(d_in)
        acc_ih.add(sum_in)
        # a copy: the first tensor an accumulator gets becomes its running total, summed into in place
        acc_hh.add(sum_in.clone() if d_hid is d_in else acc_hh.row_sum(d_hid))


# ----------------------------------------------------------------------------- forward

def gru_gate_store(gates: Tensor) -> tuple[Tensor, Tensor]:
    """The GRU's saved ``gates: [T, B, 6H]`` buffer read as (gi [T, B, 3H], gh [T, B, 3H]), each
    contiguous: the storage holds all of gi, then all of gh, so kernels write straight into it."""
    steps, batch, width = gates.shape
    store = gates.view(2, steps, batch, width // 2)
    return store[0], store[1]


def _forward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
             reverse: bool, chunk_size: int, recompute: bool, backend: str):
    spec = cells.SPECS[cell]
    steps, batch, _ = x.shape
    hidden = w_hh.shape[0] // spec.num_gates
    kern = dispatch.bound_kernels(backend, cell, x.dtype, batch, hidden, 0 if w_hr is None else w_hr.shape[0])
    if getattr(kern, "whole_layer", False):
        if lengths is not None:
            raise RuntimeError(f"fastbptt backend {backend!r} runs layers without variable lengths only")
        if recompute:  # nothing kept: inference
            return _whole_layer_inference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, chunk_size, backend)
        return _whole_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, chunk_size, backend)
    valid = valid_mask(lengths, steps, reverse, x.device)
    out_p = x.new_empty(steps, batch, h0.shape[-1])
    width = 0 if recompute else spec.saved_width(hidden)
    gates = x.new_empty(steps, batch, width) if width else x.new_empty(EMPTY)
    gi_store, gh_store = gru_gate_store(gates) if width and spec.kernel == "gru" else (None, None)
    bias = input_bias(spec, b_ih, b_hh)
    w_hh, w_hr = w_hh.contiguous(), (None if w_hr is None else w_hr.contiguous())
    h, c = h0.contiguous(), (None if c0 is None else c0.contiguous())
    bounds = chunk_bounds(steps, chunk_size)
    # the cell state at every chunk boundary, the last one included
    c_chunks = x.new_empty(len(bounds) + 1, batch, hidden) if spec.has_cell_state else None
    gate_cols = spec.num_gates * hidden
    gi_buf = x.new_empty(bounds[0][1], batch, gate_cols) if gi_store is None else None  # reused by every chunk
    for k, (s0, s1) in enumerate(bounds):
        # the input projection of the chunk, straight into the saved gates with recompute off
        gi = gi_store[s0:s1] if gi_store is not None else gi_buf[:s1 - s0]
        linear_into(gi, time_slice(x, s0, s1, reverse), w_ih, bias)
        v = None if valid is None else valid[s0:s1]
        out = out_p[s0:s1]
        if spec.kernel == "gru":
            h = kern.gru_forward(gi, h, w_hh, b_hh, v, out, None if gh_store is None else gh_store[s0:s1])
        elif spec.kernel == "lstm":
            c_chunks[k] = c
            h, c = kern.lstm_forward(gi, h, c, w_hh, w_hr, v, out, gates[s0:s1] if width else None)
        else:
            h = kern.rnn_forward(gi, h, w_hh, v, out, spec.relu)
    out = out_p.flip(0) if reverse else out_p
    if spec.has_cell_state:
        c_chunks[-1] = c
        return out, h, c, c_chunks, gates
    return out, h, gates


def _whole_layer_inference(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                           b_hh: Optional[Tensor], reverse: bool, chunk_size: int, backend: str):
    """LSTM inference by a whole-layer path (oneDNN's primitive): one call per chunk, input projection
    included, in time order (the primitive runs the reverse direction itself, so nothing is flipped). A
    single chunk's output is the layer's, not copied; c_chunks holds the cell state at every chunk boundary."""
    steps, batch = x.shape[0], x.shape[1]
    bounds = chunk_bounds(steps, chunk_size)
    run_chunk = dispatch.kernels(backend).lstm_layer_chunk
    out = x.new_empty(steps, batch, h0.shape[-1]) if len(bounds) > 1 else None
    c_chunks = x.new_empty(len(bounds) + 1, batch, c0.shape[-1])
    h, c = h0, c0
    for k, (s0, s1) in enumerate(bounds):
        c_chunks[k] = c
        t0, t1 = (steps - s1, steps - s0) if reverse else (s0, s1)  # the chunk's steps in time order
        chunk_out, h, c = run_chunk(x[t0:t1], h, c, w_ih, w_hh, b_ih, b_hh, reverse)
        if out is None:
            out = chunk_out
        else:
            out[t0:t1] = chunk_out
    c_chunks[-1] = c
    return out, h, c, c_chunks, x.new_empty(EMPTY)


def _whole_layer_forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                         b_hh: Optional[Tensor], reverse: bool, chunk_size: int, backend: str):
    """An LSTM layer trained by a whole-layer path (oneDNN's primitive): one call over all steps, its
    workspace kept in place of the gates; c_chunks holds the layer's first and last cell states."""
    if chunk_size < x.shape[0]:
        raise RuntimeError(f"fastbptt backend {backend!r} trains a layer as one chunk (chunk_size >= steps); got "
                           f"chunk_size={chunk_size} for {x.shape[0]} steps")
    out, h_n, c_n, workspace = dispatch.kernels(backend).lstm_layer_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    return out, h_n, c_n, torch.stack([c0, c_n]), workspace


def _whole_layer_backward(grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Tensor,
                          c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                          out: Tensor, c_chunks: Tensor, workspace: Tensor, reverse: bool, backend: str,
                          output_mask: Sequence[bool]):
    """The backward of :func:`_whole_layer_forward`; h_n is the output's last step in processing order."""
    h_n = out[0] if reverse else out[-1]
    grads = dispatch.kernels(backend).lstm_layer_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, out, h_n,
                                                          c_chunks[-1], workspace, grad_out, grad_h_n, grad_c_n)
    grads += (None,)  # weight_hr: the path declines projections
    return tuple(g if wanted and g is not None else x.new_empty(EMPTY) for g, wanted in zip(grads, output_mask))


# ----------------------------------------------------------------------------- backward

def _backward(cell: str, grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor], x: Tensor, h0: Tensor,
              c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], lengths: Optional[Tensor], out: Tensor, c_chunks: Optional[Tensor],
              gates: Tensor, reverse: bool, chunk_size: int, recompute: bool, backend: str,
              output_mask: Sequence[bool]):
    """Returns gradients for (x, h0, [c0], w_ih, w_hh, b_ih, b_hh, [w_hr]); empty where not wanted.
    ``gates`` is what the forward kept with recompute off (empty with it on)."""
    spec = cells.SPECS[cell]
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[0] // spec.num_gates
    kern = dispatch.bound_kernels(backend, cell, x.dtype, batch, hidden, 0 if w_hr is None else w_hr.shape[0])
    if getattr(kern, "whole_layer", False):
        if recompute:
            raise RuntimeError(f"fastbptt backend {backend!r} trains only keeping its workspace (recompute=False): "
                               f"it cannot recompute a layer")
        return _whole_layer_backward(grad_out, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, c_chunks,
                                     gates, reverse, backend, output_mask)
    lstm, gru = spec.has_cell_state, spec.kernel == "gru"
    want_x, want_h0 = output_mask[0], output_mask[1]
    want_c0 = output_mask[2] if lstm else False
    rest = output_mask[3:] if lstm else output_mask[2:]
    want_w_ih, want_w_hh, want_b_ih, want_b_hh = rest[:4]
    want_w_hr = lstm and w_hr is not None and rest[4]
    valid = valid_mask(lengths, steps, reverse, x.device)
    out_p = out.flip(0) if reverse else out
    grad_out_p = (grad_out.flip(0) if reverse else grad_out).contiguous()
    bias = input_bias(spec, b_ih, b_hh)
    w_hh_c, w_hr_c = w_hh.contiguous(), (None if w_hr is None else w_hr.contiguous())

    grad_x = torch.empty_like(x) if want_x else x.new_empty(EMPTY)  # x's strides, as the fake kernel says
    acc_w_ih, acc_w_hh = _GradAccumulator(w_ih, want_w_ih), _GradAccumulator(w_hh, want_w_hh)
    acc_b_ih = _GradAccumulator(b_ih if b_ih is not None else w_ih, want_b_ih and b_ih is not None)
    acc_b_hh = _GradAccumulator(b_hh if b_hh is not None else w_ih, want_b_hh and b_hh is not None)
    acc_w_hr = _GradAccumulator(w_hr if w_hr is not None else w_ih, want_w_hr)
    dh = grad_h_n.contiguous()
    dc = grad_c_n.contiguous() if lstm else None

    bounds = chunk_bounds(steps, chunk_size)
    gi_store, gh_store = gru_gate_store(gates) if gru and not recompute else (None, None)
    # recomputed pre-activations of a chunk, one buffer reused by every chunk: [C, B, G*H] (GRU: gi and gh;
    # the RNN's backward needs only its outputs)
    recompute_buf = (x.new_empty(2 if gru else 1, bounds[0][1], batch, w_hh.shape[0])
                     if recompute and spec.saved_per_unit else None)
    for k in reversed(range(len(bounds))):
        s0, s1 = bounds[k]
        x_c = time_slice(x, s0, s1, reverse)
        x_c = x_c.reshape(-1, x_c.shape[-1])  # [C*B, I], copied once only if x is strided
        v = None if valid is None else valid[s0:s1]
        g_out = grad_out_p[s0:s1]
        need_h_prev = gru or want_w_hh or (lstm and recompute)
        h_prev = previous_states(out_p, h0, valid, s0, s1) if need_h_prev else None
        if gru:
            if recompute:
                gi = linear_into(recompute_buf[0, :s1 - s0], x_c, w_ih, bias)
                gh = linear_into(recompute_buf[1, :s1 - s0], h_prev, w_hh, b_hh)
            else:
                gi, gh = gi_store[s0:s1], gh_store[s0:s1]
            d_gi, d_gh, dh = kern.gru_backward(gi, gh, h_prev.contiguous(), w_hh_c, g_out, dh, v)
        elif lstm:
            if recompute:  # all gate pre-activations of the chunk: x W_ih^T + b + h_prev W_hh^T
                pre = linear_into(recompute_buf[0, :s1 - s0], x_c, w_ih, bias)
                flatten(pre).addmm_(flatten(h_prev), w_hh.t())
            else:
                pre = gates[s0:s1]
            d_gi, dh, dc, d_w_hr = kern.lstm_backward(pre, c_chunks[k].contiguous(), w_hh_c, w_hr_c, g_out, dh, dc, v)
            d_gh = d_gi
            acc_w_hr.add(d_w_hr)
        else:
            d_gi, dh = kern.rnn_backward(out_p[s0:s1].contiguous(), w_hh_c, g_out, dh, v, spec.relu)
            d_gh = d_gi
        acc_w_ih.add_product(d_gi, x_c)
        if want_w_hh:
            acc_w_hh.add_product(d_gh, h_prev)
        add_bias_sums(acc_b_ih, acc_b_hh, d_gi, d_gh)
        if want_x:
            if not reverse and grad_x.is_contiguous():
                torch.mm(flatten(d_gi), w_ih, out=grad_x[s0:s1].view(-1, w_ih.shape[1]))
            else:
                dx = (flatten(d_gi) @ w_ih).view(s1 - s0, batch, -1)
                if reverse:
                    grad_x[steps - s1:steps - s0] = dx.flip(0)
                else:
                    grad_x[s0:s1] = dx
    grads = [grad_x, dh if want_h0 else x.new_empty(EMPTY)]
    if lstm:
        grads.append(dc if want_c0 else x.new_empty(EMPTY))
    grads += [acc_w_ih.result(), acc_w_hh.result(), acc_b_ih.result(), acc_b_hh.result()]
    if lstm:
        grads.append(acc_w_hr.result())
    return tuple(grads)
