"""The unseen-domain benchmark of DESIGN.md: leave one domain out, every method, every seed.

For each target T in {yaleb, orl, mfr2}: train on LFW people.txt folds 1-5 plus the other two
small sets (three source domains), then evaluate on all of T (every same-identity pair positive,
every cross-identity pair negative; MFR2 also on its own pairs.txt) and on LFW pairs.txt folds
6-10 (identity-disjoint from training, in-domain). Every method gets the same training preset
(backbone, data, image size, augmentation, steps and images per step), so the budget in images
seen is the same (facemeta.train.methods).

A benchmark preset (facemeta/configs/bench/<name>.yaml, or a file) names the training preset and
its overrides, the methods, targets and seeds, and caps for quick runs. Runs are resumable: a run
whose result.json exists is skipped, a run with a training state is resumed.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemeta.data.manifest import first_per_identity
from facemeta.errors import ConfigError
from facemeta.train.config import (
    LODO_TARGETS,
    PRESET_DIR,
    apply_overrides,
    config_from_dict,
    leave_one_out,
    read_yaml,
    resolve_config_path,
)

BENCH_DIR = PRESET_DIR / "bench"
# The benchmark row of the starting weights themselves (no training step; the prior zero-shot). It is the same
# for every seed, so it runs once, with the first seed.
ZERO_SHOT = "teacher"
METRICS = ("tar@far=1e-2", "tar@far=1e-3", "auc", "rank1")
ROC_GRID = np.logspace(-5, 0, 101)


@dataclass
class BenchPreset:
    """A benchmark preset.

    train: training preset (name or path) every run starts from; overrides: dotted settings applied
    to it after the leave-one-out rewrite; sources: per-set source settings (caps) applied after
    the rewrite too (``{lfw: {max_identities: 40}}``); methods, targets, seeds: the grid;
    target_limit_per_identity: first k images per identity of the target (null: all);
    lfw_pairs_per_fold: first k pairs of each LFW folds 6-10 half (same and different; null: all 300);
    runs: folder for the training runs (checkpoints; not committed); flip: test-time flip.
    """

    name: str = ""
    train: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["erm", "mfr", "cdt", "maml-fo", "reptile"])
    targets: list[str] = field(default_factory=lambda: list(LODO_TARGETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    target_limit_per_identity: int | None = None
    lfw_pairs_per_fold: int | None = None
    runs: str = "runs/bench"
    flip: bool = True


def load_bench_preset(name_or_path: str) -> BenchPreset:
    """Read a benchmark preset: a YAML path or a name in facemeta/configs/bench/ (ConfigError if bad)."""
    from facemeta.train.methods import METHODS

    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = BENCH_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in BENCH_DIR.glob("*.yaml"))
        raise ConfigError(f"no benchmark preset named '{name_or_path}' (presets: {', '.join(names)})")
    data = read_yaml(path)
    known = set(BenchPreset.__dataclass_fields__)
    for key in data:
        if key not in known:
            raise ConfigError(f"benchmark preset {path.name}: unknown key '{key}' (allowed: {', '.join(sorted(known))})")
    data.setdefault("name", path.stem)
    preset = BenchPreset(**data)
    check_grid(preset.methods, preset.targets, preset.seeds, (*METHODS, ZERO_SHOT))
    resolve_config_path(preset.train)
    return preset


def check_grid(methods: list[str], targets: list[str], seeds: list[int], known: tuple[str, ...]) -> None:
    """ConfigError naming the first unknown method or target, or a bad seed."""
    for m in methods:
        if m not in known:
            raise ConfigError(f"unknown method '{m}' (methods: {', '.join(known)})")
    for t in targets:
        if t not in LODO_TARGETS:
            raise ConfigError(f"unknown target '{t}' (targets: {', '.join(LODO_TARGETS)})")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"seeds must be integers >= 0, got {s!r}")
    if not methods or not targets or not seeds:
        raise ConfigError("the benchmark grid is empty (methods, targets and seeds each need one entry)")


def run_dir(preset: BenchPreset, target: str, method: str, seed: int) -> Path:
    """Training folder of one run."""
    return Path(preset.runs) / preset.name / target / method / f"seed{seed}"


def run_config(preset: BenchPreset, target: str, method: str, seed: int, data_root: str | None = None):
    """The TrainConfig of one run: the training preset, left-one-out for `target`, with the overrides."""
    data = read_yaml(resolve_config_path(preset.train))
    data.setdefault("name", f"{preset.name}-{target}-{method}-s{seed}")
    data = leave_one_out(data, target)
    for spec in data["data"]["sources"]:
        spec.update(copy.deepcopy(preset.sources.get(spec["set"], {})))
    over = dict(preset.overrides)
    over.update({"method": method, "seed": seed, "output": str(run_dir(preset, target, method, seed))})
    if method == ZERO_SHOT:  # the starting weights, calibrated, no step taken
        over.update({"method": "erm", "steps": 0})
    if data_root:
        over["data.root"] = data_root
    return config_from_dict(apply_overrides(data, over))


def _lfw_pairs(k: int | None) -> list:
    """LFW pairs.txt folds 6-10 (the first k same and k different pairs of each fold when k is set)."""
    from facemeta.data.sets import read_pairs

    pairs = [p for p in read_pairs("lfw") if p.fold >= 6]
    if k is None:
        return pairs
    out, count = [], {}
    for p in pairs:
        key = (p.fold, p.same)
        if count.get(key, 0) < k:
            count[key] = count.get(key, 0) + 1
            out.append(p)
    return out


def evaluate_run(model_path: Path, cfg, preset: BenchPreset, target: str) -> dict[str, Any]:
    """Metrics of one trained model on its unseen target (and MFR2's pairs) and LFW folds 6-10."""
    from facemeta.align.pipeline import aligned_set
    from facemeta.data.sets import read_pairs
    from facemeta.eval.benchmark import evaluate_rows
    from facemeta.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(model_path)
    size, chip, root, cache = cfg.data.align_size, cfg.data.align_chip, cfg.data.root, cfg.data.cache
    out: dict[str, Any] = {}
    rows = first_per_identity(aligned_set(target, size, data=root, cache=cache, chip=chip),
                              preset.target_limit_per_identity)
    out[target] = evaluate_rows(model, rows, flip=preset.flip)
    if target == "mfr2":
        out["mfr2-pairs"] = evaluate_rows(model, rows, pairs=read_pairs("mfr2", root), flip=preset.flip)
    pairs, lfw_rows = _lfw_eval_rows(preset.lfw_pairs_per_fold, root, cache, size, cfg.data.align_workers, chip)
    out["lfw"] = evaluate_rows(model, lfw_rows, pairs=pairs, flip=preset.flip)
    return out


@functools.lru_cache(maxsize=4)
def _lfw_eval_rows(k: int | None, root: str | None, cache: str | None, size: int, workers: int,
                   chip: str = "arcface") -> tuple[list, list]:
    """LFW folds 6-10 pairs and their aligned rows, aligned (cached) once per process, not once per run."""
    from facemeta.align.pipeline import align_rows, aligned_dir
    from facemeta.data.sets import read_set

    pairs = _lfw_pairs(k)
    wanted = {Path(p).stem for pr in pairs for p in (pr.a, pr.b)}
    raw = [r for r in read_set("lfw", root) if Path(r.path).stem in wanted]
    rows, _ = align_rows(raw, aligned_dir("lfw", size, chip, cache), size=size, workers=workers,
                         progress=False, chip=chip)
    return pairs, rows


def run_one(preset: BenchPreset, target: str, method: str, seed: int, data_root: str | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; returns its result (cached in result.json)."""
    from facemeta.atomic import atomic_write
    from facemeta.train.trainer import STATE_FILE, Trainer

    folder = run_dir(preset, target, method, seed)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    cfg = run_config(preset, target, method, seed, data_root)
    t0 = time.perf_counter()
    final = folder / "model.safetensors"
    if not final.is_file():
        resume = (folder / "checkpoints" / STATE_FILE).is_file()
        final = Trainer(cfg, resume=resume, progress=progress).fit()
    t_train = time.perf_counter() - t0
    metrics = evaluate_run(final, cfg, preset, target)
    result = {"target": target, "method": method, "seed": seed, "train_seconds": t_train,
              "eval_seconds": time.perf_counter() - t0 - t_train, "steps": cfg.steps,
              "images_seen": cfg.steps * len(cfg.data.sources) * cfg.sampler.identities_per_domain * 2,
              "metrics": metrics}
    with atomic_write(done) as fh:
        json.dump(result, fh, indent=1)
    return result


def grid(preset: BenchPreset) -> list[tuple[str, str, int]]:
    """(target, method, seed) of every run of the preset; the zero-shot row runs with the first seed only."""
    return [(t, m, s) for t in preset.targets for m in preset.methods
            for s in (preset.seeds[:1] if m == ZERO_SHOT else preset.seeds)]


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


def _mean_roc(curves: list[dict[str, list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' ROC curves averaged on a log-spaced FAR grid (step interpolation)."""
    tars = []
    for c in curves:
        far, tar = np.asarray(c["far"]), np.asarray(c["tar"])
        idx = np.searchsorted(far, ROC_GRID, side="right") - 1
        tars.append(np.where(idx >= 0, tar[np.clip(idx, 0, None)], 0.0))
    return ROC_GRID, np.mean(tars, axis=0)


def write_summary(preset: BenchPreset, results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """results.md (mean ± std per target and metric, best in bold), results.json and roc-<target>.png."""
    from facemeta.atomic import atomic_write
    from facemeta.eval.report import markdown_table, plot_roc

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in results))
    targets = list(dict.fromkeys(r["target"] for r in results))
    table: dict[str, Any] = {}
    lines = [f"# Unseen-domain benchmark: preset `{preset.name}`", "",
             "Leave one domain out (DESIGN.md): train on LFW people.txt folds 1-5 + the other two of "
             "{yaleb, orl, mfr2}; test on all of the left-out target (all pairs) and LFW pairs.txt folds 6-10. "
             f"Mean ± sample std over seeds {sorted({r['seed'] for r in results})}; best mean per column in bold. "
             "Every method: same backbone, data, augmentation, steps and images per step.", ""]
    per_method_mean: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    for t in targets:
        rows: dict[str, dict[str, list[float]]] = {}
        sets = [t] + (["mfr2-pairs"] if t == "mfr2" else []) + ["lfw"]
        curves: dict[str, tuple] = {}
        no_roc: list[str] = []
        for m in methods:
            runs = [r for r in results if r["target"] == t and r["method"] == m]
            cells: dict[str, list[float]] = {}
            for s in sets:
                keys = list(METRICS) + (["acc"] if s != t else [])
                for k in keys:
                    cells[f"{s} {k}"] = [r["metrics"][s].get(k) for r in runs if s in r["metrics"]]
            rows[m] = cells
            for r in runs:
                per_method_mean[m].setdefault(r["seed"], []).append(r["metrics"][t]["tar@far=1e-2"])
            if runs and all("roc" in r["metrics"][t] for r in runs):
                curves[m] = _mean_roc([r["metrics"][t]["roc"] for r in runs])
            elif runs:  # e.g. a result.json rebuilt from a results.json, which keeps no ROC points
                no_roc.append(m)
        table[t] = rows
        cols = list(next(iter(rows.values())))
        lines += [f"## Target {t}", "", markdown_table(rows, columns=cols, digits=3), ""]
        if curves:
            plot_roc(curves, out_dir / f"roc-{t}.png", title=f"unseen target {t} (mean over seeds)", far_min=1e-5)
            lines += [f"![ROC {t}](roc-{t}.png)", ""]
        if no_roc:
            lines += [f"ROC curve not drawn for {', '.join(no_roc)}: some of its runs carry no ROC points.", ""]
    # the goal metric: mean TAR@FAR=1e-2 over the unseen targets, per seed, then mean ± std over seeds
    goal = {m: {"mean TAR@FAR=1e-2 over targets": [float(np.mean(v)) for _, v in sorted(per_method_mean[m].items())
                                                   if len(v) == len(targets)]} for m in methods}
    lines += ["## Mean over the unseen targets", "",
              markdown_table(goal, digits=3), ""]
    if "erm" in goal:
        base = goal["erm"]["mean TAR@FAR=1e-2 over targets"]
        for m in methods:
            vals = goal[m]["mean TAR@FAR=1e-2 over targets"]
            if m in ("erm", ZERO_SHOT) or not vals or not base:
                continue
            diff = float(np.mean(vals) - np.mean(base))
            spread = max(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                         float(np.std(base, ddof=1)) if len(base) > 1 else 0.0)
            if len(vals) < 2 or len(base) < 2:
                verdict = "one seed only: no spread over seeds to judge by"
            elif diff > spread:
                verdict = "beats ERM by more than the spread over seeds"
            else:
                verdict = "does NOT beat ERM by more than the spread over seeds"
            lines.append(f"- {m}: {diff:+.3f} vs ERM (spread {spread:.3f}): {verdict}.")
        lines.append("")
    if ZERO_SHOT in methods:
        lines += [f"Against the zero-shot starting weights (`{ZERO_SHOT}`), TAR@FAR=1e-2 per target "
                  "(mean over seeds):", ""]
        for m in methods:
            if m == ZERO_SHOT:
                continue
            parts, below = [], []
            for t in targets:
                mine = [r["metrics"][t]["tar@far=1e-2"] for r in results if r["target"] == t and r["method"] == m]
                ref = [r["metrics"][t]["tar@far=1e-2"] for r in results
                       if r["target"] == t and r["method"] == ZERO_SHOT]
                if mine and ref:
                    diff = float(np.mean(mine) - np.mean(ref))
                    parts.append(f"{t} {diff:+.3f}")
                    if diff < 0:
                        below.append(t)
            verdict = f"below the teacher on {', '.join(below)}" if below else "not below the teacher on any target"
            lines.append(f"- {m}: {', '.join(parts)}: {verdict}.")
        lines.append("")
    summary = {"preset": preset.name, "train_preset": preset.train, "overrides": preset.overrides,
               "sources": preset.sources, "runs": [{k: v for k, v in r.items() if k != "metrics"} |
                                                   {"metrics": _strip_roc(r["metrics"])} for r in results],
               "table": table, "goal": goal}
    with atomic_write(out_dir / "results.json") as fh:
        json.dump(summary, fh, indent=1)
    with atomic_write(out_dir / "results.md") as fh:
        fh.write("\n".join(lines))
    return summary


def _strip_roc(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the ROC point lists (they go into the PNGs; keeps results.json small)."""
    return {s: {k: v for k, v in d.items() if k != "roc"} for s, d in metrics.items()}
