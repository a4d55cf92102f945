"""A writer lock for a gallery folder: fcntl.flock on a lock file, so two writers never interleave.

The kernel drops an flock when its holder dies (even by SIGKILL), so a crashed writer never
leaves the gallery locked. Readers take no lock: SQLite's WAL snapshots keep them consistent.
The lock file is opened without following a symbolic link and must be a regular file with no
other hard link: the PID the holder writes into it never lands in a file outside the gallery.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from facemeta.errors import GalleryError

# O_NOFOLLOW: a symlink is refused (ELOOP) instead of followed; O_NONBLOCK: a FIFO put in its place
# cannot hang the open.
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def open_lock_file(path: Path) -> int:
    """Open (creating it if missing) the lock file as a plain file inside its folder and return the fd;
    a symbolic link, a hard-linked file or anything but a regular file is a one-line GalleryError."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise GalleryError(f"the gallery lock {path} is a symbolic link; refusing to follow it "
                               "(a gallery's files must be plain files inside its folder: remove the link)") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise GalleryError(f"gallery {path.parent} is read-only (a read-only folder or mount): this command "
                               "changes it; list, info, identify, verify and export only read it") from None
        raise GalleryError(f"cannot open the gallery lock {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
               else "has other hard links" if st.st_nlink > 1 else None)
    if problem:
        os.close(fd)
        raise GalleryError(f"the gallery lock {path} {problem}; refusing to write to it "
                           "(a gallery's files must be plain files inside its folder: remove it)")
    return fd


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
        fd = open_lock_file(self.path)
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
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if text.isdigit() else ""
