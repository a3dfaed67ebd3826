"""The process's heap allocator, as far as it decides a kernel path and is named by a benchmark.

oneDNN's LSTM (torch.nn's CPU LSTM, and the ``cpu:onednn`` path in training) allocates its workspace,
about 60 bytes per step, row and hidden unit, on every call. Under glibc's default settings a block
above the mmap threshold (at most 32 MiB, raised only after a larger mapped block is freed) comes as
fresh pages, each faulting in on first touch; allocators that keep freed blocks (jemalloc, tcmalloc,
mimalloc, or glibc with its mmap and trim thresholds raised) hand it back without faults. That moved
torch.nn's LSTM training time by up to 1.5x on one machine, and which of fastbptt's LSTM training
paths is the faster with it (docs/cpu.md).
"""
from __future__ import annotations

import os
import platform
from collections.abc import Mapping

GLIBC_MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# The most glibc's dynamic mmap threshold rises to on its own (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
GLIBC_DYNAMIC_MMAP_MAX = 32 << 20


def _preloaded(environ: Mapping[str, str]) -> str:
    preload = environ.get("LD_PRELOAD", "")
    return next((name for name in PRELOADED_ALLOCATORS if name in preload), "")


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """The heap allocator of this process and its settings from the environment, in words:
    "glibc malloc (default settings)", "glibc malloc, MALLOC_MMAP_THRESHOLD_=..." or the allocator
    preloaded with LD_PRELOAD ("jemalloc (LD_PRELOAD)")."""
    preloaded = _preloaded(environ)
    if preloaded:
        return f"{preloaded} (LD_PRELOAD)"
    if platform.libc_ver()[0] != "glibc":
        return "the C library's malloc"
    settings = [f"{key}={environ[key]}" for key in GLIBC_MALLOC_ENV if environ.get(key)]
    return "glibc malloc, " + ", ".join(settings) if settings else "glibc malloc (default settings)"


def _glibc_setting(environ: Mapping[str, str], variable: str, tunable: str) -> int:
    """A glibc malloc setting in bytes from its environment variable, else from GLIBC_TUNABLES; 0 where
    neither sets it or the value is not a number."""
    value = environ.get(variable, "")
    if not value:
        tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":"))
        value = tunables.get(f"glibc.malloc.{tunable}", "")
    try:
        return int(value, 0)
    except ValueError:
        return 0


def reuses_large_blocks(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a freed block of tens of MiB comes back without page faults: an allocator from
    PRELOADED_ALLOCATORS preloaded, or glibc with both its mmap and trim thresholds set above the
    32 MiB its dynamic threshold reaches on its own."""
    if _preloaded(environ):
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    return all(_glibc_setting(environ, variable, tunable) > GLIBC_DYNAMIC_MMAP_MAX
               for variable, tunable in (("MALLOC_MMAP_THRESHOLD_", "mmap_threshold"),
                                         ("MALLOC_TRIM_THRESHOLD_", "trim_threshold")))
