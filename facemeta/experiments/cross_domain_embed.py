"""Embed each image of the cross-domain benchmark once per model and keep the vectors (npz in the facemeta cache).

Two stages per set, both cached under ``cache_root()/cross_domain/``:

1. ``landmarks``: the product's detection route (``align.pipeline.align_batch``, largest face, the fallback
   routes; the pre-cropped filters on the sets ``data.sets.PRE_CROPPED_SETS`` declares pre-cropped), one record
   per image: five points (source pixels; NaN where no route found a face), route and detector score. Model-free,
   so both models share it.
2. ``vectors``: each image warped onto each network's chip (dlib's, 150 px, for dlib's encoder and models trained
   from it; ArcFace's, 112 px, for SFace) and embedded with flip test-time augmentation, as ``FaceEmbedder``
   embeds; cached per network (``prior``, ``sface``, or the digest of a trained network's tensors), so an
   ensemble (``prior+sface``, or a checkpoint that is one) is its members' cached vectors combined. An image without landmarks gets the
   template crop of a pre-cropped set (the pipeline's ``template_crop``) with the set's median layout of its
   detected faces (model-free, no labels); ``layout="foreground"`` instead places that layout in the bounding box
   of the image's non-black pixels (thermal faces are cut out on black: the face's box is known without a
   detector). ``points`` names a landmark rule of :mod:`facemeta.align.robust` (default: the five points as found).

Everything downstream (protocols, statistics, figures) is numpy on these vectors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.data.manifest import ManifestRow

MODELS = ("shipped", "prior", "sface", "prior+sface")
LAYOUTS = ("set", "foreground")
CHIP, SIZE = "dlib", 150
FOREGROUND_LEVEL = 8  # grey level above which a thermal pixel belongs to the cut-out face


def cache_dir() -> Path:
    """Where the benchmark keeps its landmark and vector files."""
    from facemeta.paths import cache_root

    return cache_root() / "cross_domain"


def _key(rows: list[ManifestRow]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(r.path for r in rows).encode()).hexdigest()[:12]


def detect_landmarks(name: str, rows: list[ManifestRow], batch: int = 16, progress: bool = True) -> dict:
    """Stage 1 for one set (cached): {'landmarks' [N,5,2] (NaN: none found), 'route' [N], 'score' [N],
    'size' [N,2] (w, h)}; resumable by chunks of 256 images."""
    from tqdm import tqdm

    from facemeta.align.detect import FaceDetector
    from facemeta.align.pipeline import PIPELINE_VERSION, align_batch
    from facemeta.atomic import atomic_write
    from facemeta.data.sets import PRE_CROPPED_SETS
    from facemeta.images import load_image

    path = cache_dir() / f"{name}-landmarks-p{PIPELINE_VERSION}-{_key(rows)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    part = path.with_suffix(".part.npz")
    n = len(rows)
    out = {"landmarks": np.full((n, 5, 2), np.nan, np.float32), "route": np.array([""] * n, dtype="U16"),
           "score": np.full(n, np.nan, np.float32), "size": np.zeros((n, 2), np.int32)}
    done = 0
    if part.is_file():
        with np.load(part) as z:
            done = int(z["done"])
            for k in out:
                out[k] = z[k]
    detector = FaceDetector()
    bar = tqdm(total=n, initial=done, desc=f"detect {name}", unit="img", disable=not progress, file=sys.stderr)
    for start in range(done, n, batch):
        chunk = rows[start:start + batch]
        images = [load_image(r.path) for r in chunk]
        results = align_batch(images, detector, SIZE, pre_cropped=name in PRE_CROPPED_SETS, select="largest",
                              crop_fallback=False, chip=CHIP)
        for i, (img, res) in enumerate(zip(images, results, strict=True)):
            out["size"][start + i] = (img.shape[1], img.shape[0])
            out["route"][start + i] = res.route
            if res.landmarks is not None:
                out["landmarks"][start + i] = res.landmarks
                out["score"][start + i] = res.score if res.score is not None else np.nan
        bar.update(len(chunk))
        if (start + batch) % 256 == 0 or start + batch >= n:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(part, "wb") as fh:
                np.savez(fh, done=min(start + batch, n), **out)
    bar.close()
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **out)
    part.unlink(missing_ok=True)
    return out


def set_layout(marks: dict) -> np.ndarray | None:
    """Median of the detected landmarks as fractions of width and height (None where nothing was detected)."""
    found = ~np.isnan(marks["landmarks"][:, 0, 0])
    if not found.any():
        return None
    return np.median(marks["landmarks"][found] / marks["size"][found][:, None, :], axis=0).astype(np.float32)


def foreground_box(image: np.ndarray, level: int = FOREGROUND_LEVEL) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) of the pixels brighter than `level` (a face cut out on black), or None if there are none."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    ys, xs = np.nonzero(grey > level)
    if len(xs) < 16:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def foreground_layout(images: list[np.ndarray], marks: dict) -> np.ndarray | None:
    """Median of the detected landmarks as fractions of each image's foreground box (None without detections)."""
    rel = []
    for img, pts in zip(images, marks["landmarks"], strict=True):
        box = foreground_box(img)
        if box is None or np.isnan(pts[0, 0]):
            continue
        x1, y1, x2, y2 = box
        rel.append((pts - (x1, y1)) / (x2 - x1, y2 - y1))
    return np.median(np.stack(rel), axis=0).astype(np.float32) if rel else None


