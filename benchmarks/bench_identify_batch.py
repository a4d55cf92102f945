"""Identifying many photos: one `facemeta identify GALLERY FOLDER` run against one `facemeta identify GALLERY IMAGE`
process per photo (the only way before issue 14), in one script, on the same ORL photos and gallery.

The gallery holds photo 1 of every ORL subject (40 people, enrolled with the model in weights/); the probes are
photos 2 and 3 of each (80 images). The batch arm is timed over all 80 in one process (model and MTCNN loaded
once, images detected in batches); the per-photo arm is timed over the first --per-photo probes, each its own
process, and its rate is extrapolated to 80 (each call costs the same: start Python, load the model and MTCNN,
one image). Both arms' answers are compared on the photos both identified.

    python benchmarks/bench_identify_batch.py --out benchmarks/results/identify_batch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_files import machine, write_results


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "facemeta", *argv], capture_output=True, text=True, env=env,
                          check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-photo", type=int, default=8, help="probes timed one process each (default 8)")
    ap.add_argument("--out", default="benchmarks/results/identify_batch", help="output stem (.md and .json)")
    args = ap.parse_args()

    from facemeta.paths import data_root

    orl = data_root() / "orl"
    work = Path(tempfile.mkdtemp(prefix="fm-identify-"))
    try:
        people, probes = work / "people", work / "probes"
        probes.mkdir(parents=True)
        for s in sorted(orl.iterdir()):
            if s.is_dir() and s.name.startswith("s"):
                (people / s.name).mkdir(parents=True)
                shutil.copy(s / "1.pgm", people / s.name / "1.pgm")
                for i in (2, 3):
                    shutil.copy(s / f"{i}.pgm", probes / f"{s.name}-{i}.pgm")
        enrolled = _run(["enroll", str(work / "g"), "--folder", str(people), "--no-progress"])
        if enrolled.returncode:
            raise SystemExit(enrolled.stderr)
        files = sorted(probes.iterdir())

        t0 = time.perf_counter()
        batch = _run(["identify", str(work / "g"), str(probes), "--json"])
        t_batch = time.perf_counter() - t0
        if batch.returncode:
            raise SystemExit(batch.stderr)
        batch_answers = {Path(r["image"]).name: r["faces"][0]["identity"]
                         for r in map(json.loads, batch.stdout.splitlines()) if r.get("faces")}

        single_answers, t_single = {}, 0.0
        for f in files[:args.per_photo]:
            t0 = time.perf_counter()
            one = _run(["identify", str(work / "g"), str(f), "--json"])
            t_single += time.perf_counter() - t0
            if one.returncode == 0:
                single_answers[f.name] = json.loads(one.stdout)["faces"][0]["identity"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_photo = t_single / args.per_photo
    same = sum(batch_answers.get(k) == v for k, v in single_answers.items())
    right = sum(v == k.split("-")[0] for k, v in batch_answers.items())
    result = {"machine": machine(),
              "photos": len(files), "batch_seconds": round(t_batch, 2),
              "batch_images_per_s": round(len(files) / t_batch, 2),
              "per_photo_seconds": round(per_photo, 2), "per_photo_timed": args.per_photo,
              "per_photo_all_seconds_extrapolated": round(per_photo * len(files), 1),
              "speedup": round(per_photo * len(files) / t_batch, 1),
              "answers_compared": len(single_answers), "answers_equal": same,
              "batch_rank1": round(right / len(files), 4)}
    lines = ["# Identifying many photos: one run against one process per photo", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {result['machine']} with "
             "`python benchmarks/bench_identify_batch.py`. Gallery: photo 1 of the 40 ORL subjects; probes: "
             f"photos 2 and 3 of each ({len(files)} images); model: weights/default.safetensors.", "",
             "| arm | seconds for all probes | images/s |", "| --- | ---: | ---: |",
             f"| `facemeta identify G FOLDER` (one process) | {t_batch:.1f} | {len(files) / t_batch:.2f} |",
             f"| `facemeta identify G IMAGE` per photo (timed over {args.per_photo}, extrapolated) | "
             f"{per_photo * len(files):.1f} | {1 / per_photo:.2f} |", "",
             f"One run is **{result['speedup']}x** faster. The answers agree on {same} of the {len(single_answers)} "
             f"photos identified both ways; rank-1 of the batch run: {result['batch_rank1']:.3f}.", ""]
    write_results(args.out, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
