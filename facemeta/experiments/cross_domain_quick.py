"""`facemeta benchmark cross-domain --quick`: one shared cross-domain protocol, raw and with domains, in about two
minutes the first time (issue 25's demo of the main job).

AR neutral (images 01 and 14, both sessions) enrolled against sunglasses (08 and 21) of the set's 100 people: about
400 images, detected and embedded once with the shipped model through the benchmark's route
(:mod:`facemeta.experiments.cross_domain_embed`, cached: a second run is numpy only). For each of ``DRAWS``
random halvings of the people, one half is scored and the other half's photos are the unlabelled domain photos:
``PHOTOS`` per domain (neutral, sunglasses). Each domain's statistics are made exactly as ``facemeta domain add``
makes them (:func:`facemeta.gallery.domain_stats.offset_stats` with the model's source statistics, checkpoint meta
``domain_reference``) and every scored vector is normalised by its own domain with the gallery's
:func:`~facemeta.gallery.domain_stats.normalise`. Printed: TAR at FAR 1e-2 over every enrolled x probe pair, raw
and with domains, mean over the draws.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

ENROLLED = ("01", "14")  # AR neutral, sessions 1 and 2
PROBES = ("08", "21")  # AR sunglasses, sessions 1 and 2
PHOTOS = 10  # unlabelled photos per domain (the benchmark's goal count)
DRAWS = 5
FAR = 1e-2


def quick_rows(root=None) -> list:
    """The AR rows of the quick protocol (neutral ENROLLED and sunglasses PROBES of every person)."""
    from facemeta.data.sets import read_set

    wanted = {f"{int(s)}" for s in ENROLLED + PROBES}
    return [r for r in read_set("ar", root) if r.extra.get("image_index") in wanted]


def model_reference():
    """The shipped model's source statistics (meta ``domain_reference``) and its meta; None when it has none."""
    import json

    from facemeta.embedder import default_model_path
    from facemeta.gallery.domain_stats import DomainStats

    path = default_model_path()
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("meta") or {}
    entry = meta.get("domain_reference")
    return DomainStats.from_dict(entry["stats"]) if isinstance(entry, dict) and "stats" in entry else None


def score(vectors: np.ndarray, ids: np.ndarray, enrolled: np.ndarray, probe: np.ndarray, reference,
          draws: int = DRAWS, photos: int = PHOTOS) -> dict:
    """TAR@FAR=1e-2 (%) raw and with domains (mean and per draw), and each domain's mean strength."""
    from facemeta.eval.metrics import tar_at_far
    from facemeta.gallery.domain_stats import normalise, offset_stats

    people = np.unique(ids)
    out = {"raw": [], "domains": [], "strength": {"neutral": [], "sunglasses": []}}
    for draw in range(draws):
        rng = np.random.default_rng(zlib.crc32(f"quick/{draw}".encode()))
        chosen = set(rng.permutation(people)[: len(people) // 2])
        scored = np.array([i in chosen for i in ids])
        stats = {}
        for name, mask in (("neutral", enrolled), ("sunglasses", probe)):
            pool = np.flatnonzero(mask & ~scored)
            pick = rng.choice(pool, size=min(photos, len(pool)), replace=False)
            stats[name] = offset_stats(vectors[pick], reference)
            out["strength"][name].append(stats[name].strength)
        g, p = enrolled & scored, probe & scored
        same = (ids[p][:, None] == ids[g][None, :]).ravel()
        for key, (sg, sp) in (("raw", (None, None)), ("domains", (stats["neutral"], stats["sunglasses"]))):
            sims = normalise(vectors[p], sp) @ normalise(vectors[g], sg).T
            out[key].append(100 * tar_at_far(sims.ravel(), same, FAR))
    return {"raw": float(np.mean(out["raw"])), "domains": float(np.mean(out["domains"])),
            "raw_draws": out["raw"], "domains_draws": out["domains"],
            "strength": {k: float(np.mean(v)) for k, v in out["strength"].items()}}


def run_quick(root=None, progress: bool = True) -> dict:
    """Embed (cached) the quick protocol's images with the shipped model and score it -> the figures."""
    from facemeta.errors import ConfigError
    from facemeta.experiments.cross_domain_embed import embed_set

    start = time.perf_counter()
    reference = model_reference()
    if reference is None:
        raise ConfigError("the shipped model has no source statistics (meta domain_reference): "
                          "run tools/domain_threshold.py --write weights/default.json")
    rows = quick_rows(root)
    if not rows:
        raise ConfigError("no AR images found: is the ar set under the data folder (--data)?")
    vectors = embed_set("ar", rows, ("shipped",), progress=progress)["shipped"]
    ids = np.array([r.identity for r in rows])
    index = np.array([f"{int(r.extra['image_index']):02d}" for r in rows])
    enrolled, probe = np.isin(index, ENROLLED), np.isin(index, PROBES)
    result = score(vectors, ids, enrolled, probe, reference)
    result.update({"protocol": "AR neutral (01, 14) vs sunglasses (08, 21)", "images": len(rows),
                   "people": int(len(np.unique(ids))), "photos_per_domain": PHOTOS, "draws": DRAWS,
                   "statistic": "offset (facemeta domain add's)", "seconds": time.perf_counter() - start})
    return result


def format_quick(r: dict) -> str:
    """The two figures, in words."""
    return (f"{r['protocol']}: {r['images']} images of {r['people']} people; half the people scored, "
            f"{r['photos_per_domain']} unlabelled photos per domain from the other half, {r['draws']} draws\n"
            f"TAR@FAR=1e-2 raw:          {r['raw']:.1f}%\n"
            f"TAR@FAR=1e-2 with domains: {r['domains']:.1f}%  (statistic {r['statistic']}; strength neutral "
            f"{r['strength']['neutral']:.2f}, sunglasses {r['strength']['sunglasses']:.2f})\n"
            f"({r['seconds']:.0f} s; full benchmark: facemeta benchmark cross-domain)")
