"""The photos `facemeta adapt` learns from (facemeta.train.adapt): the labelled folder read and every photo
aligned once through the product's route, onto every chip the model reads (one for a single model, one per
member for an ensemble: facemeta.models.ensemble), and the unlabelled photos of a domain likewise.

Layout of the labelled folder (DIR): one sub-folder per person, named after them, holding that person's photos
from the NEW domain (``DIR/<person>/*.jpg``); the same person's photos from the ENROLMENT domain may sit in
``DIR/<person>/enrolled/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facemeta.errors import ConfigError, FacemetaError, NoFaceError

ENROLLED = "enrolled"  # DIR/<person>/enrolled/: the person's photos from the enrolment domain
NEW, ENROL = 0, 1  # domain codes of a labelled photo
BATCH = 16  # images decoded and searched together (FaceEmbedder.files_faces' batch)


@dataclass
class LabelledFaces:
    """Aligned faces of the labelled people: ``chips``, one uint8 batch [N,S,S,3] per chip the model reads (the
    same N faces in the same order), a label (index into people) and a domain code (NEW or ENROL) each, the
    source paths, and the photos that could not be used (path, why)."""

    chips: list[np.ndarray]
    labels: np.ndarray
    domains: np.ndarray
    people: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def faces(self) -> np.ndarray:
        """The faces on the first chip (a single model's only one)."""
        return self.chips[0]


def progress_bar(total: int, desc: str, unit: str, progress: bool):
    """A tqdm bar on stderr, or a silent one."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


def _images(folder: Path) -> list[Path]:
    from facemeta.data.folder import IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_labelled(folder: str | os.PathLike) -> dict[str, tuple[list[Path], list[Path]]]:
    """DIR -> {person: (new-domain photos, enrolment-domain photos)}; one-line errors for a DIR that is not
    a folder of identity folders or that holds fewer than two people."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--labelled {root} is not a folder")
    people: dict[str, tuple[list[Path], list[Path]]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        new = _images(d)
        enrolled = _images(d / ENROLLED) if (d / ENROLLED).is_dir() else []
        if new or enrolled:
            people[d.name] = (new, enrolled)
    if not people:
        loose = _images(root)
        what = f"holds {len(loose)} photos but no identity folders" if loose else "has no identity folders with photos"
        raise ConfigError(f"--labelled {root} {what}: put each person's photos in {root}/<person>/ "
                          f"(enrolment-domain photos in {root}/<person>/{ENROLLED}/)")
    if len(people) < 2:
        raise ConfigError(f"--labelled {root} holds one person only ({next(iter(people))}); adapting needs at least "
                          "2 labelled people, one folder each")
    return people


def align_chips(embedder, paths: list[Path], progress: bool = False, desc: str = "align"
                ) -> tuple[list[list[np.ndarray] | None], list[tuple[str, str]]]:
    """Align photos through the product's one route, one face each, as FaceEmbedder.faces_in_images chooses and
    warps it (its detector, routes, face policy) but without embedding -> (per path the face warped onto every
    chip of ``embedder.chips``, or None; [(path, why)] for the photos without one)."""
    from facemeta.align.route import find_faces
    from facemeta.images import load_image

    out: list[list[np.ndarray] | None] = [None] * len(paths)
    skipped: list[tuple[str, str]] = []
    bar = progress_bar(len(paths), desc, "img", progress)
    for start in range(0, len(paths), BATCH):
        images: dict[int, np.ndarray] = {}
        for i in range(start, min(start + BATCH, len(paths))):
            try:
                images[i] = load_image(paths[i])
            except FacemetaError as exc:
                skipped.append((str(paths[i]), str(exc)))
        found = find_faces([images[i] for i in images], embedder.detector, embedder.select) if images else []
        for i, f in zip(images, found, strict=True):
            if f is None or not f.faces:
                skipped.append((str(paths[i]), "no face found"))
            else:
                out[i] = embedder.warp(images[i], f.faces[0].landmarks)
        bar.update(min(BATCH, len(paths) - start))
    bar.close()
    return out, skipped


def align_photos(embedder, paths: list[Path], progress: bool = False, desc: str = "align"
                 ) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """:func:`align_chips` on the model's first chip only -> (the aligned crop or None per path, [(path, why)])."""
    chips, skipped = align_chips(embedder, paths, progress, desc)
    return [None if c is None else c[0] for c in chips], skipped


def labelled_faces(embedder, folder: str | os.PathLike, progress: bool = False) -> LabelledFaces:
    """Read DIR (:func:`read_labelled`) and align every photo once onto every chip of the model; refuses (one line)
    when fewer than two people keep a photo with a face."""
    people = read_labelled(folder)
    rows = [(name, path, code) for name, (new, enr) in people.items()
            for code, paths in ((NEW, new), (ENROL, enr)) for path in paths]
    faces, skipped = align_chips(embedder, [r[1] for r in rows], progress)
    kept = [(r, f) for r, f in zip(rows, faces, strict=True) if f is not None]
    names = sorted({r[0] for r, _ in kept})
    if len(names) < 2:
        found = f"only {names[0]} has" if names else "none of the people has"
        raise NoFaceError(f"--labelled {folder}: {found} a photo with a face ({len(skipped)} of {len(rows)} photos "
                          f"without one, e.g. {Path(skipped[0][0]).name}); adapting needs 2 people with faces")
    index = {n: i for i, n in enumerate(names)}
    chips = [np.stack([f[k] for _, f in kept]) for k in range(len(kept[0][1]))]
    return LabelledFaces(chips, np.array([index[r[0]] for r, _ in kept]), np.array([r[2] for r, _ in kept]),
                         names, [str(r[1]) for r, _ in kept], skipped)


def unlabelled_faces(embedder, data: LabelledFaces, domain: str | None, unlabelled: str | os.PathLike | None,
                     progress: bool) -> tuple[list[np.ndarray] | None, str]:
    """Faces that estimate the new domain's statistics, one batch per chip: the --unlabelled photos, else (with a
    domain) the labelled new-domain photos, else None -> (faces, where they came from)."""
    if unlabelled is None:
        if domain is None or not (data.domains == NEW).any():
            return None, ""
        faces = [c[data.domains == NEW] for c in data.chips]
        return faces, f"{len(faces[0])} labelled new-domain photos"
    from facemeta.data.folder import IMAGE_SUFFIXES

    if not Path(unlabelled).is_dir():
        raise ConfigError(f"--unlabelled {unlabelled} is not a folder")
    loose = sorted(p for p in Path(unlabelled).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    found = [f for f in align_chips(embedder, loose, progress, desc="unlabelled")[0] if f is not None]
    if not found:
        raise NoFaceError(f"--unlabelled {unlabelled}: no face found in any of its {len(loose)} photos")
    return [np.stack([f[k] for f in found]) for k in range(len(found[0]))], f"{len(found)} unlabelled photos"
