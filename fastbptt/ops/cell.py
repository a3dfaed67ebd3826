"""One step of a cell (torch.nn's RNNCell, GRUCell, LSTMCell) as a differentiable op.

A cell step is a layer's chunk of one step, so it runs on the same backends. The compiled ones
(``cpu``, ``cuda``) have their own ops, ``fastbptt::{rnn,gru,lstm}_cell`` and their
``*_backward`` (``csrc/cell_ops.cpp``): one call per step into C++, which runs the fused chunk
kernel on a one-step chunk plus the products around it, because a Python loop over a cell pays
its per-call overhead at every step. Their autograd formula and fake kernels are registered here,
and so are chains: in eager training the steps of a loop sum their weight gradients together
(see the section below). Every other backend (``triton``, ``reference``) runs the step as a
one-step layer (:func:`fastbptt.ops.recurrent_layer`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cells, dispatch, native, reference
from . import check_parameters, in_functorch_transform, library, recurrence, recurrent_layer

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
    op = _NATIVE_OPS[spec.kernel]
    options = (spec.relu, path) if op.is_rnn else (path,)
    args = (input, hx) + ((cx,) if op.lstm else ()) + (weight_ih, weight_hh, bias_ih, bias_hh)
    if torch.compiler.is_compiling():   # the op with its registered autograd, which torch.compile traces
        output = op.forward(*args, *options)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        output = _chain_step(op, options, args)
    else:
        output = op.below_autograd(*args, *options)
    return output if op.is_rnn else tuple(output[:op.n_states]) if op.lstm else output[0]


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
        self.shared_gates = cell != "gru"           # one gate gradient for both products (else gi's and gh's)

    def below_autograd(self, *args):
        """The op without its autograd kernel, for a forward inside an autograd.Function or under
        no_grad: that kernel is Python (registered below), and a step would pay for it even there."""
        with torch._C._AutoDispatchBelowAutograd():
            return self.forward(*args)

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

    def step_grads(self, ctx, grads: tuple, needs_input_grad, options: tuple, tape=None) -> tuple:
        """Gradients of a step's tensor arguments (None where not needed) from those of its states,
        with what :meth:`save` kept. With a ``tape`` the weights get none: the step leaves its gate
        gradients there instead."""
        saved = ctx.saved_tensors
        diff, kept = saved[:self.n_diff], saved[self.n_diff:]
        needs = [bool(m) and t is not None for m, t in zip(needs_input_grad, diff)]
        state_grads = grads[:self.n_states]
        if not any(needs) or all(g is None for g in state_grads):
            return (None,) * self.n_diff
        if torch.is_grad_enabled():  # a graph of the gradients is wanted: double backward, every gradient now
            result = _double_backward(self.layer_cell(options), diff, state_grads, needs)
            return tuple(g if m else None for g, m in zip(result, needs))
        mask = needs if tape is None else needs[:self.n_leading] + [False] * 4
        result = self.grads(diff, kept, options, state_grads, mask)
        if tape is not None and any(needs[self.n_leading:]):
            gates = result[self.n_diff:]
            tape.push(gates[0], gates[-1], diff[0], diff[1])
        return tuple(g if m else None for g, m in zip(result, mask))

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


# ----------------------------------------------------------------------------- chains: deferred weight gradients
#
# A cell loop runs T steps on the same weights. Formed step by step, as the op's backward does,
# each weight gradient is a product over B rows that reads and writes the whole weight, and
# autograd then adds T such tensors: for small batches that traffic is most of a training step.
# In eager training the steps of a chain (each one's hx the previous one's output, on the same
# weights) take their weights from one node, _ChainWeights, whose outputs are views of them. A
# step's backward leaves its gate gradients (and the input and hx they multiply) on the chain's
# tape and gives the weights no gradient; autograd runs _ChainWeights after every step of the
# backward pass that reaches it (it is an input of all of them), and by then the tape has summed
# each weight gradient in a few products over many steps' rows. The tape is keyed by the backward pass (graph task),
# so separate passes (retain_graph, torch.autograd.grad on part of the graph) never mix, and a
# pass that does not reach the weights drops what its steps left when it ends.

class _Tape:
    """The weight gradients of a chain's steps, summed per backward pass. Gate gradients are kept
    until they span ``rows`` rows (all steps of a small batch, a few of a large one), then go into
    the sums in one product each: fewer, larger products than one per step, with the kept rows
    still in cache."""

    __slots__ = ("weights", "wanted", "shared_gates", "pending")
    rows = 128

    def __init__(self, weights: tuple, wanted: tuple, shared_gates: bool):
        self.weights, self.wanted, self.shared_gates = weights, wanted, shared_gates
        self.pending: dict[int, _PassSums] = {}

    def push(self, d_in: Tensor, d_hid: Tensor, input: Tensor, hx: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        sums = self.pending.get(task)
        if sums is None:
            sums = self.pending[task] = _PassSums(self)
            # a pass that never reaches the weights (autograd.grad of part of the graph) drops its own
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.pending.pop(task, None))
        sums.add(d_in, d_hid, input, hx)

    def take(self) -> Optional["_PassSums"]:
        return self.pending.pop(torch._C._current_graph_task_id(), None)


class _PassSums:
    """One backward pass's weight and bias gradients of a chain, and the steps not yet summed."""

    __slots__ = ("tape", "accumulators", "steps", "rows")

    def __init__(self, tape: _Tape):
        self.tape = tape
        self.accumulators = [recurrence._GradAccumulator(w, wanted) for w, wanted in zip(tape.weights, tape.wanted)]
        self.steps, self.rows = [], 0

    def add(self, *step: Tensor) -> None:   # (input-side gate gradient, hidden-side one, input, hx)
        self.steps.append(step)
        self.rows += step[2].shape[0]
        if self.rows >= self.tape.rows:
            self.flush()

    def flush(self) -> None:
        if not self.steps:
            return
        d_in, x, h = (torch.cat([s[i] for s in self.steps]) if len(self.steps) > 1 else self.steps[0][i]
                      for i in (0, 2, 3))
        d_hid = d_in if self.tape.shared_gates else torch.cat([s[1] for s in self.steps])
        w_ih, w_hh, *biases = self.accumulators
        w_ih.add_product(d_in, x)
        w_hh.add_product(d_hid, h)
        if biases:
            recurrence.add_bias_sums(*biases, d_in, d_hid)
        self.steps, self.rows = [], 0


