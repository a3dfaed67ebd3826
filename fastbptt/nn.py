"""Drop-in replacements for ``torch.nn.RNN``, ``torch.nn.GRU`` and ``torch.nn.LSTM``.

Each class subclasses its ``torch.nn`` twin, so ``isinstance`` checks, constructor arguments,
parameters (names, shapes, order, initialisation), ``state_dict`` and argument checks are
torch's own; only ``forward`` is replaced, by layers of :func:`fastbptt.ops.recurrent_layer`
(under ``torch.jit.trace`` and ONNX export, torch's own forward runs, so exported graphs use
the standard operators). ``repr`` names the module as fastbptt's. Extra keyword-only arguments:
``chunk_size`` (steps recomputed together in the backward), ``recompute`` (the memory policy)
and ``backend``. Importing fastbptt lets ``torch.load(..., weights_only=True)`` load whole
models that hold these modules.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import cells, dispatch
from .ops import AUTO_KEEP_GATES_BYTES, DEFAULT_CHUNK_SIZE, check_chunk_size, check_recompute, recurrent_layer
from .ops.cell import run_cell_step


# The outputs torch.nn returns in the input's dtype under autocast, by (device type, layer kind);
# everywhere else all outputs come in the autocast dtype (cuDNN on CUDA; oneDNN's LSTM and ATen's
# RNN on CPU). On CPU, ATen's GRU cell mixes its float32 state back in, so the whole GRU stays
# float32 (fastbptt runs it in float32), and ATen's projected LSTM keeps its cell state float32.
AUTOCAST_INPUT_DTYPE_OUTPUTS = {
    ("cpu", "GRU"): frozenset({"output", "h_n"}),
    ("cpu", "LSTM with projection"): frozenset({"c_n"}),
}


def _exporting() -> bool:
    """Under ``torch.jit.trace`` or an ONNX export (either exporter)."""
    if torch.compiler.is_dynamo_compiling():
        return False
    if torch.jit.is_tracing():
        return True
    onnx = sys.modules.get("torch.onnx")  # not imported: no export under way (importing it costs a second)
    return onnx is not None and onnx.is_in_onnx_export()


def check_state_dtype_device(x: Tensor, states: tuple, weight: Tensor) -> None:
    """The states (hx, and cx for LSTM) in the input's dtype and on its device, and the parameters
    (represented by ``weight``) on that device."""
    device = x.device
    for label, state in zip(("hx", "cx"), states):
        if state.dtype != x.dtype:
            raise RuntimeError(f"Expected {label} to have dtype {x.dtype} like the input, got {state.dtype}")
        if state.device != device:
            raise RuntimeError(f"Expected {label} on device {x.device} like the input, got {state.device}")
    if weight.device != device:
        raise RuntimeError(f"Input and parameter tensors are not on the same device: input on {x.device}, "
                           f"parameters on {weight.device}")


class _Named:
    """The name a fastbptt module prints: a printed model shows which modules are fastbptt's (a
    converted model is otherwise torch's look-alike)."""

    def _get_name(self) -> str:
        name = type(self).__name__
        return f"fastbptt.{name}" if type(self).__module__ == __name__ else name


