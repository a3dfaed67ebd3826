"""GRU forward and backward over one chunk (contract: :mod:`fastbptt.reference`).

Gate rows r, z, n (see :mod:`fastbptt.cells`); ``gh = h W_hh^T + b_hh`` is computed here, the
input part ``gi`` comes in from the orchestrator's chunk GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cells import gru_gates, gru_grads, gru_next_state
from .common import (NUM_WARPS, block_sizes, check_launch, grid, load_tile, precision, scratch, store_step, store_tile,
                     valid_arg, w_tile, w_tile_t)


@triton.jit
def gru_forward_kernel(
    p_gi,        # [C, B, 3H]  x W_ih^T + b_ih
    p_w,         # [3H, H]     W_hh
    p_bias,      # [3H]        b_hh (HAS_BIAS)
    p_valid,     # [C, B]      uint8 (HAS_VALID)
    p_out,       # [C, B, H]
    p_gh,        # [C, B, 3H]  h_{t-1} W_hh^T + b_hh (STORE_GH)
    p_state,     # [2, B, H]   float32; [0] holds h0, step t reads [t % 2] and writes [(t + 1) % 2]
    C, B, H,
    HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, STORE_GH: tl.constexpr, RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        # one tile covers H: the three gates' weights stay in registers for the whole chunk
        b_wr = w_tile_t(p_w, 0, o_n, o_n, H, H)
        b_wz = w_tile_t(p_w, H, o_n, o_n, H, H)
        b_wn = w_tile_t(p_w, 2 * H, o_n, o_n, H, H)
    for t in range(C):
        p_cur = p_state + (t % 2) * B * H
        p_nxt = p_state + ((t + 1) % 2) * B * H
        p_gi_t = p_gi + t * B * 3 * H
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            acc_r = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            acc_z = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            acc_n = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            for k0 in range(0, H, BLOCK_N):
                o_k = k0 + o_n
                b_h = load_tile(p_cur, o_b, o_k, m_b, H, H)
                if not RESIDENT:
                    b_wr = w_tile_t(p_w, 0, o_j, o_k, H, H)
                    b_wz = w_tile_t(p_w, H, o_j, o_k, H, H)
                    b_wn = w_tile_t(p_w, 2 * H, o_j, o_k, H, H)
                acc_r += tl.dot(b_h, b_wr, input_precision=PRECISION)
                acc_z += tl.dot(b_h, b_wz, input_precision=PRECISION)
                acc_n += tl.dot(b_h, b_wn, input_precision=PRECISION)
            if HAS_BIAS:
                m_j = o_j < H
                acc_r += tl.load(p_bias + o_j, mask=m_j, other=0.0).to(tl.float32)[None, :]
                acc_z += tl.load(p_bias + H + o_j, mask=m_j, other=0.0).to(tl.float32)[None, :]
                acc_n += tl.load(p_bias + 2 * H + o_j, mask=m_j, other=0.0).to(tl.float32)[None, :]
            if STORE_GH:
                p_gh_t = p_gh + t * B * 3 * H
                store_tile(p_gh_t, acc_r, o_b, o_j, m_b, 3 * H, H)
                store_tile(p_gh_t + H, acc_z, o_b, o_j, m_b, 3 * H, H)
                store_tile(p_gh_t + 2 * H, acc_n, o_b, o_j, m_b, 3 * H, H)
            r, z, n = gru_gates(load_tile(p_gi_t, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gi_t + H, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gi_t + 2 * H, o_b, o_j, m_b, 3 * H, H), acc_r, acc_z, acc_n)
            h = gru_next_state(z, n, load_tile(p_cur, o_b, o_j, m_b, H, H))
            store_step(p_cur, p_nxt, p_out + t * B * H, h, p_valid + t * B, o_b, o_j, m_b, H, HAS_VALID)
        # h_t is complete before any tile of step t + 1 reads it
        tl.debug_barrier()


@triton.jit
def gru_backward_kernel(
    p_gi, p_gh,  # [C, B, 3H]  recomputed pre-activations (gh includes b_hh)
    p_hp,        # [C, B, H]   h_prev: the state each step started from
    p_w,         # [3H, H]     W_hh
    p_gout,      # [C, B, H]   gradient of the outputs
    p_valid,     # [C, B]      uint8 (HAS_VALID)
    p_dgi, p_dgh,  # [C, B, 3H] outputs
    p_dh,        # [B, H]      float32: carried dh; holds grad_h_n on entry and grad_h0 on exit
    p_direct,    # [B, H]      float32: the direct term of dh_prev (z * dh, or dh where invalid)
    p_dg,        # [B, 3H]     float32: this step's d_gh for the product with W_hh
    C, B, H,
    HAS_VALID: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        b_wr = w_tile(p_w, 0, o_n, o_n, H, H)
        b_wz = w_tile(p_w, H, o_n, o_n, H, H)
        b_wn = w_tile(p_w, 2 * H, o_n, o_n, H, H)
    for s in range(C):
        t = C - 1 - s
        g_off = t * B * 3 * H
        if HAS_VALID:
            b_v = tl.load(p_valid + t * B + o_b, mask=m_b, other=0) != 0
        # phase 1: gate gradients of every hidden tile (elementwise)
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            dh_carry = load_tile(p_dh, o_b, o_j, m_b, H, H)
            dh = dh_carry + load_tile(p_gout + t * B * H, o_b, o_j, m_b, H, H)
            gh_n = load_tile(p_gh + g_off + 2 * H, o_b, o_j, m_b, 3 * H, H)
            r, z, n = gru_gates(load_tile(p_gi + g_off, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gi + g_off + H, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gi + g_off + 2 * H, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gh + g_off, o_b, o_j, m_b, 3 * H, H),
                                load_tile(p_gh + g_off + H, o_b, o_j, m_b, 3 * H, H), gh_n)
            d_r, d_z, d_n = gru_grads(r, z, n, gh_n, load_tile(p_hp + t * B * H, o_b, o_j, m_b, H, H), dh)
            direct = dh * z
            if HAS_VALID:
                d_n = tl.where(b_v[:, None], d_n, 0.0)
                d_z = tl.where(b_v[:, None], d_z, 0.0)
                d_r = tl.where(b_v[:, None], d_r, 0.0)
                direct = tl.where(b_v[:, None], direct, dh_carry)
            d_hn = d_n * r
            store_tile(p_dgi + g_off, d_r, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dgi + g_off + H, d_z, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dgi + g_off + 2 * H, d_n, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dgh + g_off, d_r, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dgh + g_off + H, d_z, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dgh + g_off + 2 * H, d_hn, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dg, d_r, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dg + H, d_z, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_dg + 2 * H, d_hn, o_b, o_j, m_b, 3 * H, H)
            store_tile(p_direct, direct, o_b, o_j, m_b, H, H)
        tl.debug_barrier()
        # phase 2: dh_prev = direct + d_gh W_hh, through the transposed recurrent weights
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            acc = load_tile(p_direct, o_b, o_j, m_b, H, H)
            for k0 in range(0, H, BLOCK_N):
                o_k = k0 + o_n
                if not RESIDENT:
                    b_wr = w_tile(p_w, 0, o_k, o_j, H, H)
                    b_wz = w_tile(p_w, H, o_k, o_j, H, H)
                    b_wn = w_tile(p_w, 2 * H, o_k, o_j, H, H)
                acc += tl.dot(load_tile(p_dg, o_b, o_k, m_b, 3 * H, H), b_wr, input_precision=PRECISION)
                acc += tl.dot(load_tile(p_dg + H, o_b, o_k, m_b, 3 * H, H), b_wz, input_precision=PRECISION)
                acc += tl.dot(load_tile(p_dg + 2 * H, o_b, o_k, m_b, 3 * H, H), b_wn, input_precision=PRECISION)
            store_tile(p_dh, acc, o_b, o_j, m_b, H, H)
        tl.debug_barrier()


def gru_forward(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], valid: Optional[Tensor],
                out: Tensor, gh_out: Optional[Tensor], path: str) -> Tensor:
    steps, batch, _ = gi.shape
    hidden = h0.shape[-1]
    check_launch(gi, h0, w_hh, b_hh, out, gh_out)
    state = scratch(2, batch, hidden, like=gi)
    state[0].copy_(h0)
    block_b, block_n, resident = block_sizes(batch, hidden, path=path)
    p_valid, has_valid = valid_arg(valid, gi)
    gru_forward_kernel[grid(batch, block_b)](
        gi, w_hh, b_hh if b_hh is not None else w_hh, p_valid, out, gh_out if gh_out is not None else gi, state,
        steps, batch, hidden,
        HAS_BIAS=b_hh is not None, HAS_VALID=has_valid, STORE_GH=gh_out is not None, RESIDENT=resident,
        PRECISION=precision(), BLOCK_B=block_b, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return state[steps % 2].to(gi.dtype, copy=True)


def gru_backward(gi: Tensor, gh: Tensor, h_prev: Tensor, w_hh: Tensor, grad_out: Tensor, grad_h_n: Tensor,
                 valid: Optional[Tensor], path: str) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch, _ = gi.shape
    hidden = h_prev.shape[-1]
    check_launch(gi, gh, h_prev, w_hh, grad_out, grad_h_n)
    grad_gi, grad_gh = torch.empty_like(gi), torch.empty_like(gh)
    dh = grad_h_n.to(torch.float32, copy=True)
    direct = scratch(batch, hidden, like=gi)
    dg = scratch(batch, 3 * hidden, like=gi)
    block_b, block_n, resident = block_sizes(batch, hidden, path=path)
    p_valid, has_valid = valid_arg(valid, gi)
    gru_backward_kernel[grid(batch, block_b)](
        gi, gh, h_prev, w_hh, grad_out, p_valid, grad_gi, grad_gh, dh, direct, dg,
        steps, batch, hidden,
        HAS_VALID=has_valid, RESIDENT=resident, PRECISION=precision(), BLOCK_B=block_b, BLOCK_N=block_n,
        num_warps=NUM_WARPS)
    return grad_gi, grad_gh, dh.to(gi.dtype)

