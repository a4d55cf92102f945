"""Scale the pair thresholds and margins of MFR and CDT to the prior's own geometry, on SOURCE faces only.

The meta methods' constants (MFR's hard-pair thresholds tau_p / tau_n, the triplet margin and the CDT margin)
were set for networks trained from random weights. dlib's encoder puts people at small angles (measured here:
same-person cosines about 0.95, different people about 0.84, medians), so with tau_n 0.3 every negative pair is
"hard", no positive is, and the margins are almost never met: the terms push the whole geometry, not its errors.

One rule for all four, fixed before any run: each constant is set so that the zero-shot prior's hardest
SHARE (default a tenth) of pairs or triplets counts as hard / violates the margin, measured on the training
identities of LFW people folds 1-5 (a source domain of every leave-one-out run; never a target):
- tau_p: the SHARE quantile of same-person cosines (positives below it are hard);
- tau_n: the 1 - SHARE quantile of different-person cosines (negatives above it are hard);
- triplet_margin: the SHARE quantile of d2(a, n_hardest) - d2(a, p) over batch-hard triplets of training-shaped
  batches (B identities x 2 images), clamped at 0;
- cdt_margin: the SHARE quantile of (n-term - p-term) of CDT's triplets of one batch in the covariance metric of
  another batch (facemeta.objectives.cdt), clamped at 0.

    python benchmarks/prior_geometry.py --out benchmarks/results/prior_geometry
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from results_files import machine, write_results


def batch_statistics(emb: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator, batches: int,
                     per_batch: int) -> dict[str, np.ndarray]:
    """Over `batches` training-shaped batches (`per_batch` identities drawn uniformly x 2 images, as the episodic
    sampler draws them): the same-person and different-person cosines of the gallery/probe pairs (MFR's M), the
    batch-hard triplet gaps d2(a, n_hardest) - d2(a, p), and the CDT gaps (n-term - p-term in the covariance
    metric of another such batch)."""
    from facemeta.objectives.cdt import pair_covariances

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        ids = rng.choice(len(groups), per_batch, replace=False)
        rows = [rng.choice(groups[i], 2, replace=False) for i in ids]
        idx = np.concatenate([[r[0] for r in rows], [r[1] for r in rows]])
        return torch.from_numpy(emb[idx]), torch.arange(per_batch).repeat(2)

    genuine, impostor, trip, cdt = [], [], [], []
    for _ in range(batches):
        (e, lab), (es, labs) = draw(), draw()
        m = (e[:per_batch] @ e[per_batch:].T).numpy()
        genuine.append(np.diag(m))
        impostor.append(m[~np.eye(per_batch, dtype=bool)])
        d2 = torch.cdist(e, e).pow(2)
        same = lab[:, None] == lab[None, :]
        eye = torch.eye(len(lab), dtype=torch.bool)
        pos = d2.masked_fill(~(same & ~eye), float("-inf")).amax(1)
        neg = d2.masked_fill(same, float("inf")).amin(1)
        trip.append((neg - pos).numpy())
        cov_pos, cov_neg = pair_covariances(es, labs)
        valid = torch.nonzero((same & ~eye).unsqueeze(2) & (~same).unsqueeze(1))
        dp, dn = e[valid[:, 0]] - e[valid[:, 1]], e[valid[:, 0]] - e[valid[:, 2]]
        cdt.append((((dn @ cov_neg) * dn).sum(-1) - ((dp @ cov_pos) * dp).sum(-1)).numpy())
    return {k: np.concatenate(v) for k, v in
            (("genuine", genuine), ("impostor", impostor), ("triplet", trip), ("cdt", cdt))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="prior-styled", help="bench preset whose zero-shot run is the prior")
    ap.add_argument("--share", type=float, default=0.1, help="share of the prior's pairs / triplets counted hard")
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/prior_geometry")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from facemeta.eval.benchmark import embed_rows
    from facemeta.experiments.presets import ZERO_SHOT, load_bench_preset, run_config, run_dir
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.train.data import prepare_data

    preset = load_bench_preset(args.preset)
    target = preset.targets[0]
    prior_path = run_dir(preset, target, ZERO_SHOT, preset.seeds[0]) / "model.safetensors"
    if not prior_path.is_file():
        print(f"no zero-shot run at {prior_path}: run `facemeta benchmark {preset.name} --methods teacher` first",
              file=sys.stderr)
        return 1
    cfg = run_config(preset, target, "erm", preset.seeds[0])
    rows = [r for r in prepare_data(cfg).train if r.domain == "lfw"]
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_name[r.identity].append(i)
    groups = [np.asarray(v) for v in by_name.values() if len(v) >= 2]
    model, _ = load_checkpoint(prior_path)
    emb = embed_rows(model, rows, flip=False).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    got = batch_statistics(emb, groups, np.random.default_rng(args.seed), args.batches,
                           cfg.sampler.identities_per_domain)
    genuine, impostor, trip, cdt = got["genuine"], got["impostor"], got["triplet"], got["cdt"]

    s = args.share
    chosen = {"tau_p": float(np.quantile(genuine, s)), "tau_n": float(np.quantile(impostor, 1 - s)),
              "triplet_margin": max(0.0, float(np.quantile(trip, s))), "cdt_margin": max(0.0, float(np.quantile(cdt, s)))}
    old = {k: getattr(cfg.meta, k) for k in chosen}
    hard_now = {"tau_p": float((genuine < old["tau_p"]).mean()), "tau_n": float((impostor > old["tau_n"]).mean()),
                "triplet_margin": float((trip < old["triplet_margin"]).mean()),
                "cdt_margin": float((cdt < old["cdt_margin"]).mean())}
    stats = {"genuine_cos": [float(np.quantile(genuine, q)) for q in (0.1, 0.5, 0.9)],
             "impostor_cos": [float(np.quantile(impostor, q)) for q in (0.1, 0.5, 0.9)],
             "triplet_gap": [float(np.quantile(trip, q)) for q in (0.1, 0.5, 0.9)],
             "cdt_gap": [float(np.quantile(cdt, q)) for q in (0.1, 0.5, 0.9)]}
    lines = [f"# MFR / CDT constants scaled to the prior's geometry (share {s:g}, LFW people folds 1-5)", "",
             f"Machine: {machine()}. Prior: `{prior_path}` (zero-shot). {len(rows)} training faces of "
             f"{len(groups)} LFW identities with 2+ images (folds 1-5, held-out identities excluded; never a "
             f"target); {args.batches} training-shaped batches of {cfg.sampler.identities_per_domain} identities x 2 "
             f"images (seed {args.seed}): {len(genuine)} same-person and {len(impostor)} different-person "
             "gallery/probe pairs, the triplets of each batch.", "",
             "| quantity | 10% | 50% | 90% |", "| --- | --- | --- | --- |"]
    for k, v in stats.items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.4f}" for x in v) + " |")
    lines += ["", "| constant | from-scratch value | share of the prior's pairs/triplets hard at it | chosen |",
              "| --- | --- | --- | --- |"]
    for k in chosen:
        lines.append(f"| {k} | {old[k]:g} | {hard_now[k]:.3f} | {chosen[k]:.4f} |")
    write_results(Path(args.out), {"preset": preset.name, "prior": str(prior_path), "share": s, "stats": stats,
                                   "old": old, "hard_at_old": hard_now, "chosen": chosen, "machine": machine()},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
