"""The teacher's embedding of every training face, computed once and cached (distillation).

The teacher is kept fixed: by default the prior (dlib's encoder, :mod:`facemeta.models.dlib_resnet`); or any
facemeta checkpoint (``distill.teacher``: a single model, or an ensemble such as dlib's prior with SFace, whose
members each read their own chip: :mod:`facemeta.models.ensemble`), so an ensemble can be distilled into one
student. The teacher reads its own chips, while a student may be trained on any chip and size: each training row's
SOURCE image (its manifest keeps the path) is aligned onto each chip the teacher reads in its own cache folder,
and the teacher embeds those. Vectors are cached in ``cache_root()/teacher/`` under a key made of the teacher's
identity (the prior's weights file name, which holds the hash of dlib's file, or a checkpoint's fingerprint) and
the source paths, so a second run with the same data costs nothing. A row without every chip of the teacher gets
NaNs (the distillation loss skips it).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import numpy as np

from facemeta.data.manifest import ManifestRow

TEACHER_CHIP, TEACHER_SIZE = "dlib", 150  # the prior's chip


def _load_teacher(teacher: str | os.PathLike | None, cache: str | os.PathLike | None):
    """(model, the (chip, size) it reads per member, its identity for the cache key): the prior when `teacher` is
    None, else the checkpoint (either kind)."""
    if teacher is None:
        from facemeta.models.backbone import ModelConfig, build_model, default_normalisation
        from facemeta.models.dlib_resnet import PRIOR_EMBEDDING_SIZE, PRIOR_NAME, prior_weights_path

        weights = prior_weights_path(cache)
        mean, std = default_normalisation(PRIOR_NAME)
        model = build_model(ModelConfig(backbone=PRIOR_NAME, embedding_size=PRIOR_EMBEDDING_SIZE,
                                        image_size=TEACHER_SIZE, head="linear", mean=mean, std=std),
                            pretrained_path=weights)
        return model.eval(), [(TEACHER_CHIP, TEACHER_SIZE)], weights.name
    from facemeta.model_files import check_model_meta, checkpoint_path, file_fingerprint
    from facemeta.models.ensemble import load_model

    path = checkpoint_path(teacher)
    model, meta = load_model(path)
    settings = check_model_meta(meta, path)
    chips = list(getattr(model, "chips", None) or [(settings["align_chip"], settings["align_size"])])
    return model, chips, f"checkpoint-{file_fingerprint(path)}"


def teacher_size(model) -> int:
    """Length of a teacher's vectors (an ensemble's: the sum of its members')."""
    return int(model.embedding_size if hasattr(model, "chips") else model.config.embedding_size)


def teacher_embeddings(rows: list[ManifestRow], cache: str | os.PathLike | None = None, workers: int = 2,
                       progress: bool = False, teacher: str | os.PathLike | None = None) -> np.ndarray:
    """The teacher's unit embedding [N, E] of each row's source face (NaN rows where a chip was not made);
    `teacher`: a checkpoint (single or ensemble), default the prior (E = 128)."""
    from facemeta.align.cache import align_set_rows
    from facemeta.atomic import atomic_write
    from facemeta.data.styles import source_set
    from facemeta.paths import cache_root

    model, chips, ident = _load_teacher(teacher, cache)
    size = teacher_size(model)
    sources = [r.extra.get("source") or r.path for r in rows]
    key = hashlib.sha1("\n".join([ident, *sources]).encode("utf-8")).hexdigest()[:20]
    path = cache_root(cache) / "teacher" / f"{key}.npy"
    if path.is_file():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape == (len(rows), size):
            return vectors
    by_set: dict[str, list[ManifestRow]] = defaultdict(list)
    for r, src in zip(rows, sources, strict=True):  # a styled domain's teacher sees the real face of its set
        by_set[source_set(r.domain)].append(ManifestRow(src, r.identity, r.domain, {}))
    chip_of: list[dict[str, str]] = []
    for chip, chip_size in chips:
        found: dict[str, str] = {}
        for name, raw in by_set.items():
            aligned, _failed = align_set_rows(name, raw, chip_size, chip, cache, workers, progress)
            found.update({a.extra["source"]: a.path for a in aligned})
        chip_of.append(found)
    vectors = np.full((len(rows), size), np.nan, dtype=np.float32)
    have = [i for i, s in enumerate(sources) if all(s in found for found in chip_of)]
    if have:
        vectors[have] = _embed_chips(model, [[found[sources[i]] for i in have] for found in chip_of])
    with atomic_write(path, "wb") as fh:
        np.save(fh, vectors, allow_pickle=False)
    return vectors


def _embed_chips(model, paths_per_chip: list[list[str]], chunk: int = 256) -> np.ndarray:
    """The teacher's embeddings (no flip) of chips on disk, one list of paths per chip it reads, in chunks."""
    from facemeta.images import load_image
    from facemeta.models.backbone import embed

    parts = []
    for i in range(0, len(paths_per_chip[0]), chunk):
        faces = [[load_image(p) for p in paths[i:i + chunk]] for paths in paths_per_chip]
        if hasattr(model, "chips"):
            parts.append(model.embed(faces, flip=False, channels_last=False))
        else:
            parts.append(embed(model, faces[0], channels_last=False))
    return np.concatenate(parts)
