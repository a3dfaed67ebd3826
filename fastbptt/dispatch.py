"""Backend registry: which kernels exist, whether they load, and which one a call uses.

A backend is a module that implements the kernel contract of :mod:`fastbptt.reference`
(``rnn_forward``, ``rnn_backward``, ``gru_forward``, ``gru_backward``, ``lstm_forward``,
``lstm_backward``) and may decline a case with ``supports(cell, dtype, hidden_size, ...)``
returning a reason string. ``backend="auto"`` walks :data:`PREFERENCE` for the input's device
and takes the first backend that loads and accepts the case, so a kernel that cannot take a
case is never used silently: the next one runs instead.

Within a backend, a case can run by one of several *kernel paths* (CPU: matrix-vector products
for tiny batches, a packed per-step forward, BLAS; CUDA: persistent or standard; Triton: weights
resident in registers or streamed). Each path may decline a case by capability
(``path_decline`` of the backend module: dtype, cell, projection, capacity); the rule that picks
among the paths that accept it is :func:`choose_path`, from the order and batch limits in
:data:`BACKENDS`. ``backend="cuda:persistent"`` (any ``"BACKEND:PATH"``) forces one path; one
that declines the case then raises with the reason instead of running another.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache, partial
from types import ModuleType, SimpleNamespace
from typing import Optional

import torch

from . import heap

# The layer calls a whole-layer path may take (choose_path's ``call``): no backward and sequences of one
# length; a backward, sequences of one length and the gates kept (recompute off)
INFERENCE, TRAIN_KEEP = "inference", "training that keeps its gates"

KERNEL_FUNCTIONS = ("rnn_forward", "rnn_backward", "gru_forward", "gru_backward", "lstm_forward", "lstm_backward")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class KernelPath:
    name: str
    summary: str
    # The automatic rule takes this path for batches up to this size (None: any batch; 0: never,
    # only when forced by name)
    auto_max_batch: Optional[int] = None
    # False: its set-up per call (packing W_hh) pays off over a chunk of steps only, so the rule
    # does not take it for a single cell step
    single_step: bool = True
    # ... and from this batch size up
    auto_min_batch: int = 0
    # The rule takes this path only on CPUs whose vector ISA (fastbptt.native.packed_isa) is one of
    # these (None: any)
    auto_isas: Optional[tuple[str, ...]] = None
    # For a single cell step the rule also takes it up to this batch size on every ISA (None: the
    # limits above only)
    step_max_batch: Optional[int] = None
    # (H, B): for hidden sizes up to H the rule takes it from batch B up instead of auto_min_batch
    small_hidden_min_batch: Optional[tuple[int, int]] = None
    # It runs a layer with sequences of one length by one primitive call per chunk (oneDNN's LSTM): in
    # inference, or in training as one call whose kept state, in place of the gates, is the primitive's
    # workspace, so only for a call that keeps its gates. The workspace's size is the primitive's own, which
    # a fake kernel cannot give: the rule takes the path at the layer's entry point outside torch.compile
    # only (calls INFERENCE and TRAIN_KEEP), never inside the ops, and forcing it for another call raises
    whole_layer: bool = False
    # ... and for a TRAIN_KEEP call: batches up to this size, and any batch where the heap hands a freed
    # workspace back without page faults (fastbptt.heap.reuses_large_blocks). None: in inference only
    train_max_batch: Optional[int] = None

    def auto_for(self, batch: int, steps: Optional[int] = None, isa: str = "", hidden: int = 0,
                 call: Optional[str] = None, heap_reuses: bool = False) -> bool:
        if self.whole_layer:
            if call == TRAIN_KEEP:
                return self.train_max_batch is not None and (heap_reuses or batch <= self.train_max_batch)
            if call != INFERENCE:
                return False
        if steps == 1 and not self.single_step:
            return False
        if steps == 1 and self.step_max_batch is not None and batch <= self.step_max_batch:
            return True
        if self.auto_isas is not None and isa not in self.auto_isas:
            return False
        min_batch = self.auto_min_batch
        if self.small_hidden_min_batch is not None and hidden <= self.small_hidden_min_batch[0]:
            min_batch = min(min_batch, self.small_hidden_min_batch[1])
        return batch >= min_batch and (self.auto_max_batch is None or batch <= self.auto_max_batch)

    def rule(self) -> str:
        """When the automatic rule takes this path, in words (``fastbptt info``)."""
        if self.auto_max_batch == 0:
            return "only when forced"
        when = (f"B >= {self.auto_min_batch}" if self.auto_min_batch else
                "any batch" if self.auto_max_batch is None else f"B <= {self.auto_max_batch}")
        if self.small_hidden_min_batch is not None:
            hidden, batch = self.small_hidden_min_batch
            when += f" (B >= {batch} for H <= {hidden})"
        if self.auto_isas:
            when += f" on {'/'.join(self.auto_isas)}"
        if self.whole_layer:
            when += ", inference"
            if self.train_max_batch is not None:
                when += (f"; training that keeps its gates: B <= {self.train_max_batch}, any batch where the heap "
                         f"reuses large blocks")
        if self.step_max_batch is not None:
            when += f" (a cell step: B <= {self.step_max_batch} anywhere)"
        return when


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str            # importable module implementing the kernel contract
    devices: tuple[str, ...]
    summary: str
    # Kernel paths in the order the automatic rule tries them; the last one takes every case
    # the backend supports. Empty: one way to run each case.
    paths: tuple[KernelPath, ...] = ()


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("reference", "fastbptt.reference", ("cpu", "cuda"), "plain PyTorch, the oracle"),
        BackendSpec("cpu", "fastbptt.native", ("cpu",), "fused C++ kernels (fastbptt._C)", paths=(
            # layers: measured faster than MKL's single-threaded sgemv for one or two rows on AVX2 (AMD
            # EPYC); with AVX-512 (Intel Xeon) MKL trains faster and infers as fast, so the rule leaves it to
            # blas there (docs/cpu.md). A cell step with one row runs the fused cell-step kernels, measured
            # faster than MKL on the Intel Xeon too (docs/cells.md)
            KernelPath("small-batch", "matrix-vector products parallel over W_hh, per step (a cell step: one "
                                      "fused pass over both weights)", auto_max_batch=2, auto_isas=("avx2",),
                       step_max_batch=1),
            # LSTM inference: measured as fast as torch.nn's oneDNN LSTM (it is the same primitive) where the
            # packed kernels were slower, from B=32 at every H and from B=8 at H <= 128. LSTM training that keeps
            # its gates: 0.95-1.00x torch.nn where the heap reuses large blocks (packed 0.83-0.99x, never ahead by
            # more than 0.01), and at B=1 (0.96-1.01x; packed 0.84-0.96x, blas 0.96-0.97x); under glibc's
            # defaults the packed kernels were ahead from B=8 but at one shape (docs/cpu.md)
            KernelPath("onednn", "oneDNN's fused LSTM primitive (aten::mkldnn_rnn_layer): inference one call per "
                                 "chunk, training one call per layer keeping its workspace",
                       single_step=False, auto_min_batch=32, small_hidden_min_batch=(128, 8), whole_layer=True,
                       train_max_batch=2),
            # measured faster than MKL + row pass at every float32 shape with B > 2 (docs/cpu.md)
            KernelPath("packed", "W_hh packed per thread in L2, forward and backward: one parallel region per "
                                 "step (AVX-512 or AVX2 micro-kernel)", single_step=False, auto_min_batch=3),
            KernelPath("blas", "one MKL product and one fused gate pass per step"),
        )),
        BackendSpec("cuda", "fastbptt.native", ("cuda",), "fused CUDA kernels (fastbptt._C)", paths=(
            # never automatic until its crossover with the standard path is measured on a GPU
            KernelPath("persistent", "W_hh resident in shared memory, one cooperative launch and a grid barrier "
                                     "per step", auto_max_batch=0),
            KernelPath("standard", "one cuBLAS product and one fused gate kernel per step"),
        )),
        BackendSpec("triton", "fastbptt.triton", ("cuda", "cpu"), "Triton kernels (CPU only under TRITON_INTERPRET=1)",
                    paths=(
            KernelPath("resident", "W_hh tiles held in registers for the whole chunk (H fits one tile)"),
            KernelPath("streamed", "W_hh streamed tile by tile from global memory (L2) each step"),
        )),
    )
}

# Tried in this order by backend="auto". Triton runs on CPU tensors only in its interpreter,
# which is for tests, so it is never picked automatically there.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

CHOICES = ("auto",) + tuple(
    choice for spec in BACKENDS.values() for choice in (spec.name, *(f"{spec.name}:{p.name}" for p in spec.paths)))


def split(backend: str) -> tuple[str, str]:
    """``"cuda:persistent"`` -> ``("cuda", "persistent")``; ``"cuda"`` -> ``("cuda", "")``."""
    name, _, path = backend.partition(":")
    return name, path


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[ModuleType], str]:
    spec = BACKENDS[split(name)[0]]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:  # a missing optional dependency or an unbuilt extension
        return None, f"{spec.module} could not be imported: {exc}"
    reason = module.unavailable_reason(spec.name) if hasattr(module, "unavailable_reason") else ""
    return (None, reason) if reason else (module, "")


def availability(name: str) -> str:
    """'' when backend ``name`` can run here, else the reason it cannot."""
    return _load(name)[1]


def check_backend_name(backend: str) -> None:
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(repr(c) for c in CHOICES)}, got {backend!r}")


def kernels(name: str) -> ModuleType:
    """The kernel module of backend ``name``; raises :class:`BackendUnavailable` with the reason."""
    module, reason = _load(split(name)[0])
    if module is None:
        raise BackendUnavailable(f"fastbptt backend {name!r} is unavailable: {reason}")
    return module


def path_decline(backend: str, path: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int,
                 proj_size: int = 0) -> str:
    """'' when kernel ``path`` of a loaded ``backend`` can run this case, else why not."""
    names = [p.name for p in BACKENDS[backend].paths]
    if path not in names:
        return f"backend {backend!r} has no kernel path {path!r} (has {', '.join(names) or 'none'})"
    return kernels(backend).path_decline(backend, path, cell, dtype, batch, hidden_size, proj_size)


def path_spec(backend: str, path: str) -> KernelPath:
    """The registry entry of kernel ``path`` of ``backend`` ("cpu", "cuda", ...)."""
    return next(p for p in BACKENDS[backend].paths if p.name == path)


def with_path(name: str, path: str) -> str:
    """The name that forces kernel ``path`` of backend ``name`` ("cpu:packed"), or ``name`` for no path."""
    return f"{split(name)[0]}:{path}" if path else name


@lru_cache(maxsize=None)
def vector_isa(backend: str) -> str:
    """The vector ISA a backend's kernels run with here ("avx512", "avx2"; "" where it does not apply)."""
    return kernels("cpu").packed_isa() if backend == "cpu" else ""


