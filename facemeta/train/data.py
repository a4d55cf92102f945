"""A run's source data, prepared before its Trainer is built: read each source set, keep what the config
selects, align it into the cache, and split identities into training and held-out parts.

The caller prepares the data and hands it to the Trainer (``Trainer(cfg, prepare_data(cfg))``); under
torchrun every process prepares it, and the aligned cache's lock lets one process align while the others
wait and then read what it wrote.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from facemeta.align.cache import RowSelection, group_by_identity, prepare_set
from facemeta.data.manifest import ManifestRow
from facemeta.errors import ConfigError
from facemeta.train.config import SourceSpec, TrainConfig


@dataclass
class SourceData:
    """Aligned rows of the source domains, split by identity into training and held-out parts."""

    train: list[ManifestRow]
    heldout: list[ManifestRow]
    failures: dict[str, int]

    def summary(self) -> dict[str, Any]:
        """Counts per domain (identities, images) of both parts, for logs and checkpoint meta."""
        out: dict[str, Any] = {}
        for part, rows in (("train", self.train), ("heldout", self.heldout)):
            per: dict[str, dict[str, Any]] = defaultdict(lambda: {"identities": set(), "images": 0})
            for r in rows:
                per[r.domain]["identities"].add(r.identity)
                per[r.domain]["images"] += 1
            out[part] = {d: {"identities": len(v["identities"]), "images": v["images"]} for d, v in sorted(per.items())}
        out["alignment_failures"] = dict(self.failures)
        return out


def source_selection(spec: SourceSpec) -> RowSelection:
    """The rows of its set a source spec asks for: people folds, min images, size caps."""
    return RowSelection(people_folds=tuple(spec.people_folds) if spec.people_folds else None,
                        min_images=spec.min_images, max_identities=spec.max_identities,
                        limit_per_identity=spec.limit_per_identity)


def heldout_identities(names: list[str], fraction: float, minimum: int, keep: int) -> set[str]:
    """Identities held out of training: a fixed hash order (same for every seed and method)."""
    n = max(minimum, int(round(fraction * len(names))))
    n = min(n, len(names) - keep)
    if n < 2:
        return set()
    ordered = sorted(names, key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    return set(ordered[:n])


def prepare_data(cfg: TrainConfig, progress: bool = False) -> SourceData:
    """Align (cached) the source domains' selected images and split identities train / held-out.

    Images are read, selected and aligned by facemeta.align.cache.prepare_set (the one data preparation);
    identities with fewer than `min_images` aligned images are dropped. Identity names are made
    set-qualified (``lfw/Name``) so classes of different sets never merge; a styled domain of a set
    (``lfw+mask``, facemeta.data.styles) shares its set's classes, holds out nobody itself, and
    trains nobody held out of that set.
    """
    train: list[ManifestRow] = []
    heldout: list[ManifestRow] = []
    failures: dict[str, int] = {}
    keep = cfg.sampler.identities_per_domain
    held_of_set: dict[str, set[str]] = defaultdict(set)  # people held out of each set, over all its specs
    # natural domains first: a styled domain's people are those of its set minus everyone held out of that set
    for spec in sorted(cfg.data.sources, key=lambda s: s.style is not None):
        aligned, failed = prepare_set(spec.set, cfg.data.align_size, cfg.data.align_chip, source_selection(spec),
                                      cfg.data.root, cfg.data.cache, cfg.data.align_workers, progress)
        failures[spec.domain] = len(failed)
        groups = {n: g for n, g in group_by_identity(aligned).items() if len(g) >= spec.min_images}
        held = heldout_identities(sorted(groups), cfg.eval.heldout_fraction, cfg.eval.min_heldout, keep)
        if spec.style:  # synthetic: validation and calibration stay on real faces; nobody held out is trained
            held = held | held_of_set[spec.set]
        held_of_set[spec.set] |= held
        if len(groups) - len(held) < keep:
            raise ConfigError(f"data.sources: {spec.domain} has {len(groups) - len(held)} training identities with "
                              f">= {spec.min_images} aligned images; sampler.identities_per_domain={keep} needs more")
        for name in sorted(groups):
            for r in groups[name]:
                # one class per person: a styled domain shares its set's identity names
                extra = {**r.extra, "style": spec.style} if spec.style else dict(r.extra)
                row = ManifestRow(r.path, f"{spec.set}/{name}", spec.domain, extra)
                if name not in held:
                    train.append(row)
                elif not spec.style:
                    heldout.append(row)
    return SourceData(train, heldout, failures)
