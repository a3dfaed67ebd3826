"""What a benchmark run measures: cases (one layer stack, or one cell looped over the steps; one
shape, one mode), the candidates timed on each case (torch.nn first: it is the baseline), grids
that expand into cases, and the named presets.

A *case* fixes everything the compared implementations share: cell, mode (``train`` =
forward+backward, ``infer`` = forward under ``torch.inference_mode``), device, dtype, batch B,
hidden H, input size I, steps T, layers, direction, and the loop: ``layer`` (one call of a layer
module on the whole sequence) or ``cell`` (a Python loop of T calls of a cell module, one layer,
one direction). A *candidate* is one implementation of the case: ``torch.nn`` (the baseline),
``torch.compile`` (a compiled cell step, or the compiled torch.nn cell, looped in Python), or
``fastbptt`` with a forced backend and, for layers, a chunk size and a memory policy. One record
per (case, candidate) pair ends up in the JSON.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .. import cells as _cells
from .. import dispatch
from ..ops import check_recompute

MODES = ("train", "infer")
DTYPES = ("float32", "float64", "float16", "bfloat16")
BASELINES = ("torch.nn", "torch.compile")
LOOPS = ("layer", "cell")


@dataclass(frozen=True)
class Case:
    cell: str
    mode: str               # "train" (forward+backward) or "infer" (forward only)
    device: str             # "cpu" or "cuda"
    dtype: str              # "float32", "bfloat16", ...
    batch: int
    hidden: int
    input_size: int
    steps: int
    layers: int = 1
    bidirectional: bool = False
    timed: bool = True      # False: memory only (long sequences in the GPU preset)
    loop: str = "layer"     # "layer": a layer module on the sequence; "cell": a cell module called per step

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"unknown loop {self.loop!r}; choose from {', '.join(LOOPS)}")
        if self.loop == "cell" and (self.layers != 1 or self.bidirectional):
            raise ValueError("a cell loop has one layer and one direction")

    def key(self) -> str:
        # layer cases keep the keys they had before cell loops existed: saved runs still compare
        d = "bi" if self.bidirectional else "uni"
        return (f"{self.cell}/{self.mode}/{self.device}/{self.dtype}/B{self.batch}/H{self.hidden}/"
                f"I{self.input_size}/T{self.steps}/L{self.layers}/{d}" + ("/cell-loop" if self.loop == "cell" else "")
                + ("" if self.timed else "/memory-only"))

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


def policy_name(recompute: bool | str) -> str:
    """A fastbptt layer's memory policy in the tables: recompute (True), keep-gates (False), auto."""
    return {True: "recompute", False: "keep-gates"}.get(recompute, str(recompute))


@dataclass(frozen=True)
class Candidate:
    impl: str                       # "torch.nn", "torch.compile" or "fastbptt"
    backend: Optional[str] = None   # fastbptt only: a name from dispatch.CHOICES ("auto" or forced)
    chunk_size: Optional[int] = None   # fastbptt layers only; None for cells
    recompute: Optional[bool | str] = None   # fastbptt layers only (True, False, "auto"); None for cells

    @property
    def label(self) -> str:
        if self.impl != "fastbptt":
            return self.impl
        if self.chunk_size is None and self.recompute is None:  # a cell: one step, nothing recomputed
            return f"fastbptt[{self.backend}]"
        return f"fastbptt[{self.backend},C={self.chunk_size},{policy_name(self.recompute)}]"

    @property
    def is_baseline(self) -> bool:
        return self.impl == "torch.nn"


TORCH_NN = Candidate("torch.nn")
COMPILED = Candidate("torch.compile")


def applicable_backends(device: str) -> tuple[str, ...]:
    """fastbptt backends that target ``device``: all of them are tried (forced) and reported,
    available or not. Triton on CPU runs only in its interpreter, a test tool, so it is left out
    on CPU unless named explicitly."""
    names = []
    for name, spec in dispatch.BACKENDS.items():
        if device not in spec.devices or (name == "triton" and device == "cpu"):
            continue
        names.append(name)
    return tuple(names)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass
