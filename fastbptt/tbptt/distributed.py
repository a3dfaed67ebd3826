"""Helpers for data-parallel runs under ``torchrun``: this process's place, the carried state's
batch gathered from (and split over) the processes, reductions of scalars, and the end of a
process.

Every collective runs on the training device: NCCL (CUDA) takes only CUDA tensors, gloo (CPU)
takes CPU tensors, and each run has one default group of the matching kind.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def process_place() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(t: Tensor, dim: int) -> Tensor:
    """Concatenates every process's shard of ``t`` along the batch dimension ``dim``."""
    _, size = process_place()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def shard_batch(t: Tensor, dim: int) -> Tensor:
    """This process's equal share of ``t`` along the batch dimension ``dim``."""
    rank, size = process_place()
    if size == 1:
        return t
    share = t.shape[dim] // size
    return t.narrow(dim, rank * share, share).contiguous()


def sum_over_processes(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64, reduced on ``device``)."""
    if process_place()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_processes(value: float, device: torch.device) -> float:
    return sum_over_processes([value], device)[0] / process_place()[1]


def any_over_processes(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (so all stop at the same update)."""
    return sum_over_processes([float(flag)], device)[0] > 0


def end_process(status: int, *, wait: bool) -> NoReturn:
    """Ends this process of a multi-process run with exit ``status``, without tearing the process
    group down: when ``wait``, after every process gets here; then the output is flushed and the
    process exits at once.

    Why not ``destroy_process_group``: gloo's teardown can deadlock. The main thread, holding the
    GIL, frees the last reference to the group and joins gloo's worker thread, while that thread
    still has to free a finished collective (kept alive by a later barrier) whose tensors Python
    has dropped, which needs the GIL. On a loaded 2-core machine about 1 run in 10 hung there.
    Everything a run writes is closed before this is called."""
    if wait and dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
