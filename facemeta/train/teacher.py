"""The teacher's embedding of every training face, computed once and cached (distillation from the prior).

The teacher is the prior (dlib's encoder, :mod:`facemeta.models.dlib_resnet`), kept fixed. It reads dlib's own
150x150 chip, while a student may be trained on any chip and size: each training row's SOURCE image (its
manifest keeps the path) is aligned onto dlib's chip in its own cache folder, and the teacher embeds that.
Vectors are cached in ``cache_root()/teacher/`` under a key made of the teacher's weights file name (which holds
the hash of dlib's file) and the source paths, so a second run with the same data costs nothing. A row whose
dlib chip cannot be made gets NaNs (the distillation loss skips it).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from facemeta.data.manifest import ManifestRow

TEACHER_CHIP, TEACHER_SIZE = "dlib", 150


def teacher_embeddings(rows: list[ManifestRow], cache: str | os.PathLike | None = None, workers: int = 2,
                       progress: bool = False) -> np.ndarray:
    """The prior's unit embedding [N, 128] of each row's source face (NaN rows where no dlib chip was made)."""
    from facemeta.align.cache import align_set_rows
    from facemeta.atomic import atomic_write
    from facemeta.data.styles import source_set
    from facemeta.models.dlib_resnet import PRIOR_EMBEDDING_SIZE, prior_weights_path
    from facemeta.paths import cache_root

    weights = prior_weights_path(cache)
    sources = [r.extra.get("source") or r.path for r in rows]
    key = hashlib.sha1("\n".join([weights.name, *sources]).encode("utf-8")).hexdigest()[:20]
    path = cache_root(cache) / "teacher" / f"{key}.npy"
    if path.is_file():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape == (len(rows), PRIOR_EMBEDDING_SIZE):
            return vectors
    by_set: dict[str, list[ManifestRow]] = defaultdict(list)
    for r, src in zip(rows, sources, strict=True):  # a styled domain's teacher sees the real face of its set
        by_set[source_set(r.domain)].append(ManifestRow(src, r.identity, r.domain, {}))
    chip_of: dict[str, str] = {}
    for name, raw in by_set.items():
        aligned, _failed = align_set_rows(name, raw, TEACHER_SIZE, TEACHER_CHIP, cache, workers, progress)
        chip_of.update({a.extra["source"]: a.path for a in aligned})
    vectors = np.full((len(rows), PRIOR_EMBEDDING_SIZE), np.nan, dtype=np.float32)
    have = [i for i, s in enumerate(sources) if s in chip_of]
    if have:
        vectors[have] = _embed_chips([chip_of[sources[i]] for i in have], weights)
    with atomic_write(path, "wb") as fh:
        np.save(fh, vectors, allow_pickle=False)
    return vectors


def _embed_chips(paths: list[str], weights: Path, chunk: int = 256) -> np.ndarray:
    """The prior's embeddings of dlib chips on disk (no flip), in chunks."""
    from facemeta.images import load_image
    from facemeta.models.backbone import ModelConfig, build_model, default_normalisation, embed
    from facemeta.models.dlib_resnet import PRIOR_EMBEDDING_SIZE, PRIOR_NAME

    mean, std = default_normalisation(PRIOR_NAME)
    model = build_model(ModelConfig(backbone=PRIOR_NAME, embedding_size=PRIOR_EMBEDDING_SIZE,
                                    image_size=TEACHER_SIZE, head="linear", mean=mean, std=std),
                        pretrained_path=weights)
    parts = [embed(model, [load_image(p) for p in paths[i:i + chunk]], channels_last=False)
             for i in range(0, len(paths), chunk)]
    return np.concatenate(parts)
