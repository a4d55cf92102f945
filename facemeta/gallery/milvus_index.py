"""The Milvus backend of a gallery: its embeddings searched by Milvus, through pymilvus's MilvusClient.

One code path serves both kinds of Milvus:
- Milvus Lite, a local file (``milvus.db`` inside the gallery folder by default; the ``milvus-lite``
  package runs it in this process). One process at a time may open a Lite file.
- A Milvus standalone or cluster server, by URI (``http://host:19530``), with its token read from the
  ``FACEMETA_MILVUS_TOKEN`` environment variable (never stored in the gallery).

The collection (``facemeta_<gallery id>``) holds one row per stored embedding: ``eid`` (the database's
embedding id, primary key), ``ident`` (its identity id) and ``vec`` (the float32 unit vector). Like the
FAISS index it is a cache of the gallery's SQLite records, which stay the source of truth for names,
provenance and the model fingerprint (see the README's "Milvus backend" section for why): every change
commits to SQLite first, then reaches Milvus. The writer records the generation Milvus was last flushed
at (meta ``milvus_synced``); a writer that opens a gallery whose Milvus is not known to be in sync
(a crash between the two, a restored file) compares ids and brings it up to date: missing ids added
from the stored vectors, extra ones deleted. ``repair`` drops the collection (setting a damaged Lite
file aside) and rebuilds it from the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery.faiss_index import IndexSpec
from facemeta.gallery.index_base import IndexBase
from facemeta.gallery.ranking import IdMap
from facemeta.gallery.records import Records, fault

LITE_NAME = "milvus.db"  # the default Milvus Lite file, inside the gallery folder
TOKEN_ENV = "FACEMETA_MILVUS_TOKEN"
INSTALL_HINT = "the Milvus backend needs pymilvus and milvus-lite: pip install 'facemeta[milvus]'"
MAX_TOPK = 16384  # Milvus answers at most this many hits per query; deeper searches are done exactly here
INSERT_CHUNK = 4096  # rows per insert call (about 8 MB of 512-d vectors, under gRPC's message limit)
SYNCED_KEY = "milvus_synced"

# Milvus index for each gallery index kind, and the build and search parameters taken from the IndexSpec.
MILVUS_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivf_sq8": "IVF_SQ8"}


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a Milvus Lite file (pymilvus's rule: a path ending in .db) rather than a server."""
    return uri.endswith(".db") and "://" not in uri


def resolve_uri(uri: str, folder: Path) -> str:
    """A Lite file's path, relative to the gallery folder unless absolute; a server URI as given."""
    return str(folder / uri) if is_local(uri) else uri


def index_params(spec: IndexSpec) -> tuple[str, dict, dict]:
    """(Milvus index type, build params, search params) for a gallery IndexSpec. Milvus builds an index per
    segment, so an IVF ``nlist`` is per segment; the gallery's automatic nlist (0) leaves it to Milvus."""
    kind = MILVUS_INDEX[spec.kind]
    if kind == "HNSW":
        return kind, {"M": spec.m, "efConstruction": spec.ef_construction}, {"ef": spec.ef_search}
    if kind.startswith("IVF"):
        return kind, {"nlist": spec.nlist} if spec.nlist else {}, {"nprobe": spec.nprobe}
    return kind, {}, {}


def wire_build_params(build: dict) -> dict:
    """Build params as sent: pymilvus 3 sends each as its own key, Milvus Lite 3 reads them only from a
    JSON ``params`` entry (the older wire form, which Milvus servers also read); send both."""
    return {**build, "params": json.dumps(build)} if build else {}


