"""Statistics of a domain's embeddings, and the normalisation they define (DESIGN.md, "Domains at deployment").

A domain is where photos come from (a camera, a sketch artist, a thermal gate). Its statistics are estimated
from unit vectors of unlabelled photos of any people of it; each vector is then normalised by its own domain's
statistics before it is compared:

    v' = (v - s * mean) / scale,   then v' / |v'|

``s`` (strength, 0..1) says how strongly the mean is removed; ``scale`` is 1 for ``kind="mean"`` and the
per-dimension spread for ``kind="coral-diag"`` (a diagonal CORAL). Pure numpy: the gallery stores the fields,
the benchmark chooses the kind and the rule for the strength.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("mean", "coral-diag")
EPS = 1e-6


@dataclass(frozen=True)
class DomainStats:
    """Statistics of one domain: how they were made (kind), from how many vectors (count), the mean vector,
    the per-dimension spread (None for kind 'mean') and the strength with which the mean is removed."""

    kind: str
    count: int
    mean: np.ndarray
    scale: np.ndarray | None = None
    strength: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form (floats as lists)."""
        return {"kind": self.kind, "count": int(self.count), "strength": float(self.strength),
                "mean": [float(x) for x in self.mean],
                "scale": None if self.scale is None else [float(x) for x in self.scale],
                "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict) -> DomainStats:
        """Inverse of :meth:`to_dict`; ValueError on a malformed record."""
        kind = data.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown domain statistics kind {kind!r}")
        mean = np.asarray(data["mean"], dtype=np.float32)
        scale = None if data.get("scale") is None else np.asarray(data["scale"], dtype=np.float32)
        if mean.ndim != 1 or (scale is not None and scale.shape != mean.shape):
            raise ValueError("domain statistics: mean and scale must be vectors of one length")
        if not np.isfinite(mean).all() or (scale is not None and not (np.isfinite(scale).all() and (scale > 0).all())):
            raise ValueError("domain statistics hold non-finite or non-positive values")
        strength = float(data.get("strength", 1.0))
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"domain statistics strength must be in [0, 1], got {strength}")
        return cls(kind, int(data.get("count", 0)), mean, scale, strength, dict(data.get("extra") or {}))


def estimate(vectors: np.ndarray, kind: str = "mean", strength: float = 1.0) -> DomainStats:
    """Statistics of a domain from its unit vectors [N, E] (N >= 1)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("estimate needs a non-empty [N, E] array of vectors")
    mean = x.mean(axis=0)
    scale = None
    if kind == "coral-diag":
        scale = np.sqrt(((x - mean) ** 2).mean(axis=0) + EPS).astype(np.float32)
    return DomainStats(kind, len(x), mean.astype(np.float32), scale, float(strength))


def normalise(vectors: np.ndarray, stats: DomainStats | None) -> np.ndarray:
    """Vectors [N, E] (or one [E]) normalised by a domain's statistics -> float32 unit vectors, same shape.
    None (no domain) leaves them as they are."""
    x = np.asarray(vectors, dtype=np.float32)
    if stats is None:
        return x
    one = x.ndim == 1
    x = np.atleast_2d(x)
    if x.shape[1] != stats.mean.shape[0]:
        raise ValueError(f"vectors of length {x.shape[1]} against domain statistics of length {len(stats.mean)}")
    y = x - np.float32(stats.strength) * stats.mean
    if stats.scale is not None:
        y = y / stats.scale
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), EPS)
    y = y.astype(np.float32)
    return y[0] if one else y
