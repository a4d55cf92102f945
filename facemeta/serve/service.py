"""FaceService: the verbs of `facemeta serve` (verify, identify, enroll, people, rename, remove, info)
over one loaded model and one gallery, safe to call from many threads at once.

- Uploads become files in a private temporary folder (named after the client's file name, cleaned), so
  they pass exactly the checks of any image file (facemeta.images.load_image: header check, pixel cap)
  and the recognizer's duplicate detection (sha256 of the bytes); the folder goes when the call ends,
  and error messages name the upload, never the temporary path.
- Reads share one read-only FaceRecognizer (its gallery reader refreshes itself from the database
  before each search, so it sees every change a writer committed). Writes are serialised by a
  process lock, and each opens the gallery's writer only for its own duration (FaceRecognizer(...,
  write) then close), so `facemeta enroll` from a shell can still change the gallery between requests.
- Inference (detection, alignment, embedding) runs under a semaphore of ``slots`` so that parallel
  requests do not oversubscribe the cores: torch uses ``threads`` per request, slots x threads ~ cores.
- Memory: the pixels the uploads' headers claim are held in a shared budget (facemeta.serve.budget,
  ``max_pixels_in_flight``) while a request decodes them, so concurrent large images wait instead of
  taking all the memory; a request that cannot get room in time is a 503.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from facemeta.errors import FacemetaError, GalleryError, ImageReadError, ManyFacesError, NoFaceError, one_line
from facemeta.serve.budget import DEFAULT_MEGAPIXELS, Busy, PixelBudget, claimed_pixels
from facemeta.serve.thumbnails import Thumbnails, aligned_jpeg, crop_jpeg, data_url, preview_jpeg

log = logging.getLogger("facemeta.serve")

MAX_TOP_K = 20
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ApiError(Exception):
    """An expected refusal with its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def status_for(exc: BaseException) -> int:
    """The HTTP status of an expected error: bad image 400, no or several faces 422, a gallery that
    refuses (locked, another model, a name taken) 409, other bad input 400."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, ImageReadError):
        return 400
    if isinstance(exc, NoFaceError | ManyFacesError):
        return 422
    if isinstance(exc, GalleryError):
        return 409
    return 400


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads per request by default: half the cores (two requests run at once)."""
    return max(1, available_cores() // 2)


def safe_filename(name: str | None, index: int, taken: set[str]) -> str:
    """A client's file name reduced to a plain, unique base name (letters, digits, . _ -), for temp files
    and messages."""
    base = _SAFE.sub("_", Path(name or "").name).strip("._")[:80] or f"upload{index + 1}"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{n}-{base}"
    taken.add(out)
    return out


class FaceService:
    """One model and one gallery behind thread-safe verbs that return JSON-ready dicts.

    gallery: the gallery folder (created by the first enroll). model_path: a facemeta checkpoint
    (default: weights/ or $FACEMETA_MODEL). embedder: an already loaded FaceEmbedder instead.
    threads: torch threads per request (set process-wide; None leaves torch as it is). slots: how many
    requests may run inference at once (default: cores // threads). read_only: refuse every change.
    backend, milvus_uri: the search backend of a gallery the first enroll creates (FaceRecognizer's).
    """

    def __init__(self, gallery: str | os.PathLike, model_path: str | os.PathLike | None = None, device: str = "cpu",
                 embedder=None, threads: int | None = None, slots: int | None = None, read_only: bool = False,
                 runtime: str = "torch", onnx_path: str | os.PathLike | None = None, backend: str = "faiss",
                 milvus_uri: str | None = None, max_pixels_in_flight: int | None = None) -> None:
        import torch

        from facemeta.embedder import FaceEmbedder
        from facemeta.gallery.store import DB_NAME
        from facemeta.recognizer import FaceRecognizer

        if threads is not None:
            if threads < 1:
                raise FacemetaError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.slots = slots if slots is not None else max(1, available_cores() // self.threads)
        if self.slots < 1:
            raise FacemetaError(f"inference slots must be >= 1, got {self.slots}")
        self.path = Path(gallery)
        if self.path.exists() and not self.path.is_dir():
            raise GalleryError(f"{self.path} is not a folder")
        if self.path.is_dir() and not (self.path / DB_NAME).exists() and any(self.path.iterdir()):
            raise GalleryError(f"{self.path} holds files but no gallery; give an empty or new folder, or a gallery")
        self.read_only = read_only
        self.embedder = embedder if embedder is not None else FaceEmbedder(model_path, device=device, runtime=runtime,
                                                                           onnx_path=onnx_path)
        _ = self.embedder.fingerprint, self.embedder.detector  # hash the weights and build MTCNN once, now
        self._recognizer_cls = FaceRecognizer
        self._new_gallery = {"backend": backend, "milvus_uri": milvus_uri}
        self.reader = FaceRecognizer(self.path, embedder=self.embedder)  # refuses a gallery of another model
        self.thumbnails = Thumbnails(self.path)
        self._inference = threading.BoundedSemaphore(self.slots)
        self.pixels = PixelBudget(max_pixels_in_flight or DEFAULT_MEGAPIXELS * 1_000_000)
        self._write = threading.Lock()
        self._open = threading.Lock()
        self.started = time.time()

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close the gallery reader."""
        self.reader.close()

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Hold one of the ``slots`` inference places (waits while all are taken)."""
        with self._inference:
            yield

    @contextlib.contextmanager
    def uploads(self, files: Sequence[tuple[str | None, BinaryIO]]) -> Iterator[list[Path]]:
        """Copy uploads into a private temporary folder; yields their paths. FacemetaErrors raised inside
        name the uploads by their file names, not their temporary paths; the folder is removed after."""
        with tempfile.TemporaryDirectory(prefix="facemeta-upload-") as tmp:
            taken: set[str] = set()
            paths = []
            for i, (filename, fh) in enumerate(files):
                p = Path(tmp) / safe_filename(filename, i, taken)
                with open(p, "wb") as out:
                    shutil.copyfileobj(fh, out, 1 << 20)
                paths.append(p)
            try:
                with self.pixels.hold(claimed_pixels(paths)):  # decoded while held: the memory bound
                    yield paths
            except Busy as exc:
                raise ApiError(503, str(exc)) from None
            except FacemetaError as exc:
                raise type(exc)(self.scrub(str(exc), tmp)) from None

    @staticmethod
    def scrub(text: str, folder: str | os.PathLike) -> str:
        """A message with a temporary folder's path removed (uploads named by their file names), one line."""
        for prefix in {str(folder), os.path.realpath(folder)}:
            text = text.replace(prefix + os.sep, "")
        return one_line(text, limit=1000)

    def _writable(self) -> None:
        if self.read_only:
            raise ApiError(403, "this server is read-only (--read-only): enroll, rename and remove are disabled")

    def _gallery(self):
        """The shared read-only gallery (opened once, under a lock), or None before the first enroll."""
        with self._open:
            if not self.reader.exists():
                return None
            return self.reader.gallery()

    def _writer(self):
        """A recognizer that opens the gallery's writer for one change (close it after)."""
        return self._recognizer_cls(self.path, embedder=self.embedder, **self._new_gallery)

    def _find(self, name: str):
        """The Identity of a name (as the gallery stores it: stripped, NFC), else ApiError 404."""
        if not isinstance(name, str):
            raise ApiError(422, "a name must be a string")
        g = self._gallery()
        key = unicodedata.normalize("NFC", name.strip())
        for ident in g.identities() if g is not None else []:
            if ident.name in (key, name.strip()):
                return ident
        raise ApiError(404, f"no one named {key[:80]!r} in the gallery")

    def _face_jpeg(self, path: Path, landmarks) -> bytes:
        from facemeta.images import load_image

        e = self.embedder
        return aligned_jpeg(load_image(path), landmarks, e.align_size, e.align_chip)

    def _threshold_far(self, threshold: float | None) -> float | None:
        """The calibrated FAR of a threshold when it is the model's own, else None."""
        t = self.embedder.threshold
        if threshold is None or t is None or abs(float(threshold) - t) > 1e-9:
            return None
        return self.embedder.threshold_far

    # ------------------------------------------------------------------ reads
    def verify(self, a: tuple[str | None, BinaryIO], b: tuple[str | None, BinaryIO],
               threshold: float | None = None, domain_a: str | None = None, domain_b: str | None = None) -> dict:
        """Same person in two photos? score, threshold (and its FAR), decision, and both aligned faces.
        ``domain_a``/``domain_b``: the gallery's domains the photos come from (each face normalised by its own)."""
        from facemeta.checks import check_threshold

        threshold = check_threshold(threshold)
        with self.uploads([a, b]) as paths, self.inference():
            images = [self._decode(p) for p in paths]  # decoded once: the crops below are the ones embedded
            found = [self.embedder.face_in_image(image, p.name) for image, p in zip(images, paths, strict=True)]
            used = {}
            if domain_a is not None or domain_b is not None:
                found, threshold, far, source = self.reader.across(found, (domain_a, domain_b), threshold)
                used = {"threshold_far": far, "threshold_source": source, "domain_a": domain_a, "domain_b": domain_b}
            res = self.embedder.decide(found[0], found[1], threshold)
            faces = [{"file": p.name, "box": f["box"], "detector_score": f["score"], "landmarks": f["landmarks"],
                      **({"warning": f["warning"]} if f.get("warning") else {}),
                      "aligned": data_url(crop_jpeg(e.crop))}
                     for p, f, e in zip(paths, res.faces, found, strict=True)]
        return {"score": round(float(res.score), 6), "threshold": round(float(res.threshold), 6),
                "threshold_far": res.threshold_far, "decision": res.decision, "same": res.same, "faces": faces,
                **used}

    @staticmethod
    def _decode(path: Path):
        from facemeta.images import load_image

        return load_image(path)

    def identify(self, image: tuple[str | None, BinaryIO], top_k: int = 3, threshold: float | None = None,
                 preview: bool = False, domain: str | None = None) -> dict:
        """Every face of a photo: box, identity or "unknown", score, top-k candidates; the threshold used; the
        image's size (boxes are in its pixels) and, with ``preview``, the image as a JPEG of at most 640 px."""
        from facemeta.checks import check_threshold

        threshold = check_threshold(threshold)
        if not 1 <= top_k <= MAX_TOP_K:
            raise ApiError(422, f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
        g = self._gallery()
        if g is None:
            raise ApiError(409, "no one is enrolled yet: enroll someone first")
        with self.uploads([image]) as paths, self.inference():
            pixels = self._decode(paths[0])  # decoded once, for the search and the preview
            faces, _ = self.reader.identify_image(pixels, top_k=top_k, threshold=threshold, domain=domain)
            if not faces:
                raise NoFaceError(f"no face found in {paths[0].name}")
        used = threshold if threshold is not None else g.threshold
        far, source = self._threshold_far(used), "given" if threshold is not None else "gallery"
        if domain is not None:
            used, far, source = self.reader.threshold_for(domain, threshold)
        h, w = pixels.shape[:2]
        shown = {"width": w, "height": h, "preview": data_url(preview_jpeg(pixels)) if preview else None}
        return {"file": paths[0].name, "threshold": used, "threshold_far": far, "threshold_source": source,
                "domain": domain, "image": shown, "faces": faces}

    def people(self) -> dict:
        """Every enrolled person: name, id, photos, enrolled time, thumbnail URL."""
        g = self._gallery()
        people = [{"name": i.name, "id": i.id, "count": i.count, "created": i.created,
                   "thumbnail": f"/api/thumbnails/{i.id}"} for i in (g.identities() if g is not None else [])]
        return {"people": people, "count": len(people)}

    def thumbnail(self, identity_id: int) -> bytes:
        """The aligned face of a person's first enrolled photo (JPEG). Stored at enroll time; for people
        enrolled elsewhere (the CLI) it is made once from their first stored photo still on disk."""
        jpeg = self.thumbnails.get(identity_id)
        if jpeg is not None:
            return jpeg
        g = self._gallery()
        ident = next((i for i in (g.identities() if g is not None else []) if i.id == identity_id), None)
        if ident is None:
            raise ApiError(404, f"no person with id {identity_id}")
        for rec in g.records(ident.name)[:3]:
            if rec.source and Path(rec.source).is_file():
                try:
                    with self.inference():
                        _, face = self.embedder.embed_file(rec.source)
                        jpeg = self._face_jpeg(Path(rec.source), face.landmarks)
                except FacemetaError:
                    continue
                if not self.read_only:
                    with contextlib.suppress(OSError):
                        self.thumbnails.put(ident.id, jpeg)
                return jpeg
        raise ApiError(404, f"no picture of {ident.name[:80]!r}: its enrolled photos are not on this machine")

    def info(self) -> dict:
        """The model (fingerprint, embedding size, threshold and FAR), the gallery's size and settings, and
        this server's settings."""
        from facemeta.version import __version__

        e = self.embedder
        g = self._gallery()
        gallery = {"name": self.path.name, "exists": g is not None, "people": 0, "embeddings": 0,
                   "threshold": None, "scoring": None, "index": None}
        if g is not None:
            g.refresh()
            people = g.identities()
            gallery.update(people=len(people), embeddings=sum(i.count for i in people), threshold=g.threshold,
                           scoring=g.scoring, index=g.spec.kind, fingerprint=g.fingerprint, backend=g.backend)
        return {"version": __version__,
                "model": {"name": e.model_path.name, "fingerprint": e.fingerprint, "embedding_size": e.embedding_size,
                          "threshold": e.threshold, "threshold_far": e.threshold_far, "align_size": e.align_size,
                          "align_chip": e.align_chip, "device": str(e.device)},
                "gallery": gallery,
                "server": {"read_only": self.read_only, "threads": self.threads, "inference_slots": self.slots,
                           "max_pixels_in_flight": self.pixels.limit,
                           "uptime_s": round(time.time() - self.started, 1)}}

    # ------------------------------------------------------------------ writes
    def enroll(self, name: str, images: Sequence[tuple[str | None, BinaryIO]], force: bool = False,
               domain: str | None = None) -> dict:
        """Add a person's photos (one face each); photos already enrolled for them are skipped unless
        ``force``. -> name, added, skipped [{file, reason}], already, the person's photo count. The aligned
        face of the first photo of someone new becomes their thumbnail."""
        from facemeta.gallery import check_name

        self._writable()
        try:
            name = check_name(name)
        except GalleryError as exc:
            raise ApiError(422, one_line(exc, limit=1000)) from None
        if not images:
            raise ApiError(422, "give at least one image")
        with self.uploads(images) as paths, self._write:
            tmp = paths[0].parent
            fr = self._writer()
            try:
                with self.inference():
                    result = fr.enroll(name, paths, force=force, sources=[f"upload:{p.name}" for p in paths],
                                       domain=domain)
                ident = next((i for i in fr.gallery(write=True).identities() if i.name == name), None)
                if ident is not None and result.used and not self.thumbnails.has(ident.id):
                    try:  # the crop enroll embedded: no second decode, detection or warp
                        self.thumbnails.put(ident.id, crop_jpeg(result.crops[0]))
                    except (FacemetaError, OSError) as exc:  # the person is enrolled; the page shows initials
                        log.warning("no thumbnail for %r: %s", name, self.scrub(str(exc), tmp))
            finally:
                fr.close()
            skipped = [{"file": Path(p).name, "reason": self.scrub(why, tmp)} for p, why in result.skipped]
        return {"name": name, "added": result.total, "already": result.already, "skipped": skipped,
                "person": None if ident is None else {"name": ident.name, "id": ident.id, "count": ident.count,
                                                      "thumbnail": f"/api/thumbnails/{ident.id}"}}

    def rename(self, old: str, new: str) -> dict:
        """Rename a person: 404 if unknown, 422 for a bad new name, 409 if the new name is taken."""
        from facemeta.gallery import check_name

        self._writable()
        try:
            new = check_name(new)
        except GalleryError as exc:
            raise ApiError(422, one_line(exc, limit=1000)) from None
        with self._write:
            ident = self._find(old)
            if new != ident.name and any(i.name == new for i in self._gallery().identities()):
                raise ApiError(409, f"someone is already named {new[:80]!r}; remove them first or pick another name")
            fr = self._writer()
            try:
                fr.rename(ident.name, new)
            finally:
                fr.close()
        return {"old": ident.name, "name": new, "id": ident.id}

    def remove(self, name: str) -> dict:
        """Remove a person, their embeddings and thumbnail: 404 if unknown."""
        self._writable()
        with self._write:
            ident = self._find(name)
            fr = self._writer()
            try:
                gone = fr.remove(ident.name)
            finally:
                fr.close()
            self.thumbnails.drop(ident.id)
        return {"removed": ident.name, "id": ident.id, "embeddings": gone}
