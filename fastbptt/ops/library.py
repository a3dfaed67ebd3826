"""Registers the recurrence ops with ``torch.library``: schema, implementation, fake kernel,
autograd formula. One table (:data:`fastbptt.cells.SPECS`) drives all four cell types; the only
difference in the schemas is whether the cell carries a cell state (LSTM: ``cx``, ``weight_hr``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import Library

from .. import cells, dispatch, reference
from .recurrence import _backward, _forward

LIB = Library("fastbptt", "FRAGMENT")

_RNN_ARGS = "Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh"
_LSTM_ARGS = ("Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
              "Tensor? bias_hh, Tensor? weight_hr")
_OPTIONS = "Tensor? lengths, bool reverse, int chunk_size, bool recompute, str backend"
_BWD_OPTIONS = "bool reverse, int chunk_size, bool recompute, str backend, bool[] output_mask"

# names of the differentiable tensor arguments, in schema order, without and with a cell state
_DIFF_ARGS = {
    False: ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    True: ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"),
}
_N_OPTIONS = 5  # lengths, reverse, chunk_size, recompute, backend: not differentiable


def _fake_outputs(spec: cells.CellSpec, input: Tensor, hx: Tensor, cx: Optional[Tensor], weight_hh: Tensor,
                  chunk_size: int, recompute: bool, backend: str):
    """Shapes only (torch.compile, meta tensors): output [T, B, P], h_n, (c_n, c_chunks [n + 1, B, H]),
    gates [T, B, saved width] or empty; a whole-layer path named in ``backend`` keeps its primitive's
    workspace instead, uint8 of a size only the primitive knows."""
    steps, batch = input.shape[0], input.shape[1]
    hidden = weight_hh.shape[0] // spec.num_gates
    width = 0 if recompute else spec.saved_width(hidden)
    output = input.new_empty(steps, batch, hx.shape[-1])
    if width and dispatch.names_whole_layer_path(backend):
        gates = input.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.uint8)
    else:
        gates = input.new_empty(steps, batch, width) if width else input.new_empty(0)
    if spec.has_cell_state:
        n_chunks = (steps + chunk_size - 1) // chunk_size  # = len(chunk_bounds(...)), symbolic-friendly
        return output, torch.empty_like(hx), torch.empty_like(cx), input.new_empty(n_chunks + 1, batch, hidden), gates
    return output, torch.empty_like(hx), gates


def _fake_grads(diff: tuple, output_mask) -> tuple:
    """Shapes only: a gradient like each wanted differentiable input, empty elsewhere."""
    return tuple(torch.empty_like(t) if (wanted and t is not None) else diff[0].new_empty(0)
                 for t, wanted in zip(diff, output_mask))


def _saved_tensors(ctx, cell: str) -> tuple:
    """``ctx.saved_tensors``, with the reason spelled out when the caller edited the output in place."""
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        raise RuntimeError(
            f"fastbptt {cell} layer: its output was modified in place before the backward. The backward "
            f"recomputes the gates from the saved output instead of keeping them, so it needs the output "
            f"unchanged. Edit a copy instead (out = out.clone() first, or an out-of-place op such as "
            f"out = out * mask). Autograd's report: {exc}") from None


def _differentiable_backward(cell: str, diff: tuple, lengths: Optional[Tensor], grads: tuple, mask: list,
                             reverse: bool) -> list:
    """Gradients that can themselves be differentiated (``create_graph=True``, gradient penalties,
    hessians, ``torch.func``): the vector-Jacobian product of :func:`fastbptt.reference.layer`,
    built from plain autograd ops. Rarely needed, so it trades the fused kernels' speed for generality."""
    lstm = cells.SPECS[cell].has_cell_state
    wanted = [i for i, m in enumerate(mask) if m]

    def layer_of(*tensors):
        args = list(diff)
        for i, t in zip(wanted, tensors):
            args[i] = t
        a = dict(zip(_DIFF_ARGS[lstm], args))
        return reference.layer(cell, a["input"], a["hx"], a.get("cx"), a["weight_ih"], a["weight_hh"], a["bias_ih"],
                               a["bias_hh"], a.get("weight_hr"), lengths, reverse)

    _, vjp = torch.func.vjp(layer_of, *(diff[i] for i in wanted))
    result = [None] * len(diff)
    for i, grad in zip(wanted, vjp(tuple(grads))):
        result[i] = grad
    return result


