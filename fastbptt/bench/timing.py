"""Interleaved timing: every candidate of a case is warmed up, then timed in rounds
(A B C, B C A, C A B, ...) so that drift of the machine (other load, clocks, caches) hits all of
them alike; the figures are medians with min and max over the rounds.

On CPU a round is timed with ``time.perf_counter``; on GPU with CUDA events recorded around the
forward and the backward on the current stream, with a device synchronisation before each round
(nothing of the previous candidate is still queued) and after it (the events are complete).
"""
from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch


class Timeable(Protocol):
    train: bool

    def reset(self) -> None: ...          # untimed: drop gradients of the previous round
    def forward(self): ...                 # returns what backward takes
    def backward(self, out) -> None: ...


@dataclass
class Samples:
    forward: list[float] = field(default_factory=list)   # seconds
    backward: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def total(self) -> list[float]:
        if not self.backward:
            return list(self.forward)
        return [f + b for f, b in zip(self.forward, self.backward)]


def summary(seconds: list[float]) -> Optional[dict]:
    """median, min and max in milliseconds, the number of rounds and every sample."""
    if not seconds:
        return None
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms),
            "samples_ms": [round(v, 6) for v in ms]}


def _context(bench: Timeable):
    return contextlib.nullcontext() if bench.train else torch.inference_mode()


def time_cpu(bench: Timeable) -> tuple[float, Optional[float]]:
    bench.reset()
    with _context(bench):
        t0 = time.perf_counter()
        out = bench.forward()
        t1 = time.perf_counter()
        if not bench.train:
            return t1 - t0, None
        bench.backward(out)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_cuda(bench: Timeable) -> tuple[float, Optional[float]]:
    bench.reset()
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    torch.cuda.synchronize()
    with _context(bench):
        start.record()
        out = bench.forward()
        mid.record()
        if bench.train:
            bench.backward(out)
        end.record()
    torch.cuda.synchronize()
    forward = start.elapsed_time(mid) / 1e3
    return forward, (mid.elapsed_time(end) / 1e3 if bench.train else None)


def clock_for(device: str) -> Callable[[Timeable], tuple[float, Optional[float]]]:
    return time_cuda if device == "cuda" else time_cpu


def describe_error(exc: BaseException) -> str:
    """One line for the table, the last frames for the JSON."""
    text = f"{type(exc).__name__}: {exc}".strip()
    tb = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(tb))
    return f"{text} (at {where})" if where else text


def interleaved(benches: dict[str, Timeable], warmup: int, reps: int, device: str) -> dict[str, Samples]:
    """Warm every bench up ``warmup`` times, then time ``reps`` rounds, rotating the order each
    round. A bench that raises is taken out of the rounds and reported with its error; the others
    go on."""
    clock = clock_for(device)
    results = {label: Samples() for label in benches}
    active = list(benches)

    def attempt(label: str, record: bool) -> None:
        try:
            forward, backward = clock(benches[label])
        except Exception as exc:  # reported per candidate, never raised past the case
            results[label].error = describe_error(exc)
            results[label].forward.clear()
            results[label].backward.clear()
            active.remove(label)
            if device == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
            return
        if record:
            results[label].forward.append(forward)
            if backward is not None:
                results[label].backward.append(backward)

    for _ in range(warmup):
        for label in list(active):
            attempt(label, record=False)
    for r in range(reps):
        if not active:
            break
        k = r % len(active)
        for label in active[k:] + active[:k]:
            if label in active:
                attempt(label, record=True)
    return results
