"""FaceEmbedder: the one inference entry point (image -> detected, aligned face -> unit vector).

One route serves every caller (verify, identify, enroll, domains, the service, the ONNX check, the speed
benchmark): :meth:`FaceEmbedder.faces_in_images` takes decoded images, finds their faces through
facemeta.align.route (the routes, filters and subject policy of training alignment), warps each chosen face once
and embeds the crops of a batch together; the methods that take file paths decode and call it. It loads a facemeta checkpoint (safetensors + JSON), detects faces with MTCNN, warps each onto the
template at the size the model was trained on (``align_size`` in the checkpoint meta, 112 by
default; ``align_chip`` says which template: DESIGN.md's, or dlib's chip for models from the prior), and
embeds it exactly as training and evaluation do (resize to the model's input size, normalise, flip test-time
augmentation). The calibrated verification threshold travels with the
checkpoint (meta ``threshold`` at false-accept rate ``threshold_far``).

``runtime="onnx"`` runs the embedding network through ONNX Runtime instead (detection and alignment stay in
torch): a graph exported by :func:`export_checkpoint_onnx` (``facemeta export``), given as ``onnx_path`` or
built on first use into ``cache_root()/onnx/<fingerprint>.onnx``. The fingerprint stays the checkpoint's, so a
gallery works with either runtime. An ensemble's graph takes one input per member (each face warped onto every
member's chip, as with torch), and with the graph in the cache no torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.errors import CheckpointError, FacemetaError, NoFaceError
from facemeta.model_files import (  # noqa: F401 - part of this module's API (tests, tools, commands import them here)
    ALIGN_SIZES,
    MODEL_ENV,
    WEIGHTS_DIR,
    check_model_meta,
    checkpoint_path,
    default_model_path,
    file_fingerprint,
    onnx_cache_path,
)

RUNTIMES = ("torch", "onnx")
CHECK_FACES = 8  # faces of the ONNX parity check at export


def synthetic_faces(align_size: int, count: int = CHECK_FACES, seed: int = 0) -> np.ndarray:
    """Deterministic face-sized images for a numerical parity check when no photo is given: smooth random
    fields (uint8 [N,S,S,3]). The graph computes the same operations whatever the pixels show."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(c, (align_size, align_size), interpolation=cv2.INTER_CUBIC) for c in coarse])


def check_faces(chips: list[tuple[str, int]], images: list[str | os.PathLike] | None = None,
                count: int = CHECK_FACES) -> tuple[list[np.ndarray], str]:
    """Aligned faces for the ONNX parity check -> (one uint8 batch [N,S,S,3] per (chip, size) of `chips`: the
    same faces on each, where they came from).

    `images`: photos (one face each, the subject) aligned through facemeta's one route (facemeta.align.route);
    without them, :func:`synthetic_faces` (the shared data is never read for this)."""
    if images is None:
        return [synthetic_faces(size, count) for _, size in chips], \
            f"{count} synthetic images (pass photos to check on real faces)"
    from facemeta.align.detect import FaceDetector
    from facemeta.align.route import find_faces
    from facemeta.align.warp import warp_face
    from facemeta.images import load_image

    loaded = [load_image(p) for p in images]
    found = find_faces(loaded, FaceDetector())
    faces = [(image, f.faces[0].landmarks) for image, f in zip(loaded, found, strict=True) if f is not None][:count]
    if not faces:
        raise NoFaceError("no face found in the images of the ONNX parity check")
    return [np.stack([warp_face(image, points, size, chip) for image, points in faces]) for chip, size in chips], \
        f"{len(faces)} faces of the images given, aligned by facemeta"