class Grid:
    """A cartesian product of case parameters and candidate settings.

    ``input_size=None`` means "equal to the hidden size"; ``backends=None`` means every
    fastbptt backend that targets the device (see :func:`applicable_backends`). With
    ``loop="cell"`` the cases are cell loops: ``chunk_sizes`` and ``recompute`` do not apply (one
    fastbptt candidate per backend), ``layers`` and ``bidirectional`` must stay 1 and False.
    """
    cells: Sequence[str] = ("gru", "lstm")
    modes: Sequence[str] = MODES
    dtypes: Sequence[str] = ("float32",)
    batch: Sequence[int] = (16,)
    hidden: Sequence[int] = (128,)
    input_size: Sequence[Optional[int]] = (None,)
    steps: Sequence[int] = (128,)
    layers: Sequence[int] = (1,)
    bidirectional: Sequence[bool] = (False,)
    chunk_sizes: Sequence[int] = (32,)
    recompute: Sequence[bool | str] = (True, False)
    backends: Optional[Sequence[str]] = None
    baselines: Sequence[str] = BASELINES
    timed: bool = True
    loop: str = "layer"

    def cases(self, device: str) -> list[Case]:
        out = []
        for cell, mode, dtype, b, h, i, t, l, bi in itertools.product(
                self.cells, self.modes, self.dtypes, self.batch, self.hidden, self.input_size, self.steps,
                self.layers, self.bidirectional):
            out.append(Case(cell, mode, device, dtype, int(b), int(h), int(i if i else h), int(t), int(l),
                            bool(bi), self.timed, self.loop))
        return out

    def candidates(self, device: str) -> list[Candidate]:
        cands = [TORCH_NN]
        if "torch.compile" in self.baselines:
            cands.append(COMPILED)
        backends = applicable_backends(device) if self.backends is None else tuple(self.backends)
        for name in backends:
            if self.loop == "cell":
                cands.append(Candidate("fastbptt", name))
                continue
            for c in self.chunk_sizes:
                for rc in self.recompute:
                    cands.append(Candidate("fastbptt", name, int(c), rc if rc == "auto" else bool(rc)))
        return cands

    def validate(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"unknown loop {self.loop!r}; choose from {', '.join(LOOPS)}")
        if self.loop == "cell" and (any(int(n) != 1 for n in self.layers) or any(self.bidirectional)):
            raise ValueError("a cell loop has one layer and one direction: use layers 1 and directions 1")
        for cell in self.cells:
            if cell not in _cells.CELLS:
                raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(_cells.CELLS)}")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        for name in self.backends or ():
            if name not in dispatch.CHOICES:
                raise ValueError(f"unknown backend {name!r}; choose from {', '.join(dispatch.CHOICES)}")
        for rc in self.recompute:
            check_recompute(rc)
        for name in self.baselines:
            if name not in BASELINES:
                raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


@dataclass
class Plan:
    """A whole run: the grids (their cases are concatenated, duplicates dropped) and the timing
    settings."""
    name: str
    grids: list[Grid]
    device: str = "cpu"
    warmup: int = 2
    reps: int = 7
    description: str = ""
    out_dir: str = os.path.join("benchmarks", "out")
    time_baseline: bool = True   # False: torch.nn's memory only (its time would dominate the run)
    plots: Sequence[tuple[str, str]] = (("speedup", "batch"), ("time_per_step", "steps"), ("memory", "steps"))

    def items(self) -> list[tuple[Case, list[Candidate]]]:
        """Every case once, in grid order; a case in several grids gets the union of their
        candidates (torch.nn first)."""
        merged: dict[str, tuple[Case, list[Candidate]]] = {}
        for grid in self.grids:
            grid.validate()
            cands = grid.candidates(self.device)
            for case in grid.cases(self.device):
                _, have = merged.setdefault(case.key(), (case, []))
                have.extend(c for c in cands if c not in have)
        return list(merged.values())


# ----------------------------------------------------------------------------- presets

