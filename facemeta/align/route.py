"""The one route from a decoded image to its faces, shared by training alignment and every inference caller.

For each image the detector passes of :func:`attempts` run in order, batched over the images still without a
face, each pass with the same filters: a box must stay in the canvas the detector saw (:func:`box_inside`), the
five points in the image (:func:`landmarks_inside`), a pre-cropped set's face must span PRE_CROPPED_MIN_FACE of
the short side, and a relaxed-threshold face must fit the template (MAX_FIT_ERROR). The first pass that leaves
a face decides the image's faces; the selection policy (facemeta.align.detect.select_faces, default 'subject')
then orders them. facemeta.align.pipeline warps them for the folder jobs; facemeta.embedder embeds them.

Routes (recorded as ``route``): ``direct`` (the image as it is), ``padded`` (on a black canvas larger by
PAD_FRACTION on every side: tight crops need context), ``equalised`` (padded, grey, CLAHE: dark side-lit faces),
``relaxed`` (lower detector thresholds, then the original padded by half as much).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from facemeta.align.detect import FACE_POLICIES, Face, competing_note, select_faces
from facemeta.align.warp import alignment_matrix, template, transform_points

# The policies of one-face jobs: every face policy but 'all', and 'single' (one face, or the image fails).
SELECT = (*(p for p in FACE_POLICIES.names() if p != "all"), "single")
PAD_FRACTION = 0.5
CLAHE_CLIP, CLAHE_TILES = 3.0, 8
RELAXED_THRESHOLDS = (0.4, 0.5, 0.5)
COARSE_MIN_FACE = 0.25  # first direct pass (one-face policies): faces of at least this share of the short side
FALLBACK_MIN_FACE, RELAXED_MIN_FACE = 0.2, 0.15  # smallest face these routes look for, share of the canvas
# (route, pad fraction, CLAHE, relaxed thresholds, smallest face: share of the canvas's short side), tried in
# order on the images still without a face (attempts()); the last pads less, for other pyramid scales.
FULL_DIRECT = ("direct", 0.0, False, False, 0.0)
FALLBACKS = (("padded", PAD_FRACTION, False, False, FALLBACK_MIN_FACE),
             ("equalised", PAD_FRACTION, True, False, FALLBACK_MIN_FACE),
             ("relaxed", PAD_FRACTION, True, True, RELAXED_MIN_FACE),
             ("relaxed", PAD_FRACTION / 2, False, True, RELAXED_MIN_FACE))
BOX_TOLERANCE = 0.1  # a detection box may leave the canvas by at most this fraction of its size
PRE_CROPPED_MIN_FACE = 0.4  # in a pre-cropped image the face box spans at least this much of the short side
MAX_FIT_ERROR = 8.0  # mean landmark distance to the 112-px template after the fit, in pixels


@dataclass
class FoundFaces:
    """The faces of one image that passed the filters, on the first route that found any: ordered by the
    selection policy (the chosen face first; every face, most confident first, for policy 'all'), the route,
    and a warning when two faces compete to be the subject (None otherwise)."""

    faces: list[Face]
    route: str
    warning: str | None = None


def fit_error(landmarks: np.ndarray) -> float:
    """Mean distance, in 112-px template pixels, between fitted landmarks and the template."""
    matrix = alignment_matrix(landmarks, 112)
    return float(np.linalg.norm(transform_points(landmarks, matrix) - template(112), axis=1).mean())


def box_inside(box: np.ndarray, width: int, height: int, tolerance: float = BOX_TOLERANCE) -> bool:
    """True when a detection box stays in the canvas MTCNN saw, up to `tolerance` of the box size
    on each side. A box reaching far past the frame means the detector saw only part of a face
    (a tight crop, a bystander cut by the frame) and extrapolated its box and points."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    tx, ty = tolerance * (x2 - x1), tolerance * (y2 - y1)
    return x1 >= -tx and y1 >= -ty and x2 <= width - 1 + tx and y2 <= height - 1 + ty


def landmarks_inside(landmarks: np.ndarray, width: int, height: int, margin: float = 2.0) -> bool:
    """True when all five points lie in the image (within `margin` px). On a face cropped tighter
    than MTCNN expects, a detection can cover the whole frame with points extrapolated beyond it:
    those points are guesses, so such a detection is refused and the padded route takes over."""
    pts = np.asarray(landmarks)
    return bool((pts[:, 0] >= -margin).all() and (pts[:, 0] <= width - 1 + margin).all()
                and (pts[:, 1] >= -margin).all() and (pts[:, 1] <= height - 1 + margin).all())


def pad_image(image: np.ndarray, fraction: float = PAD_FRACTION) -> tuple[np.ndarray, int, int]:
    """The image on a black canvas larger by `fraction` of its size on every side -> (canvas, dx, dy)."""
    h, w = image.shape[:2]
    py, px = int(h * fraction), int(w * fraction)
    return cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_CONSTANT, value=(0, 0, 0)), px, py


