"""FaceRecognizer: enroll, identify, verify, remove and list people, from image files.

It joins the one inference entry point (facemeta.embedder.FaceEmbedder: detect, align, embed)
to an on-disk gallery (facemeta.gallery.Gallery). The gallery is created on the first enroll with
the model's embedding size, fingerprint and calibrated threshold, and refuses any other model.

    from facemeta import FaceRecognizer
    with FaceRecognizer("people") as fr:
        fr.enroll("Ada", ["ada1.jpg", "ada2.jpg"])   # a rerun skips photos already enrolled
        fr.identify("party.jpg")   # every face: box, best identity or "unknown", score
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facemeta.errors import FacemetaError, GalleryError, NoFaceError, one_line
from facemeta.gallery import UNKNOWN, Gallery, Identity, IndexSpec, check_name
from facemeta.gallery.store import DB_NAME
from facemeta.recognizer_domains import DomainVerbs, verify_across

ALREADY_ENROLLED = "already enrolled"  # how EnrollResult.skipped words a photo skipped as a repeat
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class EnrollResult:
    """What an enroll did: embeddings added per identity, the images (or identity folders) it did not
    use with the reason, how many of those were skipped as already enrolled for that person, each
    image it added with the face it used (path, facemeta.align.detect.Face) and that face's aligned crop
    (same order), and the images where two faces competed to be the subject (path, warning)."""

    added: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    already: int = 0
    used: list[tuple[Path, object]] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Embeddings added in all."""
        return sum(self.added.values())