def export_checkpoint_onnx(model_path: str | os.PathLike | None, out: str | os.PathLike, opset: int | None = None,
                           flip: bool = True, images: list[str | os.PathLike] | None = None) -> dict:
    """Export a checkpoint's embedding network to `out` (.onnx) with its JSON contract beside it, after checking
    ONNX Runtime against torch (cosine >= 0.9999) on real aligned faces (see :func:`check_faces`); returns the
    contract. An ensemble's graph takes one input per member (facemeta.models.onnx_contract). Nothing is written
    when the check fails (a one-line CheckpointError)."""
    from facemeta.models.ensemble import load_model
    from facemeta.models.onnx_export import DEFAULT_OPSET, export_onnx, model_contract

    if Path(out).suffix != ".onnx":
        raise CheckpointError(f"the ONNX file must end in .onnx, got {out}")
    path = checkpoint_path(model_path)
    model, meta = load_model(path)
    settings = check_model_meta(meta, path.with_suffix(".json"))
    contract = model_contract(model, settings, file_fingerprint(path), opset or DEFAULT_OPSET, flip,
                              checkpoint=path.name)
    chips = getattr(model, "chips", None) or [(settings["align_chip"], settings["align_size"])]
    faces, source = check_faces(chips, images)
    contract["parity"] = {"source": source}
    return export_onnx(model, out, contract, faces if len(chips) > 1 else faces[0], opset=opset or DEFAULT_OPSET)


@dataclass(frozen=True)
class Verification:
    """The answer of :meth:`FaceEmbedder.verify`: the cosine score, the threshold it was compared with (and
    the false-accept rate it was calibrated at; None for a threshold the caller gave), the decision, and
    each photo's face (box, detector score, landmarks, and a ``warning`` when two faces competed) as a dict."""

    score: float
    threshold: float
    threshold_far: float | None
    same: bool
    faces: list[dict]

    @property
    def decision(self) -> str:
        """'same' or 'different'."""
        return "same" if self.same else "different"

    @property
    def warnings(self) -> list[str]:
        """The photos' warnings (two faces competing to be the subject), in order."""
        return [f["warning"] for f in self.faces if f.get("warning")]


@dataclass
class EmbeddedFace:
    """One face of an image on the one route: its unit vector, the detection (facemeta.align.detect.Face), the
    aligned crop it was embedded from (uint8 RGB, reusable for pictures), and the image's warning (two faces
    competing to be the subject; set on the chosen face only)."""

    vector: np.ndarray
    face: object
    crop: np.ndarray
    warning: str | None = None

    def face_dict(self) -> dict:
        """The detection as JSON-ready data (box, score, landmarks; ``warning`` when there is one)."""
        out = self.face.to_dict()
        if self.warning:
            out["warning"] = self.warning
        return out


