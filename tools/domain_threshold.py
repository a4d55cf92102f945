"""Calibrate the shipped model's threshold for vectors normalised by their domain (issue 25, item 2), and
store the model's source statistics that the ``offset`` rule needs (meta ``domain_reference``).

The model's own threshold (meta ``threshold`` at ``threshold_far``) was calibrated on raw vectors of held-out
source identities; after a domain's mean is removed, cosines spread differently and that threshold no longer
holds its false-accept rate. This script calibrates it again on held-out source pairs normalised the same way:
LFW's pairs.txt folds 6-10 images (people the model never trained on; LFW is one of its source domains), every
pair of two different people an impostor pair, each vector normalised by the LFW domain's statistics estimated
from unlabelled LFW photos of OTHER people (people.txt folds 1-5, the cross-domain benchmark's ``lfw-source``
rows). The vectors are the cross-domain benchmark's (facemeta.experiments.cross_domain_embed, cached).

    python tools/domain_threshold.py                      # print the figures
    python tools/domain_threshold.py --write weights/default.json   # store meta domain_threshold and domain_reference

The rule is ``offset`` (facemeta.gallery.domain_stats.offset_stats): the source statistics (``domain_reference``)
are the mean, spread and count of the 600 unlabelled LFW photos of people.txt folds 1-5; the held-out LFW domain
lies at the source, so the rule gives it strength 0 and its normalised vectors are the raw ones: the threshold
for normalised vectors is then the raw threshold, which this script checks rather than assumes.
FaceRecognizer.threshold_for uses the stored entry (kind ``offset``, any strength) for domains that have no
calibrated threshold of their own; ``domain_threshold_mean`` is the same for a domain of the plain mean (strength 1,
``--kind mean``), whose cosines lie on another scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def threshold_at(impostors: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most ``far`` of the impostor scores are at or above it."""
    s = np.sort(np.asarray(impostors, np.float64))
    allowed = int(np.floor(far * len(s)))
    return float(np.nextafter(s[len(s) - allowed - 1], np.inf))


def scores(x: np.ndarray, identities: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines over every pair of rows."""
    ids = np.unique(np.array(identities), return_inverse=True)[1]
    sims = x @ x.T
    iu = np.triu_indices(len(x), 1)
    same = ids[iu[0]] == ids[iu[1]]
    flat = sims[iu]
    return flat[same], flat[~same]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--far", type=float, action="append", help="false-accept rates (default 1e-3 and 1e-2)")
    ap.add_argument("--write", metavar="MODEL.json", help="store the entry in this checkpoint's meta")
    ap.add_argument("--model", default="shipped",
                    help="the model scored: shipped (default) or a checkpoint file (single model or ensemble)")
    args = ap.parse_args()
    fars = args.far or [1e-3, 1e-2]

    from facemeta.experiments.cross_domain_embed import embed_set
    from facemeta.experiments.cross_domain_protocols import benchmark_rows
    from facemeta.gallery.domain_stats import estimate, normalise, offset_stats

    rows, source = benchmark_rows("lfw"), benchmark_rows("lfw-source")
    held = embed_set("lfw", rows, (args.model,))[args.model]
    photos = embed_set("lfw", source, (args.model,))[args.model]
    reference = estimate(photos)
    # the held-out LFW domain's statistics from other unlabelled photos of it: the source photos themselves
    rules = {"offset": offset_stats(photos, reference), "mean": estimate(photos, "mean")}
    out = {"set": "LFW pairs.txt folds 6-10 images, every pair (people the model never trained on)",
           "statistics": f"the LFW domain from {len(source)} unlabelled photos of people.txt folds 1-5",
           "strengths": {k: st.strength for k, st in rules.items()}, "images": len(rows), "thresholds": {}}
    identities = [r.identity for r in rows]
    for label, x in (("raw", held), *((k, normalise(held, st)) for k, st in rules.items())):
        genuine, impostor = scores(x, identities)
        out[f"{label}_pairs"] = {"genuine": len(genuine), "impostor": len(impostor)}
        for far in fars:
            t = threshold_at(impostor, far)
            out["thresholds"].setdefault(f"{far:g}", {})[label] = {
                "threshold": round(t, 6), "tar": round(float((genuine >= t).mean()), 4)}
    print(json.dumps(out, indent=1))
    if args.write:
        path = Path(args.write)
        body = json.loads(path.read_text())
        far = min(fars)
        for key, kind in (("domain_threshold", "offset"), ("domain_threshold_mean", "mean")):
            entry = out["thresholds"][f"{far:g}"][kind]
            body["meta"][key] = {"threshold": entry["threshold"], "far": far, "kind": kind,
                                 "strength": None if kind == "offset" else rules[kind].strength,
                                 "set": out["set"], "impostor_pairs": out[f"{kind}_pairs"]["impostor"],
                                 "tar": entry["tar"]}
        body["meta"]["domain_threshold"]["note"] = ("offset rule: the source domain gets strength "
                                                    f"{rules['offset'].strength:g}, so this is the raw threshold")
        body["meta"]["domain_reference"] = {"photos": f"{len(source)} unlabelled LFW photos of people.txt folds 1-5",
                                            "stats": reference.to_dict()}
        path.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote meta domain_threshold, domain_threshold_mean and domain_reference into {path}")


if __name__ == "__main__":
    main()
