"""Benchmark presets of the unseen-domain benchmark: the grid of (target, method, seed) runs and the
TrainConfig of each (the training preset, left one domain out, with the preset's overrides).

A benchmark preset (facemeta/configs/bench/<name>.yaml, or a file) names the training preset and
its overrides, the methods, targets and seeds, and caps for quick runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemeta.errors import ConfigError
from facemeta.train.config import (
    LODO_TARGETS,
    PRESET_DIR,
    apply_overrides,
    config_from_dict,
    leave_one_out,
    read_preset,
    read_yaml,
    resolve_config_path,
)
from facemeta.train.methods import METHODS

BENCH_DIR = PRESET_DIR / "bench"
# The benchmark row of the starting weights themselves (no training step; the prior zero-shot). It is the same
# for every seed, so it runs once, with the first seed.
ZERO_SHOT = "teacher"


@dataclass
class BenchPreset:
    """A benchmark preset.

    train: training preset (name or path) every run starts from; overrides: dotted settings applied
    to it after the leave-one-out rewrite; sources: per-set source settings (caps) applied after
    the rewrite too (``{lfw: {max_identities: 40}}``); methods, targets, seeds: the grid;
    target_limit_per_identity: first k images per identity of the target (null: all);
    lfw_pairs_per_fold: first k pairs of each LFW folds 6-10 half (same and different; null: all 300);
    runs: folder for the training runs (checkpoints; not committed); flip: test-time flip;
    extra_sources: synthetic source specs (``{set: lfw, style: harsh_light}``, facemeta.data.styles) added to
    every run's sources; one made from the run's target is left out;
    method_overrides: dotted settings for one method's runs only, applied after ``overrides``
    (``{cdt: {meta.alpha: 0.0}}``: a setting chosen for that method, e.g. by benchmarks/heldout_select.py);
    checkpoints: zero-shot rows of given checkpoint files, name -> path (a single model or an ensemble, read with
    facemeta.models.ensemble.load_model; each on its own chips): evaluated on each target, never trained, once
    per target like ``teacher``; a row runs only when its name is in ``methods``.
    """

    name: str = ""
    train: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(METHODS.names()))  # every registered method
    targets: list[str] = field(default_factory=lambda: list(LODO_TARGETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    target_limit_per_identity: int | None = None
    lfw_pairs_per_fold: int | None = None
    runs: str = "runs/bench"
    flip: bool = True
    extra_sources: list[dict[str, Any]] = field(default_factory=list)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)


def load_bench_preset(name_or_path: str) -> BenchPreset:
    """Read a benchmark preset: a YAML path or a name in facemeta/configs/bench/ (ConfigError if bad)."""
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
    for name, ckpt in preset.checkpoints.items():
        if name in METHODS or name == ZERO_SHOT or not isinstance(ckpt, str) or not ckpt:
            raise ConfigError(f"benchmark preset {path.name}: checkpoints takes a row name that is not a method "
                              f"and a checkpoint path, got {name!r}: {ckpt!r}")
    check_grid(preset.methods, preset.targets, preset.seeds, known_methods(preset))
    for method, over in preset.method_overrides.items():
        if method not in METHODS or not isinstance(over, dict):
            raise ConfigError(f"benchmark preset {path.name}: method_overrides takes a method of "
                              f"{', '.join(METHODS)} and a mapping of settings, got {method!r}: {over!r}")
    resolve_config_path(preset.train)
    return preset


def known_methods(preset: BenchPreset) -> tuple[str, ...]:
    """The row names a preset's grid may hold: the training methods, the zero-shot teacher, its checkpoints."""
    return (*METHODS, ZERO_SHOT, *preset.checkpoints)


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
    data = read_preset(preset.train)
    data.setdefault("name", f"{preset.name}-{target}-{method}-s{seed}")
    if preset.extra_sources:
        section = data.setdefault("data", {})
        section["sources"] = [*section.get("sources", []), *copy.deepcopy(preset.extra_sources)]
    data = leave_one_out(data, target)  # keeps styled sources, except one made from the target
    for spec in data["data"]["sources"]:
        if not spec.get("style"):
            spec.update(copy.deepcopy(preset.sources.get(spec["set"], {})))
    over = {**preset.overrides, **preset.method_overrides.get(method, {})}
    over.update({"method": method, "seed": seed, "output": str(run_dir(preset, target, method, seed))})
    if method == ZERO_SHOT:  # the starting weights, calibrated, no step taken
        over.update({"method": "erm", "steps": 0})
    if data_root:
        over["data.root"] = data_root
    return config_from_dict(apply_overrides(data, over))


def grid(preset: BenchPreset) -> list[tuple[str, str, int]]:
    """(target, method, seed) of every run of the preset; zero-shot rows (the teacher, the checkpoints) run with
    the first seed only."""
    return [(t, m, s) for t in preset.targets for m in preset.methods
            for s in (preset.seeds[:1] if m == ZERO_SHOT or m in preset.checkpoints else preset.seeds)]