class _FusedRNNMixin(_Named):
    """Shared forward for the three module types. ``self`` is a ``torch.nn.RNNBase``."""

    def _init_fastbptt(self, chunk_size: int, backend: str, recompute: bool | str) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        dispatch.check_backend_name(backend)
        self.backend = backend
        self.recompute = check_recompute(recompute)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.chunk_size != DEFAULT_CHUNK_SIZE:
            s += f", chunk_size={self.chunk_size}"
        if self.recompute != "auto":
            s += f", recompute={self.recompute!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # ------------------------------------------------------------------ forward
    def forward(self, input, hx=None):
        if _exporting():
            # Exporters record torch.nn's forward, whose aten::lstm/gru/rnn_* ops map onto ONNX's own
            # LSTM/GRU/RNN operators; the maths is the same as the fused kernels'.
            return super().forward(input, hx)
        lstm = self.mode == "LSTM"
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        num_directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if packed:
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            # padded [T, B, I] in sorted order, like the packed data
            x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
            lengths = lengths.to(torch.int64)
            batch, is_batched, batch_dim, checked = x.shape[1], True, 1, input.data
        else:
            if input.dim() not in (2, 3):
                got = f"{input.dim()}D tensor" if self.mode.startswith("RNN") else f"{input.dim()}D"  # torch's wording
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if is_batched else input.unsqueeze(batch_dim)
            checked = x
            if self.batch_first:
                x = x.transpose(0, 1)
            sorted_indices = unsorted_indices = lengths = None
            batch = x.shape[1]
            if hx is not None:
                self._check_hx_dims(hx, is_batched)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
        if hx is None:
            zeros = x.new_zeros(self.num_layers * num_directions, batch, out_size)
            hx = (zeros, x.new_zeros(self.num_layers * num_directions, batch, self.hidden_size)) if lstm else zeros
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        # torch's own checks, for torch's own messages (input size, hidden sizes, dtype)
        self.check_forward_args(checked, hx, input.batch_sizes if packed else None)
        input_dtype, keep_dtype = x.dtype, self._autocast_input_dtype_outputs(x)
        if keep_dtype is not None and "output" not in keep_dtype:
            x, hx = self._autocast(x, hx)
        self._check_state_dtype_device(x, hx)

        output, h_n, c_n = self._run_layers(x, hx, lengths)
        if keep_dtype and "c_n" in keep_dtype:
            c_n = c_n.to(input_dtype)
        if packed:
            data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, sorted_indices, unsorted_indices)
        else:
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(batch_dim)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if lstm else None
        hidden = (h_n, c_n) if lstm else h_n
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _check_hx_dims(self, hx, is_batched: bool) -> None:
        """The same checks and messages as torch.nn for batched vs unbatched hx."""
        want, kind = (3, "batched 3-D") if is_batched else (2, "unbatched 2-D")
        if self.mode != "LSTM":
            if hx.dim() != want:
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
            return
        if not (isinstance(hx, tuple) and len(hx) == 2):
            raise TypeError(f"LSTM expects hx as a tuple (h_0, c_0), got {type(hx).__name__}")
        if hx[0].dim() != want or hx[1].dim() != want:
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")

    def _autocast_input_dtype_outputs(self, x: Tensor) -> Optional[frozenset]:
        """None outside autocast; under it, the outputs torch.nn returns in the input's dtype."""
        device_type = x.device.type
        if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
            return None
        kind = "LSTM with projection" if self.mode == "LSTM" and self.proj_size > 0 else self.mode
        return AUTOCAST_INPUT_DTYPE_OUTPUTS.get((device_type, kind), frozenset())

    @staticmethod
    def _autocast(x: Tensor, hx):
        """Input and states in the autocast dtype, as torch.nn's RNNs run under autocast."""
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = (lambda t: t.to(dtype))
        return cast(x), (tuple(map(cast, hx)) if isinstance(hx, tuple) else cast(hx))

    def _check_state_dtype_device(self, x: Tensor, hx) -> None:
        check_state_dtype_device(x, hx if isinstance(hx, tuple) else (hx,), self._flat_weights[0])

    def _layer_weights(self, index: int, dtype: torch.dtype):
        names = self._all_weights[index]
        params = [getattr(self, n) for n in names]
        params = [p.to(dtype) if p.dtype != dtype else p for p in params]  # autocast only
        w_ih, w_hh = params[0], params[1]
        b_ih, b_hh = (params[2], params[3]) if self.bias else (None, None)
        w_hr = params[-1] if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _run_layers(self, x: Tensor, hx, lengths: Optional[Tensor]):
        """x: [T, B, I] time-major. Returns (output [T, B, D*P], h_n [L*D, B, P], c_n [L*D, B, H] or None)."""
        lstm = self.mode == "LSTM"
        cell = cells.CELL_OF_MODE[self.mode]
        h0, c0 = hx if lstm else (hx, None)
        num_directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(index, x.dtype)
                result = recurrent_layer(
                    cell, layer_input, h0[index], w_ih, w_hh, b_ih, b_hh,
                    cx=c0[index] if lstm else None, weight_hr=w_hr, lengths=lengths, reverse=direction == 1,
                    chunk_size=self.chunk_size, recompute=self.recompute, backend=self.backend)
                outputs.append(result[0])
                h_n.append(result[1])
                if lstm:
                    c_n.append(result[2])
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), (torch.stack(c_n) if lstm else None)


_EXTRA_DOC = ("Takes every argument of ``torch.nn.{name}`` plus the keyword-only ``chunk_size`` (steps recomputed "
              "together in the backward), ``recompute`` (True: keep only the outputs and chunk-boundary states; "
              "False: also keep the gate pre-activations, faster backward, more memory; 'auto', the default: keep "
              f"them while they take at most {AUTO_KEEP_GATES_BYTES >> 20} MiB per layer and direction) and "
              "``backend`` ("
              + ", ".join(dispatch.CHOICES) + ").")