def image_points(images: list[np.ndarray], landmarks: np.ndarray, frame: np.ndarray | None,
                 fg: np.ndarray | None = None, points: str = "five") -> np.ndarray:
    """The five points each image is warped by [N,5,2]: its landmarks (through the rule `points` of
    align.robust), else `fg` (fractions of the foreground box) where given, else `frame` (fractions of the image:
    the set's median layout; None: the pipeline's PRECROPPED_LAYOUT)."""
    from facemeta.align.robust import robust_landmarks
    from facemeta.align.warp import PRECROPPED_LAYOUT

    out = np.empty((len(images), 5, 2), np.float32)
    for i, (img, pts) in enumerate(zip(images, landmarks, strict=True)):
        h, w = img.shape[:2]
        if not np.isnan(pts[0, 0]):
            out[i] = pts if points == "five" else robust_landmarks(pts, rule=points, chip=CHIP)
            continue
        box = foreground_box(img) if fg is not None else None
        if box is not None:
            x1, y1, x2, y2 = box
            out[i] = fg * (x2 - x1, y2 - y1) + (x1, y1)
        else:
            out[i] = (frame if frame is not None else PRECROPPED_LAYOUT) * (w, h)
    return out


@dataclass
class Part:
    """One network a model of the benchmark embeds with: its cache key, its chip (name, side) and weight."""

    key: str
    chip: str
    size: int
    weight: float
    build: Callable[[], object]