@lru_cache(maxsize=None)
def heap_reuses_large_blocks() -> bool:
    """:func:`fastbptt.heap.reuses_large_blocks` for this process: the allocator reads its settings once, at
    start-up, so a later change to the environment changes nothing."""
    return heap.reuses_large_blocks()


def choose_path(backend: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int,
                proj_size: int = 0, steps: Optional[int] = None, call: Optional[str] = None) -> str:
    """The kernel path of ``backend`` ("cpu", "cuda:persistent", ...) for one layer call (``steps=1``:
    one cell step): the path named, which must accept the case (else :class:`BackendUnavailable`
    with the reason), or the first path in :data:`BACKENDS` order whose limits and ``path_decline``
    admit the case. '' for a backend without paths.

    ``call``: at a layer's entry point, INFERENCE or TRAIN_KEEP for a call a whole-layer path may take,
    "" for any other (forcing a whole-layer path then raises); None inside the ops, whose entry point
    has checked that already."""
    name, forced = split(backend)
    paths = BACKENDS[name].paths
    if forced:
        reason = path_decline(name, forced, cell, dtype, batch, hidden_size, proj_size)
        if not reason and call == "" and path_spec(name, forced).whole_layer:
            reason = (f"the {forced} path runs sequences of one length only, in inference (no gradient: "
                      f"torch.no_grad() or inputs that do not require grad) or in training that keeps its "
                      f"workspace (recompute=False or 'auto', not True)")
        if reason:
            raise BackendUnavailable(f"fastbptt backend {backend!r} cannot run this {cell} layer "
                                     f"(B={batch}, H={hidden_size}, {dtype}): {reason}")
        return forced
    isa = vector_isa(name)
    heap_reuses = call == TRAIN_KEEP and heap_reuses_large_blocks()
    for path in paths:
        if path.auto_for(batch, steps, isa, hidden_size, call, heap_reuses) and not path_decline(
                name, path.name, cell, dtype, batch, hidden_size, proj_size):
            return path.name
    if paths:  # the last path takes every supported case: reaching here is a bug in a path_decline
        raise AssertionError(f"no kernel path of {name!r} takes this {cell} case (B={batch}, H={hidden_size}, "
                             f"{dtype})")
    return ""


