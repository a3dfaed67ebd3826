"""Checkpoint files: written atomically, read back with clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT_FORMAT = "fastbptt.tbptt"
CHECKPOINT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, then renames it over
    ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
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


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, *, argument: str = "--checkpoint") -> dict:
    """Loads a checkpoint written by :class:`Trainer` (``weights_only=True``); clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{argument}: checkpoint not found: {str(p)!r}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unpickling failure means "not our checkpoint")
        raise ValueError(f"{argument}: {str(p)!r} is not a readable fastbptt checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{argument}: {str(p)!r} is not a fastbptt training checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{argument}: {str(p)!r} has checkpoint version {ckpt.get('version')}, "
                         f"this fastbptt reads version {CHECKPOINT_VERSION}")
    return ckpt
