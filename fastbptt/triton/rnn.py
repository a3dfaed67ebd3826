"""tanh/relu RNN forward and backward over one chunk (contract: :mod:`fastbptt.reference`).

``pre_in = x W_ih^T + b_ih + b_hh`` comes in from the orchestrator; the kernels add
``h_{t-1} W_hh^T`` and apply the activation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (NUM_WARPS, block_sizes, check_launch, grid, load_tile, precision, scratch, store_step, store_tile,
                     tanh, valid_arg, w_tile, w_tile_t)


@triton.jit
def rnn_forward_kernel(
    p_pre,       # [C, B, H]  x W_ih^T + b_ih + b_hh
    p_w,         # [H, H]     W_hh
    p_valid,     # [C, B]     uint8 (HAS_VALID)
    p_out,       # [C, B, H]
    p_state,     # [2, B, H]  float32; [0] holds h0, step t reads [t % 2] and writes [(t + 1) % 2]
    C, B, H,
    RELU: tl.constexpr, HAS_VALID: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        b_w = w_tile_t(p_w, 0, o_n, o_n, H, H)
    for t in range(C):
        p_cur = p_state + (t % 2) * B * H
        p_nxt = p_state + ((t + 1) % 2) * B * H
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            acc = load_tile(p_pre + t * B * H, o_b, o_j, m_b, H, H)
            for k0 in range(0, H, BLOCK_N):
                o_k = k0 + o_n
                if not RESIDENT:
                    b_w = w_tile_t(p_w, 0, o_j, o_k, H, H)
                acc += tl.dot(load_tile(p_cur, o_b, o_k, m_b, H, H), b_w, input_precision=PRECISION)
            if RELU:
                h = tl.maximum(acc, 0.0)
            else:
                h = tanh(acc)
            store_step(p_cur, p_nxt, p_out + t * B * H, h, p_valid + t * B, o_b, o_j, m_b, H, HAS_VALID)
        tl.debug_barrier()


@triton.jit
def rnn_backward_kernel(
    p_out,       # [C, B, H]  the chunk's outputs (the activation's derivative needs only them)
    p_w,         # [H, H]     W_hh
    p_gout,      # [C, B, H]
    p_valid,     # [C, B]     uint8 (HAS_VALID)
    p_dpre,      # [C, B, H]  output: gradient of the pre-activation
    p_dh,        # [2, B, H]  float32; [0] holds grad_h_n, walking back step s reads [s % 2], writes the other
    p_dg,        # [B, H]     float32: this step's d_pre for the product with W_hh
    C, B, H,
    RELU: tl.constexpr, HAS_VALID: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        b_w = w_tile(p_w, 0, o_n, o_n, H, H)
    for s in range(C):
        t = C - 1 - s
        p_cur = p_dh + (s % 2) * B * H
        p_nxt = p_dh + ((s + 1) % 2) * B * H
        if HAS_VALID:
            b_v = tl.load(p_valid + t * B + o_b, mask=m_b, other=0) != 0
        # phase 1: d_pre of every hidden tile (elementwise)
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            dh = load_tile(p_cur, o_b, o_j, m_b, H, H) + load_tile(p_gout + t * B * H, o_b, o_j, m_b, H, H)
            h = load_tile(p_out + t * B * H, o_b, o_j, m_b, H, H)
            if RELU:
                d = tl.where(h > 0.0, dh, 0.0)
            else:
                d = dh * (1.0 - h * h)
            if HAS_VALID:
                d = tl.where(b_v[:, None], d, 0.0)
            store_tile(p_dpre + t * B * H, d, o_b, o_j, m_b, H, H)
            store_tile(p_dg, d, o_b, o_j, m_b, H, H)
        tl.debug_barrier()
        # phase 2: dh_prev = d_pre W_hh where the step is real, else the carried dh
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            for k0 in range(0, H, BLOCK_N):
                o_k = k0 + o_n
                if not RESIDENT:
                    b_w = w_tile(p_w, 0, o_k, o_j, H, H)
                acc += tl.dot(load_tile(p_dg, o_b, o_k, m_b, H, H), b_w, input_precision=PRECISION)
            if HAS_VALID:
                acc = tl.where(b_v[:, None], acc, load_tile(p_cur, o_b, o_j, m_b, H, H))
            store_tile(p_nxt, acc, o_b, o_j, m_b, H, H)
        tl.debug_barrier()


def rnn_forward(pre_in: Tensor, h0: Tensor, w_hh: Tensor, valid: Optional[Tensor], out: Tensor,
                relu: bool, path: str) -> Tensor:
    steps, batch, hidden = pre_in.shape
    check_launch(pre_in, h0, w_hh, out)
    state = scratch(2, batch, hidden, like=pre_in)
    state[0].copy_(h0)
    block_b, block_n, resident = block_sizes(batch, hidden, path=path)
    p_valid, has_valid = valid_arg(valid, pre_in)
    rnn_forward_kernel[grid(batch, block_b)](
        pre_in, w_hh, p_valid, out, state, steps, batch, hidden,
        RELU=bool(relu), HAS_VALID=has_valid, RESIDENT=resident, PRECISION=precision(),
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return state[steps % 2].to(pre_in.dtype, copy=True)


def rnn_backward(out: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor, valid: Optional[Tensor],
                 relu: bool, path: str) -> tuple[Tensor, Tensor]:
    steps, batch, hidden = out.shape
    check_launch(out, w_hh, grad_out, grad_h_n)
    grad_pre = torch.empty_like(out)
    dh = scratch(2, batch, hidden, like=out)
    dh[0].copy_(grad_h_n)
    dg = scratch(batch, hidden, like=out)
    block_b, block_n, resident = block_sizes(batch, hidden, path=path)
    p_valid, has_valid = valid_arg(valid, out)
    rnn_backward_kernel[grid(batch, block_b)](
        out, w_hh, grad_out, p_valid, grad_pre, dh, dg, steps, batch, hidden,
        RELU=bool(relu), HAS_VALID=has_valid, RESIDENT=resident, PRECISION=precision(),
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return grad_pre, dh[steps % 2].to(out.dtype, copy=True)