class FaceEmbedder:
    """Detect, align and embed faces with a trained facemeta model.

    model_path: a checkpoint (.safetensors with its .json); None uses :func:`default_model_path`.
    device: torch device for the model and MTCNN. select: which face of a photo the one-face methods use
    ('subject': size, centrality and confidence together, the default; 'largest'; 'confident').
    flip: flip test-time augmentation (as in evaluation).
    runtime: 'torch', or 'onnx' to embed with ONNX Runtime on the CPU (``model`` is then None);
    onnx_path: the exported graph (its contract must name this checkpoint's fingerprint); None exports
    the checkpoint into the cache on first use (:func:`onnx_cache_path`), checked on the first faces embedded.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str = "cpu", select: str = "subject",
                 flip: bool = True, runtime: str = "torch", onnx_path: str | os.PathLike | None = None):
        from facemeta.align.detect import POLICIES
        from facemeta.checks import check_device
        from facemeta.models.checkpoint import read_checkpoint_info

        if select not in POLICIES or select == "all":
            raise ValueError(f"select must be one of {', '.join(p for p in POLICIES if p != 'all')}, not {select!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if onnx_path is not None and runtime != "onnx":
            raise ValueError("onnx_path needs runtime='onnx'")
        self.model_path = checkpoint_path(model_path)
        device = check_device(device)
        self.runtime = runtime
        self._fingerprint: str | None = None
        self.onnx_model = None
        self._onnx_pending = False
        self._config: dict = {}  # the checkpoint's config, read for the ONNX runtime (its contract is checked on it)
        if runtime == "torch":
            from facemeta.models.ensemble import load_model  # a single model or an ensemble of several

            self.model, self.meta = load_model(self.model_path, map_location=device)
            self.model.to(device).eval()
        else:  # the graph's contract must name these weights; thresholds come from the (recalibratable) sidecar
            info = read_checkpoint_info(self.model_path)
            self.model, self.meta = None, dict(info.get("meta") or {})
            self._config = info.get("config") or {}
        self.device = device
        self.select = select
        self.flip = flip
        settings = check_model_meta(self.meta, self.model_path.with_suffix(".json"))
        # the chips the faces are warped onto: one per member of an ensemble, else the checkpoint's own
        self.chips: list[tuple[str, int]] = list(getattr(self.model, "chips", None) or _config_chips(
            self._config, self.model_path) or [(settings["align_chip"], settings["align_size"])])
        self.align_chip, self.align_size = self.chips[0]
        self._threshold = settings["threshold"]
        self._threshold_far = settings["threshold_far"]
        self._detector = None
        if runtime == "onnx":
            self._onnx_model(onnx_path)

    def _onnx_model(self, onnx_path: str | os.PathLike | None, faces: np.ndarray | None = None) -> None:
        """Load the ONNX Runtime model of this checkpoint: `onnx_path`, or the cached export. A missing or unusable
        cache is exported again on the first faces embedded (`faces`: the parity check runs on them). Its
        contract must name this checkpoint and the chip the faces are aligned onto."""
        from facemeta.models.onnx_export import OnnxEmbeddingModel, require_onnxruntime

        require_onnxruntime()
        if onnx_path is not None:
            model = OnnxEmbeddingModel(onnx_path, fingerprint=self.fingerprint, config=self._config)
        else:
            cached = onnx_cache_path(self.fingerprint)
            try:
                model = OnnxEmbeddingModel(cached, fingerprint=self.fingerprint, config=self._config)
            except CheckpointError:  # missing, stale or damaged: it is only a cache
                if faces is None:
                    self._onnx_pending = True
                    return
                _export_with_faces(self.model_path, cached, faces)
                model = OnnxEmbeddingModel(cached, fingerprint=self.fingerprint, config=self._config)
        c = model.contract
        if model.ensemble or self.ensemble:
            if model.chips != self.chips:
                raise CheckpointError(f"{model.path.name} expects faces aligned onto {model.chips} (chip, px), the "
                                      f"checkpoint onto {self.chips}; export it again")
        elif (c.get("align_size"), c.get("align_chip")) != (self.align_size, self.align_chip):
            raise CheckpointError(f"{model.path.name} expects faces aligned at {c.get('align_size')} px onto the "
                                  f"{c.get('align_chip')} chip, the checkpoint at {self.align_size} px onto "
                                  f"{self.align_chip}; export it again")
        self.onnx_model, self._onnx_pending = model, False

    # -- properties
    @property
    def detector(self):
        """The MTCNN detector, built on first use (so embedding aligned faces does not load it); with the onnx
        runtime its three networks run on ONNX Runtime too (no torch: facemeta.align.mtcnn_onnx)."""
        if self._detector is None:
            if self.runtime == "onnx":
                from facemeta.align.mtcnn_onnx import OnnxFaceDetector

                self._detector = OnnxFaceDetector()
            else:
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
        if self.model is None:
            if self.ensemble:
                return sum(int(e["config"]["embedding_size"]) for e in self._config["members"])
            return int(self._config["embedding_size"])
        return int(self.model.embedding_size if self.ensemble else self.model.config.embedding_size)

    @property
    def ensemble(self) -> bool:
        """Whether the model is an ensemble (facemeta.models.ensemble: one chip per member, vectors joined)."""
        return len(self.chips) > 1

    # -- embedding
    def warp(self, image: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        """A face of an RGB image warped from its landmarks onto each chip the model reads (one for a single
        model, one per member for an ensemble)."""
        from facemeta.align.warp import warp_face

        return [warp_face(image, landmarks, size, chip) for chip, size in self.chips]

    def embed_chips(self, crops: list[list[np.ndarray]]) -> np.ndarray:
        """Faces warped by :meth:`warp` (one list of chips per face) -> float32 unit vectors [N,E]."""
        if not self.ensemble:
            return self.embed_aligned(np.stack([c[0] for c in crops]))
        return self.embed_aligned([np.stack([c[k] for c in crops]) for k in range(len(self.chips))])

    def embed_aligned(self, faces: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Aligned uint8 RGB faces [N,S,S,3] -> float32 unit vectors [N,E] (torch or ONNX Runtime). For an
        ensemble: one such batch per member, on that member's chip (:attr:`chips`), in a list."""
        if self.ensemble:
            faces = [np.asarray(f) for f in faces]
        if self._onnx_pending:
            self._onnx_model(None, faces if self.ensemble else np.asarray(faces))
        if self.onnx_model is not None:
            return self.onnx_model.embed(faces, flip=self.flip)
        if self.ensemble:
            return self.model.embed(faces, flip=self.flip)
        from facemeta.models.backbone import embed

        return embed(self.model, faces, flip=self.flip)

    def faces_in_images(self, images: Sequence[np.ndarray], every: bool = False, select: str | None = None
                        ) -> list[list[EmbeddedFace]]:
        """The one route: decoded RGB images -> their faces, embedded. For each image, the faces found by
        facemeta.align.route (training alignment's routes and filters); `every=False`: the face the policy
        chooses (`select`, default this embedder's), alone; `every=True`: every face, most confident first.
        Each chosen face is warped once and the crops of all images are embedded together. An image without
        a face gets []."""
        from facemeta.align.route import find_faces

        policy = "all" if every else (select or self.select)
        found = find_faces(list(images), self.detector, policy) if len(images) else []
        picked = [[] if f is None else (f.faces if every else f.faces[:1]) for f in found]
        chips = [self.warp(image, face.landmarks) for image, faces in zip(images, picked, strict=True) for face in faces]
        vectors = iter(self.embed_chips(chips) if chips else [])
        crops = [c[0] for c in chips]  # the first chip of each face: what the pictures show
        out: list[list[EmbeddedFace]] = []
        crop_iter = iter(crops)
        for f, faces in zip(found, picked, strict=True):
            warning = None if f is None or every else f.warning
            out.append([EmbeddedFace(next(vectors), face, next(crop_iter), warning if k == 0 else None)
                        for k, face in enumerate(faces)])
        return out

    def face_in_image(self, image: np.ndarray, where: str = "the image") -> EmbeddedFace:
        """The one face of a decoded image the policy chooses, embedded; NoFaceError naming `where` if none."""
        faces = self.faces_in_images([image])[0]
        if not faces:
            raise NoFaceError(f"no face found in {where}{self.detector.miss_note(image)}")
        return faces[0]

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

    def files_faces(self, paths: Sequence[str | os.PathLike], every: bool = False, batch_size: int = 16
                    ) -> Iterator[tuple[str | os.PathLike, list[EmbeddedFace] | FacemetaError]]:
        """:meth:`faces_in_images` over image files, in batches of `batch_size`: yields (path, its faces) in
        order, or (path, the FacemetaError of a file that could not be read); the model and MTCNN load once."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            images, errors = self._load_all(chunk)
            faces = dict(zip(images, self.faces_in_images([images[i] for i in images], every), strict=True))
            for i, path in enumerate(chunk):
                yield path, errors[i] if i in errors else faces[i]

    def embed_all(self, path: str | os.PathLike) -> list[tuple[np.ndarray, object]]:
        """Every face of an image file -> [(unit vector (E,), Face)], most confident first (may be empty);
        an unreadable file raises its ImageReadError."""
        _, faces = next(self.embed_all_files([path]))
        if isinstance(faces, Exception):
            raise faces
        return faces

    def embed_all_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 16
                        ) -> Iterator[tuple[str | os.PathLike, list[tuple[np.ndarray, object]] | FacemetaError]]:
        """Every face of each image file (the one route, `every=True`): yields (path, [(unit vector, Face)] most
        confident first) in order, or (path, the FacemetaError of a file that could not be read)."""
        for path, faces in self.files_faces(paths, every=True, batch_size=batch_size):
            yield path, faces if isinstance(faces, FacemetaError) else [(f.vector, f.face) for f in faces]

    def face_in_file(self, path: str | os.PathLike) -> EmbeddedFace:
        """The one face of an image file the policy chooses, embedded; NoFaceError if none."""
        return self.face_in_image(self._load(path), str(path))

    def embed_file(self, path: str | os.PathLike) -> tuple[np.ndarray, object]:
        """One face of an image file (by the select policy) -> (unit vector (E,), Face); NoFaceError if none."""
        found = self.face_in_file(path)
        return found.vector, found.face

    def embed_files(self, paths: list[str | os.PathLike], batch_size: int = 16) -> list[np.ndarray | None]:
        """One face per image file (the select policy), in batches -> a unit vector per path, or None where the
        file is unreadable or holds no face (the per-file reason is what :meth:`embed_file` raises)."""
        return [None if isinstance(faces, FacemetaError) or not faces else faces[0].vector
                for _, faces in self.files_faces(paths, batch_size=batch_size)]

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two embeddings (unit vectors: their dot product)."""
        return float(np.dot(np.asarray(a, np.float32), np.asarray(b, np.float32)))

    def decide(self, a: EmbeddedFace, b: EmbeddedFace, threshold: float | None = None) -> Verification:
        """Compare two embedded faces -> :class:`Verification`, against `threshold` (a checked cosine: see
        :meth:`verify`) or the model's own."""
        thr = self.threshold if threshold is None else float(threshold)
        if thr is None:
            raise CheckpointError(f"{self.model_path} has no calibrated threshold; pass --threshold")
        score = self.similarity(a.vector, b.vector)
        return Verification(score, thr, None if threshold is not None else self.threshold_far, bool(score >= thr),
                            [a.face_dict(), b.face_dict()])

    def verify_images(self, image_a: np.ndarray, image_b: np.ndarray, threshold: float | None = None,
                      names: tuple[str, str] = ("the first image", "the second image")) -> Verification:
        """Compare the faces of two decoded images (one each, by the select policy) -> :class:`Verification`.
        `threshold` is checked here, before any face is looked for (the one place a verify checks it)."""
        from facemeta.checks import check_threshold

        threshold = check_threshold(threshold)
        return self.decide(self.face_in_image(image_a, names[0]), self.face_in_image(image_b, names[1]), threshold)

    def verify(self, path_a: str | os.PathLike, path_b: str | os.PathLike,
               threshold: float | None = None) -> Verification:
        """Compare the faces of two image files (one each, by the select policy) -> :class:`Verification`."""
        from facemeta.checks import check_threshold

        threshold = check_threshold(threshold)
        return self.decide(self.face_in_file(path_a), self.face_in_file(path_b), threshold)


