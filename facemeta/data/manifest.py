"""Manifests: one CSV row per image with its path, identity and domain (and optional extras).

Required columns: ``path`` (absolute, or relative to the manifest's folder), ``identity``,
``domain``. Any other column is kept as a string (for example ``score``, ``landmarks``,
``route``, ``fold``, ``mask``, ``azimuth``). Landmarks are stored as ten space-separated
numbers (x1 y1 ... x5 y5).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from facemeta.atomic import atomic_write

REQUIRED = ("path", "identity", "domain")


class ManifestError(ValueError):
    """A manifest file is missing, malformed or lacks required columns."""


@dataclass
class ManifestRow:
    """One image: where it is, who it shows, which domain it comes from, and extras."""

    path: str
    identity: str
    domain: str
    extra: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        """Return an extra column's value (or a required field by name)."""
        if key in REQUIRED:
            return getattr(self, key)
        return self.extra.get(key, default)

    def as_dict(self) -> dict[str, str]:
        """Flatten to one dict of column → string."""
        return {"path": self.path, "identity": self.identity, "domain": self.domain,
                **{k: "" if v is None else str(v) for k, v in self.extra.items()}}


def format_landmarks(points: Sequence[Sequence[float]]) -> str:
    """Five (x, y) points → 'x1 y1 ... x5 y5' with two decimals."""
    return " ".join(f"{float(v):.2f}" for p in points for v in p)


def parse_landmarks(text: str) -> list[tuple[float, float]] | None:
    """Inverse of :func:`format_landmarks`; an empty string gives None."""
    if not text:
        return None
    vals = [float(v) for v in text.split()]
    if len(vals) != 10:
        raise ManifestError(f"landmarks need 10 numbers, got {len(vals)}")
    return [(vals[i], vals[i + 1]) for i in range(0, 10, 2)]


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike) -> Path:
    """Write rows as CSV atomically (temporary file, fsync, rename); returns the path."""
    rows = list(rows)
    extra_cols: list[str] = []
    for row in rows:
        for key in row.extra:
            if key not in extra_cols:
                extra_cols.append(key)
    path = Path(path)
    with atomic_write(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=[*REQUIRED, *extra_cols], restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    return path


def read_manifest(path: str | os.PathLike, resolve: bool = True) -> list[ManifestRow]:
    """Read a manifest CSV; with `resolve`, relative paths become absolute (from the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for rec in reader:
            p = rec.pop("path")
            if resolve and not os.path.isabs(p):
                p = str((path.parent / p).resolve())
            rows.append(ManifestRow(p, rec.pop("identity"), rec.pop("domain"),
                                    {k: v for k, v in rec.items() if k is not None}))
    return rows


def first_per_identity(rows: Sequence[ManifestRow], k: int | None) -> list[ManifestRow]:
    """The first `k` rows of each identity, in their order (all rows when k is None or 0)."""
    if not k:
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        if seen.get(row.identity, 0) < k:
            seen[row.identity] = seen.get(row.identity, 0) + 1
            out.append(row)
    return out
