"""Alignment benchmark: faces/s of a naive MTCNN loop vs facemeta's batched multi-process pipeline,
and the success rate (with the route each image took) of alignment on every whole shared set.

Run: python benchmarks/bench_align.py [--data DIR] [--n 1000] [--sets lfw,yaleb,mfr2,orl] [--out DIR]
Writes benchmarks/results/align.json and align.md. Both speed arms run in this one process tree, on
the same 1,000 LFW images (a fixed random sample), one after the other; (a) uses one MTCNN call per
image in one process with one torch thread (on this shared 2-core machine, torch on both cores
was 8x slower than one thread under load, so one thread is the stronger baseline; the default-thread
loop is measured on the first --n-threaded images for reference), (b) is `align_rows` with worker processes, each with
one torch thread, and MTCNN batched over equal-sized images. Both load, detect, warp and write PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from facemeta.align.detect import FaceDetector, select_faces
from facemeta.align.pipeline import PIPELINE_VERSION, align_rows
from facemeta.align.warp import warp_face
from facemeta.data.sets import PRE_CROPPED_SETS, read_set
from facemeta.images import load_image

RESULTS = Path(__file__).resolve().parent / "results"
YALEB_RE = re.compile(r"_P00A([+-]\d+)E([+-]\d+)\.png$")


def naive_loop(rows, out_dir: Path, threads: int) -> dict:
    """(a) One MTCNN.detect call per image, in this process, largest face warped and saved."""
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(threads)
    mtcnn = MTCNN(keep_all=True, post_process=False, device="cpu")
    ok = 0
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        img = load_image(row.path)
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        if boxes is None:
            continue
        from facemeta.align.detect import Face

        faces = [Face(b, float(p), pt) for b, p, pt in zip(boxes, probs, points, strict=True)]
        face = select_faces(faces, "largest")[0]
        aligned = warp_face(img, face.landmarks, 112)
        cv2.imwrite(str(out_dir / f"{i:05d}.png"), cv2.cvtColor(aligned, cv2.COLOR_RGB2BGR))
        ok += 1
    dt = time.perf_counter() - t0
    return {"images": len(rows), "aligned": ok, "seconds": round(dt, 2), "faces_per_s": round(ok / dt, 2)}


def pipeline_run(rows, out_dir: Path, workers: int, pre_cropped: bool = False) -> tuple[dict, list, list]:
    """(b) facemeta's align_rows (batched MTCNN, worker processes, fallbacks, manifest)."""
    stats: dict = {}
    t0 = time.perf_counter()
    aligned, failures = align_rows(rows, out_dir, size=112, workers=workers, pre_cropped=pre_cropped,
                                   progress=False, stats=stats)
    dt = time.perf_counter() - t0
    stats.update(seconds=round(dt, 2), faces_per_s=round(len(aligned) / dt, 2))
    return stats, aligned, failures


def set_report(name: str, stats: dict, aligned, failures) -> dict:
    """Success rates, routes, fit error and failure reasons of one whole set."""
    fit = [float(r.extra["fit_error"]) for r in aligned if r.extra.get("fit_error")]
    n = stats["images"]
    with_landmarks = sum(1 for r in aligned if r.extra.get("route") != "template-crop")
    rep = {"images": n, "aligned": stats["aligned"], "failed": stats["failed"],
           "success_rate": round(stats["aligned"] / n, 4),
           "with_landmarks_rate": round(with_landmarks / n, 4),
           "routes": stats["routes"], "failure_reasons": stats["reasons"],
           "mean_fit_error_px": round(float(np.mean(fit)), 3) if fit else None,
           "seconds": stats["seconds"], "faces_per_s": stats["faces_per_s"],
           "failures": [Path(f["path"]).name for f in failures][:50]}
    if name == "yaleb":
        by = {"frontal_60_45": [], "other": []}
        for r in aligned:
            m = YALEB_RE.search(r.extra["source"])
            if m is None:
                continue  # the ambient image has no angles
            key = "frontal_60_45" if abs(int(m[1])) <= 60 and abs(int(m[2])) <= 45 else "other"
            by[key].append(r.extra["route"])
        for f in failures:
            m = YALEB_RE.search(f["path"])
            if m is not None:
                key = "frontal_60_45" if abs(int(m[1])) <= 60 and abs(int(m[2])) <= 45 else "other"
                by[key].append("failed")
        rep["lighting_subsets"] = {
            k: {"images": len(v), "with_landmarks": sum(x not in ("template-crop", "failed") for x in v),
                "usable": sum(x != "failed" for x in v), "routes": dict(Counter(v))} for k, v in by.items()}
    return rep