class _ChainWeights(torch.autograd.Function):
    """The weights of a chain (views of them, identity forward); the backward returns the gradients
    the steps summed on the tape, plus any a step gave directly (double backward)."""

    @staticmethod
    def forward(ctx, tape: _Tape, *weights: Tensor):   # w_ih, w_hh (, b_ih, b_hh)
        ctx.tape = tape
        ctx.set_materialize_grads(False)
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        sums = ctx.tape.take()
        if sums is None:
            return (None,) + grads
        sums.flush()
        for acc, grad in zip(sums.accumulators, grads):
            acc.add(grad)
        return (None,) + tuple(acc.result() if acc.wanted and acc.total is not None else None
                               for acc in sums.accumulators)


class _Chain:
    """The steps of one cell loop on the same weights: the _ChainWeights node they read them through."""

    __slots__ = ("op", "options", "sources", "state", "tape", "weights")

    def __init__(self, op: _NativeOp, options: tuple, sources: tuple):
        self.op, self.options, self.sources = op, options, sources
        self.state = _weights_state(sources)
        present = tuple(w for w in sources if w is not None)
        self.tape = _Tape(present, tuple(w.requires_grad for w in present), op.shared_gates)
        views = iter(_ChainWeights.apply(self.tape, *present))
        self.weights = tuple(next(views) if w is not None else None for w in sources)

    def continues(self, op: _NativeOp, options: tuple, sources: tuple) -> bool:
        """Whether a step on ``sources`` can join: the same op and weights, none updated since."""
        return (op is self.op and options == self.options and all(a is b for a, b in zip(sources, self.sources))
                and self.state == _weights_state(sources))


def _weights_state(weights: tuple) -> tuple:
    return tuple((w._version, w.requires_grad) for w in weights if w is not None)


class _ChainStep(torch.autograd.Function):
    """A step of a chain: the native op forward; the backward gives the input and state gradients
    and leaves the gate gradients on the chain's tape for the weights."""

    @staticmethod
    def forward(ctx, chain: _Chain, *args: Optional[Tensor]):  # the op's tensor arguments, the chain's weights
        output = chain.op.below_autograd(*args, *chain.options)
        chain.op.save(ctx, args, output)
        ctx.chain = chain
        return output

    @staticmethod
    def backward(ctx, *grads):
        chain = ctx.chain
        return (None,) + chain.op.step_grads(ctx, grads, ctx.needs_input_grad[1:], chain.options, chain.tape)


# autograd.Function.apply without its Python wrapper, which binds default arguments and unwraps
# torch.func tensors: a step pays it every time, and a chain never runs under torch.func (a step
# there runs the reference maths, see run_cell_step)
_apply_chain_step = torch._C._FunctionBase.__dict__["apply"].__get__(None, _ChainStep)

_NATIVE_OPS: dict = {}   # by kernel (rnn, gru, lstm)


def _chain_step(op: _NativeOp, options: tuple, args: tuple):
    """Runs ``op`` as a step of the chain its hx continues, or of a new chain."""
    leading, sources = args[:op.n_leading], args[op.n_leading:]
    hx = leading[1]
    producer = (hx if hx._base is None else hx._base).grad_fn   # a _ChainStep's node is its ctx
    chain = getattr(producer, "chain", None)
    if chain is None or not chain.continues(op, options, sources):
        chain = _Chain(op, options, sources)
    return _apply_chain_step(chain, *leading, *chain.weights)


if native._C is not None:
    for _kernel, _cell in (("rnn", "rnn_tanh"), ("gru", "gru"), ("lstm", "lstm")):
        _NATIVE_OPS[_kernel] = _NativeOp(f"{_kernel}_cell", _cell)   # rnn_cell: tanh or relu is a flag of the op
        _register(_NATIVE_OPS[_kernel])
