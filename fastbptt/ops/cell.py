"""One step of a cell (torch.nn's RNNCell, GRUCell, LSTMCell) as a differentiable op.

A cell step is a layer's chunk of one step, so it runs on the same backends. The compiled ones
(``cpu``, ``cuda``) have their own ops, ``fastbptt::{rnn,gru,lstm}_cell`` and their
``*_backward`` (``csrc/cell_ops.cpp``): one call per step into C++, which runs the fused chunk
kernel on a one-step chunk plus the products around it, because a Python loop over a cell pays
its per-call overhead at every step. Their autograd formula (for torch.compile) and fake kernels
are registered here. In eager mode a step goes straight to C++ (``fastbptt._C.cell_step``), where
the steps of a training loop form chains (``csrc/cell_chain.cpp``) that sum their weight gradients
together; second derivatives there run :func:`_double_backward`. Every other backend
(``triton``, ``reference``) runs the step as a one-step layer (:func:`fastbptt.ops.recurrent_layer`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cells, dispatch, native, reference
from . import check_parameters, in_functorch_transform, library, recurrent_layer

NATIVE_BACKENDS = ("cpu", "cuda")


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
    if torch.compiler.is_compiling():   # the op with its registered autograd, which torch.compile traces
        op = _NATIVE_OPS[spec.kernel]
        options = (spec.relu, path) if op.is_rnn else (path,)
        args = (input, hx) + ((cx,) if op.lstm else ()) + (weight_ih, weight_hh, bias_ih, bias_hh)
        output = op.forward(*args, *options)
        return output if op.is_rnn else tuple(output[:op.n_states]) if op.lstm else output[0]
    # eager: the op, or in training a step of a chain (csrc/cell_chain.cpp), all in C++
    output = native._C.cell_step(cell, path, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    return tuple(output) if spec.has_cell_state else output[0]


def check_cell_args(spec: cells.CellSpec, input: Tensor, hx: Tensor, cx: Optional[Tensor], weight_ih: Tensor,
                    weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> None:
    if input.dim() != 2:
        raise RuntimeError(f"input must have 2 dimensions [B, input_size], got {input.dim()}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating point tensor, got {input.dtype}")
    check_parameters(spec, "cell", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)


# ----------------------------------------------------------------------------- autograd of the native ops

class _NativeOp:
    """A native cell op and its backward: the differentiable arguments (schema order), what the
    forward returns for the backward to read, and how the backward op is called."""

    def __init__(self, cell_op: str, cell: str):
        self.lstm = cells.SPECS[cell].has_cell_state
        self.cell = cell
        self.forward = getattr(torch.ops.fastbptt, cell_op)
        self.backward = getattr(torch.ops.fastbptt, f"{cell_op}_backward")
        self.is_rnn = cell_op == "rnn_cell"
        # the differentiable arguments in schema order: input, hx (, cx), then w_ih, w_hh, b_ih, b_hh
        self.n_leading = 3 if self.lstm else 2
        self.n_diff = self.n_leading + 4
        self.n_states = 2 if self.lstm else 1       # hy (, cy): the outputs with gradients

    def kept(self, output) -> tuple:
        """What the forward returns for the backward: the RNN's output, the GRU's gi and gh, the LSTM's gates."""
        if self.is_rnn:
            return (output,)
        return tuple(output[self.n_states:])

    def layer_cell(self, options: tuple) -> str:
        return ("rnn_relu" if options[0] else "rnn_tanh") if self.is_rnn else self.cell

    def save(self, ctx, args: tuple, output) -> None:
        """Keeps a step's tensor arguments and what its forward returned for the backward."""
        kept = self.kept(output)
        if not self.is_rnn:   # the gate pre-activations the backward reads
            ctx.mark_non_differentiable(*kept)
        ctx.save_for_backward(*args, *kept)
        ctx.set_materialize_grads(False)

    def step_grads(self, ctx, grads: tuple, needs_input_grad, options: tuple) -> tuple:
        """Gradients of a step's tensor arguments (None where not needed) from those of its states,
        with what :meth:`save` kept."""
        saved = ctx.saved_tensors
        diff, kept = saved[:self.n_diff], saved[self.n_diff:]
        needs = [bool(m) and t is not None for m, t in zip(needs_input_grad, diff)]
        state_grads = grads[:self.n_states]
        if not any(needs) or all(g is None for g in state_grads):
            return (None,) * self.n_diff
        if torch.is_grad_enabled():  # a graph of the gradients is wanted: double backward, every gradient now
            result = _double_backward(self.layer_cell(options), diff, state_grads, needs)
            return tuple(g if m else None for g, m in zip(result, needs))
        result = self.grads(diff, kept, options, state_grads, needs)
        return tuple(g if m else None for g, m in zip(result, needs))

    def grads(self, diff: tuple, kept: tuple, options: tuple, state_grads: tuple, mask: list) -> tuple:
        """The backward op: gradients of ``diff`` (empty where ``mask`` says no), then the gate gradients."""
        state_grads = tuple(torch.zeros_like(diff[1]) if g is None else g for g in state_grads)
        *flags, path = options   # (relu, path) for the RNN, (path,) otherwise
        return self.backward(*state_grads, *diff[:-2], *kept, *flags, mask, path)


def _double_backward(cell: str, diff: tuple, grads: tuple, mask: list) -> list:
    """Gradients that can themselves be differentiated: the layer ops' formula on a one-step layer."""
    lstm = cells.SPECS[cell].has_cell_state
    layer_diff = (diff[0][None],) + tuple(diff[1:]) + ((None,) if lstm else ())   # + weight_hr
    layer_mask = list(mask) + ([False] if lstm else [])
    state_grads = tuple(torch.zeros_like(diff[1]) if g is None else g for g in grads)   # hx, cx: [B, H]
    output_grad = torch.zeros_like(state_grads[0])[None]
    result = library._differentiable_backward(cell, layer_diff, None, (output_grad,) + state_grads, layer_mask, False)
    if result[0] is not None:
        result[0] = result[0][0]
    return result[:len(diff)]


def _register(op: _NativeOp) -> None:
    """Autograd for the op: the native backward op, or the differentiable formula when a graph of
    the gradients is asked for."""

    def setup_context(ctx, inputs, output):
        op.save(ctx, inputs[:op.n_diff], output)
        ctx.options = inputs[op.n_diff:]

    def backward(ctx, *grads):
        result = op.step_grads(ctx, grads, ctx.needs_input_grad[:op.n_diff], ctx.options)
        return result + (None,) * (len(ctx.needs_input_grad) - op.n_diff)

    torch.library.register_autograd(op.forward._qualified_op_name, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------- registration
#
# In eager training the steps of a cell loop form chains (csrc/cell_chain.cpp): C++ autograd nodes
# that sum a loop's weight gradients in a few products over many steps' rows, and cost a step no
# Python frame in the backward. A chain's backward with create_graph calls _double_backward.

_NATIVE_OPS: dict = {}   # by kernel (rnn, gru, lstm)

if native._C is not None:
    for _kernel, _cell in (("rnn", "rnn_tanh"), ("gru", "gru"), ("lstm", "lstm")):
        _NATIVE_OPS[_kernel] = _NativeOp(f"{_kernel}_cell", _cell)   # rnn_cell: tanh or relu is a flag of the op
        _register(_NATIVE_OPS[_kernel])
    native._C.set_cell_double_backward(_double_backward)