# Subclasses of torch.nn's own classes, so user code that branches on ``isinstance(m, nn.LSTM)``
# (weight-init loops, flatten_parameters calls, parameter groups) treats them alike. The mixin
# comes first: its forward replaces torch's. Like torch.nn's RNNs, torch.compile graph-breaks at
# these modules unless ``torch._dynamo.config.allow_rnn`` is set; with it set, the whole forward
# (fastbptt's custom ops) is traced into one graph.
class RNN(_FusedRNNMixin, nn.RNN):
    __doc__ = "Drop-in ``torch.nn.RNN`` running on fastbptt's fused kernels.\n\n" + _EXTRA_DOC.format(name="RNN")

    def __init__(self, *args, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                 recompute: bool | str = "auto", **kwargs):
        nn.RNN.__init__(self, *args, **kwargs)  # torch's own argument checks (nonlinearity, proj_size)
        self._init_fastbptt(chunk_size, backend, recompute)


class GRU(_FusedRNNMixin, nn.GRU):
    __doc__ = "Drop-in ``torch.nn.GRU`` running on fastbptt's fused kernels.\n\n" + _EXTRA_DOC.format(name="GRU")

    def __init__(self, *args, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                 recompute: bool | str = "auto", **kwargs):
        nn.GRU.__init__(self, *args, **kwargs)
        self._init_fastbptt(chunk_size, backend, recompute)


class LSTM(_FusedRNNMixin, nn.LSTM):
    __doc__ = "Drop-in ``torch.nn.LSTM`` running on fastbptt's fused kernels.\n\n" + _EXTRA_DOC.format(name="LSTM")

    def __init__(self, *args, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                 recompute: bool | str = "auto", **kwargs):
        nn.LSTM.__init__(self, *args, **kwargs)
        self._init_fastbptt(chunk_size, backend, recompute)


# ----------------------------------------------------------------------------- cells