def _quick(device: str) -> Plan:
    base = dict(cells=("rnn_tanh", "gru", "lstm"), hidden=(64,), recompute=(True, False), baselines=("torch.nn",))
    grids = [
        # speedup vs batch size, training and inference
        Grid(**base, batch=(1, 8, 32), steps=(32,)),
        # time and memory vs sequence length
        Grid(**base, modes=("train",), batch=(8,), steps=(16, 64)),
        # the compiled cell loop on one case: compiling costs seconds per shape and cell
        Grid(cells=("gru",), modes=("train",), hidden=(64,), batch=(8,), steps=(32,), recompute=(True, False),
             baselines=BASELINES),
    ]
    return Plan("quick", grids, device, warmup=1, reps=3,
                description="small shapes, three cell types, about a minute on 2 CPU cores")


def _full(device: str) -> Plan:
    cells = ("rnn_tanh", "rnn_relu", "gru", "lstm")
    grids = [
        Grid(cells=cells, batch=(1, 8, 16, 64, 256), hidden=(256, 512, 1024), steps=(1024,),
             dtypes=("float32", "bfloat16"), chunk_sizes=(64,)),
        Grid(cells=cells, modes=("train",), batch=(16,), hidden=(512,), steps=(256, 1024, 4096),
             dtypes=("float32",), chunk_sizes=(64,)),
        Grid(cells=("gru", "lstm"), modes=("train",), batch=(64,), hidden=(512,), steps=(1024,),
             layers=(1, 2), bidirectional=(False, True), chunk_sizes=(64,)),
        Grid(cells=("gru", "lstm"), modes=("train",), batch=(64,), hidden=(512,), steps=(1024,),
             chunk_sizes=(16, 32, 64, 128, 256), baselines=("torch.nn",)),
    ]
    return Plan("full", grids, device, warmup=3, reps=10, description="the whole grid, for GPUs")


# The CPU kernel shapes (B, H, T, layers): a mid-size case, small batch and long sequence, a large
# batch, batch one with a large H, and the word-level language model shape (2 layers, H=200, B=20, T=35).
CPU_SHAPES = ((32, 256, 128, 1), (8, 512, 256, 1), (128, 128, 128, 1), (1, 1024, 512, 1), (20, 200, 35, 2))


def _cpu_kernels(device: str) -> Plan:
    # fused C++ CPU kernels against torch.nn and a compiled cell loop: training with each memory policy
    # (auto, the default, is one of the other two per case), inference (which keeps nothing) once; on
    # CPU one run per thread count (--threads), the machine name records it
    kw = dict(cells=("rnn_tanh", "gru", "lstm"), dtypes=("float32",), backends=("cpu",), chunk_sizes=(32,))
    grids = []
    for b, h, t, layers in CPU_SHAPES:
        shape = dict(batch=(b,), hidden=(h,), steps=(t,), layers=(layers,))
        grids.append(Grid(**kw, **shape, modes=("train",), recompute=("auto", True, False)))
        grids.append(Grid(**kw, **shape, modes=("infer",), recompute=(True,)))
    return Plan("cpu-kernels", grids, device, warmup=2, reps=9,
                description="fastbptt 'cpu' (each memory policy) vs torch.nn vs torch.compile, float32",
                out_dir=os.path.join("benchmarks", "results"),
                plots=(("speedup", "batch"), ("time_per_step", "batch")))


def _cells_preset(device: str) -> Plan:
    # fastbptt's cell modules in a per-step Python loop against torch.nn's cells and the compiled
    # torch.nn cell, on the device's compiled backend; on CPU one run per thread count (--threads),
    # the machine name records it
    backend = "cuda" if device == "cuda" else "cpu"
    grids = [Grid(cells=("rnn_tanh", "gru", "lstm"), batch=(1, 32), hidden=(256,), input_size=(256,), steps=(64,),
                  dtypes=("float32",), backends=(backend,), baselines=BASELINES, loop="cell")]
    return Plan("cells", grids, device, warmup=2, reps=9,
                description=f"cell loops: fastbptt's RNNCell/GRUCell/LSTMCell (backend '{backend}') called per step "
                            "in a Python loop vs torch.nn's cells vs the compiled torch.nn cell",
                out_dir=os.path.join("benchmarks", "results"),
                plots=(("speedup", "batch"), ("time_per_step", "batch")))