def bound_kernels(backend: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int,
                  proj_size: int = 0):
    """The six kernel functions of ``backend`` for one layer call, bound to the kernel path
    :func:`choose_path` picks, with the path's name and whether it runs whole layers (the module
    itself for a backend without paths)."""
    module = kernels(backend)
    path = choose_path(backend, cell, dtype, batch, hidden_size, proj_size)
    if not path:
        return module
    return SimpleNamespace(path=path, whole_layer=path_spec(split(backend)[0], path).whole_layer,
                           **{f: partial(getattr(module, f), path=path) for f in KERNEL_FUNCTIONS})


def decline_reason(name: str, cell: str, device_type: str, dtype: torch.dtype, hidden_size: int,
                   proj_size: int = 0) -> str:
    """'' when backend ``name`` loads and takes this case on some kernel path, else why not."""
    spec = BACKENDS[split(name)[0]]
    if device_type not in spec.devices:
        return f"it does not run on {device_type} tensors (runs on {', '.join(spec.devices)})"
    module, reason = _load(spec.name)
    if module is None:
        return reason
    supports = getattr(module, "supports", None)
    return supports(spec.name, cell, dtype, hidden_size, proj_size) if supports else ""


def resolve(backend: str, cell: str, x: torch.Tensor, hidden_size: int, proj_size: int = 0) -> str:
    """The concrete backend for one layer call on input ``x``. A named backend that cannot take
    the case raises :class:`BackendUnavailable` with the reason."""
    check_backend_name(backend)
    return _resolve(backend, cell, x.device.type, x.dtype, hidden_size, proj_size)