def _digest(model) -> str:
    """sha256[:12] of a network's tensors (float32, sorted keys): the cache key of a trained network, so the same
    weights share vectors whether they come alone or as an ensemble's member."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return "w" + h.hexdigest()[:12]




def model_parts(which: str) -> list[Part]:
    """The networks of model `which` (see :data:`MODELS`, or a checkpoint path: a single model or an ensemble)."""
    import functools

    from facemeta.errors import CheckpointError
    from facemeta.models.backbone import PRIORS, build_prior
    from facemeta.models.ensemble import load_model

    if which in PRIORS:
        _, chip, size, _ = PRIORS[which]
        return [Part(which, chip, size, 1.0, lambda: build_prior(which)[0])]
    if "+" in which and all(w in PRIORS for w in which.split("+")):
        return [p for w in which.split("+") for p in model_parts(w)]
    if which == "shipped":
        from facemeta.model_files import default_model_path

        path = default_model_path()
    else:
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"--models: {which} is neither one of {', '.join(MODELS)} nor a checkpoint file")
    model, meta = load_model(path)
    if not hasattr(model, "chips"):
        chip = (str(meta.get("align_chip", "arcface")), int(meta.get("align_size", 112)))
        return [Part(_digest(model), *chip, 1.0, lambda: model.eval())]
    parts = []
    for member, spec in zip(model.members, model.specs, strict=True):
        named = [n for n, (b, c, s, _) in PRIORS.items()
                 if spec.prior and member.config.backbone == b and (spec.chip, spec.align_size) == (c, s)]
        key = named[0] if named else _digest(member)
        parts.append(Part(key, spec.chip, int(spec.align_size), float(spec.weight),
                          functools.partial(lambda m: m.eval(), member)))
    return parts


def combine(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Members' unit vectors -> the ensemble's (facemeta.models.ensemble: each scaled by sqrt(w / sum w),
    concatenated, renormalised)."""
    if len(vectors) == 1:
        return vectors[0]
    total = sum(weights)
    out = np.concatenate([v * np.sqrt(w / total) for v, w in zip(vectors, weights, strict=True)], axis=1)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def embed_set(name: str, rows: list[ManifestRow], models: tuple[str, ...] = MODELS, layout: str = "set",
              points: str = "five", progress: bool = True, only: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stage 2 (cached per network): {model: unit vectors [N, E]} for the rows of one set. `only` (bool [N]):
    embed just those rows and take the others from the plain variant (layout 'set', points 'five'): a landmark
    rule that changes few images costs only those."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    out = {}
    for which in models:
        parts = model_parts(which)
        vecs = [_embed_part(name, rows, part, layout, points, progress, only) for part in parts]
        out[which] = combine(vecs, [p.weight for p in parts])
    return out


def _embed_part(name: str, rows: list[ManifestRow], part: Part, layout: str, points: str, progress: bool,
                only: np.ndarray | None) -> np.ndarray:
    """One network's vectors for one set (cached as ``<set>-<key>-<layout>-<points>-<rows>.npz``)."""
    from tqdm import tqdm

    from facemeta.align.warp import warp_face
    from facemeta.atomic import atomic_write
    from facemeta.images import load_image
    from facemeta.models.backbone import embed

    path = cache_dir() / f"{name}-{part.key}-{layout}-{points}-{_key(rows)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["vectors"]
    marks = detect_landmarks(name, rows, progress=progress)
    base = _embed_part(name, rows, part, "set", "five", progress, None) if only is not None else None
    pick = np.arange(len(rows)) if only is None else np.flatnonzero(only)
    frame = set_layout(marks)
    fg = foreground_layout([load_image(r.path) for r in rows], marks) if layout == "foreground" else None
    model = part.build()
    vecs = base.copy() if base is not None else np.zeros((len(rows), model.config.embedding_size), np.float32)
    bar = tqdm(total=len(pick), desc=f"embed {name} {part.key}", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(pick), 64):
        idx = pick[start:start + 64]
        imgs = [load_image(rows[i].path) for i in idx]
        pts = image_points(imgs, marks["landmarks"][idx], frame, fg, points)
        chips = np.stack([warp_face(img, p, part.size, part.chip) for img, p in zip(imgs, pts, strict=True)])
        vecs[idx] = embed(model, chips, flip=True)
        bar.update(len(idx))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        np.savez(fh, vectors=vecs)
    return vecs


def main() -> None:
    """Warm the cache: every set of the benchmark, both models (run in the background; resumable)."""
    import torch

    from facemeta.experiments.cross_domain_protocols import benchmark_rows

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = sys.argv[1:] or ["ar", "mfr2", "thermal", "orl", "yaleb", "lfw"]
    for name in names:
        rows = benchmark_rows(name)
        embed_set(name, rows)
        if name == "thermal":
            embed_set(name, rows, layout="foreground")
        print(f"{name}: done", flush=True)


if __name__ == "__main__":
    main()
