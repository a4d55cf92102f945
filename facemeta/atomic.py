"""Crash-safe file writes: write a temporary file beside the target, fsync, rename; and the one check of an
output path that everything facemeta writes goes through (:func:`check_output`, called by atomic_write).

An output must be a regular file or a new name: never a device, FIFO, socket or folder (the rename would
replace a device node with a file; opening a FIFO blocks), never a file the command is reading (an export
written over its own input), and never a path a registered guard refuses (facemeta.gallery registers one for
the files of a gallery folder: an export over ``gallery.sqlite`` would destroy the gallery it reads). A
write that finds the disk full raises :class:`DiskFullError`, saying which file was not written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from facemeta.errors import FacemetaError


class OutputPathError(FacemetaError):
    """An output path facemeta must not write: not a regular file, a file being read, or a guarded file."""


class DiskFullError(FacemetaError, OSError):
    """The disk (or the user's quota) filled up while a file was written; the file was left as it was."""

    def __init__(self, path: str | os.PathLike) -> None:
        FacemetaError.__init__(self, f"disk full: {path} was not written (the file system has no space left; "
                                     "free some and run the command again)")
        self.message = self.args[0]
        self.errno = errno.ENOSPC
        self.strerror = "No space left on device"

    def __str__(self) -> str:
        return self.message


# Guards: each takes a resolved output path and returns why it must not be written (None: no objection).
_GUARDS: list[Callable[[Path], str | None]] = []
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def add_output_guard(guard: Callable[[Path], str | None]) -> None:
    """Register a check every output path must pass (e.g. the gallery package's: no gallery file)."""
    if guard not in _GUARDS:
        _GUARDS.append(guard)


def _kind(mode: int) -> str | None:
    return next((what for test, what in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def check_output(path: str | os.PathLike, reading: Iterable[str | os.PathLike] = (), guarded: bool = True) -> Path:
    """The output path, checked before anything is written (OutputPathError, one line, otherwise): it must be
    a new name or a regular file (a symbolic link is judged by what it points to: the rename replaces the
    link, and what it points to keeps its bytes), not any file in ``reading`` (same inode), and, when
    ``guarded``, pass every registered guard (a gallery writing its own index passes guarded=False)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from None
    if st is not None:
        what = _kind(st.st_mode)
        if what is not None:
            raise OutputPathError(f"cannot write {path}: it is {what}; facemeta writes only regular files "
                                  "(give a file name)")
        for src in reading:
            with contextlib.suppress(OSError):
                other = os.stat(src)
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    raise OutputPathError(f"cannot write {path}: it is {src}, which this command reads; "
                                          "give another output file")
    if guarded and _GUARDS:
        resolved = Path(os.path.realpath(path))
        for guard in _GUARDS:
            why = guard(resolved)
            if why:
                raise OutputPathError(f"cannot write {path}: {why}")
    return path


def _current_umask() -> int:
    """The process umask (read once; os.umask has no read-only form)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished files get the usual mode instead.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 reading: Iterable[str | os.PathLike] = (), guarded: bool = True) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces `path` atomically.

    The path is checked first (:func:`check_output` with ``reading`` and ``guarded``). On an exception the
    temporary file is removed and `path` is left untouched; a full disk raises DiskFullError naming it.
    """
    path = check_output(path, reading, guarded)
    try:
        with _writing(path, mode, encoding) as fh:
            yield fh
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from None
        raise


@contextlib.contextmanager
def _writing(path: Path, mode: str, encoding: str | None) -> Iterator[IO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding,
                       newline=None if binary else "") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), _FILE_MODE)  # on the open file: a link swapped in for tmp is never followed
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
