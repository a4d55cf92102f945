"""What an evaluation scores: the aligned rows of a shared set (with its pairs protocol, or all pairs), of a
folder of images, or of a manifest, aligned through the cache (only the images the protocol needs; shared sets
through facemeta.align.cache.prepare_set, the one data preparation)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from facemeta.align.cache import RowSelection, aligned_dir, prepare_set, select_rows
from facemeta.align.pipeline import align_rows
from facemeta.data.manifest import read_manifest
from facemeta.data.sets import PAIR_SETS, SET_NAMES
from facemeta.errors import ConfigError


def load_eval_rows(set_name: str, align_size: int, protocol: str = "auto", folds: set[int] | None = None,
                   limit_per_identity: int | None = None, data: str | None = None, cache: str | None = None,
                   progress: bool = False, chip: str = "arcface") -> tuple[list, list | None, str]:
    """Aligned rows (and a pair list or None) of a set for evaluation, plus a label for reports.

    Only the images a protocol needs are aligned (LFW pairs.txt folds name about 7.7k of its 13k images).
    """
    limit = RowSelection(limit_per_identity=limit_per_identity)
    if set_name in SET_NAMES:
        from facemeta.data.sets import read_pairs

        use_pairs = set_name in PAIR_SETS and protocol != "all"
        if protocol == "pairs" and set_name not in PAIR_SETS:
            raise ConfigError(f"--protocol pairs: set '{set_name}' has no pair list (use all)")
        pairs = None
        if use_pairs:
            pairs = read_pairs(set_name, data)
            if folds:
                pairs = [p for p in pairs if p.fold in folds]
        rows, _failures = prepare_set(set_name, align_size, chip, RowSelection(pairs=pairs) if use_pairs else limit,
                                      data, cache, progress=progress)
        label = set_name + (" pairs.txt" if use_pairs else " all pairs")
        if use_pairs and folds:
            label += f" folds {','.join(str(f) for f in sorted(folds))}"
        return rows, pairs, label
    path = Path(set_name).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return select_rows(read_manifest(path), limit), None, f"{path.name} all pairs"
    if path.is_dir():
        from facemeta.data.folder import image_folder

        raw = select_rows(image_folder(path), limit)
        if not raw:
            raise ConfigError(f"--set {set_name}: no images in this folder")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        dst = aligned_dir(f"folder-{path.name}-{digest}", align_size, chip, cache)
        rows, _failures = align_rows(raw, dst, size=align_size, progress=progress, chip=chip)
        return rows, None, f"{path.name} all pairs"
    raise ConfigError(f"--set must be one of {', '.join(SET_NAMES)}, an image folder or a manifest .csv; "
                      f"{set_name!r} is none of these")


def load_eval_chip_rows(set_name: str, chips: list[tuple[str, int]], protocol: str = "auto",
                        folds: set[int] | None = None, limit_per_identity: int | None = None, data: str | None = None,
                        cache: str | None = None, progress: bool = False) -> tuple[list[list], list | None, str]:
    """:func:`load_eval_rows` for an ensemble: the set aligned onto every ``(chip, size)`` its members read ->
    (rows per chip, the same faces in the same order: the ones aligned on every chip; pairs or None; label).
    An aligned manifest holds one chip only, so it is refused in one line."""
    path = Path(set_name).expanduser()
    if set_name not in SET_NAMES and path.is_file():
        raise ConfigError(f"--set {set_name}: an aligned manifest holds faces on one chip, and an ensemble reads "
                          f"{len(chips)} ({', '.join(f'{c} {s} px' for c, s in chips)}); give the set's name or a "
                          "folder of images")
    per_chip, pairs, label = [], None, ""
    for chip, size in chips:
        rows, pairs, label = load_eval_rows(set_name, size, protocol, folds, limit_per_identity, data, cache,
                                            progress, chip)
        per_chip.append({r.extra.get("source") or r.path: r for r in rows})
    order = [k for k in per_chip[0] if all(k in rows for rows in per_chip[1:])]
    return [[rows[k] for k in order] for rows in per_chip], pairs, label
