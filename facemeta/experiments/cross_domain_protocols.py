"""The cross-domain protocols of issue 25 on the shared sets: which images each needs and how they split into
an enrolled domain and probe domains.

A protocol is a set, an enrolled (gallery) domain and named probe domains, each a boolean mask over the set's
rows; ``scored`` people are those whose images are scored, the other people's images give the unlabelled photos
(:mod:`facemeta.experiments.cross_domain`). In-domain controls (LFW pairs.txt folds 6-10, ORL) have one domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facemeta.data.manifest import ManifestRow

SETS = ("mfr2", "yaleb", "ar", "thermal", "lfw", "orl")
MASK_GROUPS = {"surgical": "surgical", "cloth": "cloth", "KN95": "respirator", "N95": "respirator",
               "N99": "respirator"}
FRONTAL = (0, 0)
SOURCE_PHOTOS = 600  # unlabelled LFW photos (people folds 1-5): the source domain's statistics


@dataclass
class Protocol:
    """One protocol: set, enrolled domain mask, probe domains {name: mask}; `kind` 'cross' or 'control';
    `open_set` (thermal): probes of never-enrolled people; `pairs` (LFW): fixed pairs (index a, index b, same)."""

    name: str
    set: str
    kind: str
    gallery: np.ndarray
    probes: dict[str, np.ndarray]
    open_set: np.ndarray | None = None
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def benchmark_rows(name: str, root=None) -> list[ManifestRow]:
    """The rows a set contributes: LFW's images named by pairs.txt folds 6-10, Yale B without its ambient
    images, every image of the others."""
    from facemeta.data.sets import read_pairs, read_set

    if name == "lfw-source":  # unlabelled LFW photos of people.txt folds 1-5 (people apart from pairs folds 6-10)
        rows = [r for r in read_set("lfw", root) if r.extra.get("people_fold") in ("1", "2", "3", "4", "5")]
        return rows[::max(1, len(rows) // SOURCE_PHOTOS)][:SOURCE_PHOTOS]
    if name == "lfw":
        pairs = [p for p in read_pairs("lfw", root) if p.fold >= 6]
        wanted = {p.a for p in pairs} | {p.b for p in pairs}
        return [r for r in read_set("lfw", root) if r.path in wanted]
    return read_set(name, root, include_ambient=False) if name == "yaleb" else read_set(name, root)


def mfr2_group(mask: str) -> str:
    """MFR2's mask type -> 'unmasked', 'surgical', 'cloth' or 'respirator' ('' when unlabelled)."""
    if mask == "no-mask":
        return "unmasked"
    return MASK_GROUPS.get(mask.split("_")[0], "") if mask else ""


def yaleb_group(row: ManifestRow) -> str:
    """Yale B light angle group of a row: 'frontal' (A+000E+00), then by the larger of |azimuth| and
    |elevation|: 'light <=25', 'light 26-50', 'light 51-77', 'light >77'."""
    from facemeta.data.sets import yaleb_angles

    angles = yaleb_angles(row)
    if angles is None:
        return ""
    if angles == FRONTAL:
        return "frontal"
    worst = max(abs(angles[0]), abs(angles[1]))
    for top, label in ((25, "light <=25"), (50, "light 26-50"), (77, "light 51-77")):
        if worst <= top:
            return label
    return "light >77"


YALEB_GROUPS = ("light <=25", "light 26-50", "light 51-77", "light >77")
AR_PROBES = ("expression", "light", "sunglasses", "scarf", "other session")
MFR2_PROBES = ("surgical", "cloth", "respirator")


def protocols(name: str, rows: list[ManifestRow], root=None) -> list[Protocol]:
    """The protocols of one set over its benchmark rows."""
    n = len(rows)
    if name == "mfr2":
        group = np.array([mfr2_group(r.extra.get("mask", "")) for r in rows])
        return [Protocol("MFR2 unmasked vs masked", name, "cross", group == "unmasked",
                         {g: group == g for g in MFR2_PROBES})]
    if name == "yaleb":
        group = np.array([yaleb_group(r) for r in rows])
        return [Protocol("Yale B frontal light vs light angle", name, "cross", group == "frontal",
                         {g: group == g for g in YALEB_GROUPS})]
    if name == "ar":
        session = np.array([r.extra["session"] for r in rows])
        group = np.array([r.extra["group"] for r in rows])
        one = session == "1"
        probes = {g: one & (group == g) for g in AR_PROBES[:4]}
        probes["other session"] = session == "2"
        return [Protocol("AR neutral vs condition", name, "cross", one & (group == "neutral"), probes,
                         notes="enrolled: image 01 (session 1 neutral); probes: session 1 by condition (3 images "
                               "each), and every image of session 2")]
    if name == "thermal":
        subs = [set(r.extra["subsets"].split(";")) for r in rows]
        gallery = np.array(["GalleryPristine" in s for s in subs])
        probe = np.array(["ProbePristine" in s for s in subs])
        never = np.array(["ProbeNPristine" in s for s in subs])
        return [Protocol("thermal gallery vs probes", name, "cross", gallery, {"probes": probe}, open_set=never)]
    if name == "orl":
        every = np.ones(n, bool)
        return [Protocol("ORL (in-domain control)", name, "control", every, {"all pairs": every})]
    if name == "lfw":
        from facemeta.data.sets import read_pairs

        index = {r.path: i for i, r in enumerate(rows)}
        pairs = [p for p in read_pairs("lfw", root) if p.fold >= 6]
        ia = np.array([index[p.a] for p in pairs])
        ib = np.array([index[p.b] for p in pairs])
        same = np.array([p.same for p in pairs])
        every = np.ones(n, bool)
        return [Protocol("LFW pairs.txt folds 6-10 (in-domain control)", name, "control", every,
                         {"pairs": every}, pairs=(ia, ib, same))]
    raise ValueError(f"no cross-domain protocol for set {name!r}")
