"""A writer lock for a gallery folder: fcntl.flock on a lock file, so two writers never interleave.

The kernel drops an flock when its holder dies (even by SIGKILL), so a crashed writer never
leaves the gallery locked. Readers take no lock: SQLite's WAL snapshots keep them consistent.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from facemeta.errors import GalleryError


class WriterLock:
    """Exclusive, process-wide lock on ``path`` (created if missing); use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, timeout: float = 10.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; GalleryError if another writer keeps it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise GalleryError(f"cannot create the gallery lock {self.path}: {exc.strerror}") from None
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f" (process {holder})" if holder else ""
                    raise GalleryError(f"gallery {self.path.parent} is being changed by another writer{who}; "
                                       "try again when it finishes") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
