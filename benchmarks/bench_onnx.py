"""Embedding speed of the shipped model: PyTorch against ONNX Runtime, batch 1 and batch 32, in one run.

Both arms are ``FaceEmbedder.embed_aligned`` on the same real faces (LFW photos aligned by facemeta onto the model's
chip): preprocessing (normalise) and the network, flip test-time augmentation as verification uses it (two passes
per face; ``--no-flip`` for one). torch: the checkpoint in eval mode, channels-last, inference mode. onnx: the graph
``facemeta export`` writes (exported into a temporary folder here), ONNX Runtime's CPU provider with
``intra_op_num_threads`` = torch.get_num_threads(), so both use the same threads. Each row: a warm-up, then
--repeats passes over the faces per arm, taken in turn (torch, onnx, torch...), and the median; the ratio is ONNX
Runtime over torch in the same run. Embeddings of the two arms are compared too (min cosine), so a fast but wrong graph shows.

    python benchmarks/bench_onnx.py --out benchmarks/results/onnx
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from results_files import machine, write_results


def _faces(embedder, n: int, folder: Path, seed: int = 0) -> list[np.ndarray]:
    """n LFW photos aligned by facemeta onto each chip the model reads (one uint8 [n,S,S,3] batch per chip: one for
    a single model, one per member for an ensemble; the same photos in the same order)."""
    from facemeta.align.pipeline import align_rows
    from facemeta.data.sets import read_set
    from facemeta.images import load_image

    rows = random.Random(seed).sample(sorted(read_set("lfw"), key=lambda r: r.path), n + 16)
    found = []
    for chip, size in embedder.chips:
        aligned, _ = align_rows(rows, folder / f"{chip}{size}", size=size, chip=chip, workers=2, progress=False)
        found.append({r.extra.get("source", r.path): r.path for r in aligned})
    common = sorted(set.intersection(*(set(f) for f in found)))[:n]
    return [np.stack([load_image(f[src]) for src in common]) for f in found]


def _batch(embedder, faces: list[np.ndarray], i: int, batch: int):
    """Faces i..i+batch as embed_aligned takes them (a list per chip for an ensemble)."""
    part = [f[i:i + batch] for f in faces]
    return part if embedder.ensemble else part[0]


def _pass(embedder, faces: list[np.ndarray], batch: int) -> tuple[float, np.ndarray]:
    """Seconds of one pass over `faces` in batches of `batch`, and the vectors."""
    t0 = time.perf_counter()
    out = np.concatenate([embedder.embed_aligned(_batch(embedder, faces, i, batch))
                          for i in range(0, len(faces[0]), batch)])
    return time.perf_counter() - t0, out


def _compare(arms: dict, faces: list[np.ndarray], batch: int, repeats: int) -> dict:
    """One table row: each arm warmed up, then `repeats` passes taken in turn (arm A, arm B, A, B...) so that
    both see the same machine; the median pass per arm."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    vectors = {}
    for embedder in arms.values():
        embedder.embed_aligned(_batch(embedder, faces, 0, batch))
    for _ in range(repeats):
        for name, embedder in arms.items():
            seconds, vectors[name] = _pass(embedder, faces, batch)
            times[name].append(seconds)
    row: dict = {"batch": batch}
    for name in arms:
        seconds = statistics.median(times[name])
        row[name] = {"seconds": round(seconds, 3), "images_per_s": round(len(faces[0]) / seconds, 1),
                     "passes_s": [round(t, 3) for t in times[name]]}
    row["ratio"] = round(row["onnx"]["images_per_s"] / row["torch"]["images_per_s"], 2)
    row["min_cosine"] = round(float((vectors["torch"] * vectors["onnx"]).sum(axis=1).min()), 7)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="facemeta checkpoint (default: the shipped model in weights/)")
    ap.add_argument("--faces", type=int, default=128, help="aligned faces per pass (default 128)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per arm, taken in turn (default 5)")
    ap.add_argument("--no-flip", action="store_true", help="one pass per face (no flip test-time augmentation)")
    ap.add_argument("--out", default="benchmarks/results/onnx")
    args = ap.parse_args()
    import onnxruntime
    import torch

    from facemeta.embedder import FaceEmbedder, default_model_path, export_checkpoint_onnx

    model = str(args.model or default_model_path())
    flip = not args.no_flip
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        t0 = time.perf_counter()
        contract = export_checkpoint_onnx(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t0
        arms = {"torch": FaceEmbedder(model, flip=flip),
                "onnx": FaceEmbedder(model, flip=flip, runtime="onnx", onnx_path=Path(tmp) / "model.onnx")}
        faces = _faces(arms["torch"], args.faces, Path(tmp) / "aligned")
        rows = []
        for batch in args.batches:
            rows.append(_compare(arms, faces, batch, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": Path(model).name,
              "fingerprint": contract["checkpoint"]["fingerprint"], "backbone": contract["checkpoint"].get("backbone")
              or "+".join(contract["checkpoint"].get("backbones", [])),
              "image_size": contract.get("image_size") or "+".join(str(m["image_size"])
                                                                  for m in contract.get("members", [])),
              "faces": len(faces[0]), "flip": flip, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "opset": contract["opset"], "export_seconds": round(export_s, 1),
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "machine": machine(),
              "command": "python benchmarks/bench_onnx.py " + (f"--out {args.out}" if args.out else ""),
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows}
    write_results(args.out, result, _markdown(result))


def _markdown(r: dict) -> str:
    lines = ["# Embedding speed: PyTorch vs ONNX Runtime", "",
             f"Measured {r['date']} on {r['machine']} with `{r['command']}`: torch {r['torch']}, onnxruntime "
             f"{r['onnxruntime']}, {r['threads']} threads each. Model `{r['model']}` ({r['backbone']}, "
             f"{r['image_size']} px, fingerprint {r['fingerprint']}), exported at opset {r['opset']} "
             f"in {r['export_seconds']} s. {r['faces']} real LFW faces aligned by facemeta, flip test-time "
             f"augmentation {'on (two passes per face, as verification does)' if r['flip'] else 'off'}; median of "
             f"{r['repeats']} passes per arm, taken in turn after a warm-up. Load average {r['loadavg_start'][0]:.2f} at start, "
             f"{r['loadavg_end'][0]:.2f} at end.", "",
             "| batch | torch images/s | ONNX Runtime images/s | ONNX Runtime / torch | min cosine |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['torch']['images_per_s']} | {row['onnx']['images_per_s']} | "
                     f"**{row['ratio']:.2f}x** | {row['min_cosine']} |")
    lines += ["", "Both arms: `FaceEmbedder.embed_aligned` (normalise, network, flip TTA) on already aligned faces; "
              "detection and alignment (MTCNN, in torch for both runtimes) are not timed.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
