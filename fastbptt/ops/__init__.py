"""Layer-level entry point over the custom ops: validates arguments and picks the backend.

``recurrent_layer`` runs one layer, one direction, over a time-major sequence; the modules in
:mod:`fastbptt.nn` stack it into layers and directions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cells, dispatch, reference
from . import library  # registers torch.ops.fastbptt.*
from ..reference import valid_mask  # noqa: F401
from .recurrence import chunk_bounds  # noqa: F401

DEFAULT_CHUNK_SIZE = 32
MAX_CHUNK_SIZE = 2**63 - 1  # the ops take it as a C++ int64

# The default memory policy, recompute="auto": keep a layer call's gate pre-activations when they take
# at most this many bytes (per layer and direction), recompute them in the backward above it. Keeping
# was the faster policy at nearly every size measured, up to 128 MiB (docs/cpu.md, Memory policies), so
# the line is drawn for memory: kept gates grow with the window, while recompute keeps little more than
# the output. 64 MiB per layer covers the usual training windows (LSTM: T * B * H up to 4M) at a quarter
# of the bytes torch.nn keeps for an LSTM.
AUTO_KEEP_GATES_BYTES = 64 << 20

# CPU inference keeps nothing for a backward, so its chunks only bound the input projection's buffer:
# about this many bytes, reused by every chunk. Big enough for efficient products; small enough to
# stay in cache from the projection to the recurrent kernel, and for the allocator to hand the same
# memory back call after call (a fresh multi-MiB buffer per call costs a page fault per 4 KiB). On a
# GPU (a caching allocator, launches to save) inference stays one chunk.
INFERENCE_CHUNK_BYTES = 8 << 20
# A whole-layer path (oneDNN's LSTM primitive) projects and runs a chunk in one call, which has its own
# costs (the weights reordered into oneDNN's layout): fewer, larger chunks, while its buffers stay below
# the 32 MiB up to which glibc's heap reuses a block instead of mapping fresh pages (docs/cpu.md, Inference).
WHOLE_LAYER_INFERENCE_CHUNK_BYTES = 16 << 20


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size should be of type int, got: {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size (steps recomputed together) must lie in [1, 2**63 - 1], got {chunk_size}")
    return chunk_size


def check_recompute(recompute) -> bool | str:
    if not (isinstance(recompute, bool) or isinstance(recompute, str) and recompute == "auto"):
        raise ValueError(f"recompute must be True, False or 'auto', got {recompute!r}")
    return recompute


def keeps_gates(recompute: bool | str, cell: str, steps: int, batch: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether a layer call keeps its gate pre-activations for the backward (``recompute`` False,
    or "auto" with at most AUTO_KEEP_GATES_BYTES of them)."""
    if recompute != "auto":
        return not recompute
    kept = steps * batch * cells.SPECS[cell].saved_width(hidden) * dtype.itemsize
    return kept <= AUTO_KEEP_GATES_BYTES


def layer_call(inference: bool, has_lengths: bool, recompute: bool | str, cell: str, steps: int, batch: int,
               hidden: int, dtype: torch.dtype, backend: str = "") -> str:
    """The kind of layer call a whole-layer kernel path may take (:data:`dispatch.INFERENCE`,
    :data:`dispatch.TRAIN_KEEP`), or '' for one it may not. ``recompute="auto"`` keeps the gates of a
    ``backend`` that names a whole-layer path ("cpu:onednn") whatever their size: the path keeps them."""
    if has_lengths:
        return ""
    if inference:
        return dispatch.INFERENCE
    if recompute == "auto" and dispatch.names_whole_layer_path(backend):
        return dispatch.TRAIN_KEEP
    return dispatch.TRAIN_KEEP if keeps_gates(recompute, cell, steps, batch, hidden, dtype) else ""


def _check_tensor(name: str, t: Optional[Tensor], shape: tuple, x: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"Expected {name} size {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise RuntimeError(f"Expected {name} to have dtype {x.dtype} like the input, got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"Expected {name} on device {x.device} like the input, got {t.device}")


def check_parameters(spec: cells.CellSpec, unit: str, x_t: Tensor, hx: Tensor, cx: Optional[Tensor],
                     weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                     weight_hr: Optional[Tensor] = None) -> tuple[int, int]:
    """Shapes, dtypes and devices of the weights and states of a layer or a cell (``unit``) against
    one step of its input, ``x_t: [B, I]``. Returns (hidden size H, output size P)."""
    batch, input_size = x_t.shape
    gates = spec.num_gates
    hidden = weight_hh.shape[0] // gates
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    _check_tensor("weight_ih", weight_ih, (gates * hidden, input_size), x_t)
    _check_tensor("weight_hh", weight_hh, (gates * hidden, out_size), x_t)
    _check_tensor("bias_ih", bias_ih, (gates * hidden,), x_t)
    _check_tensor("bias_hh", bias_hh, (gates * hidden,), x_t)
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError("bias_ih and bias_hh must be given together")
    _check_tensor("hidden state hx", hx, (batch, out_size), x_t)
    if spec.has_cell_state:
        if cx is None:
            raise ValueError(f"an LSTM {unit} needs the cell state cx")
        _check_tensor("cell state cx", cx, (batch, hidden), x_t)
        _check_tensor("weight_hr", weight_hr, (out_size, hidden), x_t)
    return hidden, out_size


