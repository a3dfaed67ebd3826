"""LSTM forward and backward over one chunk, with or without projection (contract:
:mod:`fastbptt.reference`).

Gate rows i, f, g, o (see :mod:`fastbptt.cells`). ``gates_in = x W_ih^T + b_ih + b_hh`` comes in
from the orchestrator. With a projection ``W_hr: [P, H]`` each step has a second phase,
``h = m W_hr^T`` with ``m = o * tanh(c)``, which needs every hidden tile of ``m`` first. The
backward rebuilds the chunk's cell states from the boundary ``c0`` in a first elementwise pass;
the projection's weight gradient is one product over the chunk (no per-step accumulation).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cells import lstm_gates, lstm_grads, lstm_hidden, lstm_next_cell
from .common import (NUM_WARPS, block_sizes, check_launch, grid, load_tile, precision, scratch, store_step, store_tile,
                     tanh, valid_arg, w_tile, w_tile_t)


@triton.jit
def lstm_forward_kernel(
    p_gin,       # [C, B, 4H]  x W_ih^T + b_ih + b_hh
    p_w,         # [4H, P]     W_hh
    p_whr,       # [P, H]      W_hr (PROJ)
    p_valid,     # [C, B]      uint8 (HAS_VALID)
    p_out,       # [C, B, P]
    p_gates,     # [C, B, 4H]  full pre-activations (STORE_GATES)
    p_h,         # [2, B, P]   float32; [0] holds h0, step t reads [t % 2] and writes [(t + 1) % 2]
    p_c,         # [2, B, H]   float32; likewise for c
    p_m,         # [B, H]      float32: o * tanh(c) of the step, input of the projection (PROJ)
    C, B, H, P,
    PROJ: tl.constexpr, HAS_VALID: tl.constexpr, STORE_GATES: tl.constexpr, RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    if RESIDENT:
        b_wi = w_tile_t(p_w, 0, o_n, o_n, H, P)
        b_wf = w_tile_t(p_w, H, o_n, o_n, H, P)
        b_wg = w_tile_t(p_w, 2 * H, o_n, o_n, H, P)
        b_wo = w_tile_t(p_w, 3 * H, o_n, o_n, H, P)
        if PROJ:
            b_whr = w_tile_t(p_whr, 0, o_n, o_n, P, H)
    for t in range(C):
        p_hcur = p_h + (t % 2) * B * P
        p_hnxt = p_h + ((t + 1) % 2) * B * P
        p_ccur = p_c + (t % 2) * B * H
        p_cnxt = p_c + ((t + 1) % 2) * B * H
        p_gin_t = p_gin + t * B * 4 * H
        if HAS_VALID:
            b_v = tl.load(p_valid + t * B + o_b, mask=m_b, other=0) != 0
        # phase 1: gates, c and m of every hidden tile
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            acc_i = load_tile(p_gin_t, o_b, o_j, m_b, 4 * H, H)
            acc_f = load_tile(p_gin_t + H, o_b, o_j, m_b, 4 * H, H)
            acc_g = load_tile(p_gin_t + 2 * H, o_b, o_j, m_b, 4 * H, H)
            acc_o = load_tile(p_gin_t + 3 * H, o_b, o_j, m_b, 4 * H, H)
            for k0 in range(0, P, BLOCK_N):
                o_k = k0 + o_n
                b_h = load_tile(p_hcur, o_b, o_k, m_b, P, P)
                if not RESIDENT:
                    b_wi = w_tile_t(p_w, 0, o_j, o_k, H, P)
                    b_wf = w_tile_t(p_w, H, o_j, o_k, H, P)
                    b_wg = w_tile_t(p_w, 2 * H, o_j, o_k, H, P)
                    b_wo = w_tile_t(p_w, 3 * H, o_j, o_k, H, P)
                acc_i += tl.dot(b_h, b_wi, input_precision=PRECISION)
                acc_f += tl.dot(b_h, b_wf, input_precision=PRECISION)
                acc_g += tl.dot(b_h, b_wg, input_precision=PRECISION)
                acc_o += tl.dot(b_h, b_wo, input_precision=PRECISION)
            if STORE_GATES:
                p_gates_t = p_gates + t * B * 4 * H
                store_tile(p_gates_t, acc_i, o_b, o_j, m_b, 4 * H, H)
                store_tile(p_gates_t + H, acc_f, o_b, o_j, m_b, 4 * H, H)
                store_tile(p_gates_t + 2 * H, acc_g, o_b, o_j, m_b, 4 * H, H)
                store_tile(p_gates_t + 3 * H, acc_o, o_b, o_j, m_b, 4 * H, H)
            c_prev = load_tile(p_ccur, o_b, o_j, m_b, H, H)
            c = lstm_next_cell(acc_i, acc_f, acc_g, c_prev)
            m = lstm_hidden(acc_o, c)
            if HAS_VALID:
                c = tl.where(b_v[:, None], c, c_prev)
            store_tile(p_cnxt, c, o_b, o_j, m_b, H, H)
            if PROJ:
                store_tile(p_m, m, o_b, o_j, m_b, H, H)
            else:
                store_step(p_hcur, p_hnxt, p_out + t * B * P, m, p_valid + t * B, o_b, o_j, m_b, P, HAS_VALID)
        if PROJ:
            tl.debug_barrier()
            # phase 2: h = m W_hr^T over the output tiles
            for p0 in range(0, P, BLOCK_N):
                o_p = p0 + o_n
                acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
                for k0 in range(0, H, BLOCK_N):
                    o_k = k0 + o_n
                    if not RESIDENT:
                        b_whr = w_tile_t(p_whr, 0, o_p, o_k, P, H)
                    acc += tl.dot(load_tile(p_m, o_b, o_k, m_b, H, H), b_whr, input_precision=PRECISION)
                store_step(p_hcur, p_hnxt, p_out + t * B * P, acc, p_valid + t * B, o_b, o_p, m_b, P, HAS_VALID)
        tl.debug_barrier()


@triton.jit
def lstm_backward_kernel(
    p_gates,     # [C, B, 4H]  full pre-activations
    p_w,         # [4H, P]     W_hh
    p_whr,       # [P, H]      W_hr (PROJ)
    p_gout,      # [C, B, P]
    p_valid,     # [C, B]      uint8 (HAS_VALID)
    p_dgates,    # [C, B, 4H]  output
    p_call,      # [C + 1, B, H] float32: [0] holds c0, [t + 1] the state after step t (rebuilt here)
    p_dh,        # [2, B, P]   float32; [0] holds grad_h_n, walking back step s reads [s % 2], writes the other
    p_dc,        # [2, B, H]   float32; likewise for dc
    p_dg,        # [B, 4H]     float32: this step's gate gradients for the product with W_hh
    p_dht,       # [C, B, P]   float32: dh of each step's output, zero where invalid (PROJ)
    p_mall,      # [C, B, H]   float32: m = o * tanh(c) of each step (PROJ)
    C, B, H, P,
    PROJ: tl.constexpr, HAS_VALID: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_n = tl.arange(0, BLOCK_N)
    # pass 1: the chunk's cell states from its boundary state (elementwise, cheap)
    for t in range(C):
        p_g_t = p_gates + t * B * 4 * H
        if HAS_VALID:
            b_v = tl.load(p_valid + t * B + o_b, mask=m_b, other=0) != 0
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            c_prev = load_tile(p_call + t * B * H, o_b, o_j, m_b, H, H)
            c = lstm_next_cell(load_tile(p_g_t, o_b, o_j, m_b, 4 * H, H), load_tile(p_g_t + H, o_b, o_j, m_b, 4 * H, H),
                               load_tile(p_g_t + 2 * H, o_b, o_j, m_b, 4 * H, H), c_prev)
            if HAS_VALID:
                c = tl.where(b_v[:, None], c, c_prev)
            store_tile(p_call + (t + 1) * B * H, c, o_b, o_j, m_b, H, H)
        tl.debug_barrier()
    if RESIDENT:
        b_wi = w_tile(p_w, 0, o_n, o_n, H, P)
        b_wf = w_tile(p_w, H, o_n, o_n, H, P)
        b_wg = w_tile(p_w, 2 * H, o_n, o_n, H, P)
        b_wo = w_tile(p_w, 3 * H, o_n, o_n, H, P)
        if PROJ:
            b_whr = w_tile(p_whr, 0, o_n, o_n, P, H)
    # pass 2: walk the chunk back
    for s in range(C):
        t = C - 1 - s
        p_dhcur = p_dh + (s % 2) * B * P
        p_dhnxt = p_dh + ((s + 1) % 2) * B * P
        p_dccur = p_dc + (s % 2) * B * H
        p_dcnxt = p_dc + ((s + 1) % 2) * B * H
        p_g_t = p_gates + t * B * 4 * H
        if HAS_VALID:
            b_v = tl.load(p_valid + t * B + o_b, mask=m_b, other=0) != 0
        if PROJ:
            # phase 0: the output's gradient, needed whole by every hidden tile through W_hr
            for p0 in range(0, P, BLOCK_N):
                o_p = p0 + o_n
                dht = load_tile(p_dhcur, o_b, o_p, m_b, P, P) + load_tile(p_gout + t * B * P, o_b, o_p, m_b, P, P)
                if HAS_VALID:
                    dht = tl.where(b_v[:, None], dht, 0.0)
                store_tile(p_dht + t * B * P, dht, o_b, o_p, m_b, P, P)
            tl.debug_barrier()
        # phase 1: gate gradients and dc of every hidden tile
        for j0 in range(0, H, BLOCK_N):
            o_j = j0 + o_n
            if PROJ:
                dm = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
                for k0 in range(0, P, BLOCK_N):
                    o_k = k0 + o_n
                    if not RESIDENT:
                        b_whr = w_tile(p_whr, 0, o_k, o_j, P, H)
                    dm += tl.dot(load_tile(p_dht + t * B * P, o_b, o_k, m_b, P, P), b_whr,
                                 input_precision=PRECISION)
            else:
                dm = load_tile(p_dhcur, o_b, o_j, m_b, P, P) + load_tile(p_gout + t * B * P, o_b, o_j, m_b, P, P)
                if HAS_VALID:
                    dm = tl.where(b_v[:, None], dm, 0.0)
            i, f, g, o = lstm_gates(load_tile(p_g_t, o_b, o_j, m_b, 4 * H, H),
                                    load_tile(p_g_t + H, o_b, o_j, m_b, 4 * H, H),
                                    load_tile(p_g_t + 2 * H, o_b, o_j, m_b, 4 * H, H),
                                    load_tile(p_g_t + 3 * H, o_b, o_j, m_b, 4 * H, H))
            c_prev = load_tile(p_call + t * B * H, o_b, o_j, m_b, H, H)
            tanh_c = tanh(load_tile(p_call + (t + 1) * B * H, o_b, o_j, m_b, H, H))
            dc_carry = load_tile(p_dccur, o_b, o_j, m_b, H, H)
            dc = dc_carry
            if HAS_VALID:
                dc = tl.where(b_v[:, None], dc, 0.0)
            d_i, d_f, d_g, d_o, dc_prev = lstm_grads(i, f, g, o, c_prev, tanh_c, dm, dc)
            if HAS_VALID:
                dc_prev = tl.where(b_v[:, None], dc_prev, dc_carry)
            p_dgates_t = p_dgates + t * B * 4 * H
            store_tile(p_dgates_t, d_i, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dgates_t + H, d_f, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dgates_t + 2 * H, d_g, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dgates_t + 3 * H, d_o, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dg, d_i, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dg + H, d_f, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dg + 2 * H, d_g, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dg + 3 * H, d_o, o_b, o_j, m_b, 4 * H, H)
            store_tile(p_dcnxt, dc_prev, o_b, o_j, m_b, H, H)
            if PROJ:
                store_tile(p_mall + t * B * H, o * tanh_c, o_b, o_j, m_b, H, H)
        tl.debug_barrier()
        # phase 2: dh_prev = d_gates W_hh where the step is real, else the carried dh
        for p0 in range(0, P, BLOCK_N):
            o_p = p0 + o_n
            acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
            for k0 in range(0, H, BLOCK_N):
                o_k = k0 + o_n
                if not RESIDENT:
                    b_wi = w_tile(p_w, 0, o_k, o_p, H, P)
                    b_wf = w_tile(p_w, H, o_k, o_p, H, P)
                    b_wg = w_tile(p_w, 2 * H, o_k, o_p, H, P)
                    b_wo = w_tile(p_w, 3 * H, o_k, o_p, H, P)
                acc += tl.dot(load_tile(p_dg, o_b, o_k, m_b, 4 * H, H), b_wi, input_precision=PRECISION)
                acc += tl.dot(load_tile(p_dg + H, o_b, o_k, m_b, 4 * H, H), b_wf, input_precision=PRECISION)
                acc += tl.dot(load_tile(p_dg + 2 * H, o_b, o_k, m_b, 4 * H, H), b_wg, input_precision=PRECISION)
                acc += tl.dot(load_tile(p_dg + 3 * H, o_b, o_k, m_b, 4 * H, H), b_wo, input_precision=PRECISION)
            if HAS_VALID:
                acc = tl.where(b_v[:, None], acc, load_tile(p_dhcur, o_b, o_p, m_b, P, P))
            store_tile(p_dhnxt, acc, o_b, o_p, m_b, P, P)
        tl.debug_barrier()


def lstm_forward(gates_in: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                 valid: Optional[Tensor], out: Tensor, gates_out: Optional[Tensor], path: str) -> tuple[Tensor, Tensor]:
    steps, batch, _ = gates_in.shape
    hidden, out_size = c0.shape[-1], h0.shape[-1]
    check_launch(gates_in, h0, c0, w_hh, w_hr, out, gates_out)
    h = scratch(2, batch, out_size, like=gates_in)
    c = scratch(2, batch, hidden, like=gates_in)
    h[0].copy_(h0)
    c[0].copy_(c0)
    proj = w_hr is not None
    m = scratch(batch, hidden, like=gates_in) if proj else c
    block_b, block_n, resident = block_sizes(batch, hidden, out_size, path=path)
    p_valid, has_valid = valid_arg(valid, gates_in)
    lstm_forward_kernel[grid(batch, block_b)](
        gates_in, w_hh, w_hr if proj else w_hh, p_valid, out, gates_out if gates_out is not None else gates_in,
        h, c, m, steps, batch, hidden, out_size,
        PROJ=proj, HAS_VALID=has_valid, STORE_GATES=gates_out is not None, RESIDENT=resident,
        PRECISION=precision(), BLOCK_B=block_b, BLOCK_N=block_n, num_warps=NUM_WARPS)
    dtype = gates_in.dtype
    return h[steps % 2].to(dtype, copy=True), c[steps % 2].to(dtype, copy=True)


def lstm_backward(gates: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], grad_out: Tensor,
                  grad_h_n: Tensor, grad_c_n: Tensor, valid: Optional[Tensor],
                  path: str) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    steps, batch, _ = gates.shape
    hidden, out_size = c0.shape[-1], grad_h_n.shape[-1]
    check_launch(gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n)
    grad_gates = torch.empty_like(gates)
    c_all = scratch(steps + 1, batch, hidden, like=gates)
    c_all[0].copy_(c0)
    dh = scratch(2, batch, out_size, like=gates)
    dc = scratch(2, batch, hidden, like=gates)
    dh[0].copy_(grad_h_n)
    dc[0].copy_(grad_c_n)
    dg = scratch(batch, 4 * hidden, like=gates)
    proj = w_hr is not None
    dht = scratch(steps, batch, out_size, like=gates) if proj else dg
    m_all = scratch(steps, batch, hidden, like=gates) if proj else dg
    block_b, block_n, resident = block_sizes(batch, hidden, out_size, path=path)
    p_valid, has_valid = valid_arg(valid, gates)
    lstm_backward_kernel[grid(batch, block_b)](
        gates, w_hh, w_hr if proj else w_hh, grad_out, p_valid, grad_gates, c_all, dh, dc, dg, dht, m_all,
        steps, batch, hidden, out_size,
        PROJ=proj, HAS_VALID=has_valid, RESIDENT=resident, PRECISION=precision(),
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=NUM_WARPS)
    dtype = gates.dtype
    # the projection's weight gradient: one [P, C*B] x [C*B, H] product for the chunk
    grad_w_hr = (dht.reshape(-1, out_size).t() @ m_all.reshape(-1, hidden)).to(dtype) if proj else None
    return grad_gates, dh[steps % 2].to(dtype, copy=True), dc[steps % 2].to(dtype, copy=True), grad_w_hr