def _export_with_faces(model_path: Path, out: Path, faces: np.ndarray | list[np.ndarray]) -> None:
    """Export a checkpoint to `out` for ``runtime="onnx"``, its parity checked on `faces` (the first faces the
    embedder aligned, with their mirror images; an ensemble's: a list, one batch per member's chip), never on
    the shared data."""
    from facemeta.models.ensemble import load_model
    from facemeta.models.onnx_export import DEFAULT_OPSET, export_onnx, model_contract

    model, meta = load_model(model_path)
    settings = check_model_meta(meta, model_path.with_suffix(".json"))
    contract = model_contract(model, settings, file_fingerprint(model_path), DEFAULT_OPSET, True,
                              checkpoint=model_path.name)
    batches = list(faces) if hasattr(model, "chips") else [faces]
    checks = [np.ascontiguousarray(np.concatenate([f, f[:, :, ::-1]])[:2 * CHECK_FACES]) for f in batches]
    contract["parity"] = {"source": f"{len(checks[0])} faces of the first photos embedded, and their mirror images"}
    export_onnx(model, out, contract, checks if hasattr(model, "chips") else checks[0], opset=DEFAULT_OPSET)


def _config_chips(config: dict, where: Path) -> list[tuple[str, int]] | None:
    """The (chip, size) each member of an ensemble checkpoint's config reads (torch-free, for the ONNX runtime);
    None for a single model; a one-line CheckpointError for members that name no known chip."""
    from facemeta.align.warp import CHIPS

    if config.get("kind") != "ensemble":
        return None
    try:
        chips = [(e["chip"], e["align_size"]) for e in config["members"]]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"bad ensemble config in {where.name}: each member needs chip and align_size") from exc
    for chip, size in chips:
        bad_size = isinstance(size, bool) or not isinstance(size, int) or not ALIGN_SIZES[0] <= size <= ALIGN_SIZES[1]
        if chip not in CHIPS or bad_size:
            raise CheckpointError(f"bad ensemble config in {where.name}: member chip {chip!r} at {size!r} px")
    return chips
