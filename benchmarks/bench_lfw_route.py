"""LFW pairs.txt through the product's route: the shipped model as `facemeta verify` sees each photo.

Every photo named by LFW's pairs.txt (all ten folds) goes through FaceEmbedder's one route (facemeta.align.route:
training alignment's routes, filters and the subject policy; flip test-time augmentation, as verify runs), and
the pairs are scored as verify scores them. Reports 10-fold accuracy (the standard protocol), TAR@FAR=1e-2 and
the folds 6-10 accuracy beside the model card's cached-face figure; photos without a face score -1 (a rejected
pair), as a user would see verify refuse them. Vectors are cached in --cache, so an interrupted run resumes.

    python benchmarks/bench_lfw_route.py --out benchmarks/results/lfw_route
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the shipped model)")
    ap.add_argument("--data", help="root of the shared face sets")
    ap.add_argument("--select", default="subject", help="face-selection policy (default subject)")
    ap.add_argument("--out", default="benchmarks/results/lfw_route", help="results stem (.md and .json written)")
    ap.add_argument("--cache", default="/tmp/facemeta-lfw-route.npz", help="vectors computed so far")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from facemeta.data.sets import read_pairs
    from facemeta.embedder import FaceEmbedder
    from facemeta.errors import FacemetaError
    from facemeta.eval.metrics import kfold_accuracy, roc_auc, tar_at_far

    torch.set_num_threads(args.threads)
    pairs = read_pairs("lfw", args.data)
    paths = sorted({str(p) for pair in pairs for p in (pair.a, pair.b)})
    embedder = FaceEmbedder(args.model, select=args.select)
    cache = Path(args.cache)
    done: dict[str, np.ndarray] = {}
    warned: dict[str, str] = {}
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if str(z["fingerprint"]) == embedder.fingerprint and str(z["select"]) == args.select:
            done = dict(zip(z["paths"].tolist(), z["vectors"], strict=True))
            warned = dict(zip(z["warned"].tolist(), z["warnings"].tolist(), strict=True))
    todo = [p for p in paths if p not in done]
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="embed", unit="img") as bar:
        for k in range(0, len(todo), args.batch):
            chunk = todo[k:k + args.batch]
            for path, faces in embedder.files_faces(chunk, batch_size=args.batch):
                if isinstance(faces, FacemetaError) or not faces:
                    done[str(path)] = np.full(embedder.embedding_size, np.nan, np.float32)
                else:
                    done[str(path)] = faces[0].vector
                    if faces[0].warning:
                        warned[str(path)] = faces[0].warning
            bar.update(len(chunk))
            keys = list(done)
            np.savez(cache, paths=np.array(keys), vectors=np.stack([done[p] for p in keys]),
                     fingerprint=embedder.fingerprint, select=args.select,
                     warned=np.array(list(warned), dtype=str), warnings=np.array(list(warned.values()), dtype=str))
    seconds = time.perf_counter() - start
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    scores = np.array([-1.0 if np.isnan(done[str(p.a)]).any() or np.isnan(done[str(p.b)]).any()
                       else float(np.dot(done[str(p.a)], done[str(p.b)])) for p in pairs])
    acc, std, _ = kfold_accuracy(scores, same, folds)
    late = folds >= 6
    acc_late, _, _ = kfold_accuracy(scores[late], same[late], folds[late])
    missing = sorted(p for p in paths if np.isnan(done[p]).any())
    result = {"model": str(embedder.model_path), "fingerprint": embedder.fingerprint, "select": args.select,
              "route": "FaceEmbedder one route (facemeta.align.route), flip TTA", "pairs": len(pairs),
              "photos": len(paths), "photos_without_face": len(missing), "photos_with_competing_faces": len(warned),
              "accuracy_10fold": acc, "accuracy_10fold_std": std, "accuracy_folds_6_10": acc_late,
              "tar_at_far_1e-2": tar_at_far(scores, same, 1e-2), "tar_at_far_1e-3": tar_at_far(scores, same, 1e-3),
              "auc": roc_auc(scores, same), "embed_seconds_this_run": round(seconds, 1),
              "without_face": [Path(p).name for p in missing][:50]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# LFW pairs.txt through the product's route\n\n"
        f"`python benchmarks/bench_lfw_route.py` (model fingerprint {embedder.fingerprint}, policy {args.select}): "
        "every photo of LFW's pairs.txt (ten folds) through FaceEmbedder's one route, the route `facemeta verify`, "
        "`enroll`, `identify` and `serve` use; a photo without a face scores -1.\n\n"
        "| figure | value |\n| --- | --- |\n"
        f"| 10-fold accuracy (all ten folds) | {100 * acc:.2f}% ± {100 * std:.2f} |\n"
        f"| accuracy, folds 6-10 (the model card's protocol, there on cached faces) | {100 * acc_late:.2f}% |\n"
        f"| TAR@FAR=1e-2 / 1e-3 | {100 * result['tar_at_far_1e-2']:.2f}% / {100 * result['tar_at_far_1e-3']:.2f}% |\n"
        f"| ROC AUC | {result['auc']:.5f} |\n"
        f"| photos / without a face / with two faces competing | {len(paths)} / {len(missing)} / {len(warned)} |\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