# The GPU kernel shapes (B, H, T): small batch and long sequences, a middle case, a large batch
GPU_SHAPES = ((256, 1024, 256), (16, 768, 1024), (64, 512, 512))


def _gpu_kernels(device: str) -> Plan:
    # fastbptt 'cuda' (the rule's path, and the persistent path forced) and 'triton' against torch.nn
    # (cuDNN); the compiled cell loop in training
    kw = dict(cells=("gru", "lstm"), dtypes=("float32", "bfloat16"), backends=("cuda", "cuda:persistent", "triton"),
              chunk_sizes=(64,), recompute=(True, False))
    grids = [
        # peak memory of one training step at a long sequence, first: cheap, and a target of its own
        Grid(**kw, modes=("train",), batch=(16,), hidden=(768,), steps=(4096,), baselines=("torch.nn",),
             timed=False),
    ]
    for b, h, t in GPU_SHAPES:
        grids.append(Grid(**kw, modes=("train",), batch=(b,), hidden=(h,), steps=(t,), baselines=BASELINES))
        # nothing is kept for backward in inference, so the memory policy makes no difference there
        grids.append(Grid(**{**kw, "recompute": (True,)}, modes=("infer",), batch=(b,), hidden=(h,), steps=(t,),
                          baselines=("torch.nn",)))
    return Plan("gpu-kernels", grids, device, warmup=2, reps=10,
                description="fastbptt 'cuda' (standard and persistent paths) and 'triton' vs torch.nn (cuDNN) and a "
                            "compiled cell loop: forward, forward+backward, inference and peak training memory",
                out_dir=os.path.join("benchmarks", "results"),
                plots=(("speedup", "batch"), ("time_per_step", "batch"), ("memory", "batch")))


def _scaling(device: str) -> Plan:
    # docs/scaling.md: the default backend against T, B and H. torch.nn's CPU training takes
    # seconds per thousand steps, so it is measured for memory only (its time is in the kernel
    # presets).
    kw = dict(cells=("gru", "lstm"), modes=("train",), backends=("auto",), recompute=(True,), chunk_sizes=(32,),
              baselines=("torch.nn",))
    grids = [
        Grid(**kw, batch=(8,), hidden=(128,), steps=(256, 1024, 4096, 16384)),
        Grid(**kw, batch=(1, 4, 16, 64), hidden=(128,), steps=(1024,)),
        Grid(**kw, batch=(8,), hidden=(64, 256, 512), steps=(1024,)),
    ]
    return Plan("scaling", grids, device, warmup=1, reps=3, time_baseline=False,
                description="time and memory against T, B and H for the default backend (backend='auto')",
                out_dir=os.path.join("benchmarks", "results"),
                plots=(("time_per_step", "steps"), ("memory", "steps"), ("time_per_step", "batch"),
                       ("time_per_step", "hidden")))


PRESETS = {
    "quick": _quick,
    "full": _full,
    "cpu-kernels": _cpu_kernels,
    "cells": _cells_preset,
    "gpu-kernels": _gpu_kernels,
    "scaling": _scaling,
}
DEFAULT_DEVICE = {"quick": "cpu", "full": "cuda", "cpu-kernels": "cpu", "cells": "cpu", "gpu-kernels": "cuda",
                  "scaling": "cpu"}


def preset(name: str, device: Optional[str] = None) -> Plan:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name](device or DEFAULT_DEVICE[name])


def override(plan: Plan, **fields) -> Plan:
    """The plan with grid fields replaced in every grid (``None`` values are ignored)."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if not changes:
        return plan
    return dataclasses.replace(plan, grids=[dataclasses.replace(g, **changes) for g in plan.grids])


__all__ = ["Case", "Candidate", "Grid", "Plan", "PRESETS", "preset", "override", "applicable_backends",
           "TORCH_NN", "COMPILED", "MODES", "DTYPES", "BASELINES", "LOOPS"]
