"""The adapt and prepare stages of benchmarks/gpu_check.sh (see benchmarks/gpu_check.py): facemeta adapt's
procedure on the device at larger budgets, scored as `facemeta benchmark adapt` scores it, on aligned faces carried
from the CPU machine (``prepare`` writes them)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from gpu_common import ROOT, Budget, Part, device_of, sync

CARRY_PROTOCOLS = ("mfr2-mask", "thermal", "yaleb-side")


# ---------------------------------------------------------------- adapt
def carried(args) -> tuple[Path | None, dict[str, dict]]:
    """(base checkpoint, {protocol: aligned faces}) from --carry; (None, {}) when it holds none."""
    root = Path(args.carry)
    base = root / "base.safetensors"
    data = {}
    for p in sorted(root.glob("*.npz")) if root.is_dir() else []:
        with np.load(p) as z:
            data[p.stem] = {k: z[k] for k in z.files}
    return (base if base.is_file() else None), data


def synthetic_protocol(people: int, per: int, size: int) -> dict:
    """Random faces: `people` people with one enrolment photo and per - 1 target photos each (timing only)."""
    rng = np.random.default_rng(0)
    n = people * per
    return {"faces": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
            "people": np.repeat(np.array([f"p{i:03d}" for i in range(people)]), per),
            "conditions": np.tile(np.array([1] + [0] * (per - 1)), people)}


def subset(data: dict, people: int) -> dict:
    """The photos of the first `people` eligible people (a dry run's small protocol)."""
    from facemeta.experiments.adapt_bench import eligible_people

    keep = np.isin(data["people"], eligible_people(data)[:people])
    return {k: v[keep] for k, v in data.items()}


def adapt_grid(quick: bool) -> tuple[dict, tuple[int, ...], tuple[int, ...]]:
    """({name: AdaptSettings}, ks, seeds): the CPU default and larger budgets."""
    from facemeta.train.adapt import AdaptSettings as S

    if quick:
        return {"default-2steps": S(steps=2)}, (3,), (0,)
    return ({"default": S(), "steps300": S(steps=300), "t8-steps300": S(tail_blocks=8, steps=300),
             "t8-steps300-keep1": S(tail_blocks=8, steps=300, interpolate=1.0),
             "t8-steps1000-lr3e-5": S(tail_blocks=8, steps=1000, lr=3e-5)}, (10, 20), (0, 1, 2))


def device_views(device):
    """facemeta.train.adapt.draw_views with the random choice moved to the features' device (the product draws
    it on the CPU, where adapt runs); same draws, same procedure."""
    import torch

    def draw(feats, flipped, generator):
        pick = (torch.rand(len(feats), generator=generator) < 0.5).to(feats.device)
        return torch.where(pick.view(-1, *([1] * (feats.dim() - 1))), flipped, feats)

    return draw


def front_on(tail, faces: np.ndarray, device, batch: int = 256):
    """The frozen front over faces and mirror images, on `device` (facemeta.train.adapt.front_features there)."""
    import torch

    from facemeta.models.backbone import preprocess

    model = tail._model[0]
    out, flipped = [], []
    with torch.inference_mode():
        for i in range(0, len(faces), batch):
            x = preprocess(faces[i:i + batch], model.config).to(device)
            out.append(tail.front(x))
            flipped.append(tail.front(torch.flip(x, dims=[3])))
    return torch.cat(out).clone(), torch.cat(flipped).clone()


def vectors_on(tail, feats, flipped) -> np.ndarray:
    """adapt_bench.tail_vectors on the device: flip-TTA unit vectors from cached front features."""
    import torch
    import torch.nn.functional as F

    tail.eval()
    with torch.inference_mode():
        e = F.normalize(F.normalize(tail(feats), dim=1) + F.normalize(tail(flipped), dim=1), dim=1)
    return e.float().cpu().numpy()


def stats_only_np(vectors: np.ndarray, conditions: np.ndarray, adapt_idx: np.ndarray) -> np.ndarray:
    """adapt_bench.stats_only (each condition centred on its mean over the adapting people's photos, renormalised:
    facemeta.gallery.domain_stats, kind mean) in numpy here: facemeta.gallery imports FAISS, which the device
    machine does not have. tests/test_gpu_check.py checks that both give the same vectors."""
    out = vectors.astype(np.float32).copy()
    for c in (0, 1):
        mask = conditions == c
        mean = vectors[np.intersect1d(adapt_idx, np.flatnonzero(mask))].astype(np.float64).mean(axis=0)
        y = vectors[mask] - mean.astype(np.float32)
        out[mask] = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-6)  # domain_stats.EPS
    return out