def equalise(image: np.ndarray) -> np.ndarray:
    """Grey, CLAHE-equalised copy of an RGB image (three equal channels)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    eq = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(grey)
    return np.repeat(eq[:, :, None], 3, axis=2)


def attempts(select: str) -> tuple[tuple, ...]:
    """The detector passes for a selection policy, in order. One-face policies ('subject', 'largest', 'single'
    does not: it must see every face) start with a coarse direct pass (faces of COARSE_MIN_FACE of the short side
    and up) and put the full-range direct pass after the padded and equalised routes, which look only for faces
    filling their canvas (the tight crops and dark faces they are for): the costly full pyramid then runs only
    where those fail. End to end on 200 Extended Yale B files this took facemeta from 17.3 to 39.7 images/s
    (PIPELINE_VERSION 4; benchmarks/results/pipeline_speed.md). 'confident', 'single' and 'all' see every face."""
    if select in ("subject", "largest"):
        return (("direct", 0.0, False, False, COARSE_MIN_FACE), *FALLBACKS[:2], FULL_DIRECT, *FALLBACKS[2:])
    return (FULL_DIRECT, *FALLBACKS)


def _rgb(image: np.ndarray) -> np.ndarray:
    """An HxWx3 view of a grey or RGBA image (the detector's own preparation does the same)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3] if image.shape[2] == 4 else image


def find_faces(images: Sequence[np.ndarray], detector, select: str = "subject",
               pre_cropped: bool = False) -> list[FoundFaces | None]:
    """The faces of each RGB image through the routes and filters of this module -> a FoundFaces per image, or
    None where no route found a face. `select`: 'subject' (default), 'largest', 'confident', 'single' (the
    chosen face first; 'single' keeps every face so that a caller can refuse several) or 'all' (every face,
    most confident first). `detector`: a facemeta.align.detect.FaceDetector or anything with its detect_batch.

    'all' (identify) runs the passes of the one-face policies first, so that a face gets the very landmarks
    verify and enroll give it, then the full-range direct pass for the smaller faces they do not look for; a
    face both find (boxes overlapping by SAME_FACE_IOU) keeps the first one's landmarks."""
    if select not in (*SELECT, "all"):
        raise ValueError(f"select must be one of {', '.join((*SELECT, 'all'))}, not {select!r}")
    if select != "all":
        return _search(images, detector, attempts(select), select, pre_cropped)
    seen = _search(images, detector, attempts("subject"), "all", pre_cropped)
    found = [i for i, f in enumerate(seen) if f is not None]
    full = _search([images[i] for i in found], detector, (FULL_DIRECT,), "all", pre_cropped)
    for i, more in zip(found, full, strict=True):
        if more is not None:
            first = seen[i].faces
            extra = [f for f in more.faces if max(box_iou(f.box, g.box) for g in first) < SAME_FACE_IOU]
            seen[i] = FoundFaces(select_faces(first + extra, "all"), seen[i].route)
    return seen


SAME_FACE_IOU = 0.5  # two detections whose boxes overlap this much are one face


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _search(images: Sequence[np.ndarray], detector, passes: Sequence[tuple], select: str,
            pre_cropped: bool) -> list[FoundFaces | None]:
    """Run `passes` in order over the images still without a face, each with this module's filters."""
    results: list[FoundFaces | None] = [None] * len(images)
    todo = list(range(len(images)))
    for route, pad, eq, relaxed, min_face in passes:
        if not todo:
            break
        inputs, offsets = [], []
        for i in todo:
            canvas, px, py = pad_image(_rgb(images[i]), pad) if pad else (images[i], 0, 0)
            inputs.append(equalise(canvas) if eq else canvas)
            offsets.append((px, py))
        found = detector.detect_batch(inputs, RELAXED_THRESHOLDS if relaxed else None, min_face_fraction=min_face)
        still = []
        for i, faces, canvas, (px, py) in zip(todo, found, inputs, offsets, strict=True):
            h, w = images[i].shape[:2]
            faces = [f for f in faces if box_inside(f.box, canvas.shape[1], canvas.shape[0])]
            faces = [f for f in (f.shifted(-px, -py) for f in faces) if landmarks_inside(f.landmarks, w, h)]
            if pre_cropped:
                faces = [f for f in faces if f.box[2] - f.box[0] >= PRE_CROPPED_MIN_FACE * min(w, h)]
            if route == "relaxed":
                faces = [f for f in faces if fit_error(f.landmarks) <= MAX_FIT_ERROR]
            if not faces:
                still.append(i)
                continue
            results[i] = _ordered(faces, route, select, (h, w))
        todo = still
    return results


def _ordered(faces: list[Face], route: str, select: str, shape: tuple[int, int]) -> FoundFaces:
    """The faces of one image ordered by the policy: the chosen one first, then the rest most confident first."""
    every = select_faces(faces, "all")
    if select == "all":
        return FoundFaces(every, route)
    policy = "subject" if select == "single" else select
    chosen = select_faces(faces, policy, shape)[0]
    rest = [f for f in every if f is not chosen]
    warning = competing_note(faces, shape[1], shape[0]) if policy == "subject" else None
    return FoundFaces([chosen, *rest], route, warning)
