"""Which search backend a gallery uses: FAISS (an index file in the gallery folder, the default) or Milvus
(a Milvus Lite file in the folder, or a Milvus server), recorded in the gallery's meta when it is created.
Both are caches of the gallery's SQLite records (index_base.py says what a backend does)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from facemeta.errors import GalleryError
from facemeta.gallery.index_base import IndexBase
from facemeta.gallery.index_cache import IndexCache
from facemeta.gallery.records import Records

DB_NAME = "gallery.sqlite"  # the records, the source of truth
INDEX_NAME = "index.faiss"  # the FAISS backend's index file

BACKENDS = ("faiss", "milvus")


def open_backend(records: Records, path: Path, meta: dict[str, str], writable: bool, save_interval: float,
                 use_gpu: bool | None) -> IndexBase:
    """The search backend the gallery's meta names (FAISS when it names none: galleries from before
    backends existed). The Milvus one is imported only when used (pymilvus is an optional extra)."""
    backend = meta.get("backend", "faiss")
    if backend == "faiss":
        return IndexCache(records, path / INDEX_NAME, writable, save_interval, use_gpu)
    if backend == "milvus":
        from facemeta.gallery.milvus_index import MilvusIndex

        return MilvusIndex(records, path, json.loads(meta["milvus"]), writable, save_interval)
    raise GalleryError(f"{path / DB_NAME} names a search backend this facemeta does not know ({backend!r})")


def backend_meta(backend: str, milvus_uri: str | None) -> dict[str, str]:
    """What a new gallery stores about its backend (never a token)."""
    if backend not in BACKENDS:
        raise GalleryError(f"unknown gallery backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "faiss":
        if milvus_uri:
            raise GalleryError("a Milvus URI was given for a FAISS gallery; add --backend milvus")
        return {}
    from facemeta.gallery.milvus_index import LITE_NAME

    gallery_id = uuid.uuid4().hex  # chosen here: it names the gallery's Milvus collection
    return {"gallery_id": gallery_id, "backend": "milvus",
            "milvus": json.dumps({"uri": milvus_uri or LITE_NAME, "collection": f"facemeta_{gallery_id}"})}


def empty_folder(path: Path) -> None:
    """Remove what a failed create wrote into its (previously empty) folder."""
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