def adapt_cell(model, data: dict, k: int, seed: int, settings, device) -> dict:
    """One adapt run on the device, scored as adapt_bench.run_cell scores it -> {base, stats-only, adapt}."""
    import copy

    import torch

    import facemeta.train.adapt as adapt
    from facemeta.experiments.adapt_bench import FAR, draw, score

    adapt_idx, other = draw(data, k, seed)
    sub = {key: data[key][other] for key in ("people", "conditions")}
    m = copy.deepcopy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(False)
    tail = adapt.Tail(m, settings.tail_blocks)
    for p in tail.parameters():
        p.requires_grad_(True)
    feats, flipped = front_on(tail, data["faces"], device)
    base = vectors_on(tail, feats, flipped)
    rows = {"base": score(base[other], **sub),
            "stats-only": score(stats_only_np(base, data["conditions"], adapt_idx)[other], **sub)}
    labels = torch.as_tensor(np.unique(data["people"][adapt_idx], return_inverse=True)[1]).long().to(device)
    ix = torch.as_tensor(adapt_idx, device=device)
    original = adapt.draw_views
    adapt.draw_views = device_views(device)  # restored below; only this process's module is touched
    try:
        sync(device)
        t0 = time.perf_counter()
        losses = adapt.fit_tail(tail, feats[ix], flipped[ix], labels, settings)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        adapt.draw_views = original
    v = vectors_on(tail, feats, flipped)
    thr = adapt.calibrate(v[adapt_idx], labels.cpu().numpy(), FAR)[0]
    rows["adapt"] = {**score(v[other], **sub, threshold=thr), "fit_seconds": round(seconds, 3),
                     "loss_first": losses[0], "loss_last": losses[-1]}
    return rows


def stage_adapt(args, out: Path) -> None:
    """Adapt at larger budgets on the carried protocols (or random faces: timings only)."""
    import torch

    device = device_of(args.device)
    base, protos = carried(args)
    grid, ks, seeds = adapt_grid(args.quick)
    if base is not None:
        from facemeta.models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(base)
        source = f"{base.name} (carried)"
    else:
        from facemeta.models.backbone import ModelConfig, build_model

        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="dlib_resnet29", head="linear", embedding_size=128,
                                        image_size=150)).eval()
        source = "dlib_resnet29, random weights (no carried base: timings only)"
    if not protos:
        protos = {"synthetic": synthetic_protocol(8 if args.quick else 40, 4, 150)}
    if args.quick:  # the first protocol, 8 of its people
        name, data = next(iter(protos.items()))
        protos = {name: subset(data, 8)}
    setup = {"base": source, "protocols": sorted(protos), "settings": {n: vars(s) for n, s in grid.items()},
             "ks": list(ks), "seeds": list(seeds), "device": str(device), "quick": args.quick}
    part = Part(out, "adapt", setup, args.fresh)
    budget = Budget(args.budget)
    from facemeta.experiments.adapt_bench import feasible

    for k in ks:  # k first, then settings: the smaller budgets of every protocol before the larger ones
        for name, settings in grid.items():
            for proto, data in protos.items():
                for seed in seeds:
                    key = f"{proto}/k{k}/{name}/s{seed}"
                    if part.has(key) or not feasible(data, k):
                        continue
                    if budget.over():
                        print(f"  budget spent before {key}", flush=True)
                        return
                    try:
                        rows = adapt_cell(model, data, k, seed, settings, device)
                        part.add(key, {"protocol": proto, "k": k, "setting": name, "seed": seed, "rows": rows,
                                       "synthetic": proto == "synthetic"})
                        a = rows["adapt"]
                        print(f"  {key}: TAR {a['tar']:.3f} (base {rows['base']['tar']:.3f}), fit {a['fit_seconds']} s",
                              flush=True)
                    except Exception as exc:  # keep going with the next cell
                        part.error(key, exc)


# ---------------------------------------------------------------- prepare (CPU machine)
def stage_prepare(args, out: Path) -> None:
    """Write --carry: base.safetensors (+ .json) of a single model and each protocol's aligned faces."""
    import shutil

    from facemeta.embedder import FaceEmbedder
    from facemeta.experiments.adapt_bench import aligned_protocol

    root = Path(args.carry)
    root.mkdir(parents=True, exist_ok=True)
    src = Path(args.model) if args.model else ROOT / "weights" / "default.safetensors"
    embedder = FaceEmbedder(src)
    if hasattr(embedder.model, "members"):
        raise SystemExit(f"{src} is an ensemble: pass --model with a single model (adapt fine-tunes one network)")
    shutil.copyfile(src, root / "base.safetensors")
    shutil.copyfile(src.with_suffix(".json"), root / "base.json")
    for proto in (args.protocols.split(",") if args.protocols else CARRY_PROTOCOLS):
        d = aligned_protocol(proto, embedder)
        np.savez_compressed(root / f"{proto}.npz", faces=d["faces"], people=d["people"], conditions=d["conditions"])
        print(f"{proto}: {len(d['faces'])} faces, {(root / f'{proto}.npz').stat().st_size / 2 ** 20:.1f} MiB")
