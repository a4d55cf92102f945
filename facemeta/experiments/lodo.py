"""The unseen-domain benchmark of DESIGN.md: leave one domain out, every method, every seed.

For each target T in {yaleb, orl, mfr2}: train on LFW people.txt folds 1-5 plus the other two
small sets (three source domains), then evaluate on all of T (every same-identity pair positive,
every cross-identity pair negative; MFR2 also on its own pairs.txt) and on LFW pairs.txt folds
6-10 (identity-disjoint from training, in-domain). Every method gets the same training preset
(backbone, data, image size, augmentation, steps and images per step), so the budget in images
seen is the same (facemeta.train.methods).

Runs are resumable: a run whose result.json exists is skipped, a run with a training state is resumed.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facemeta.align.cache import RowSelection, prepare_set
from facemeta.experiments.presets import BenchPreset, grid, run_config, run_dir
from facemeta.experiments.summary import write_summary
from facemeta.train.data import prepare_data


def _lfw_pairs(k: int | None, root: str | None = None) -> list:
    """LFW pairs.txt folds 6-10 (the first k same and k different pairs of each fold when k is set)."""
    from facemeta.data.sets import read_pairs

    pairs = [p for p in read_pairs("lfw", root) if p.fold >= 6]
    if k is None:
        return pairs
    out, count = [], {}
    for p in pairs:
        key = (p.fold, p.same)
        if count.get(key, 0) < k:
            count[key] = count.get(key, 0) + 1
            out.append(p)
    return out


def evaluate_run(model_path: Path, cfg, preset: BenchPreset, target: str, given: bool = False) -> dict[str, Any]:
    """Metrics of one model (a single one or an ensemble) on its unseen target (and MFR2's pairs) and LFW folds
    6-10. A model trained by the run reads the run's chip (cfg.data), a `given` checkpoint the chip it records;
    an ensemble's members read their own chips of the same faces (a face counts when every chip was aligned)."""
    from facemeta.data.sets import read_pairs
    from facemeta.models.ensemble import load_model

    model, meta = load_model(model_path)
    root, cache, workers = cfg.data.root, cfg.data.cache, cfg.data.align_workers
    if hasattr(model, "chips"):
        chips = model.chips
    elif given:
        chips = [(str(meta.get("align_chip", "arcface")), int(meta.get("align_size", 112)))]
    else:
        chips = [(cfg.data.align_chip, cfg.data.align_size)]
    out: dict[str, Any] = {}
    rows = _matched([prepare_set(target, size, chip, RowSelection(limit_per_identity=preset.target_limit_per_identity),
                                 root, cache, workers)[0] for chip, size in chips])
    out[target] = _evaluate(model, rows, None, preset.flip)
    if target == "mfr2":
        out["mfr2-pairs"] = _evaluate(model, rows, read_pairs("mfr2", root), preset.flip)
    pairs = _lfw_pairs(preset.lfw_pairs_per_fold, root)
    lfw_rows = _matched([_lfw_eval_rows(preset.lfw_pairs_per_fold, root, cache, size, workers, chip)[1]
                         for chip, size in chips])
    out["lfw"] = _evaluate(model, lfw_rows, pairs, preset.flip)
    return out


@functools.lru_cache(maxsize=4)
def _lfw_eval_rows(k: int | None, root: str | None, cache: str | None, size: int, workers: int,
                   chip: str = "arcface") -> tuple[list, list]:
    """LFW folds 6-10 pairs and their aligned rows, aligned (cached) once per process, not once per run."""
    pairs = _lfw_pairs(k, root)
    rows, _ = prepare_set("lfw", size, chip, RowSelection(pairs=pairs), root, cache, workers)
    return pairs, rows


def _matched(per_chip: list[list]) -> list[list]:
    """Aligned rows of one set on each chip -> the rows of the faces aligned on every chip, in the first chip's
    order (matched by source photo); one chip: its rows as they are."""
    if len(per_chip) == 1:
        return per_chip
    keys = [{r.get("source", r.path): r for r in rows} for rows in per_chip]
    common = [k for k in keys[0] if all(k in other for other in keys[1:])]
    return [[chip_rows[k] for k in common] for chip_rows in keys]


def _evaluate(model, rows_per_chip: list[list], pairs, flip: bool) -> dict[str, Any]:
    """facemeta.eval.benchmark.evaluate_rows for a single model, or for an ensemble on its members' embeddings of
    the same faces (combined as the ensemble combines them)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from facemeta.eval.benchmark import embed_rows, evaluate_rows

    if not hasattr(model, "chips"):
        return evaluate_rows(model, rows_per_chip[0], pairs=pairs, flip=flip)
    t0 = time.perf_counter()
    parts = [torch.from_numpy(embed_rows(m, rows, flip=flip)) for m, rows in zip(model.members, rows_per_chip,
                                                                                 strict=True)]
    emb = F.normalize(model.combine(parts), dim=1).numpy().astype(np.float32)
    seconds = time.perf_counter() - t0
    out = evaluate_rows(model.members[0], rows_per_chip[0], pairs=pairs, flip=flip, embeddings=emb)
    out.update({"backbone": "+".join(m.config.backbone for m in model.members),
                "image_size": [size for _, size in model.chips], "chips": [c for c, _ in model.chips],
                "embed_seconds": seconds, "images_per_s": len(emb) / seconds if seconds > 0 else None})
    return out


def run_one(preset: BenchPreset, target: str, method: str, seed: int, data_root: str | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; returns its result (cached in result.json)."""
    from facemeta.atomic import atomic_write
    from facemeta.errors import CheckpointError
    from facemeta.train.state import STATE_FILE
    from facemeta.train.trainer import Trainer

    folder = run_dir(preset, target, method, seed)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    given = method in preset.checkpoints  # a zero-shot row of a given checkpoint: evaluated, not trained
    final = Path(preset.checkpoints[method]) if given else folder / "model.safetensors"
    if given and not final.is_file():
        raise CheckpointError(f"benchmark row {method}: checkpoint {final} not found (the preset's `checkpoints` "
                              "says how it is made)")
    cfg = run_config(preset, target, "erm" if given else method, seed, data_root)  # given: its data settings only
    steps = 0 if given else cfg.steps
    t0 = time.perf_counter()
    if not final.is_file():
        resume = (folder / "checkpoints" / STATE_FILE).is_file()
        final = Trainer(cfg, prepare_data(cfg), resume=resume, progress=progress).fit()
    t_train = time.perf_counter() - t0
    metrics = evaluate_run(final, cfg, preset, target, given)
    result = {"target": target, "method": method, "seed": seed, "train_seconds": t_train,
              "eval_seconds": time.perf_counter() - t0 - t_train, "steps": steps,
              "images_seen": steps * len(cfg.data.sources) * cfg.sampler.identities_per_domain * 2,
              "metrics": metrics}
    with atomic_write(done) as fh:
        json.dump(result, fh, indent=1)
    return result


def finished_results(preset: BenchPreset) -> list[dict[str, Any]]:
    """The results of the runs of the grid that have finished (their result.json), in grid order."""
    out = []
    for t, m, s in grid(preset):
        done = run_dir(preset, t, m, s) / "result.json"
        if done.is_file():
            out.append(json.loads(done.read_text(encoding="utf-8")))
    return out


def run_benchmark(preset: BenchPreset, out_dir: Path, data_root: str | None = None,
                  log: Callable[[str], None] = print, progress: bool = False) -> dict[str, Any]:
    """Every (target, method, seed) run of the preset, then the summary files in out_dir."""
    cells = grid(preset)
    results = []
    t0 = time.perf_counter()
    for i, (t, m, s) in enumerate(cells, 1):
        cached = (run_dir(preset, t, m, s) / "result.json").is_file()
        log(f"[{i}/{len(cells)}] target={t} method={m} seed={s}" + (" (done, skipped)" if cached else " ..."))
        r = run_one(preset, t, m, s, data_root, progress)
        results.append(r)
        if not cached:
            tar = r["metrics"][t].get("tar@far=1e-2")
            log(f"    {t} TAR@FAR=1e-2 {tar:.3f}  train {r['train_seconds']:.0f}s  eval {r['eval_seconds']:.0f}s  "
                f"(elapsed {time.perf_counter() - t0:.0f}s)")
    return write_summary(preset, results, out_dir)
