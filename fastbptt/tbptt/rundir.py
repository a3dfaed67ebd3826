"""One run at a time per output directory: a lock that names its holder, and the clean-up of
what an interrupted run left behind."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

from .checkpoint import temporary_files
from .errors import RunDirectoryBusy

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_FILE = ".lock"


class RunDirectoryLock:
    """Holds an exclusive ``flock`` on ``<directory>/.lock`` while a run writes into ``directory``.

    The file records the holder (pid, host, start time) for the error a second run gets. The
    kernel drops the lock when its process ends, however it ends, so a killed run never leaves
    a stale lock behind; the file itself stays (removing it would let two runs lock two files).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> "RunDirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise RunDirectoryBusy(f"{str(self.directory)!r} is in use by another run ({holder}); wait for it to end "
                                   "or write this run elsewhere (--out)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(directory: str | os.PathLike, names: Iterable[str], log: Callable[[str], None]) -> None:
    """Deletes the temporary files (see :func:`~.checkpoint.atomic_write`) that a run killed while
    writing ``names`` left in ``directory``. Call it only under the lock."""
    leftovers = [p for name in names for p in temporary_files(Path(directory) / name)]
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log(f"removed {len(leftovers)} temporary file(s) an interrupted run left in {str(directory)!r}")
