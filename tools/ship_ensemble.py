"""Ship an ensemble as the default model: copy it into weights/ and write weights/model-card.json from measurements.

    python tools/ship_ensemble.py runs/v3/e0.safetensors --rule benchmarks/results/shipped_v3/results.json \\
        --speed benchmarks/results/shipped_v3/pipeline_speed.json --out weights

The ensemble comes from tools/make_ensemble.py (threshold calibrated on held-out source identities); the rule's
verdict from benchmarks/shipped_v3.py (benchmarks/results/shipped_v3/RULE.md); the speed from
benchmarks/bench_pipeline_speed.py run on this ensemble. Nothing here measures: every figure of the card is copied
from those files, and the card records the shipped file's sha256 (tests/test_weights.py checks that they agree).
Run tools/domain_threshold.py --write weights/default.json afterwards for the domains' meta.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path


def member_rows(doc: dict) -> list[dict]:
    """Each member of the checkpoint document: backbone, chip, weight, and whether its tensors are in the file."""
    rows = []
    for entry, info in zip(doc["config"]["members"], doc["meta"].get("members", []), strict=False):
        rows.append({"backbone": entry["config"]["backbone"], "chip": entry["chip"], "align_size": entry["align_size"],
                     "weight": entry["weight"], "stored": not entry.get("prior"), "prior": entry.get("prior"),
                     "from": info.get("member"), "from_fingerprint": info.get("fingerprint")})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Copy the ensemble into `--out` as default.safetensors/.json and write model-card.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the ensemble checkpoint (.safetensors, its .json beside it)")
    ap.add_argument("--rule", type=Path, required=True, help="benchmarks/shipped_v3.py's results.json")
    ap.add_argument("--speed", type=Path, help="bench_pipeline_speed.py's json for this model")
    ap.add_argument("--out", type=Path, default=Path("weights"))
    args = ap.parse_args(argv)

    from facemeta.models.checkpoint import read_checkpoint_info

    doc = read_checkpoint_info(args.model)
    if (doc.get("config") or {}).get("kind") != "ensemble":
        ap.error(f"{args.model} is not an ensemble")
    rule = json.loads(args.rule.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    dst = args.out / "default.safetensors"
    shutil.copyfile(args.model, dst)
    shutil.copyfile(args.model.with_suffix(".json"), dst.with_suffix(".json"))
    sha = hashlib.sha256(dst.read_bytes()).hexdigest()
    meta = doc["meta"]
    card = {"version": 3, "written": time.strftime("%Y-%m-%d", time.gmtime()), "source_file": str(args.model),
            "model": {"kind": "ensemble", "sha256": sha, "fingerprint": sha[:16], "bytes": dst.stat().st_size,
                      "embedding_size": sum(m["config"]["embedding_size"] for m in doc["config"]["members"]),
                      "members": member_rows(doc)},
            "threshold": {"threshold": meta["threshold"], "threshold_far": meta["threshold_far"],
                          "validation": meta.get("validation"), "weight_choice": meta.get("weight_choice")},
            "rule": {"file": "benchmarks/results/shipped_v3/RULE.md", "verdict": str(args.rule),
                     "choice": rule["choice"], "date": rule["date"],
                     "candidates": [{k: c[k] for k in ("name", "model", "mean", "lfw", "below_start", "eligible")}
                                    for c in rule["candidates"]]},
            "cells": {c["name"]: c["cells"] for c in rule["candidates"] + rule["shown"]},
            "lfw_folds_6_10": {c["name"]: c["lfw"] for c in rule["candidates"] + rule["shown"]}}
    if args.speed:
        card["speed"] = json.loads(args.speed.read_text())
    (args.out / "model-card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"shipped {args.model} as {dst} (sha256 {sha[:16]}…, {dst.stat().st_size / 1e6:.1f} MB); "
          f"card: {args.out / 'model-card.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
