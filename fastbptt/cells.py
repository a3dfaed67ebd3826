"""Gate layouts and cell equations, defined once and shared by every backend.

Layouts follow ``torch.nn`` exactly, so a ``state_dict`` moves both ways:

* RNN  (G=1): ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, act = tanh or relu
* GRU  (G=3, rows r, z, n)::

      r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
      z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
      n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
      h' = (1 - z) * n + z * h

* LSTM (G=4, rows i, f, g, o), optional projection ``W_hr: [P, H]``::

      i, f, o = sigmoid(.), g = tanh(.)      (of W_ih x + b_ih + W_hh h + b_hh)
      c' = f * c + i * g
      h' = o * tanh(c')                       (h' = W_hr (o * tanh(c')) with projection)

Notation used across the package: ``gi = x W_ih^T (+ b_ih)``, ``gh = h W_hh^T (+ b_hh)``,
``[T, B, G*H]`` gate tensors with the G blocks of H columns in the order above.

The step functions below are the equations; the reference backend is a loop over them, and
their ``*_backward`` twins are the hand-derived gradients that every kernel reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CellSpec:
    """What the op layer, the fake kernels and the benchmarks need to know about a cell."""
    name: str                     # "rnn_tanh", "rnn_relu", "gru", "lstm"
    mode: str                     # torch.nn.RNNBase.mode
    kernel: str                   # kernel family: the prefix of its kernels ("rnn", "gru", "lstm")
    gate_names: tuple[str, ...]   # the G blocks of H rows of W_ih / W_hh, in torch.nn's order
    # columns per hidden unit kept per step with recompute off: GRU keeps gi and gh (b_hn sits
    # inside r * (.), so gh cannot be folded into gi), LSTM the gate sums, RNN nothing (its
    # backward needs only the output)
    saved_per_unit: int
    folds_hidden_bias: bool       # b_hh can be added to gi once (RNN, LSTM); not GRU
    has_cell_state: bool          # LSTM: carries c beside h, and may project h (W_hr)
    relu: bool = False            # RNN nonlinearity

    @property
    def num_gates(self) -> int:
        return len(self.gate_names)

    def saved_width(self, hidden: int) -> int:
        """Columns of the ``gates`` buffer the forward keeps per step with recompute off."""
        return self.saved_per_unit * hidden


SPECS: dict[str, CellSpec] = {spec.name: spec for spec in (
    CellSpec("rnn_tanh", "RNN_TANH", "rnn", ("h",), 0, folds_hidden_bias=True, has_cell_state=False),
    CellSpec("rnn_relu", "RNN_RELU", "rnn", ("h",), 0, folds_hidden_bias=True, has_cell_state=False, relu=True),
    CellSpec("gru", "GRU", "gru", ("r", "z", "n"), 6, folds_hidden_bias=False, has_cell_state=False),
    CellSpec("lstm", "LSTM", "lstm", ("i", "f", "g", "o"), 4, folds_hidden_bias=True, has_cell_state=True),
)}

CELLS = tuple(SPECS)
CELL_OF_MODE = {spec.mode: name for name, spec in SPECS.items()}   # torch.nn.RNNBase.mode -> cell


def spec(cell: str) -> CellSpec:
    """The spec of ``cell``; a clear error for an unknown name."""
    try:
        return SPECS[cell]
    except KeyError:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}") from None


# ----------------------------------------------------------------------------- forward steps

def rnn_step(pre: Tensor, relu: bool) -> Tensor:
    """pre: [B, H] = gi + gh -> h: [B, H]"""
    return torch.relu(pre) if relu else torch.tanh(pre)


def gru_step(gi: Tensor, gh: Tensor, h_prev: Tensor) -> Tensor:
    """gi, gh: [B, 3H]; h_prev: [B, H] -> h: [B, H]"""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h_prev


def lstm_step(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """gates: [B, 4H] pre-activations (gi + gh); c_prev: [B, H] -> (m, c) with m = o * tanh(c)."""
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


# ----------------------------------------------------------------------------- backward steps

def rnn_step_backward(h: Tensor, dh: Tensor, relu: bool) -> Tensor:
    """Gradient of the pre-activation from the step's own output h (no recompute needed)."""
    return dh * (h > 0).to(dh.dtype) if relu else dh * (1 - h * h)


def gru_step_backward(gi: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dh: [B, H] total gradient of h' -> (d_gi [B, 3H], d_gh [B, 3H], dh_prev direct term [B, H]).

    d_gi and d_gh differ only in the n block: d(gh_n) = d(gi_n) * r.
    """
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    d_n = dh * (1 - z) * (1 - n * n)
    d_z = dh * (h_prev - n) * z * (1 - z)
    d_r = d_n * h_n * r * (1 - r)
    d_gi = torch.cat([d_r, d_z, d_n], -1)
    d_gh = torch.cat([d_r, d_z, d_n * r], -1)
    return d_gi, d_gh, dh * z


def lstm_step_backward(gates: Tensor, c_prev: Tensor, c: Tensor, dm: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:
    """dm: gradient of m = o * tanh(c); dc: gradient of c from the next step.

    Returns (d_gates [B, 4H], dc_prev [B, H]).
    """
    i, f, g, o = gates.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    tanh_c = torch.tanh(c)
    dc = dc + dm * o * (1 - tanh_c * tanh_c)
    d_i = dc * g * i * (1 - i)
    d_f = dc * c_prev * f * (1 - f)
    d_g = dc * i * (1 - g * g)
    d_o = dm * tanh_c * o * (1 - o)
    return torch.cat([d_i, d_f, d_g, d_o], -1), dc * f
