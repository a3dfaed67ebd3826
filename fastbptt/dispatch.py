"""Backend registry: which kernels exist, whether they load, and which one a call uses.

A backend is a module that implements the kernel contract of :mod:`fastbptt.reference`
(``rnn_forward``, ``rnn_backward``, ``gru_forward``, ``gru_backward``, ``lstm_forward``,
``lstm_backward``) and may decline a case with ``supports(cell, dtype, hidden_size, ...)``
returning a reason string. ``backend="auto"`` walks :data:`PREFERENCE` for the input's device
and takes the first backend that loads and accepts the case, so a kernel that cannot take a
case is never used silently: the next one runs instead.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str            # importable module implementing the kernel contract
    devices: tuple[str, ...]
    summary: str


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("reference", "fastbptt.reference", ("cpu", "cuda"), "plain PyTorch, the oracle"),
        BackendSpec("cpu", "fastbptt.native", ("cpu",), "fused C++ kernels (fastbptt._C)"),
        BackendSpec("cuda", "fastbptt.native", ("cuda",), "fused CUDA kernels (fastbptt._C)"),
        BackendSpec("triton", "fastbptt.triton", ("cuda", "cpu"), "Triton kernels (CPU only under TRITON_INTERPRET=1)"),
    )
}

# Tried in this order by backend="auto". Triton runs on CPU tensors only in its interpreter,
# which is for tests, so it is never picked automatically there.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

CHOICES = ("auto",) + tuple(BACKENDS)


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[ModuleType], str]:
    spec = BACKENDS[name]
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
    module, reason = _load(name)
    if module is None:
        raise BackendUnavailable(f"fastbptt backend {name!r} is unavailable: {reason}")
    return module


def decline_reason(name: str, cell: str, device_type: str, dtype: torch.dtype, hidden_size: int,
                   proj_size: int = 0) -> str:
    """'' when backend ``name`` loads and takes this case, else why not."""
    spec = BACKENDS[name]
    if device_type not in spec.devices:
        return f"it does not run on {device_type} tensors (runs on {', '.join(spec.devices)})"
    module, reason = _load(name)
    if module is None:
        return reason
    supports = getattr(module, "supports", None)
    return supports(name, cell, dtype, hidden_size, proj_size) if supports else ""


def resolve(backend: str, cell: str, x: torch.Tensor, hidden_size: int, proj_size: int = 0) -> str:
    """The concrete backend for one layer call on input ``x``. A named backend that cannot take
    the case raises :class:`BackendUnavailable` with the reason."""
    check_backend_name(backend)
    return _resolve(backend, cell, x.device.type, x.dtype, hidden_size, proj_size)


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