def in_functorch_transform(tensors) -> bool:
    """Inside torch.func transforms (grad, vmap, jacrev, jvp), which custom ops' autograd does not
    support: the callers run plain PyTorch ops there, differentiable and batchable to any order."""
    if torch._C._functorch.peek_interpreter_stack() is None:   # no transform running: a cheap test first
        return False
    return not torch.compiler.is_compiling() and any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def check_lengths(lengths: Optional[Tensor], steps: int, batch: int) -> None:
    if lengths is None:
        return
    if lengths.dtype != torch.int64 or lengths.dim() != 1 or lengths.shape[0] != batch:
        raise RuntimeError(f"Expected lengths to be a 1-D int64 tensor of size {batch}, "
                           f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
    if not torch.compiler.is_compiling() and lengths.device.type != "meta" and lengths.numel() and (
            int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (the padded sequence length), "
                         f"got min {int(lengths.min())} and max {int(lengths.max())}")


def recurrent_layer(cell: str, x: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *,
                    cx: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
                    lengths: Optional[Tensor] = None, reverse: bool = False,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, recompute: bool | str = "auto", backend: str = "auto"):
    """One recurrent layer in one direction.

    x: [T, B, I]; hx: [B, P]; cx: [B, H] (LSTM); weight_ih: [G*H, I]; weight_hh: [G*H, P];
    bias_*: [G*H]; weight_hr: [P, H] (LSTM projection); lengths: [B] int64, each in [1, T].
    Returns (output [T, B, P], h_n [B, P]) and, for LSTM, c_n [B, H] as a third item.
    Padded steps (t >= lengths[b]) output zeros and leave the state unchanged.
    recompute: True keeps only the output and chunk-boundary states for the backward, False also the
    gate pre-activations, "auto" keeps them up to AUTO_KEEP_GATES_BYTES.
    """
    spec = cells.spec(cell)
    check_chunk_size(chunk_size)
    check_recompute(recompute)
    dispatch.check_backend_name(backend)
    if x.dim() != 3:
        raise RuntimeError(f"input must have 3 dimensions [T, B, input_size], got {x.dim()}")
    steps, batch, input_size = x.shape
    if steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN (the input's time dimension is empty)")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating point tensor, got {x.dtype}")
    hidden, out_size = check_parameters(spec, "layer", x[0], hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                                        weight_hr)
    check_lengths(lengths, steps, batch)
    tensors = (x, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    if in_functorch_transform(tensors):
        return reference.layer(cell, x, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse)
    proj = out_size if weight_hr is not None else 0
    name = dispatch.resolve(backend, cell, x, hidden, proj)
    inference = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    call = layer_call(inference, lengths is not None, recompute, cell, steps, batch, hidden, x.dtype, name)
    if (call or ":" in name) and not torch.compiler.is_compiling():
        # the kernel path for this call: a whole-layer path may take (or, forced, must have) a call that
        # layer_call names. Under torch.compile (sizes may be symbolic) the ops pick the path when they
        # run, among the paths that run any call; a forced whole-layer one runs as named
        name = dispatch.layer_kernel(name, cell, x.dtype, batch, hidden, proj, call)
    whole_layer = dispatch.names_whole_layer_path(name)
    if inference:
        # nothing is kept for a backward, so no gates are kept and the chunk size only sets the input
        # projection's buffer
        chunk_size, recompute = steps, True
        if x.device.type == "cpu":
            row_bytes = max(1, batch * spec.num_gates * hidden * x.element_size())
            budget = WHOLE_LAYER_INFERENCE_CHUNK_BYTES if whole_layer else INFERENCE_CHUNK_BYTES
            chunk_size = max(1, min(steps, budget // row_bytes))
    elif call == dispatch.TRAIN_KEEP:  # layer_call decided: the gates are kept
        recompute = False
        if whole_layer:
            chunk_size = steps  # one call over the layer, its workspace kept
    else:
        recompute = not keeps_gates(recompute, cell, steps, batch, hidden, x.dtype)
    if spec.has_cell_state:
        out, h_n, c_n, _, _ = library.run_layer(cell, x, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                                lengths, reverse, chunk_size, recompute, name, needs_grad=not inference)
        return out, h_n, c_n
    out, h_n, _ = library.run_layer(cell, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, chunk_size,
                                    recompute, name, needs_grad=not inference)
    return out, h_n


from .cell import cell_step  # noqa: E402  (uses recurrent_layer above)
