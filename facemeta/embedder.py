"""FaceEmbedder: the one inference entry point (image file -> detected, aligned face -> unit vector).

It loads a facemeta checkpoint (safetensors + JSON), detects faces with MTCNN, warps each onto the
template at the size the model was trained on (``align_size`` in the checkpoint meta, 112 by
default; ``align_chip`` says which template: DESIGN.md's, or dlib's chip for models from the prior), and
embeds it exactly as training and evaluation do (resize to the model's input size, normalise, flip test-time
augmentation). The calibrated verification threshold travels with the
checkpoint (meta ``threshold`` at false-accept rate ``threshold_far``).

``runtime="onnx"`` runs the embedding network through ONNX Runtime instead (detection and alignment stay in
torch): a graph exported by :func:`export_checkpoint_onnx` (``facemeta export``), given as ``onnx_path`` or
built on first use into ``cache_root()/onnx/<fingerprint>.onnx``. The fingerprint stays the checkpoint's, so a
gallery works with either runtime.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.errors import CheckpointError, FacemetaError, NoFaceError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
MODEL_ENV = "FACEMETA_MODEL"
RUNTIMES = ("torch", "onnx")
CHECK_FACES = 8  # real faces of the ONNX parity check at export


def default_model_path() -> Path:
    """$FACEMETA_MODEL, else the project's model in weights/ (default.safetensors, or the only one there)."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser()
    candidates = sorted(WEIGHTS_DIR.glob("*.safetensors")) if WEIGHTS_DIR.is_dir() else []
    preferred = WEIGHTS_DIR / "default.safetensors"
    if preferred.is_file():
        return preferred
    if len(candidates) == 1:
        return candidates[0]
    where = f"{WEIGHTS_DIR} holds {len(candidates)} models" if candidates else f"no model in {WEIGHTS_DIR}"
    raise CheckpointError(f"{where}; pass --model PATH (a .safetensors checkpoint) or set ${MODEL_ENV}")


ALIGN_SIZES = (16, 1024)  # the aligned chip sides a checkpoint may ask for (as data.align_size allows, and more)


