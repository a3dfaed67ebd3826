"""The pointwise math of one hidden unit per cell, written once for the Triton kernels
(the equations: :mod:`fastbptt.cells`; the C++ counterpart: ``csrc/cpu/cells/``).

Each function works elementwise on tiles of any shape; the kernels load the tiles and store the
results.
"""
from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (Triton requires it in a jit function's module)

from .common import sigmoid, tanh


# ----------------------------------------------------------------------------- GRU: gates [r, z, n]

@triton.jit
def gru_gates(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n):
    """r, z, n from the input (``x W_ih^T + b_ih``) and recurrent (``h W_hh^T + b_hh``) parts."""
    r = sigmoid(gi_r + gh_r)
    z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)
    return r, z, n


@triton.jit
def gru_next_state(z, n, h_prev):
    return (1.0 - z) * n + z * h_prev


@triton.jit
def gru_grads(r, z, n, gh_n, h_prev, dh):
    """Gradients w.r.t. the summed pre-activations of r, z, n (``dgi``; ``dgh_n`` is
    ``d_n * r``) from ``dh = dL/dh'``; the direct part of ``dL/dh`` is ``dh * z``."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    d_r = d_n * gh_n * r * (1.0 - r)
    return d_r, d_z, d_n


# ----------------------------------------------------------------------------- LSTM: gates [i, f, g, o]

@triton.jit
def lstm_next_cell(pre_i, pre_f, pre_g, c_prev):
    """``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)`` from the gate pre-activations."""
    return sigmoid(pre_f) * c_prev + sigmoid(pre_i) * tanh(pre_g)


@triton.jit
def lstm_hidden(pre_o, c_new):
    """``m = sigmoid(o) * tanh(c')``: the new h, or the input of the projection."""
    return sigmoid(pre_o) * tanh(c_new)


@triton.jit
def lstm_gates(pre_i, pre_f, pre_g, pre_o):
    return sigmoid(pre_i), sigmoid(pre_f), tanh(pre_g), sigmoid(pre_o)


@triton.jit
def lstm_grads(i, f, g, o, c_prev, tanh_c, dm, dc):
    """Gradients w.r.t. the pre-activations of i, f, g, o and ``dL/dc`` carried to the earlier
    step, from the recomputed gates, ``tanh(c')``, ``dm = dL/dm`` and ``dc = dL/dc'``."""
    dc = dc + dm * o * (1.0 - tanh_c * tanh_c)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dm * tanh_c * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc * f
