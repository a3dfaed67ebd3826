"""Registers the recurrence ops with ``torch.library``: schema, implementation, fake kernel,
autograd formula. One table drives all four cell types."""
from __future__ import annotations

import torch
from torch.library import Library

from .. import cells
from .recurrence import _backward, _forward, saved_gate_width

LIB = Library("fastbptt", "FRAGMENT")

_RNN_ARGS = "Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh"
_LSTM_ARGS = ("Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
              "Tensor? bias_hh, Tensor? weight_hr")
_OPTIONS = "Tensor? lengths, bool reverse, int chunk_size, bool recompute, str backend"
_BWD_OPTIONS = "bool reverse, int chunk_size, str backend, bool[] output_mask"

# cell -> names of the differentiable tensor arguments, in schema order
_DIFF_ARGS = {
    "rnn": ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    "lstm": ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"),
}


def _kind(cell: str) -> str:
    return "lstm" if cell == "lstm" else "rnn"


def _define(cell: str) -> None:
    lstm = cell == "lstm"
    n_grads = len(_DIFF_ARGS[_kind(cell)])
    if lstm:
        LIB.define(f"lstm({_LSTM_ARGS}, {_OPTIONS}) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor c_chunks, "
                   f"Tensor gates)")
        LIB.define(f"lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, {_LSTM_ARGS}, "
                   f"Tensor? lengths, Tensor output, Tensor c_chunks, Tensor gates, {_BWD_OPTIONS}) -> "
                   f"({', '.join(['Tensor'] * n_grads)})")
    else:
        LIB.define(f"{cell}({_RNN_ARGS}, {_OPTIONS}) -> (Tensor output, Tensor h_n, Tensor gates)")
        LIB.define(f"{cell}_backward(Tensor grad_output, Tensor grad_h_n, {_RNN_ARGS}, Tensor? lengths, "
                   f"Tensor output, Tensor gates, {_BWD_OPTIONS}) -> ({', '.join(['Tensor'] * n_grads)})")

    # --- implementations (device-generic: the backend registry picks the kernels)
    if lstm:
        def forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse, chunk_size,
                    recompute, backend):
            return _forward(cell, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                            reverse, chunk_size, recompute, backend)

        def backward(grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                     weight_hr, lengths, output, c_chunks, gates, reverse, chunk_size, backend, output_mask):
            return _backward(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh, bias_ih,
                             bias_hh, weight_hr, lengths, output, c_chunks, gates, reverse, chunk_size, backend,
                             output_mask)
    else:
        def forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, chunk_size, recompute,
                    backend):
            return _forward(cell, input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None, lengths, reverse,
                            chunk_size, recompute, backend)

        def backward(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, output,
                     gates, reverse, chunk_size, backend, output_mask):
            return _backward(cell, grad_output, grad_h_n, None, input, hx, None, weight_ih, weight_hh, bias_ih,
                             bias_hh, None, lengths, output, None, gates, reverse, chunk_size, backend, output_mask)

    LIB.impl(cell, forward, "CompositeExplicitAutograd")
    LIB.impl(f"{cell}_backward", backward, "CompositeExplicitAutograd")

    # --- fake kernels: shapes only, for torch.compile and meta tensors
    def fake_forward(*args):
        input, hx = args[0], args[1]
        steps, batch = input.shape[0], input.shape[1]
        weight_hh = args[4] if lstm else args[3]
        chunk_size, recompute = args[-3], args[-2]
        hidden = weight_hh.shape[0] // cells.NUM_GATES[cell]
        width = 0 if recompute else saved_gate_width(cell, hidden)
        output = input.new_empty(steps, batch, hx.shape[-1])
        gates = input.new_empty(steps, batch, width) if width else input.new_empty(0)
        if lstm:
            n_chunks = (steps + chunk_size - 1) // chunk_size  # = len(chunk_bounds(...)), symbolic-friendly
            return output, torch.empty_like(hx), torch.empty_like(args[2]), input.new_empty(n_chunks, batch, hidden), gates
        return output, torch.empty_like(hx), gates

    def fake_backward(*args):
        first = 3 if lstm else 2
        tensors = args[first:first + n_grads]
        mask = args[-1]
        return tuple(torch.empty_like(t) if (wanted and t is not None) else args[first].new_empty(0)
                     for t, wanted in zip(tensors, mask))

    torch.library.register_fake(f"fastbptt::{cell}", fake_forward, lib=LIB)
    torch.library.register_fake(f"fastbptt::{cell}_backward", fake_backward, lib=LIB)

    # --- autograd
    def setup_context(ctx, inputs, output):
        diff = inputs[:n_grads]
        lengths, reverse, chunk_size, _recompute, backend = inputs[n_grads:]
        saved_outputs = (output[0], output[3], output[4]) if lstm else (output[0], output[2])
        ctx.save_for_backward(*diff, lengths, *saved_outputs)
        ctx.options = (reverse, chunk_size, backend)
        ctx.set_materialize_grads(True)

    def backward_formula(ctx, *grads):
        saved = ctx.saved_tensors
        diff, lengths, saved_outputs = saved[:n_grads], saved[n_grads], saved[n_grads + 1:]
        mask = [bool(m) and t is not None for m, t in zip(ctx.needs_input_grad[:n_grads], diff)]
        if not any(mask):
            return (None,) * (n_grads + 5)
        n_state_grads = 3 if lstm else 2
        op = getattr(torch.ops.fastbptt, f"{cell}_backward")
        result = op(*grads[:n_state_grads], *diff, lengths, *saved_outputs, *ctx.options, mask)
        return tuple(g if m else None for g, m in zip(result, mask)) + (None,) * 5

    torch.library.register_autograd(f"fastbptt::{cell}", backward_formula, setup_context=setup_context, lib=LIB)


for _cell in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
    _define(_cell)