@torch.compiler.assume_constant_result  # a plain lookup: torch.compile takes its result as a constant
def cell_kernel(backend: str, cell: str, device_type: str, dtype: torch.dtype, batch: int, hidden_size: int) -> str:
    """The backend and kernel path of one cell step ("cpu:small-batch", "cuda:standard", "triton",
    ...): the layer's rule for a one-step layer. Raises :class:`BackendUnavailable` like :func:`resolve`."""
    return _cell_kernel(backend, cell, device_type, dtype, batch, hidden_size)


@lru_cache(maxsize=1024)  # a cell is called once per step: the lookup is done once per shape
def _cell_kernel(backend: str, cell: str, device_type: str, dtype: torch.dtype, batch: int, hidden_size: int) -> str:
    name = _resolve(backend, cell, device_type, dtype, hidden_size, 0)
    path = choose_path(name, cell, dtype, batch, hidden_size, 0, steps=1)
    return with_path(name, path)


def layer_kernel(name: str, cell: str, dtype: torch.dtype, batch: int, hidden_size: int, proj_size: int,
                 call: str) -> str:
    """The backend and kernel path ("cpu:packed", ...) that the ops run for one layer call of the resolved
    backend ``name`` (``call``: see :func:`choose_path`): the rule's choice, or the forced path
    checked for this call. Raises :class:`BackendUnavailable` like :func:`choose_path`. Not cached: a path
    may decline by a run-time setting (``torch.backends.mkldnn.enabled``)."""
    path = choose_path(name, cell, dtype, batch, hidden_size, proj_size, call=call)
    return with_path(name, path)


def names_whole_layer_path(backend: str) -> bool:
    """Whether ``backend`` ("cpu:onednn", ...) names a whole-layer kernel path."""
    name, path = split(backend)
    return bool(path) and path_spec(name, path).whole_layer


@torch.compiler.assume_constant_result  # a plain lookup: torch.compile takes its result as a constant
def _resolve(backend: str, cell: str, device_type: str, dtype: torch.dtype, hidden_size: int, proj_size: int) -> str:
    if backend != "auto":
        reason = decline_reason(backend, cell, device_type, dtype, hidden_size, proj_size)
        if reason:
            raise BackendUnavailable(f"fastbptt backend {backend!r} cannot run this {cell} layer: {reason}")
        return backend
    for name in PREFERENCE.get(device_type, ("reference",)):
        if not decline_reason(name, cell, device_type, dtype, hidden_size, proj_size):
            return name
    return "reference"
