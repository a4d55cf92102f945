"""Which search backend a gallery uses: FAISS (an index file in the gallery folder, the default) or Milvus
(a Milvus Lite file in the folder, or a Milvus server), recorded in the gallery's meta when it is created.
Both are caches of the gallery's SQLite records (index_base.py says what a backend does).

Each backend is registered in :data:`BACKENDS` (facemeta.registry) with how it opens and what a new gallery
records about it; ``--backend`` of the commands and Gallery.create read that registry.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from facemeta.errors import GalleryError
from facemeta.gallery.index_base import IndexBase
from facemeta.gallery.index_cache import IndexCache
from facemeta.gallery.records import Records
from facemeta.registry import Registry

DB_NAME = "gallery.sqlite"  # the records, the source of truth
INDEX_NAME = "index.faiss"  # the FAISS backend's index file



@dataclass(frozen=True)
class Backend:
    """A search backend: ``open(records, path, meta, writable, save_interval, use_gpu)`` its index of a gallery,
    and ``new_meta(milvus_uri)`` what a new gallery stores about it (never a token)."""

    open: Callable[[Records, Path, dict[str, str], bool, float, bool | None], IndexBase]
    new_meta: Callable[[str | None], dict[str, str]]


BACKENDS: Registry[Backend] = Registry("gallery backend", error=GalleryError)


def _open_faiss(records: Records, path: Path, meta: dict[str, str], writable: bool, save_interval: float,
                use_gpu: bool | None) -> IndexBase:
    return IndexCache(records, path / INDEX_NAME, writable, save_interval, use_gpu)


def _faiss_meta(milvus_uri: str | None) -> dict[str, str]:
    if milvus_uri:
        raise GalleryError("a Milvus URI was given for a FAISS gallery; add --backend milvus")
    return {}


def _open_milvus(records: Records, path: Path, meta: dict[str, str], writable: bool, save_interval: float,
                 use_gpu: bool | None) -> IndexBase:
    from facemeta.gallery.milvus_index import MilvusIndex  # only when used: pymilvus is an optional extra

    return MilvusIndex(records, path, json.loads(meta["milvus"]), writable, save_interval)


def _milvus_meta(milvus_uri: str | None) -> dict[str, str]:
    from facemeta.gallery.milvus_index import LITE_NAME

    gallery_id = uuid.uuid4().hex  # chosen here: it names the gallery's Milvus collection
    return {"gallery_id": gallery_id, "backend": "milvus",
            "milvus": json.dumps({"uri": milvus_uri or LITE_NAME, "collection": f"facemeta_{gallery_id}"})}


BACKENDS.register("faiss", Backend(_open_faiss, _faiss_meta))  # the default; galleries from before backends
BACKENDS.register("milvus", Backend(_open_milvus, _milvus_meta))


def open_backend(records: Records, path: Path, meta: dict[str, str], writable: bool, save_interval: float,
                 use_gpu: bool | None) -> IndexBase:
    """The search backend the gallery's meta names (FAISS when it names none: galleries from before
    backends existed)."""
    backend = meta.get("backend", "faiss")
    if backend not in BACKENDS:
        raise GalleryError(f"{path / DB_NAME} names a search backend this facemeta does not know ({backend!r})")
    return BACKENDS[backend].open(records, path, meta, writable, save_interval, use_gpu)


def backend_meta(backend: str, milvus_uri: str | None) -> dict[str, str]:
    """What a new gallery stores about its backend (never a token); GalleryError for an unknown backend."""
    return BACKENDS.get(backend).new_meta(milvus_uri)


def empty_folder(path: Path) -> None:
    """Remove what a failed create wrote into its (previously empty) folder."""
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


