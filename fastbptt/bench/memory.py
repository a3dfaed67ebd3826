"""Activation memory: the bytes autograd keeps after a forward pass."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves while ``forward()`` runs.

    Tensors in ``exclude`` (parameters, the input: owned by the caller anyway) are not counted;
    a storage saved several times counts once. Returns the total in bytes.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and storage.nbytes():
            storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    del result
    return sum(storages.values())


def peak_cuda_bytes(step: Callable[[], object], device=None) -> int:
    """Peak bytes allocated on the GPU while ``step()`` runs (e.g. one forward+backward), above
    what was already allocated before it (parameters, input, anything the caller holds)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - before)