def _define(cell: str) -> None:
    spec = cells.SPECS[cell]
    lstm = spec.has_cell_state
    n_grads = len(_DIFF_ARGS[lstm])
    if lstm:
        LIB.define(f"{cell}({_LSTM_ARGS}, {_OPTIONS}) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor c_chunks, "
                   f"Tensor gates)")
        LIB.define(f"{cell}_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, {_LSTM_ARGS}, "
                   f"Tensor? lengths, Tensor output, Tensor c_chunks, Tensor gates, {_BWD_OPTIONS}) -> "
                   f"({', '.join(['Tensor'] * n_grads)})")
    else:
        LIB.define(f"{cell}({_RNN_ARGS}, {_OPTIONS}) -> (Tensor output, Tensor h_n, Tensor gates)")
        LIB.define(f"{cell}_backward(Tensor grad_output, Tensor grad_h_n, {_RNN_ARGS}, Tensor? lengths, "
                   f"Tensor output, Tensor gates, {_BWD_OPTIONS}) -> ({', '.join(['Tensor'] * n_grads)})")

    # --- implementations (device-generic: the backend registry picks the kernels), and their
    # fake (shape-only) twins with the same named parameters
    if lstm:
        def forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse, chunk_size,
                    recompute, backend):
            return _forward(cell, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                            reverse, chunk_size, recompute, backend)

        def backward(grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                     weight_hr, lengths, output, c_chunks, gates, reverse, chunk_size, recompute, backend,
                     output_mask):
            return _backward(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh, bias_ih,
                             bias_hh, weight_hr, lengths, output, c_chunks, gates, reverse, chunk_size, recompute,
                             backend, output_mask)

        def fake_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse,
                         chunk_size, recompute, backend):
            return _fake_outputs(spec, input, hx, cx, weight_hh, chunk_size, recompute, backend)

        def fake_backward(grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                          weight_hr, lengths, output, c_chunks, gates, reverse, chunk_size, recompute, backend,
                          output_mask):
            return _fake_grads((input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), output_mask)
    else:
        def forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, chunk_size, recompute,
                    backend):
            return _forward(cell, input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None, lengths, reverse,
                            chunk_size, recompute, backend)

        def backward(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, output,
                     gates, reverse, chunk_size, recompute, backend, output_mask):
            return _backward(cell, grad_output, grad_h_n, None, input, hx, None, weight_ih, weight_hh, bias_ih,
                             bias_hh, None, lengths, output, None, gates, reverse, chunk_size, recompute, backend,
                             output_mask)

        def fake_forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, chunk_size, recompute,
                         backend):
            return _fake_outputs(spec, input, hx, None, weight_hh, chunk_size, recompute, backend)

        def fake_backward(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, output,
                          gates, reverse, chunk_size, recompute, backend, output_mask):
            return _fake_grads((input, hx, weight_ih, weight_hh, bias_ih, bias_hh), output_mask)

    LIB.impl(cell, forward, "CompositeExplicitAutograd")
    LIB.impl(f"{cell}_backward", backward, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastbptt::{cell}", fake_forward, lib=LIB)
    torch.library.register_fake(f"fastbptt::{cell}_backward", fake_backward, lib=LIB)

    # --- autograd
    def setup_context(ctx, inputs, output):
        diff = inputs[:n_grads]
        lengths, reverse, chunk_size, recompute, backend = inputs[n_grads:]
        saved_outputs = (output[0], output[3], output[4]) if lstm else (output[0], output[2])
        ctx.save_for_backward(*diff, lengths, *saved_outputs)
        ctx.options = (reverse, chunk_size, recompute, backend)
        # the gradients of c_chunks and gates are never read: not materializing them spares a zero-filled
        # [T, B, saved width] buffer per layer call; backward_formula fills in the state gradients it needs
        ctx.set_materialize_grads(False)

    def backward_formula(ctx, *grads, eager: bool = False):
        saved = _saved_tensors(ctx, cell)
        diff, lengths, saved_outputs = saved[:n_grads], saved[n_grads], saved[n_grads + 1:]
        mask = [bool(m) and t is not None for m, t in zip(ctx.needs_input_grad[:n_grads], diff)]
        if not any(mask):
            return (None,) * (n_grads + _N_OPTIONS)
        # gradients of (output, h_n[, c_n]), zeros where autograd has none (an unused output)
        state_likes = (saved_outputs[0], diff[1], diff[2]) if lstm else (saved_outputs[0], diff[1])
        state_grads = [torch.zeros_like(like) if g is None else g for g, like in zip(grads, state_likes)]
        if torch.is_grad_enabled():  # a graph of the gradients is wanted: double backward
            result = _differentiable_backward(cell, diff, lengths, state_grads, mask, ctx.options[0])
        else:
            op = backward if eager and plain_eager(state_grads) else getattr(torch.ops.fastbptt, f"{cell}_backward")
            result = op(*state_grads, *diff, lengths, *saved_outputs, *ctx.options, mask)
        return tuple(g if m else None for g, m in zip(result, mask)) + (None,) * _N_OPTIONS

    torch.library.register_autograd(f"fastbptt::{cell}", backward_formula, setup_context=setup_context, lib=LIB)

    # --- the eager door: the same implementation and formula without the dispatcher's round trips
    def eager_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grads):
        return backward_formula(ctx, *grads, eager=True)

    # named at creation, which names its autograd node: fastbptt_lstmBackward
    function = type(f"fastbptt_{cell}", (torch.autograd.Function,),
                    {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})
    _EAGER[cell] = (forward, function.apply)


# cell -> (implementation, autograd.Function.apply) of the eager door (:func:`run_layer`)
_EAGER: dict = {}


def plain_eager(tensors) -> bool:
    """Whether these tensors are plain ones in plain eager mode: no torch.compile, tracing, dispatch or
    function mode, tensor subclass or device without kernels (meta), which all see the registered ops."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch.jit.is_tracing()):
        return False
    return all(t is None or (type(t) is Tensor or type(t) is torch.nn.Parameter) and t.device.type != "meta"
               for t in tensors)


def run_layer(cell: str, *args, needs_grad: bool):
    """``torch.ops.fastbptt.<cell>(*args)``. In plain eager mode (:func:`plain_eager`) it runs the op's
    implementation directly, through a ``torch.autograd.Function`` made of the op's own autograd formula
    when ``needs_grad``: a layer call then pays no dispatcher round trips into Python (about 80 us per
    training call, at every layer of every step; docs/design.md). Elsewhere it calls the op, which
    torch.compile, subclasses and modes see as one operator."""
    n_tensors = len(_DIFF_ARGS[cells.SPECS[cell].has_cell_state]) + 1   # + lengths
    if not plain_eager(args[:n_tensors]):
        return getattr(torch.ops.fastbptt, cell)(*args)
    implementation, apply = _EAGER[cell]
    return apply(*args) if needs_grad else implementation(*args)


for _cell in cells.CELLS:
    _define(_cell)