class _Clients:
    """One MilvusClient per URI in this process, shared by every gallery handle (a Lite file admits one
    process, so a reader and the writer of one FaceRecognizer must share it), closed with its last user."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[str, list] = {}  # uri -> [client, users]

    def acquire(self, uri: str):
        with self.lock:
            entry = self.open.get(uri)
            if entry is None:
                entry = self.open[uri] = [_connect(uri), 0]
            entry[1] += 1
            return entry[0]

    def release(self, uri: str) -> None:
        """One user fewer; the last one closes the client and, for a Lite file, stops its in-process
        server (which flushes the file and releases its lock for other processes)."""
        with self.lock:
            entry = self.open.get(uri)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self.open[uri]
            with contextlib.suppress(Exception):
                entry[0].close()
            if is_local(uri):
                with contextlib.suppress(ImportError):
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(uri)


CLIENTS = _Clients()


def _connect(uri: str):
    """A MilvusClient for ``uri`` (one line of error when pymilvus is missing or the URI cannot be opened)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's INFO lines (e.g. at every fork) are not ours to show
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise GalleryError(INSTALL_HINT) from None
    # Their tracebacks arrive as our one-line errors (grpc._server: Milvus Lite's in-process server, which
    # logs the RPCs it does not implement and pymilvus then does without).
    for name in ("pymilvus", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if is_local(uri) and os.path.islink(uri):  # Milvus Lite would write through it, outside the gallery
        raise GalleryError(f"the Milvus Lite file {uri} is a symbolic link; refusing to follow it (a gallery's "
                           "files must be plain files inside its folder: remove the link)")
    token = os.environ.get(TOKEN_ENV, "")
    try:
        return MilvusClient(uri=uri, token=token) if token else MilvusClient(uri=uri)
    except Exception as exc:  # pymilvus raises its own exceptions, gRPC's, or OSError
        if not is_local(uri):
            raise GalleryError(f"cannot reach the Milvus server {uri} ({_short(exc)})") from None
        if lite_in_use(uri):
            raise GalleryError(f"the Milvus Lite file {uri} is open in another process (Milvus Lite serves one "
                               "process at a time; a Milvus server serves many)") from None
        raise GalleryError(f"the Milvus Lite file {uri} cannot be opened ({_short(exc)})") from None


def lite_in_use(uri: str) -> bool:
    """Whether another process holds the Lite file's lock (Milvus Lite flocks ``<file>/LOCK``)."""
    try:
        fd = os.open(os.path.join(uri, "LOCK"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _short(exc: BaseException) -> str:
    """One line of a pymilvus error (its message, not its repr)."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


@contextlib.contextmanager
def milvus_errors(what: str) -> Iterator[None]:
    """Turn a Milvus failure while doing ``what`` into a one-line GalleryError."""
    try:
        yield
    except GalleryError:
        raise
    except Exception as exc:
        raise GalleryError(f"Milvus failed to {what}: {_short(exc)}") from None


class MilvusIndex(IndexBase):
    """The Milvus backend of one open gallery. ``settings`` are what the gallery stores (``uri`` and
    ``collection``); ``folder`` is the gallery folder (a relative Lite path is inside it)."""

    name = "milvus"

    def __init__(self, records: Records, folder: Path, settings: dict, writable: bool,
                 save_interval: float) -> None:
        super().__init__(records, writable, save_interval)
        self.folder = folder
        self.stored_uri = str(settings["uri"])
        self.uri = resolve_uri(self.stored_uri, folder)
        self.collection = str(settings["collection"])
        self.client = None
        self.behind = 0  # reader: embeddings the database holds that Milvus did not have when opened
        self.unavailable: str | None = None  # why Milvus could not be reached (a busy Lite file, a server down)

    # ------------------------------------------------------------------ connecting and loading

    def connect(self) -> None:
        """Open the client (shared in this process) if not open yet; a Lite file that cannot be opened
        (and is not merely in use) gets the repair hint."""
        if self.client is None:
            if is_local(self.uri) and not os.path.lexists(self.uri) and not self.writable:
                raise self.repair_hint(f"the Milvus Lite file {self.uri} is missing")  # a reader makes no file
            try:
                self.client = CLIENTS.acquire(self.uri)
            except GalleryError as exc:
                if is_local(self.uri) and not lite_in_use(self.uri):
                    raise self.repair_hint(str(exc)) from None
                self.unavailable = str(exc)  # busy or unreachable: nothing to repair
                raise
            self.unavailable = None

    def release(self) -> None:
        """A failed open: release the client without flushing."""
        self.disconnect()

    def disconnect(self) -> None:
        """Release the client (the last user in this process closes it)."""
        if self.client is not None:
            self.client = None
            CLIENTS.release(self.uri)

    def close(self) -> None:
        """Flush what changed (writer) and release the client."""
        try:
            super().close()
        finally:
            self.disconnect()

    def repair_hint(self, problem: str) -> GalleryError:
        """The error for a Milvus collection that cannot serve (remembered for ``status``)."""
        self.error = problem
        return GalleryError(f"{problem}; the database is intact: `facemeta gallery repair "
                            f"{shlex.quote(str(self.folder))}` rebuilds the Milvus collection from it")

    def create_collection(self, spec: IndexSpec) -> None:
        """Create the (empty) collection with ``spec``'s index and load it for searching."""
        from pymilvus import DataType

        c = self.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("eid", DataType.INT64, is_primary=True)
        schema.add_field("ident", DataType.INT64)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.records.dim)
        kind, build, _ = index_params(spec)
        params = c.prepare_index_params()
        params.add_index(field_name="vec", index_type=kind, metric_type="IP", params=wire_build_params(build))
        with milvus_errors(f"create collection {self.collection}"):
            c.create_collection(self.collection, schema=schema, index_params=params)
            c.load_collection(self.collection)

    def create_empty(self) -> None:
        """A new gallery's empty collection (refusing to adopt one that already exists under its name)."""
        self.connect()
        with milvus_errors("list collections"):
            exists = self.client.has_collection(self.collection)
        if exists:
            raise GalleryError(f"Milvus at {self.stored_uri} already holds a collection {self.collection}")
        self.create_collection(self.spec)
        self.save()

    def load(self, repair: bool) -> None:
        """Connect, check the collection is there, and (writer) bring it up to date with the database;
        with ``repair`` rebuild it from the database instead (see ``repair``)."""
        gen, eids, idents, digests = self.records.state()
        self.records.generation, self.ids = gen, IdMap(eids, idents)
        if self.writable:
            self.records.digest = int(digests[gen], 16)  # Records.upgrade made sure it is recorded
        if repair:
            self.repair()
            return
        self.connect()
        try:
            with milvus_errors(f"load collection {self.collection}"):
                exists = self.client.has_collection(self.collection)
                if exists:
                    self.client.load_collection(self.collection)
        except GalleryError as exc:
            raise self.repair_hint(f"the Milvus collection cannot be loaded ({exc})") from None
        if not exists:
            if not self.writable:
                raise self.repair_hint(f"Milvus at {self.stored_uri} has no collection {self.collection}")
            self.rebuild()
            return
        if self.writable:
            self.sync(eids)
        else:
            self.check_reader(gen, len(eids))
        self.error = None

    def check_reader(self, generation: int, expected: int) -> None:
        """A reader cannot mend Milvus: rows missing although the writer recorded this generation as
        flushed mean damage (repair hint); otherwise a writer is between its two commits (or died there)
        and ``status`` says how far behind Milvus is until the next writer brings it up to date."""
        missing = expected - self.held_count()
        synced = self.records.read_meta().get(SYNCED_KEY)
        if missing > 0 and synced is not None and int(synced) == generation:
            raise self.repair_hint(f"the Milvus collection holds {expected - missing} of the database's "
                                   f"{expected} embeddings")
        self.behind = max(0, missing)

    def repair(self) -> None:
        """Rebuild the collection from the database (recomputing the digest); a Lite file is set aside
        first (kept beside, as a damaged FAISS index file is), so a file Milvus cannot even open is mended."""
        self.repaired = {"aside": None, "problem": None, "digest_fixed": False}
        if is_local(self.uri) and os.path.lexists(self.uri):
            self.disconnect()  # the last user in this process also stops the Lite server holding the old file
            if self.uri in CLIENTS.open:
                raise GalleryError(f"{self.uri} is open elsewhere in this process; close it before repairing")
            aside = f"{self.uri}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self.uri, aside)
            self.repaired["aside"] = aside
        self.rebuild(fix_digest=True)

    def held_count(self) -> int:
        """Rows in the collection now."""
        with milvus_errors("count the collection"):
            res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def stored_ids(self) -> np.ndarray:
        """Every embedding id in the collection, sorted."""
        out = []
        with milvus_errors("list the collection's ids"):
            it = self.client.query_iterator(self.collection, batch_size=16384, filter="", output_fields=["eid"])
            try:
                while batch := it.next():
                    out.extend(r["eid"] for r in batch)
            finally:
                it.close()
        return np.sort(np.array(out, np.int64))

    def sync(self, eids: np.ndarray) -> None:
        """Writer: trust the collection when it was flushed at this generation with as many rows as the
        database holds; otherwise compare ids and add the missing rows, delete the extra ones."""
        meta = self.records.read_meta()
        synced = meta.get(SYNCED_KEY)
        if synced is not None and int(synced) == self.records.generation and self.held_count() == len(eids):
            self.mark_saved()
            return
        present = self.stored_ids()
        extra = np.setdiff1d(present, eids, assume_unique=True)
        missing = np.setdiff1d(eids, present, assume_unique=True)
        if len(extra):
            self.delete_rows(extra)
        for start in range(0, len(missing), INSERT_CHUNK):
            part = missing[start:start + INSERT_CHUNK]
            self.insert_rows(self.records.fetch_vectors(part), part, self.ids.lookup(part))
        self.save()

    def ensure(self) -> MilvusIndex:
        """The loaded backend (connecting and checking now if the gallery was opened without it)."""
        if self.client is None:
            self.load(repair=False)
        return self

    def catch_up(self) -> bool:
        """A reader: follow a writer's committed changes in the id map (Milvus itself is kept by the
        writer); True when the database had moved on."""
        if self.records.current_generation() == self.records.generation:
            return False
        self.read_ids()
        return True

    # ------------------------------------------------------------------ changing and saving

    def insert_rows(self, vectors: np.ndarray, eids: np.ndarray, idents: np.ndarray) -> None:
        """Insert rows (embedding id, identity id, vector) in chunks."""
        for start in range(0, len(eids), INSERT_CHUNK):
            stop = start + INSERT_CHUNK
            rows = [{"eid": int(e), "ident": int(i), "vec": v}
                    for e, i, v in zip(eids[start:stop], idents[start:stop], vectors[start:stop], strict=True)]
            with milvus_errors("insert embeddings"):
                self.client.insert(self.collection, rows)
            if start:
                fault("milvus_insert")

    def delete_rows(self, eids: np.ndarray | list[int]) -> None:
        """Delete rows by embedding id."""
        eids = [int(e) for e in eids]
        for start in range(0, len(eids), INSERT_CHUNK):
            with milvus_errors("delete embeddings"):
                self.client.delete(self.collection, ids=eids[start:start + INSERT_CHUNK])

    def rebuild(self, spec: IndexSpec | None = None, fix_digest: bool = False) -> None:
        """Drop the collection and build it again from the database (``fix_digest``: see IndexBase)."""
        self.connect()
        ids, vecs = self.rows_for_rebuild(fix_digest)
        with milvus_errors(f"drop collection {self.collection}"):
            if self.client.has_collection(self.collection):
                self.client.drop_collection(self.collection)
        self.create_collection(spec or self.spec)
        self.insert_rows(vecs, ids, self.ids.lookup(ids))
        self.drop_caches()
        self.error = None
        self.save()

    def add(self, vectors: np.ndarray, eids: np.ndarray, idents: np.ndarray) -> None:
        """Add committed embeddings (unit vectors) of the given identities."""
        self.insert_rows(vectors, eids, idents)
        self.ids.add(eids, idents)

    def remove(self, eids: list[int]) -> None:
        """Delete removed embeddings."""
        self.delete_rows(eids)
        self.ids.remove(np.array(eids, np.int64))

    def save(self) -> None:
        """Flush the collection and record the generation it now holds (``milvus_synced``)."""
        with milvus_errors("flush the collection"):
            self.client.flush(self.collection)
        self.records.set_meta({SYNCED_KEY: str(self.records.generation)})
        self.mark_saved()

    def save_now(self) -> None:
        """Flush now."""
        self.save()

    # ------------------------------------------------------------------ searching and checking

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k stored embeddings per query (ranking.SearchFn); beyond Milvus's top-k limit, an exact
        search over the stored vectors."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, int(k))
        if k > MAX_TOPK:
            ids = self.ids.eids  # the database's ids (no digest to compute, unlike Records.all_vectors)
            vecs = self.records.fetch_vectors(ids)
            sims = queries @ vecs.T
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, order, 1), ids[order]
        _, _, search = index_params(self.spec)
        if "ef" in search:
            search["ef"] = max(search["ef"], k)
        with milvus_errors("search"):
            res = self.client.search(self.collection, data=list(queries), limit=k, anns_field="vec",
                                     search_params={"metric_type": "IP", "params": search})
        sims = np.full((len(queries), k), -np.inf, np.float32)
        hits = np.full((len(queries), k), -1, np.int64)
        for row, found in enumerate(res):
            for col, hit in enumerate(found):
                sims[row, col] = hit["distance"]
                hits[row, col] = hit["eid"]
        return sims, hits

    def status(self) -> str:
        """"ok", or why the collection cannot serve searches, or how far it is behind the database."""
        if self.error:
            return (f"needs repair: {self.error}; `facemeta gallery repair {shlex.quote(str(self.folder))}` "
                    "rebuilds it from the database")
        if self.unavailable:
            return f"unavailable: {self.unavailable}"
        if self.client is None:
            return "not checked yet (Milvus is opened on the first search; `gallery info --check` checks it now)"
        if self.behind:
            return (f"behind the database by {self.behind} embeddings (the next writer to open the gallery "
                    "brings Milvus up to date)")
        return "ok"

    def matches(self, eids: np.ndarray) -> bool:
        """Whether the collection holds exactly the database's ids ``eids``, each with the database's vector."""
        held: dict[int, np.ndarray] = {}
        with milvus_errors("read the collection"):
            it = self.client.query_iterator(self.collection, batch_size=4096, filter="",
                                            output_fields=["eid", "vec"])
            try:
                while batch := it.next():
                    held.update((int(r["eid"]), np.asarray(r["vec"], np.float32)) for r in batch)
            finally:
                it.close()
        if sorted(held) != sorted(int(e) for e in eids):
            return False
        ordered = np.sort(np.asarray(eids, np.int64))
        for start in range(0, len(ordered), INSERT_CHUNK):
            part = ordered[start:start + INSERT_CHUNK]
            stored = self.records.fetch_vectors(part)
            if not all(np.array_equal(held[int(e)], v) for e, v in zip(part, stored, strict=True)):
                return False
        return True

    def describe(self, status: str) -> dict:
        """What ``Gallery.info`` reports about this backend (never the token)."""
        kind, build, _ = index_params(self.spec)
        size = 0
        if is_local(self.uri) and os.path.isdir(self.uri):
            size = sum(p.stat().st_size for p in Path(self.uri).rglob("*") if p.is_file())
        return {"backend": self.name, "milvus_uri": self.stored_uri, "collection": self.collection,
                "index_built": kind, "index_settings": {"kind": self.spec.kind, **build},
                "nlist": None, "gpu": False, "index_bytes": size}  # Milvus picks its lists per segment