def file_sha256(path: Path) -> str | None:
    """sha256 of a regular file's bytes (hex), or None when it is not one or cannot be read (the
    embedder then says why); a FIFO is never waited on."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            while block := fh.read(1 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def image_files(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand paths: files as given, folders to their image files (sorted, not recursive)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def identity_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """A folder of identity subfolders -> {subfolder name: its image files}."""
    root = Path(root)
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder")
    people = {d.name: image_files([d]) for d in sorted(root.iterdir()) if d.is_dir()}
    people = {k: v for k, v in people.items() if v}
    if not people:
        raise GalleryError(f"{root} has no identity subfolders with images")
    return people


class FaceRecognizer(DomainVerbs):
    """Face identification and verification over a gallery folder with one model.

    gallery: the gallery folder (created on the first enroll). model_path: a facemeta checkpoint
    (default: the model in weights/ or $FACEMETA_MODEL). index: index kind for a new gallery
    ("flat", "hnsw", "ivf", "ivf_sq8" or an IndexSpec); backend, milvus_uri: where a new gallery's
    embeddings are searched ("faiss", or "milvus" with a Milvus Lite file in the folder or a server URI). threshold: open-set threshold for identify
    (default: the gallery's, which a new gallery takes from the model's calibrated threshold).
    embedder: an already loaded FaceEmbedder (to share one between recognizers).
    """

    _image_files = staticmethod(image_files)  # for DomainVerbs
    _file_sha256 = staticmethod(file_sha256)

    def __init__(self, gallery: str | os.PathLike, model_path: str | os.PathLike | None = None, device: str = "cpu",
                 select: str = "subject", index: str | IndexSpec = "flat", threshold: float | None = None,
                 embedder=None, runtime: str = "torch", onnx_path: str | os.PathLike | None = None,
                 backend: str = "faiss", milvus_uri: str | None = None) -> None:
        from facemeta.checks import check_threshold
        from facemeta.embedder import FaceEmbedder

        self.path = Path(gallery)
        self.embedder = embedder if embedder is not None else FaceEmbedder(
            model_path, device=device, select=select, runtime=runtime, onnx_path=onnx_path)
        threshold = check_threshold(threshold)
        self.index = index
        self.backend, self.milvus_uri = backend, milvus_uri
        self.threshold = threshold
        self._reader: Gallery | None = None
        self._writer: Gallery | None = None
        if (self.path / DB_NAME).exists():
            self._check_model(self.gallery())

    # -- gallery handles
    def exists(self) -> bool:
        """Whether the gallery folder holds a gallery yet."""
        return (self.path / DB_NAME).exists()

    def _check_model(self, g: Gallery) -> None:
        fp = self.embedder.fingerprint
        if g.fingerprint != fp or g.dim != self.embedder.embedding_size:
            raise GalleryError(f"gallery {self.path} was built with model {g.fingerprint} ({g.dim}-d); "
                               f"{self.embedder.model_path} is model {fp} ({self.embedder.embedding_size}-d): "
                               "use that model (--model) or another gallery")

    def gallery(self, write: bool = False) -> Gallery:
        """The open gallery (read-only, or as its writer, created if missing when write=True)."""
        if write:
            if self._writer is None:
                if not self.exists():
                    self._writer = Gallery.create(self.path, dim=self.embedder.embedding_size,
                                                  fingerprint=self.embedder.fingerprint, index=self.index,
                                                  backend=self.backend, milvus_uri=self.milvus_uri,
                                                  threshold=self.embedder.threshold)
                else:
                    self._writer = Gallery.open(self.path, mode="w")
                    self._check_model(self._writer)
            return self._writer
        if self._writer is not None:
            return self._writer
        if self._reader is None:
            if not self.exists():
                raise GalleryError(f"no gallery at {self.path}; enroll someone first")
            self._reader = Gallery.open(self.path, load_index=False)  # the index loads on the first search
            self._check_model(self._reader)
        return self._reader

    def close(self) -> None:
        """Save and close the gallery (releases the writer lock)."""
        for g in (self._writer, self._reader):
            if g is not None:
                g.close()
        self._writer = self._reader = None

    def __enter__(self) -> FaceRecognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- verbs
    def enroll(self, name: str, images: str | os.PathLike | Sequence[str | os.PathLike],
               on_image: Callable[[Path], None] | None = None, force: bool = False,
               sources: Sequence[str] | None = None, domain: str | None = None) -> EnrollResult:
        """Add every usable image of one person (files or folders; one face per image by the select
        policy) in one transaction. A file whose bytes (sha256) are already enrolled for that person,
        or repeat an earlier file of this call, is skipped as already enrolled unless ``force``;
        unusable images are reported in ``skipped``. If no image is usable, NoFaceError with the reason.
        ``sources`` (one per image file given) is what the gallery records as each photo's source instead of
        its path (e.g. ``upload:ada.jpg`` for a file that will not outlive the call). ``domain``: a domain of
        the gallery (:meth:`add_domain`) the photos come from (default: the gallery's default domain)."""
        name = check_name(name)  # a bad name is refused before any image is read
        domain = self._domain_name(domain)  # so is an unknown domain
        if self.exists():
            self.gallery(write=True).check_unlike([name])  # so is a look-alike of another person
        paths = image_files([images] if isinstance(images, str | os.PathLike) else images)
        if not paths:
            raise GalleryError(f"no images given for {name!r}")
        if sources is not None and len(sources) != len(paths):
            raise GalleryError(f"{len(sources)} source labels for {len(paths)} images of {name!r}")
        label = dict(zip(paths, sources, strict=True)) if sources is not None else {}
        known = set() if force or not self.exists() else self.gallery(write=True).content_hashes(name)
        result = EnrollResult()
        vecs, recorded, scores, hashes, failures = [], [], [], [], []
        first_of: dict[str, Path] = {}
        for p in paths:
            digest = file_sha256(p)
            if not force and digest is not None and (digest in known or digest in first_of):
                why = f"{ALREADY_ENROLLED} for {name!r}"
                if digest not in known:
                    why += f" (same content as {first_of[digest]})"
                result.skipped.append((str(p), why))
                result.already += 1
            else:
                try:
                    found = self.embedder.face_in_file(p)
                    face = found.face
                    vecs.append(found.vector)
                    recorded.append(label.get(p) or str(p.resolve()))
                    scores.append(float(face.score))
                    hashes.append(digest)
                    result.used.append((p, face))
                    result.crops.append(found.crop)
                    if found.warning:
                        result.warnings.append((str(p), found.warning))
                    if digest is not None:
                        first_of.setdefault(digest, p)
                except FacemetaError as exc:
                    failures.append(one_line(exc, limit=1000))
                    result.skipped.append((str(p), failures[-1]))
            if on_image:
                on_image(p)
        if not vecs and not result.already:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise NoFaceError(f"none of the {len(paths)} image(s) for {name!r} gave a usable face: {failures[0]}{more}")
        if vecs:
            g = self.gallery(write=True)
            if domain is None:
                g.enroll(name, np.stack(vecs), fingerprint=self.embedder.fingerprint, sources=recorded, scores=scores,
                         content_hashes=hashes)
            else:  # raw vectors kept, the index gets them normalised by the domain's statistics
                from facemeta.gallery import domains

                domains.enroll(g, name, np.stack(vecs), fingerprint=self.embedder.fingerprint, domain=domain,
                               sources=recorded, scores=scores, content_hashes=hashes)
            result.added[name] = len(vecs)
        return result

    def enroll_folder(self, root: str | os.PathLike, progress: bool = False, force: bool = False,
                      domain: str | None = None) -> EnrollResult:
        """Enroll a folder of identity subfolders (one transaction per identity, so an interrupted
        run keeps every identity it finished, and a rerun skips the photos already enrolled unless
        ``force``). A subfolder with a bad name or no usable face is reported in ``skipped`` and the
        rest continue; a problem with the gallery itself (locked, another model, damaged) stops the run.
        ``domain``: as in :meth:`enroll`, for every photo."""
        people = identity_folders(root)
        domain = self._domain_name(domain)
        total = sum(len(v) for v in people.values())
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="img", desc="enroll")
        result = EnrollResult()
        try:
            if self.exists():
                self.gallery(write=True)  # open (and check) the gallery once, before any photo is embedded
            for folder, files in people.items():
                try:
                    name = check_name(folder)
                    if self.exists():
                        self.gallery(write=True).check_unlike([name])  # a look-alike of someone enrolled
                except GalleryError as exc:
                    result.skipped.append((str(Path(root) / folder), str(exc)))
                    if bar:
                        bar.update(len(files))
                    continue
                try:
                    r = self.enroll(name, files, on_image=(lambda _p: bar.update(1)) if bar else None, force=force,
                                    domain=domain)
                except GalleryError as exc:  # the gallery itself (locked, damaged, a full disk): no point going on
                    if not result.added:
                        raise
                    raise GalleryError(f"{exc}; {name!r} was not enrolled, the {len(result.added)} people "
                                       f"({result.total} photos) enrolled before it are committed (a rerun skips "
                                       "them)") from None
                except FacemetaError as exc:  # no usable face, or another problem of this person's photos
                    result.skipped.append((folder, one_line(exc, limit=1000)))
                    continue
                for k, v in r.added.items():
                    result.added[k] = result.added.get(k, 0) + v
                result.skipped.extend(r.skipped)
                result.already += r.already
                result.warnings.extend(r.warnings)
        finally:
            if bar:
                bar.close()
        return result

    def identify(self, image: str | os.PathLike, top_k: int = 1, threshold: float | None = None,
                 domain: str | None = None) -> list[dict]:
        """Every face in an image: box, detector score, its identity (or "unknown" below the
        threshold) with its score, and the top-k candidate identities. An unreadable file raises.
        ``domain``: the domain the photo comes from (its faces are normalised by its statistics)."""
        _, faces = next(self.identify_files([image], top_k, threshold, domain=domain))
        if isinstance(faces, Exception):
            raise faces
        return faces

    def identify_files(self, images: Sequence[str | os.PathLike], top_k: int = 1, threshold: float | None = None,
                       batch_size: int = 16, domain: str | None = None
                       ) -> Iterator[tuple[str | os.PathLike, list[dict] | FacemetaError]]:
        """:meth:`identify` for many image files with the model and MTCNN loaded once: images are decoded and
        detected in batches and every face of a batch is searched in one call. Yields (path, faces) in order,
        or (path, the FacemetaError of a file that could not be read). ``domain``: as in :meth:`identify`; the
        threshold is then the domain's calibrated one unless one is given (:meth:`threshold_for`)."""
        if batch_size < 1:
            raise GalleryError(f"batch size must be >= 1, got {batch_size}")
        g, thr, stats = self._search_settings(top_k, threshold, domain)
        pending: list[tuple[str | os.PathLike, list | FacemetaError]] = []
        for path, faces in self.embedder.embed_all_files(list(images), batch_size):
            pending.append((path, faces))
            if len(pending) == batch_size:
                yield from self._search_faces(g, pending, top_k, thr, stats)
                pending = []
        yield from self._search_faces(g, pending, top_k, thr, stats)

    def identify_image(self, image: np.ndarray, top_k: int = 1, threshold: float | None = None,
                       domain: str | None = None) -> tuple[list[dict], list]:
        """:meth:`identify` for a decoded RGB image (the service's uploads, decoded once) -> (the faces as
        :meth:`identify` gives them, the facemeta.embedder.EmbeddedFace of each: crops for pictures)."""
        g, thr, stats = self._search_settings(top_k, threshold, domain)
        found = self.embedder.faces_in_images([image], every=True)[0]
        _, faces = next(self._search_faces(g, [("image", [(f.vector, f.face) for f in found])], top_k, thr, stats))
        return faces, found

    def _search_settings(self, top_k: int, threshold: float | None, domain: str | None):
        """(gallery, threshold, domain statistics) of a search, checked: the given threshold, else the gallery's,
        else the domain's calibrated one."""
        from facemeta.checks import check_threshold

        g = self.gallery()
        stats = self.domain(domain).stats if domain is not None else None
        thr = check_threshold(threshold) if threshold is not None else self.threshold
        if thr is None and domain is not None:
            thr = self.threshold_for(domain)[0]
        if top_k < 1:
            raise GalleryError(f"top-k must be >= 1, got {top_k}")
        return g, thr, stats

    def _search_faces(self, g: Gallery, items: list, top_k: int, threshold: float | None, stats=None) -> Iterator:
        """One gallery search for every face of `items` [(path, [(vector, Face)] or an error)], each vector
        normalised by the domain statistics ``stats`` first (None: as the model gives it)."""
        from facemeta.gallery.domain_stats import normalise

        vectors = [v for _, faces in items if not isinstance(faces, Exception) for v, _ in faces]
        results = iter(g.search(normalise(np.stack(vectors), stats), k=top_k, threshold=threshold,
                                fingerprint=self.embedder.fingerprint) if vectors else [])
        for path, faces in items:
            if isinstance(faces, Exception):
                yield path, faces
                continue
            out = []
            for _, face in faces:
                matches = next(results)
                best = matches[0] if matches else None
                known = best is not None and best.known
                out.append({"identity": best.name if known else UNKNOWN,
                            "score": None if best is None else round(best.score, 6),
                            "box": face.to_dict()["box"], "detector_score": round(float(face.score), 5),
                            "candidates": [{"identity": m.name, "score": round(m.score, 6), "known": m.known}
                                           for m in matches]})
            yield path, out

    def identify_vectors(self, vectors: np.ndarray, threshold: float | None = None):
        """Identify precomputed embeddings of this model (best identity or "unknown" each)."""
        return self.gallery().identify(vectors, threshold=threshold if threshold is not None else self.threshold,
                                       fingerprint=self.embedder.fingerprint)

    def verify(self, a: str | os.PathLike, b: str | os.PathLike, threshold: float | None = None,
               domain_a: str | None = None, domain_b: str | None = None):
        """Same person in two photos? A facemeta.embedder.Verification (score, threshold and its FAR,
        same, faces; the model's threshold unless one is given). ``domain_a``/``domain_b``: the gallery's
        domains the photos come from; each face is normalised by its own domain's statistics, and the
        threshold is :meth:`threshold_for` theirs."""
        if domain_a is None and domain_b is None:
            return self.embedder.verify(a, b, threshold=threshold)
        da = self.domain(domain_a) if domain_a is not None else None
        db = self.domain(domain_b) if domain_b is not None else None
        thr, far, _ = self.threshold_for(domain_b if domain_b is not None else domain_a, threshold, other=domain_a)
        return verify_across(self.embedder, a, b, da, db, threshold=thr, far=far)

    def verify_person(self, image: str | os.PathLike, name: str, threshold: float | None = None,
                      domain: str | None = None):
        """Is the face in ``image`` (one, by the select policy) the enrolled person ``name``? A
        facemeta.embedder.Verification whose score is the face against that person's stored embeddings
        (the gallery's scoring: best or mean cosine); the threshold is the one given, else this
        recognizer's, else the gallery's, else the model's. ``domain``: the photo's domain (normalised by its
        statistics; its calibrated threshold, :meth:`threshold_for`)."""
        from facemeta.checks import check_threshold
        from facemeta.embedder import Verification
        from facemeta.gallery.domain_stats import normalise

        g = self.gallery()
        if domain is not None:
            thr, far, _ = self.threshold_for(domain, threshold)
            vector, face = self.embedder.embed_file(image)
            score = g.score_person(name, normalise(vector, self.domain(domain).stats),
                                   fingerprint=self.embedder.fingerprint)
            return Verification(score, thr, far, bool(score >= thr), [face.to_dict()])
        vector, face = self.embedder.embed_file(image)
        score = g.score_person(name, vector, fingerprint=self.embedder.fingerprint)
        thr = next((t for t in (threshold, self.threshold, g.threshold, self.embedder.threshold) if t is not None), None)
        if thr is None:
            raise GalleryError(f"neither the gallery nor {self.embedder.model_path} has a threshold; pass --threshold")
        thr = check_threshold(thr)
        far = self.embedder.threshold_far if thr == self.embedder.threshold else None
        return Verification(score, thr, far, bool(score >= thr), [face.to_dict()])

    def remove(self, name: str) -> int:
        """Remove a person and every stored embedding; returns how many embeddings went."""
        return self.gallery(write=True).remove(name)

    def rename(self, old: str, new: str) -> None:
        """Rename a person."""
        self.gallery(write=True).rename(old, new)

    def list(self) -> list[Identity]:
        """Every enrolled person with their number of embeddings."""
        return self.gallery().identities()
