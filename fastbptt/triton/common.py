"""Launch helpers and device functions shared by the Triton kernels.

Every kernel follows one plan (see ``docs/triton.md``): one launch per chunk, one program per
tile of ``BLOCK_B`` batch rows, and inside it a loop over the chunk's steps that visits every
hidden tile in turn. A program therefore owns all hidden units of its rows, which is what lets a
whole chunk run in one launch without a grid-wide barrier (Triton has none, and its interpreter
runs programs one after another). State that other tiles of the same program read in the next
phase goes through small float32 scratch buffers, double-buffered so that no phase reads and
writes the same address; ``tl.debug_barrier()`` orders the phases on a GPU.

This module is imported lazily, on the first kernel call: ``triton.jit`` decides at decoration
time whether a kernel is compiled or interpreted, so ``TRITON_INTERPRET`` must be set by then.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Decided when the kernels were decorated; the launch checks that tensors fit this mode.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Tile limits. A hidden size that fits one tile keeps its recurrent weights in registers for the
# whole chunk (RESIDENT); above it they are streamed tile by tile from global memory (L2) each step.
# 32-wide tiles keep the four LSTM weight tiles at 32 registers per thread with 4 warps (not tuned
# on a GPU yet).
MAX_BLOCK_N = 32
MAX_BLOCK_B = 32
MIN_BLOCK = 16          # tl.dot needs every dimension >= 16; smaller batches and sizes are masked
NUM_WARPS = 4

# TF32 for the recurrent products on GPUs that have it. Off by default: float32 results then
# match torch.nn to float32 rounding. FASTBPTT_TRITON_TF32=1 turns it on.
ALLOW_TF32 = os.environ.get("FASTBPTT_TRITON_TF32", "0") == "1"

INT32_MAX = 2 ** 31 - 1


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def fits_one_tile(*sizes: int) -> bool:
    """Whether a cell with these hidden/projection sizes has W_hh tiles that fit one tile, which the
    resident path needs."""
    return max(sizes) <= MAX_BLOCK_N


def block_sizes(batch: int, *sizes: int, path: str) -> tuple[int, int, bool]:
    """(BLOCK_B, BLOCK_N, RESIDENT) for a batch, the hidden/projection sizes of a cell and the
    kernel path: "resident" (W_hh's tiles held in registers; the sizes must fit one tile) or
    "streamed" (tiles reloaded each step)."""
    if path not in ("resident", "streamed"):
        raise ValueError(f"path must be 'resident' or 'streamed', got {path!r}")
    if path == "resident" and not fits_one_tile(*sizes):
        raise ValueError(f"the resident path needs sizes {sizes} to fit one tile of {MAX_BLOCK_N}")
    block_b = _pow2(batch, MIN_BLOCK, MAX_BLOCK_B)
    block_n = _pow2(max(sizes), MIN_BLOCK, MAX_BLOCK_N)
    return block_b, block_n, path == "resident"


def precision() -> str:
    return "tf32" if ALLOW_TF32 else "ieee"


def grid(batch: int, block_b: int) -> tuple[int]:
    return (triton.cdiv(batch, block_b),)


def check_launch(*tensors: Optional[Tensor]) -> None:
    """Clear errors instead of a crash deep inside Triton."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError(
                "fastbptt's Triton kernels got CPU tensors but run compiled (TRITON_INTERPRET was not 1 when "
                "they were first loaded); Triton runs CPU tensors only in its interpreter: set "
                "TRITON_INTERPRET=1 before the first Triton kernel is used, or move the tensors to a CUDA device")
        if t.numel() > INT32_MAX:
            raise ValueError(f"a tensor of {t.numel()} elements is beyond the Triton kernels' 32-bit offsets; "
                             "use a smaller chunk_size")
        if not t.is_contiguous():
            raise ValueError("the Triton kernels take contiguous tensors (the kernel contract)")


def valid_arg(valid: Optional[Tensor], like: Tensor) -> tuple[Tensor, bool]:
    """The [C, B] mask as bytes (a view, no copy) and HAS_VALID; a dummy pointer when there is none."""
    if valid is None:
        return like, False
    return valid.contiguous().view(torch.uint8), True


def scratch(*shape: int, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device=like.device)


# ----------------------------------------------------------------------------- device functions

@triton.jit
def sigmoid(x):
    # from builtins only: triton.language's own jit helpers (tl.sigmoid) break the interpreter when
    # triton was imported before TRITON_INTERPRET was set
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tl.extra.libdevice is not available in the interpreter
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def load_tile(p, o_b, o_n, m_b, n, N):
    """[BLOCK_B, BLOCK_N] float32 tile of a row-major [., n-wide] matrix: rows o_b, columns o_n."""
    m = m_b[:, None] & (o_n < N)[None, :]
    return tl.load(p + o_b[:, None] * n + o_n[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def store_tile(p, x, o_b, o_n, m_b, n, N):
    m = m_b[:, None] & (o_n < N)[None, :]
    tl.store(p + o_b[:, None] * n + o_n[None, :], x.to(p.dtype.element_ty), mask=m)


@triton.jit
def store_step(p_cur, p_nxt, p_out_t, h_new, p_valid_t, o_b, o_n, m_b, N, HAS_VALID: tl.constexpr):
    """Writes one step's state tile (to ``p_nxt``) and output tile (to ``p_out_t``), both
    row-major [., N]: rows that are padding at this step (``p_valid_t``: the step's [B] mask)
    keep their state from ``p_cur`` and output zeros."""
    h = h_new
    y = h_new
    if HAS_VALID:
        b_v = tl.load(p_valid_t + o_b, mask=m_b, other=0) != 0
        h = tl.where(b_v[:, None], h_new, load_tile(p_cur, o_b, o_n, m_b, N, N))
        y = tl.where(b_v[:, None], h_new, 0.0)
    store_tile(p_nxt, h, o_b, o_n, m_b, N, N)
    store_tile(p_out_t, y, o_b, o_n, m_b, N, N)


@triton.jit
def w_tile_t(p_w, row0, o_j, o_k, H, K):
    """[BLOCK_N(k), BLOCK_N(j)] tile of W^T: element (k, j) = W[row0 + j, k]; W is [., K], j < H."""
    m = (o_k < K)[:, None] & (o_j < H)[None, :]
    return tl.load(p_w + (row0 + o_j[None, :]) * K + o_k[:, None], mask=m, other=0.0).to(tl.float32)


@triton.jit
def w_tile(p_w, row0, o_k, o_j, H, K):
    """[BLOCK_N(k), BLOCK_N(j)] tile of W: element (k, j) = W[row0 + k, j]; W is [., K], k < H."""
    m = (o_k < H)[:, None] & (o_j < K)[None, :]
    return tl.load(p_w + (row0 + o_k[:, None]) * K + o_j[None, :], mask=m, other=0.0).to(tl.float32)
