"""Stream batching for TBPTT: a long sequence cut into ``B`` streams read window by window."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .config import SAMPLING, check_positive_int


class Window(NamedTuple):
    input: Tensor    # [B, T, ...]
    target: Tensor   # [B, T, ...]
    reset: bool      # True: start from a zero state (epoch start, or every window when random)


class StreamBatcher:
    """Batches a long sequence for TBPTT.

    ``mode="stream"``: the first ``B * L`` items (``L = (N - 1) // B`` with next-item targets)
    form ``B`` contiguous streams of length ``L``; stream ``b`` is ``data[b*L : (b+1)*L]``. Window
    ``i`` holds columns ``[i*T, (i+1)*T)`` of every stream (the last window may be shorter), so
    consecutive windows continue each other and one epoch reads every item of the ``B * L``
    exactly once. ``mode="random"``: each window draws ``B`` offsets uniformly from the whole
    sequence (a torch generator seeded by ``seed``, saved in :meth:`state_dict`); an epoch has
    as many windows as would cover the data once.

    data: [N, ...]; targets: [N, ...] aligned with ``data``, or None for ``data`` shifted by one.
    With ``world_size > 1`` this process yields streams ``[rank*B/w, (rank+1)*B/w)`` of the
    global batch ``B`` (random offsets are drawn for the global batch, then sliced), so the
    processes together read exactly what one process with batch ``B`` reads.
    names: what the sequence is and which setting sets ``batch_size``, for error messages.
    """

    def __init__(self, data: Tensor, batch_size: int, num_steps: int, *, targets: Optional[Tensor] = None,
                 mode: str = "stream", seed: int = 0, rank: int = 0, world_size: int = 1,
                 names: tuple[str, str] = ("training", "batch_size")):
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_steps", num_steps)
        if mode not in SAMPLING:
            raise ValueError(f"mode must be one of {SAMPLING}, got {mode!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if targets is None:
            inputs, targets = data[:-1], data[1:]
        else:
            if targets.shape[0] != data.shape[0]:
                raise ValueError(f"targets must have as many items as data, got {targets.shape[0]} and {data.shape[0]}")
            inputs = data
        n = inputs.shape[0]
        if n < batch_size:
            role, size_name = names
            raise ValueError(f"the {role} sequence has {n} items, fewer than {size_name}={batch_size} streams; use a "
                             f"longer {role} text or a smaller {size_name} (--{size_name.replace('_', '-')})")
        if mode == "random" and n < num_steps:
            raise ValueError(f"random windows of {num_steps} steps need at least that many items, the sequence has {n}")
        self.batch_size, self.num_steps, self.mode = batch_size, num_steps, mode
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.stream_length = n // batch_size
        used = self.stream_length * batch_size
        # [B, L, ...]: row b is stream b
        self._inputs = inputs[:used].reshape(batch_size, self.stream_length, *inputs.shape[1:])
        self._targets = targets[:used].reshape(batch_size, self.stream_length, *targets.shape[1:])
        self._flat_inputs, self._flat_targets = inputs, targets
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0  # index of the next window within the epoch

    def __len__(self) -> int:
        """Windows per epoch."""
        if self.mode == "stream":
            return -(-self.stream_length // self.num_steps)
        return max(1, self._flat_inputs.shape[0] // (self.batch_size * self.num_steps))

    @property
    def tokens_per_epoch(self) -> int:
        return self.stream_length * self.batch_size

    def _local(self, t: Tensor) -> Tensor:
        return t[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def _window(self, i: int) -> Window:
        if self.mode == "stream":
            lo, hi = i * self.num_steps, min((i + 1) * self.num_steps, self.stream_length)
            return Window(self._local(self._inputs[:, lo:hi]), self._local(self._targets[:, lo:hi]), reset=i == 0)
        n = self._flat_inputs.shape[0]
        offsets = torch.randint(0, n - self.num_steps + 1, (self.batch_size,), generator=self._generator)
        index = self._local(offsets)[:, None] + torch.arange(self.num_steps)
        return Window(self._flat_inputs[index], self._flat_targets[index], reset=True)

    def __iter__(self) -> Iterator[Window]:
        """Yields the remaining windows of the current epoch, then moves to the next epoch."""
        while self.position < len(self):
            window = self._window(self.position)
            self.position += 1
            yield window
        self.position = 0
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self._generator.get_state(),
                "mode": self.mode, "batch_size": self.batch_size, "num_steps": self.num_steps,
                "stream_length": self.stream_length}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "batch_size", "num_steps", "stream_length"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data stream has {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}; resume with the same data and batching settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._generator.set_state(state["generator"])