class _FusedCellMixin(_Named):
    """Shared forward of the three cell types. ``self`` is a ``torch.nn.RNNCellBase``; the argument
    checks and their messages are torch.nn's."""

    def _init_fastbptt(self, backend: str) -> None:
        dispatch.check_backend_name(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend != "auto" else "")

    def _cell(self) -> str:
        if isinstance(self, nn.GRUCell):
            return "gru"
        if isinstance(self, nn.LSTMCell):
            return "lstm"
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return f"rnn_{self.nonlinearity}"

    def _torch_runs(self, input: Tensor) -> bool:
        """Exporters record torch.nn's forward (ONNX has no cell operator of its own, but torch's
        decomposes into standard ones); under autocast torch's own forward runs too, so the dtypes of
        the outputs are torch's, whatever it casts."""
        if torch._C._is_any_autocast_enabled():   # cheap, and false in nearly every call
            device_type = input.device.type
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                return True
        return _exporting()

    def _check_step_args(self, input: Tensor, states: tuple, weight: Tensor) -> None:
        """torch.nn's checks, with its messages, and the dtype/device checks of the layers
        (``weight``: the parameters')."""
        batch, features = input.shape
        if features != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {features} expected {self.input_size}")
        for label, state in enumerate(states):
            shape = state.shape
            if batch != shape[0]:
                raise RuntimeError(f"Input batch size {batch} doesn't match hidden{label} batch size {shape[0]}")
            if shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {shape[1]}, expected "
                                   f"{self.hidden_size}")
        check_state_dtype_device(input, states, weight)
        if weight.dtype != input.dtype:
            raise RuntimeError(f"Expected the parameters to have dtype {input.dtype} like the input, got {weight.dtype}")

    def _weights(self) -> tuple:
        """(weight_ih, weight_hh, bias_ih, bias_hh), read from ``_parameters``: an attribute lookup
        per weight costs a small step as much as its kernel. The attributes where a weight is not a
        registered parameter (parametrized with torch.nn.utils.parametrize, or replaced)."""
        params = self._parameters
        try:
            return params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
        except KeyError:
            return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def _single_state_forward(self, label: str, input: Tensor, hx: Optional[Tensor]) -> Tensor:
        """RNNCell and GRUCell: torch.nn's forward, with ``label`` in its messages."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{label}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{label}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        cell = self._cell()
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        if hx is None:
            hx = x.new_zeros(x.shape[0], self.hidden_size)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        hy = self._step(cell, x, hx)
        return hy if is_batched else hy.squeeze(0)

    def _step(self, cell: str, input: Tensor, hx: Tensor, cx: Optional[Tensor] = None):
        """One checked step: ``input`` [B, I], ``hx`` (, ``cx``) [B, H]."""
        weight_ih, weight_hh, bias_ih, bias_hh = self._weights()
        self._check_step_args(input, (hx,) if cx is None else (hx, cx), weight_ih)
        return run_cell_step(cells.SPECS[cell], input, hx, weight_ih, weight_hh, bias_ih, bias_hh, cx, self.backend)


_CELL_EXTRA_DOC = ("Takes every argument of ``torch.nn.{name}`` plus the keyword-only ``backend`` ("
                   + ", ".join(dispatch.CHOICES) + ").")


class RNNCell(_FusedCellMixin, nn.RNNCell):
    __doc__ = ("Drop-in ``torch.nn.RNNCell`` running one fused kernel per step, forward and backward.\n\n"
               + _CELL_EXTRA_DOC.format(name="RNNCell"))

    def __init__(self, *args, backend: str = "auto", **kwargs):
        nn.RNNCell.__init__(self, *args, **kwargs)
        self._init_fastbptt(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if self._torch_runs(input):
            return super().forward(input, hx)
        return self._single_state_forward("RNNCell", input, hx)


class GRUCell(_FusedCellMixin, nn.GRUCell):
    __doc__ = ("Drop-in ``torch.nn.GRUCell`` running one fused kernel per step, forward and backward.\n\n"
               + _CELL_EXTRA_DOC.format(name="GRUCell"))

    def __init__(self, *args, backend: str = "auto", **kwargs):
        nn.GRUCell.__init__(self, *args, **kwargs)
        self._init_fastbptt(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if self._torch_runs(input):
            return super().forward(input, hx)
        return self._single_state_forward("GRUCell", input, hx)


class LSTMCell(_FusedCellMixin, nn.LSTMCell):
    __doc__ = ("Drop-in ``torch.nn.LSTMCell`` running one fused kernel per step, forward and backward.\n\n"
               + _CELL_EXTRA_DOC.format(name="LSTMCell"))

    def __init__(self, *args, backend: str = "auto", **kwargs):
        nn.LSTMCell.__init__(self, *args, **kwargs)
        self._init_fastbptt(backend)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if self._torch_runs(input):
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        hy, cy = self._step("lstm", x, hx[0], hx[1])
        return (hy, cy) if is_batched else (hy.squeeze(0), cy.squeeze(0))


_FUSED_OF = {nn.RNN: RNN, nn.GRU: GRU, nn.LSTM: LSTM, nn.RNNCell: RNNCell, nn.GRUCell: GRUCell, nn.LSTMCell: LSTMCell}

# cell name (fastbptt/cells.py) -> module class, fastbptt's and torch.nn's
MODULE_OF_CELL = {"rnn_tanh": RNN, "rnn_relu": RNN, "gru": GRU, "lstm": LSTM}
TORCH_MODULE_OF_CELL = {"rnn_tanh": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
# cell name -> cell module class (one step per call), fastbptt's and torch.nn's
CELL_MODULE_OF_CELL = {"rnn_tanh": RNNCell, "rnn_relu": RNNCell, "gru": GRUCell, "lstm": LSTMCell}
TORCH_CELL_MODULE_OF_CELL = {"rnn_tanh": nn.RNNCell, "rnn_relu": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}


def cell_kwargs(cell: str) -> dict:
    """Constructor keywords that make ``MODULE_OF_CELL[cell]`` run ``cell`` (the RNN's nonlinearity)."""
    return {"nonlinearity": cell[len("rnn_"):]} if cell.startswith("rnn_") else {}


def convert(model: nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
            recompute: bool | str = "auto") -> nn.Module:
    """Replaces every ``torch.nn`` RNN/GRU/LSTM and RNNCell/GRUCell/LSTMCell inside ``model`` by its
    fastbptt twin, in place (``chunk_size`` and ``recompute`` apply to the layers only).

    The modules keep their parameter objects (so weights, device, dtype, ``requires_grad`` and
    any optimizer holding them are untouched); only the forward changes. Returns ``model``.
    """
    check_chunk_size(chunk_size)
    dispatch.check_backend_name(backend)
    check_recompute(recompute)
    for module in model.modules():
        fused_cls = _FUSED_OF.get(type(module))
        if fused_cls is None:
            continue
        module.__class__ = fused_cls
        if isinstance(module, _FusedCellMixin):
            module._init_fastbptt(backend)
        else:
            module._init_fastbptt(chunk_size, backend, recompute)
    return model


# whole pickled models holding fastbptt modules load with torch.load's default weights_only=True
torch.serialization.add_safe_globals([RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell])
