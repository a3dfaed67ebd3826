"""One step of a cell (torch.nn's RNNCell, GRUCell, LSTMCell) as a differentiable op.

A cell step is a layer's chunk of one step, so it runs on the same backends. The compiled ones
(``cpu``, ``cuda``) have their own ops, ``fastbptt::{rnn,gru,lstm}_cell`` and their
``*_backward`` (``csrc/cell_ops.cpp``): one call per step into C++, which runs the fused chunk
kernel on a one-step chunk plus the products around it, because a Python loop over a cell pays
its per-call overhead at every step. Their autograd formula and fake kernels are registered here.
Every other backend (``triton``, ``reference``) runs the step as a one-step layer
(:func:`fastbptt.ops.recurrent_layer`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cells, dispatch, native, reference
from . import check_parameters, in_functorch_transform, library, recurrent_layer

NATIVE_BACKENDS = ("cpu", "cuda")

# differentiable tensor arguments of the cell ops, in schema order
_ARGS = {False: ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"),
         True: ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")}


def cell_step(cell: str, input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *, cx: Optional[Tensor] = None,
              backend: str = "auto"):
    """One step of ``cell``. input: [B, I]; hx, cx (LSTM): [B, H]; weight_ih: [G*H, I];
    weight_hh: [G*H, H]; bias_*: [G*H]. Returns hy [B, H], or (hy, cy) for LSTM."""
    spec = cells.spec(cell)
    dispatch.check_backend_name(backend)
    check_cell_args(spec, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    return run_cell_step(spec, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, cx, backend)


def run_cell_step(spec: cells.CellSpec, input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                  bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], cx: Optional[Tensor], backend: str):
    """:func:`cell_step` on arguments already checked (the modules check them with torch.nn's messages)."""
    cell = spec.name
    if in_functorch_transform((input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)):
        result = reference.layer(cell, input[None], hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, None, None, False)
        return result[1:] if spec.has_cell_state else result[1]
    kernel = dispatch.cell_kernel(backend, cell, input.device.type, input.dtype, input.shape[0], hx.shape[1])
    name, path = dispatch.split(kernel)
    if name not in NATIVE_BACKENDS:
        result = recurrent_layer(cell, input[None], hx, weight_ih, weight_hh, bias_ih, bias_hh, cx=cx, chunk_size=1,
                                 recompute=False, backend=kernel)
        return result[1:] if spec.has_cell_state else result[1]
    if spec.kernel == "lstm":
        hy, cy, _ = torch.ops.fastbptt.lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, path)
        return hy, cy
    if spec.kernel == "gru":
        return torch.ops.fastbptt.gru_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, path)[0]
    return torch.ops.fastbptt.rnn_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, spec.relu, path)


def check_cell_args(spec: cells.CellSpec, input: Tensor, hx: Tensor, cx: Optional[Tensor], weight_ih: Tensor,
                    weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> None:
    if input.dim() != 2:
        raise RuntimeError(f"input must have 2 dimensions [B, input_size], got {input.dim()}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating point tensor, got {input.dtype}")
    check_parameters(spec, "cell", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)


# ----------------------------------------------------------------------------- autograd of the native ops

def _double_backward(cell: str, diff: tuple, grads: tuple, mask: list) -> list:
    """Gradients that can themselves be differentiated: the layer ops' formula on a one-step layer."""
    lstm = cells.SPECS[cell].has_cell_state
    layer_diff = (diff[0][None],) + tuple(diff[1:]) + ((None,) if lstm else ())   # + weight_hr
    layer_mask = list(mask) + ([False] if lstm else [])
    state_grads = tuple(torch.zeros_like(g) if g is None else g for g in grads)
    output_grad = torch.zeros_like(state_grads[0])[None]
    result = library._differentiable_backward(cell, layer_diff, None, (output_grad,) + state_grads, layer_mask, False)
    if result[0] is not None:
        result[0] = result[0][0]
    return result[:len(diff)]


def _register(cell_op: str, cell: str) -> None:
    """Autograd for ``fastbptt::{cell_op}``: the native backward op, or the differentiable formula
    when a graph of the gradients is asked for."""
    lstm = cells.SPECS[cell].has_cell_state
    n_diff = len(_ARGS[lstm])
    backward_op = getattr(torch.ops.fastbptt, f"{cell_op}_backward")

    def setup_context(ctx, inputs, output):
        diff, options = inputs[:n_diff], inputs[n_diff:]
        if cell_op == "rnn_cell":
            saved = (output,)
        else:  # the gate pre-activations the backward reads
            saved = output[2:] if lstm else output[1:]
            ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(*diff, *saved)
        ctx.options = options    # (relu, path) for the RNN, (path,) otherwise
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        diff, kept = saved[:n_diff], saved[n_diff:]
        mask = [bool(m) and t is not None for m, t in zip(ctx.needs_input_grad[:n_diff], diff)]
        state_grads = grads[:2] if lstm else grads[:1]
        if not any(mask) or all(g is None for g in state_grads):
            return (None,) * len(ctx.needs_input_grad)
        if torch.is_grad_enabled():  # a graph of the gradients is wanted: double backward
            name = ("rnn_relu" if ctx.options[0] else "rnn_tanh") if cell_op == "rnn_cell" else cell
            result = _double_backward(name, diff, state_grads, mask)
        else:  # backward_op(state grads, tensors but the biases, what the forward kept, [relu], mask, path)
            state_grads = tuple(torch.zeros_like(diff[1]) if g is None else g for g in state_grads)
            *flags, path = ctx.options
            result = backward_op(*state_grads, *diff[:-2], *kept, *flags, mask, path)
        grads_out = tuple(g if m else None for g, m in zip(result, mask))
        return grads_out + (None,) * (len(ctx.needs_input_grad) - n_diff)

    torch.library.register_autograd(f"fastbptt::{cell_op}", backward, setup_context=setup_context)


if native._C is not None:
    _register("rnn_cell", "rnn_tanh")   # tanh or relu: a flag of the op
    _register("gru_cell", "gru")
    _register("lstm_cell", "lstm")