def write_results(result: dict) -> None:
    """Write align.json and align.md (called after every stage so a partial run still leaves results)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "align.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Alignment benchmark", "",
             f"Measured {result['date']} on {result['machine']} with `python benchmarks/bench_align.py` "
             f"(pipeline version {result['pipeline_version']}). {result['note']}", ""]
    if result.get("speed_measured"):
        lines += [f"The speed table below comes from the run of {result['speed_measured']}.", ""]
    if result.get("sets_measured"):
        lines += [f"The whole-set table below comes from the run of {result['sets_measured']}.", ""]
    sp = result.get("speed")
    if sp:
        lines += ["## Speed: 1,000 LFW images (load, detect, warp, write PNG)", "",
                  "| arm | images | aligned | seconds | faces/s |", "| --- | ---: | ---: | ---: | ---: |"]
        for key, label in (("naive", "(a) naive loop, one MTCNN call per image, 1 torch thread"),
                           ("naive_all_threads", "(reference) naive loop, torch on all cores"),
                           ("pipeline", f"(b) facemeta batched pipeline, {sp['workers']} workers")):
            if key in sp:
                a = sp[key]
                lines.append(f"| {label} | {a['images']} | {a['aligned']} | {a['seconds']} | {a['faces_per_s']} |")
        if "ratio_b_over_a" in sp:
            lines += ["", f"**(b)/(a) = {sp['ratio_b_over_a']}** (goal >= 2)."]
        lines.append("")
    if result.get("sets"):
        lines += ["## Success on each whole shared set (`align_rows`, as `facemeta align <set>` runs it)", "",
                  "| set | images | aligned | success | with detector landmarks | mean fit error (px, 112) | routes | failures | seconds |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
        for name, r in result["sets"].items():
            routes = ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items(), key=lambda kv: -kv[1]))
            reasons = ", ".join(f"{k} {v}" for k, v in r["failure_reasons"].items()) or "none"
            lines.append(f"| {name} | {r['images']} | {r['aligned']} | {100 * r['success_rate']:.2f}% | "
                         f"{100 * r['with_landmarks_rate']:.2f}% | {r['mean_fit_error_px']} | {routes} | {reasons} | {r['seconds']} |")
        yb = result["sets"].get("yaleb", {}).get("lighting_subsets")
        if yb:
            lines += ["", "Extended Yale B by lighting (frontal = within 60 deg azimuth and 45 deg elevation):", "",
                      "| subset | images | with detector landmarks | usable | routes |", "| --- | ---: | ---: | ---: | --- |"]
            for k, v in yb.items():
                n = max(1, v["images"])
                lines.append(f"| {k} | {v['images']} | {v['with_landmarks']} ({100 * v['with_landmarks'] / n:.1f}%) | "
                             f"{v['usable']} ({100 * v['usable'] / n:.1f}%) | "
                             + ", ".join(f"{a} {b}" for a, b in sorted(v["routes"].items(), key=lambda kv: -kv[1])) + " |")
        lines.append("")
        for name, r in result["sets"].items():
            if r["failures"]:
                lines.append(f"- {name} failures (first 50): " + ", ".join(r["failures"]))
    (RESULTS / "align.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Run the speed comparison, then the whole-set runs, writing results after each stage."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="face data folder (default $FACEMETA_DATA or ../shared/data)")
    ap.add_argument("--n", type=int, default=1000, help="LFW images for the speed comparison")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-threaded", type=int, default=100,
                    help="images for the reference naive loop with torch on all cores (0: skip)")
    ap.add_argument("--sets", default="lfw,yaleb,mfr2,orl")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", help="folder for the aligned outputs (default: a temporary folder, removed)")
    ap.add_argument("--note", default="", help="free text stored with the results (machine load...)")
    args = ap.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_align_"))
    cores = os.cpu_count() or 1
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {cores} CPU cores, Python {platform.python_version()}",
              "pipeline_version": PIPELINE_VERSION, "note": args.note, "speed": {}, "sets": {}}
    if not args.sets and (RESULTS / "align.json").is_file():
        # speed-only run: keep the whole-set results of the previous run (and say when they were measured)
        old = json.loads((RESULTS / "align.json").read_text())
        result["sets"] = old.get("sets", {})
        result["sets_measured"] = old.get("sets_measured", old.get("date"))
    if args.skip_speed and (RESULTS / "align.json").is_file():
        # sets-only run: keep the speed results of the previous run
        old = json.loads((RESULTS / "align.json").read_text())
        result["speed"] = old.get("speed", {})
        result["speed_measured"] = old.get("speed_measured", old.get("date"))
        result["note"] = (old.get("note", "") + " " + result["note"]).strip()
    try:
        if not args.skip_speed:
            rows = sorted(read_set("lfw", args.data), key=lambda r: r.path)
            rows = random.Random(0).sample(rows, min(args.n, len(rows)))
            _ = FaceDetector()  # import torch and facenet-pytorch before timing either arm
            for d in ("naive", "pipeline"):
                shutil.rmtree(work / d, ignore_errors=True)
                (work / d).mkdir(parents=True)
            sp = result["speed"]
            sp["workers"] = args.workers
            sp["naive"] = naive_loop(rows, work / "naive", threads=1)
            print("naive", sp["naive"], flush=True)
            if args.n_threaded:
                sp["naive_all_threads"] = naive_loop(rows[:args.n_threaded], work / "naive", threads=cores)
                sp["naive_all_threads"]["threads"] = cores
                print("naive, all threads", sp["naive_all_threads"], flush=True)
            stats, _, _ = pipeline_run(rows, work / "pipeline", args.workers)
            sp["pipeline"] = {k: stats[k] for k in ("images", "aligned", "seconds", "faces_per_s", "routes")}
            sp["ratio_b_over_a"] = round(sp["pipeline"]["faces_per_s"] / sp["naive"]["faces_per_s"], 2)
            print("pipeline", sp["pipeline"], "ratio", sp["ratio_b_over_a"], flush=True)
            write_results(result)
        for name in [s for s in args.sets.split(",") if s]:
            dst = work / f"{name}-112"
            shutil.rmtree(dst, ignore_errors=True)
            stats, aligned, failures = pipeline_run(read_set(name, args.data), dst, args.workers,
                                                    pre_cropped=name in PRE_CROPPED_SETS)
            result["sets"][name] = set_report(name, stats, aligned, failures)
            print(name, {k: v for k, v in result["sets"][name].items() if k != "failures"}, flush=True)
            write_results(result)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