def check_model_meta(meta: dict, where: str | os.PathLike) -> dict:
    """The inference settings of a checkpoint's meta, checked: ``align_size`` (an integer in 16..1024),
    ``align_chip`` (a known template), ``threshold`` (a finite cosine in [-1, 1]) and ``threshold_far``
    (in (0, 1]); absent ones take their defaults. A bad value is a one-line CheckpointError naming
    the file, before anything is allocated from it."""
    import math

    from facemeta.align.warp import CHIPS

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{where}: meta {key!r} must be {want}, got {meta.get(key)!r}")

    size = meta.get("align_size", 112)
    if isinstance(size, bool) or not isinstance(size, int) or not ALIGN_SIZES[0] <= size <= ALIGN_SIZES[1]:
        raise bad("align_size", f"an integer in {ALIGN_SIZES[0]}..{ALIGN_SIZES[1]}")
    chip = meta.get("align_chip", "arcface")
    if chip not in CHIPS:
        raise bad("align_chip", "one of " + ", ".join(CHIPS))
    out = {"align_size": size, "align_chip": chip}
    for key, low, high, want in (("threshold", -1.0, 1.0, "a finite cosine in [-1, 1] or null"),
                                 ("threshold_far", 0.0, 1.0, "a rate in (0, 1] or null")):
        value = meta.get(key)
        if value is not None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high or (key == "threshold_far" and value == 0):
                raise bad(key, want)
            value = float(value)
        out[key] = value
    return out


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of a file (identifies a model's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def checkpoint_path(model_path: str | os.PathLike | None) -> Path:
    """The .safetensors file a model argument names (the file, its .json sidecar or a bare stem; None: default)."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if path.suffix == ".json":  # the sidecar names the same checkpoint
        return path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":  # a bare stem, as load_checkpoint accepts
        return path.with_name(path.name + ".safetensors")
    return path


def onnx_cache_path(fingerprint: str) -> Path:
    """Where ``runtime="onnx"`` keeps the graph it exports on first use: cache_root()/onnx/<fingerprint>.onnx."""
    from facemeta.paths import cache_root

    return cache_root() / "onnx" / f"{fingerprint}.onnx"


def check_faces(align_size: int, chip: str, images: list[str | os.PathLike] | None = None,
                count: int = CHECK_FACES) -> tuple[np.ndarray, str]:
    """Aligned faces for the ONNX parity check -> (uint8 [N,S,S,3], where they came from).

    `images`: photos to use (one face each, the largest); default: `count` LFW photos spread over the shared
    face data. Without that data (an installed facemeta elsewhere) random pixels stand in, and say so."""
    from facemeta.align.detect import FaceDetector, select_faces
    from facemeta.align.warp import warp_face
    from facemeta.images import load_image

    source = "images given"
    if images is None:
        from facemeta.data.sets import read_set
        from facemeta.paths import DataNotFoundError

        try:
            rows = sorted(read_set("lfw"), key=lambda r: r.path)
        except DataNotFoundError:
            noise = np.random.default_rng(0).integers(0, 256, (count, align_size, align_size, 3), dtype=np.uint8)
            return noise, "random pixels (no face data found; pass images to check on real faces)"
        step = max(1, len(rows) // (3 * count))
        images, source = [r.path for r in rows[::step]], "LFW"
        images = images[:count + 4]  # a few spare photos where MTCNN misses a face
    loaded = [load_image(p) for p in images]
    faces = [warp_face(image, select_faces(found, "largest")[0].landmarks, align_size, chip)
             for image, found in zip(loaded, FaceDetector().detect_batch(loaded, min_face_fraction=0.25), strict=True)
             if found][:count]
    if not faces:
        raise NoFaceError("no face found in the images of the ONNX parity check")
    return np.stack(faces), f"{len(faces)} {source} faces aligned by facemeta"


def export_checkpoint_onnx(model_path: str | os.PathLike | None, out: str | os.PathLike, opset: int | None = None,
                           flip: bool = True, images: list[str | os.PathLike] | None = None) -> dict:
    """Export a checkpoint's embedding network to `out` (.onnx) with its JSON contract beside it, after checking
    ONNX Runtime against torch (cosine >= 0.9999) on real aligned faces (see :func:`check_faces`); returns the
    contract. Nothing is written when the check fails (a one-line CheckpointError)."""
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.models.onnx_export import DEFAULT_OPSET, build_contract, export_onnx

    if Path(out).suffix != ".onnx":
        raise CheckpointError(f"the ONNX file must end in .onnx, got {out}")
    path = checkpoint_path(model_path)
    model, meta = load_checkpoint(path)
    settings = check_model_meta(meta, path.with_suffix(".json"))
    contract = build_contract(model.config, settings, file_fingerprint(path), opset or DEFAULT_OPSET, flip,
                              checkpoint=path.name)
    faces, source = check_faces(settings["align_size"], settings["align_chip"], images)
    contract["parity"] = {"source": source}
    return export_onnx(model, out, contract, faces, opset=opset or DEFAULT_OPSET)


@dataclass(frozen=True)
class Verification:
    """The answer of :meth:`FaceEmbedder.verify`: the cosine score, the threshold it was compared with (and
    the false-accept rate it was calibrated at; None for a threshold the caller gave), the decision, and
    each photo's face (box, detector score, landmarks) as a dict."""

    score: float
    threshold: float
    threshold_far: float | None
    same: bool
    faces: list[dict]

    @property
    def decision(self) -> str:
        """'same' or 'different'."""
        return "same" if self.same else "different"


class FaceEmbedder:
    """Detect, align and embed faces with a trained facemeta model.

    model_path: a checkpoint (.safetensors with its .json); None uses :func:`default_model_path`.
    device: torch device for the model and MTCNN. select: which face of a photo ``embed_file``
    uses ('largest' or 'confident'). flip: flip test-time augmentation (as in evaluation).
    runtime: 'torch', or 'onnx' to embed with ONNX Runtime on the CPU (``model`` is then None);
    onnx_path: the exported graph (its contract must name this checkpoint's fingerprint); None exports
    the checkpoint into the cache on first use (:func:`onnx_cache_path`).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str = "cpu", select: str = "largest",
                 flip: bool = True, runtime: str = "torch", onnx_path: str | os.PathLike | None = None):
        from facemeta.align.detect import POLICIES
        from facemeta.checks import check_device
        from facemeta.models.checkpoint import load_checkpoint, read_checkpoint_info

        if select not in POLICIES or select == "all":
            raise ValueError(f"select must be 'largest' or 'confident', not {select!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if onnx_path is not None and runtime != "onnx":
            raise ValueError("onnx_path needs runtime='onnx'")
        self.model_path = checkpoint_path(model_path)
        device = check_device(device)
        self.runtime = runtime
        self._fingerprint: str | None = None
        self.onnx_model = None
        if runtime == "torch":
            self.model, self.meta = load_checkpoint(self.model_path, map_location=device)
            self.model.to(device).eval()
        else:  # the graph's contract must name these weights; thresholds come from the (recalibratable) sidecar
            self.model, self.meta = None, dict(read_checkpoint_info(self.model_path).get("meta") or {})
        self.device = device
        self.select = select
        self.flip = flip
        settings = check_model_meta(self.meta, self.model_path.with_suffix(".json"))
        self.align_size = settings["align_size"]
        self.align_chip = settings["align_chip"]
        self._threshold = settings["threshold"]
        self._threshold_far = settings["threshold_far"]
        self._detector = None
        if runtime == "onnx":
            self.onnx_model = self._onnx_model(onnx_path)

    def _onnx_model(self, onnx_path: str | os.PathLike | None):
        """The ONNX Runtime model of this checkpoint: `onnx_path`, or the cached export (built when missing or
        unusable). Its contract must name this checkpoint and the chip the faces are aligned onto."""
        from facemeta.models.onnx_export import OnnxEmbeddingModel, require_onnxruntime

        require_onnxruntime()
        if onnx_path is not None:
            model = OnnxEmbeddingModel(onnx_path, fingerprint=self.fingerprint)
        else:
            cached = onnx_cache_path(self.fingerprint)
            try:
                model = OnnxEmbeddingModel(cached, fingerprint=self.fingerprint)
            except CheckpointError:  # missing, stale or damaged: it is only a cache
                export_checkpoint_onnx(self.model_path, cached)
                model = OnnxEmbeddingModel(cached, fingerprint=self.fingerprint)
        c = model.contract
        if (c.get("align_size"), c.get("align_chip")) != (self.align_size, self.align_chip):
            raise CheckpointError(f"{model.path.name} expects faces aligned at {c.get('align_size')} px onto the "
                                  f"{c.get('align_chip')} chip, the checkpoint at {self.align_size} px onto "
                                  f"{self.align_chip}; export it again")
        return model

    # -- properties
    @property
    def detector(self):
        """The MTCNN detector, built on first use (so embedding aligned faces does not load it)."""
        if self._detector is None:
            from facemeta.align.detect import FaceDetector

            self._detector = FaceDetector(device=self.device)
        return self._detector

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights file, first 16 hex digits (galleries record it)."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.model_path)
        return self._fingerprint

    @property
    def threshold(self) -> float | None:
        """The calibrated cosine threshold (same person when score >= threshold), or None."""
        return self._threshold

    @property
    def threshold_far(self) -> float | None:
        """The false-accept rate the threshold was calibrated for (on held-out source identities)."""
        return self._threshold_far

    @property
    def embedding_size(self) -> int:
        """Length of the embedding vectors."""
        if self.onnx_model is not None:
            return self.onnx_model.embedding_size
        return int(self.model.config.embedding_size)

    # -- embedding
    def embed_aligned(self, faces: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Aligned uint8 RGB faces [N,S,S,3] -> float32 unit vectors [N,E] (torch or ONNX Runtime)."""
        if self.onnx_model is not None:
            return self.onnx_model.embed(faces, flip=self.flip)
        from facemeta.models.backbone import embed

        return embed(self.model, faces, flip=self.flip)

    def _faces(self, image: np.ndarray, found: list | None = None):
        """Faces in an image: MTCNN directly (or `found`, what a batched MTCNN pass saw), then the alignment
        pipeline's fallback routes."""
        from facemeta.align.detect import Face
        from facemeta.align.pipeline import align_image

        faces = self.detector.detect(image) if found is None else found
        if faces:
            return faces
        res = align_image(image, self.detector, size=self.align_size, select=self.select, chip=self.align_chip)
        if res.face is None or res.landmarks is None or res.box is None:
            return []
        return [Face(np.asarray(res.box, dtype=np.float32), float(res.score or 0.0),
                     np.asarray(res.landmarks, dtype=np.float32))]

    def _load(self, path: str | os.PathLike) -> np.ndarray:
        from facemeta.images import load_image

        return load_image(path)

    def _load_all(self, paths: Sequence[str | os.PathLike]) -> tuple[dict[int, np.ndarray], dict[int, FacemetaError]]:
        """Decode each file -> ({position: image}, {position: the error of a file that could not be read})."""
        images: dict[int, np.ndarray] = {}
        errors: dict[int, FacemetaError] = {}
        for i, path in enumerate(paths):
            try:
                images[i] = self._load(path)
            except FacemetaError as exc:
                errors[i] = exc
        return images, errors

    def embed_all(self, path: str | os.PathLike) -> list[tuple[np.ndarray, object]]:
        """Every face of an image file -> [(unit vector (E,), Face)], most confident first (may be empty);
        an unreadable file raises its ImageReadError."""
        _, faces = next(self.embed_all_files([path]))
        if isinstance(faces, Exception):
            raise faces
        return faces

    def embed_all_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 16
                        ) -> Iterator[tuple[str | os.PathLike, list[tuple[np.ndarray, object]] | FacemetaError]]:
        """Every face of each image file, in batches of `batch_size` images: decode, one MTCNN pass over the
        batch (images of equal size share a call), the fallback routes for images without a face, warp, embed
        every face of the batch together. Yields (path, [(unit vector, Face)] most confident first) in order,
        or (path, the FacemetaError of a file that could not be read); the model and MTCNN load once."""
        from facemeta.align.detect import select_faces
        from facemeta.align.warp import warp_face

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            images, errors = self._load_all(chunk)
            found = self.detector.detect_batch([images[i] for i in images]) if images else []
            faces = {i: select_faces(self._faces(images[i], f), "all") for i, f in zip(images, found, strict=True)}
            crops = [warp_face(images[i], f.landmarks, self.align_size, self.align_chip)
                     for i in faces for f in faces[i]]
            vectors = iter(self.embed_aligned(np.stack(crops)) if crops else [])
            for i, path in enumerate(chunk):
                yield path, errors[i] if i in errors else [(next(vectors), f) for f in faces[i]]

    def embed_file(self, path: str | os.PathLike) -> tuple[np.ndarray, object]:
        """One face of an image file (by the select policy) -> (unit vector (E,), Face); NoFaceError if none."""
        from facemeta.align.detect import select_faces
        from facemeta.align.warp import warp_face

        image = self._load(path)
        faces = self._faces(image)
        if not faces:
            raise NoFaceError(f"no face found in {path}{self.detector.miss_note(image)}")
        face = select_faces(faces, self.select)[0]
        crop = warp_face(image, face.landmarks, self.align_size, self.align_chip)
        return self.embed_aligned(crop[None])[0], face

    def embed_files(self, paths: list[str | os.PathLike], batch_size: int = 16) -> list[np.ndarray | None]:
        """One face per image file (the select policy), in batches: decode, MTCNN on the whole batch with the
        alignment pipeline's fallback routes, warp, embed together. -> a unit vector per path, or None where
        the file is unreadable or holds no face (the per-file reason is what :meth:`embed_file` raises)."""
        from facemeta.align.pipeline import align_batch

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out: list[np.ndarray | None] = [None] * len(paths)
        for start in range(0, len(paths), batch_size):
            images, _ = self._load_all(paths[start:start + batch_size])
            loaded = [(start + i, image) for i, image in images.items()]
            results = align_batch([img for _, img in loaded], self.detector, self.align_size, select=self.select,
                                  crop_fallback=False, chip=self.align_chip)
            found = [(i, r.face) for (i, _), r in zip(loaded, results, strict=True) if r.face is not None]
            if found:
                vectors = self.embed_aligned(np.stack([f for _, f in found]))
                for (i, _), v in zip(found, vectors, strict=True):
                    out[i] = v
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two embeddings (unit vectors: their dot product)."""
        return float(np.dot(np.asarray(a, np.float32), np.asarray(b, np.float32)))

    def verify(self, path_a: str | os.PathLike, path_b: str | os.PathLike,
               threshold: float | None = None) -> Verification:
        """Compare the faces of two image files (one each, by the select policy) -> :class:`Verification`."""
        from facemeta.checks import check_threshold

        thr = self.threshold if threshold is None else check_threshold(threshold)
        ea, fa = self.embed_file(path_a)
        eb, fb = self.embed_file(path_b)
        if thr is None:
            raise CheckpointError(f"{self.model_path} has no calibrated threshold; pass --threshold")
        score = self.similarity(ea, eb)
        return Verification(score, thr, None if threshold is not None else self.threshold_far, bool(score >= thr),
                            [fa.to_dict(), fb.to_dict()])
