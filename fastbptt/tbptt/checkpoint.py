"""Checkpoint files: written atomically with a digest of their content, read back with clear errors."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError

CHECKPOINT_FORMAT = "fastbptt.tbptt"
CHECKPOINT_VERSION = 2         # 2: with a SHA-256 digest of the content
READABLE_VERSIONS = (1, 2)     # 1: no digest to check


TEMPORARY_SUFFIX = ".tmp"  # atomic_write's file beside its target: <target name><random>.tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, then renames it over
    ``path``: a crash never leaves a half-written file (only the temporary one, see
    :func:`temporary_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of :func:`atomic_write` calls on ``path`` that a crash left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.name}*{TEMPORARY_SUFFIX}"))


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def payload_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, and every other
    value's type and repr, walked in order. torch.load checks no checksum of tensor data, so
    this is what turns flipped bytes into an error instead of a model that quietly goes NaN."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(obj)
    return digest.hexdigest()


def nonfinite_entries(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` (a state dict) holding a NaN or Inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint_file(state: dict, path: str | os.PathLike) -> None:
    """Writes a training checkpoint atomically, stamped with its format, version and digest."""
    content = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    save_atomic({**content, "sha256": payload_digest(content)}, path)


def load_checkpoint(path: str | os.PathLike, *, argument: str = "--checkpoint") -> dict:
    """Loads a checkpoint written by :func:`save_checkpoint_file` (``weights_only=True``) and checks
    its digest; a clear :class:`CheckpointError` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{argument}: checkpoint not found: {str(p)!r}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unpickling failure means "not our checkpoint")
        raise CheckpointError(f"{argument}: {str(p)!r} is not a readable fastbptt checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{argument}: {str(p)!r} is not a fastbptt training checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{argument}: {str(p)!r} has checkpoint version {ckpt.get('version')}, "
                              f"this fastbptt reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if ckpt["version"] >= 2:
        saved = ckpt.pop("sha256", None)
        if saved != payload_digest(ckpt):
            raise CheckpointError(f"{argument}: {str(p)!r} is corrupt: its content does not match the digest written "
                                  "with it (a damaged disk or copy?); resume from another checkpoint or start afresh")
    return ckpt
