"""The protocols of `facemeta benchmark adapt` (facemeta.experiments.adapt_bench): which photos, how they are
aligned (cached), and the draws of the k people who adapt the model.

Protocols (cross-domain: an enrolment photo against a probe of the target condition), per shared set:
- ``ar-scarf``: AR neutral (01, 14) vs scarf (11, 12, 13, 24, 25, 26), 100 people;
- ``ar-sunglasses``: AR neutral vs sunglasses (08, 09, 10, 21, 22, 23);
- ``mfr2-mask``: MFR2 unmasked vs masked (mfr2_labels.txt), 53 people;
- ``yaleb-side``: Yale B frontal light vs side light (the cross-domain benchmark's "light >77" group: light more
  than 77 degrees off the axis), 38 people, one enrolment photo each;
- ``thermal``: thermal gallery vs probes (GalleryPristine vs ProbePristine), 41 enrolled people, with the 41
  never-enrolled people's probes (ProbeNPristine) among the target photos: they only ever make impostor pairs.
The Yale B and thermal splits are those of facemeta.experiments.cross_domain_protocols, and their faces are aligned as
that benchmark aligns them (its cached landmarks; the set's template crop where none were found), since MTCNN finds
few thermal faces; AR and MFR2 go through the product's route (FaceEmbedder.files_faces). Faces are aligned once per
chip the model reads (an ensemble reads one per member) and cached in cache_root()/adapt_bench/.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

AR_NEUTRAL = (1, 14)
AR_CONDITIONS = {"scarf": (11, 12, 13, 24, 25, 26), "sunglasses": (8, 9, 10, 21, 22, 23)}
PROTOCOLS = ("ar-scarf", "ar-sunglasses", "mfr2-mask", "yaleb-side", "thermal")
YALEB_SIDE = ("light >77",)  # facemeta.experiments.cross_domain_protocols.YALEB_GROUPS: the side light
CROSS_DOMAIN_ALIGNED = ("yaleb-side", "thermal")  # aligned as facemeta.experiments.cross_domain_embed does


def protocol_rows(name: str, data: str | os.PathLike | None = None) -> list[tuple[str, str, int]]:
    """(path, person, condition) of a protocol: condition 1 = enrolment photos, 0 = the target condition."""
    from facemeta.paths import data_root

    root = data_root(data)
    rows = []
    if name.startswith("ar-"):
        target = AR_CONDITIONS[name[3:]]
        for d in sorted((root / "ar").iterdir()):
            for n in AR_NEUTRAL + target:
                p = d / f"face_{d.name}_{n:02d}.png"
                if p.is_file():
                    rows.append((str(p), d.name, 1 if n in AR_NEUTRAL else 0))
    elif name == "mfr2-mask":
        for line in (root / "mfr2" / "mfr2_labels.txt").read_text().splitlines():
            parts = [t.strip() for t in line.split(",")]
            if len(parts) == 3 and parts[1].isdigit():
                p = root / "mfr2" / parts[0] / f"{parts[0]}_{int(parts[1]):04d}.png"
                if p.is_file():
                    rows.append((str(p), parts[0], 1 if parts[2].lower() == "no-mask" else 0))
    elif name in ("yaleb-side", "thermal"):
        from facemeta.experiments.cross_domain_protocols import benchmark_rows, protocols

        which = name.split("-")[0]
        found = benchmark_rows(which, root)
        proto = protocols(which, found, root)[0]
        if which == "yaleb":
            target = np.any([proto.probes[g] for g in YALEB_SIDE], axis=0)
        else:
            target = proto.probes["probes"] | proto.open_set
        for r, enrol, probe in zip(found, proto.gallery, target, strict=True):
            if enrol or probe:
                rows.append((r.path, r.identity, 1 if enrol else 0))
    else:
        raise ValueError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}")
    return rows


def cross_domain_faces(name: str, paths: list[str], chip: str, size: int, data=None, progress: bool = False
                       ) -> list[np.ndarray]:
    """Faces of a Yale B or thermal protocol warped as the cross-domain benchmark warps them
    (facemeta.experiments.cross_domain_embed: the product's detection route, landmarks cached there; a photo
    without landmarks gets the template crop with the set's median layout): a visible-light detector finds few
    thermal faces (52 of 410 through FaceEmbedder), so the product's route alone would leave 7 people."""
    from facemeta.align.warp import warp_face
    from facemeta.experiments.cross_domain_embed import detect_landmarks, image_points, set_layout
    from facemeta.experiments.cross_domain_protocols import benchmark_rows
    from facemeta.images import load_image
    from facemeta.paths import data_root

    which = name.split("-")[0]
    rows = benchmark_rows(which, data_root(data))
    marks = detect_landmarks(which, rows, progress=progress)
    index = {r.path: i for i, r in enumerate(rows)}
    frame = set_layout(marks)
    out = []
    for p in paths:
        img = load_image(p)
        pts = image_points([img], marks["landmarks"][index[p]][None], frame)[0]
        out.append(warp_face(img, pts, size, chip))
    return out

def _cache_file(name: str, chip: str, size: int) -> Path:
    from facemeta.paths import cache_root

    route = "xd" if name in CROSS_DOMAIN_ALIGNED else "route2"  # route2: FaceEmbedder.files_faces
    return cache_root() / "adapt_bench" / f"{name}-{chip}{size}-{route}.npz"


def _align_missing(name: str, embedder, chips: list[tuple[str, int]], data, progress: bool) -> None:
    """Align a protocol's photos onto each chip of `chips` and write each chip's cache file (the photos without a
    face dropped, per chip; the product's route finds the same faces whatever the chip)."""
    rows = protocol_rows(name, data)
    if name in CROSS_DOMAIN_ALIGNED:
        per_chip = [cross_domain_faces(name, [r[0] for r in rows], chip, size, data, progress) for chip, size in chips]
    else:
        from facemeta.train.adapt_faces import align_chips

        found = align_chips(embedder, [Path(r[0]) for r in rows], progress, desc=name)[0]
        index = [embedder.chips.index(c) for c in chips]
        per_chip = [[None if f is None else f[i] for f in found] for i in index]
    for (chip, size), faces in zip(chips, per_chip, strict=True):
        keep = [i for i, f in enumerate(faces) if f is not None]
        path = _cache_file(name, chip, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, faces=np.stack([faces[i] for i in keep]), people=np.array([rows[i][1] for i in keep]),
                 conditions=np.array([rows[i][2] for i in keep]), paths=np.array([rows[i][0] for i in keep]))


def aligned_parts(name: str, embedder, data=None, progress: bool = False) -> dict:
    """Aligned faces of a protocol on every chip the embedder's model reads (one per ensemble member), cached:
    {faces: [array per chip], people, conditions, paths}, the same photos in the same order on every chip (those
    with a face on all of them). AR and MFR2 go through the product's route (photos without a face dropped); Yale B
    and thermal are aligned as the cross-domain benchmark aligns them (:func:`cross_domain_faces`), every photo
    kept."""
    chips = list(dict.fromkeys(embedder.chips))
    missing = [c for c in chips if not _cache_file(name, *c).is_file()]
    if missing:
        _align_missing(name, embedder, missing, data, progress)
    loaded = {c: dict(np.load(_cache_file(name, *c))) for c in chips}
    common = set.intersection(*(set(z["paths"].tolist()) for z in loaded.values()))
    first = loaded[chips[0]]
    order = [p for p in first["paths"].tolist() if p in common]
    faces = []
    for chip in embedder.chips:
        z = loaded[chip]
        at = {p: i for i, p in enumerate(z["paths"].tolist())}
        faces.append(z["faces"][[at[p] for p in order]])
    pick = [i for i, p in enumerate(first["paths"].tolist()) if p in common]
    return {"faces": faces, "people": first["people"][pick], "conditions": first["conditions"][pick],
            "paths": first["paths"][pick]}


def aligned_protocol(name: str, embedder, data=None, progress: bool = False) -> dict:
    """:func:`aligned_parts` on the model's first chip only: {faces (one array), people, conditions, paths}."""
    out = aligned_parts(name, embedder, data, progress)
    return {**out, "faces": out["faces"][0]}


def eligible_people(data: dict) -> np.ndarray:
    """The people a draw picks from: those with photos of both conditions (sorted)."""
    both = set(data["people"][data["conditions"] == 1]) & set(data["people"][data["conditions"] == 0])
    return np.array(sorted(both))


def feasible(data: dict, k: int) -> bool:
    """Whether k labelled people can be drawn and still leave two people with genuine pairs to score (k = 0, the
    base model alone, always; k = 1 never: adapt needs two people)."""
    return k == 0 or 2 <= k <= len(eligible_people(data)) - 2


def draw(data: dict, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `seed` of k people among the eligible ones -> (indices of their photos, indices of everyone else's)."""
    rng = np.random.default_rng([seed, k])
    chosen = list(rng.choice(eligible_people(data), size=k, replace=False)) if k else []
    inside = np.isin(data["people"], chosen)
    return np.flatnonzero(inside), np.flatnonzero(~inside)
