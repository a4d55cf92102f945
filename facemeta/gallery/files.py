"""A gallery's files opened as plain files: never through a symbolic link, never anything but a regular file.

The lock (lock.py) and the index are opened without following symbolic links and must be regular
files; the SQLite files are checked the same way before SQLite opens them (it would follow a link);
the index is replaced by rename, which replaces a link rather than writing through it. No output facemeta
writes may land on a gallery's own files (:func:`not_a_gallery_file`, registered with facemeta.atomic).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from facemeta.atomic import add_output_guard
from facemeta.errors import GalleryError

# A gallery folder is one holding this file; these names in it (and their -wal, -shm, -journal or repair
# copies) belong to the gallery.
_MARK = "gallery.sqlite"
_OWN = ("gallery.sqlite", "index.faiss", "writer.lock", "milvus.db")


def not_a_gallery_file(path: Path) -> str | None:
    """Why an output may not be written at ``path`` (resolved): a file of a gallery folder, e.g. an export over
    the gallery it reads (its own writes pass guarded=False); None for any other path."""
    if path.name.startswith(_OWN) and os.path.lexists(path.parent / _MARK):
        return (f"it is a file of the gallery in {path.parent} ({path.name}); writing it would damage the "
                "gallery: write outside the gallery folder")
    return None


add_output_guard(not_a_gallery_file)


def open_regular(path: Path):
    """Open a gallery file for reading without following a symbolic link or blocking on a FIFO;
    anything but a regular file is a one-line GalleryError (OSError for a missing file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise GalleryError(f"{path} is a symbolic link; a gallery's files must be plain files inside "
                               "its folder") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GalleryError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def check_plain_files(db: Path) -> None:
    """Refuse SQLite files (the database, its -wal and -shm) that are symbolic links or not regular files,
    before SQLite opens them: it follows links, so the writer would change a file outside the gallery folder."""
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise GalleryError(f"cannot read {p}: {exc.strerror}") from None
        if stat.S_ISLNK(mode):
            raise GalleryError(f"{p} is a symbolic link; a gallery's files must be plain files inside its folder")
        if not stat.S_ISREG(mode):
            raise GalleryError(f"{p} is not a regular file")
