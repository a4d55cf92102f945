"""Statistics of a domain's embeddings, and the normalisation they define (DESIGN.md, "Domains at deployment").

A domain is where photos come from (a camera, a sketch artist, a thermal gate). Its statistics are estimated
from unit vectors of unlabelled photos of any people of it; each vector is then normalised by its own domain's
statistics before it is compared:

    v' = (v - s * (mean - origin) - centre * origin) / scale,   then v' / |v'|

``s`` (strength, 0..1) says how strongly the mean is removed; ``origin`` is None (zero) for ``kind="mean"`` and
``"coral-diag"`` and the model's source mean for ``kind="offset"``; ``centre`` is 0 except in the benchmark's
variants; ``scale`` is 1 except for ``kind="coral-diag"`` (the per-dimension spread: a diagonal CORAL). Pure numpy:
the gallery stores the fields, the benchmark chooses the kind and the rule for the strength.

The gallery's rule is ``offset`` (:func:`offset_stats`): each domain on its own is moved towards the model's source
mean by ``s (mean - source mean)`` with the strength of :func:`auto_strength` below (``OFFSET_TOP`` 0.5). A domain
at the source (ordinary photos) gets s = 0 and stays exactly as the model embeds it; every domain keeps the large
mean common to all faces, so two domains at different strengths still compare on one scale, and no pairing is
needed (``benchmarks/results/cross_domain``: shipped model, 10 photos, AR sunglasses +5.5, controls unchanged,
MFR2 cloth -1.6 and Yale B 26-50 degrees -0.6 the two misses).

The rule (:func:`auto_strength`, chosen by ``benchmarks/results/cross_domain``; unlabelled photos only): removing a
domain's mean helps where the domain lies far from the photos the model was trained on and hurts where it does
not (MFR2: every centring lost). So the strength is ``TOP`` (0.5) times the product of

- a gate on the domain's shift from the model's *source* statistics (the mean of unlabelled photos of its
  training domain, a ``reference`` DomainStats): ``z = (|mean - ref.mean|^2 - spread / n) / spread``, the squared
  distance of the means, less what the estimate's own noise adds, in units of the domain's spread (mean squared
  distance of its vectors to their mean); 0 below ``Z_LOW``, 1 above ``Z_HIGH``, linear between;
- the reliability of the estimated mean (a James-Stein shrinkage): ``max(0, 1 - (spread / n) / |mean - ref.mean|^2)``,
  small for a mean from few photos that is barely off the reference.

``TOP``: removing half the mean lost less than the whole where centring hurts (Yale B) and kept most of the gain
where it helps (AR sunglasses +6.8 instead of +10.3, shipped model, 10 photos).

Two domains compared with different strengths lose: the large mean common to all faces is then removed from one
side only (Yale B, light beyond 77 degrees, prior: 47.9 with per-domain strengths, 71.1 raw, at full strength).
The benchmark's ``auto-pair`` gives both sides of a comparison the smaller of their strengths (:func:`pair_strength`,
:func:`with_strength`); a gallery of normalised vectors cannot, hence ``offset``. The source statistics
of the shipped model and of the prior (600 LFW photos of people.txt folds 1-5) are in
``benchmarks/results/cross_domain/source_stats.json``; the shipped model carries its own in its meta (``domain_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("mean", "coral-diag", "offset")
EPS = 1e-6
Z_LOW, Z_HIGH = 0.15, 0.25  # the gate of auto_strength (chosen on the shared sets, see the module docstring)
OFFSET_TOP = 0.5  # the largest strength of an offset (offset_stats; 1 measured too, module docstring)
TOP = 0.5  # the largest strength auto_strength gives (half the mean: chosen on the shared sets, module docstring)


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
    origin: np.ndarray | None = None
    centre: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready form (floats as lists)."""
        out = {"kind": self.kind, "count": int(self.count), "strength": float(self.strength),
               "mean": [float(x) for x in self.mean],
               "scale": None if self.scale is None else [float(x) for x in self.scale],
               "extra": dict(self.extra)}
        if self.origin is not None:
            out["origin"] = [float(x) for x in self.origin]
            out["centre"] = float(self.centre)
        return out

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
        origin = None if data.get("origin") is None else np.asarray(data["origin"], dtype=np.float32)
        centre = float(data.get("centre", 0.0))
        if kind == "offset" and origin is None:
            raise ValueError("offset domain statistics need the model's source mean (origin)")
        if origin is not None and (origin.shape != mean.shape or not np.isfinite(origin).all()):
            raise ValueError("domain statistics: origin must be a finite vector of the mean's length")
        if not 0.0 <= centre <= 1.0:
            raise ValueError(f"domain statistics centre must be in [0, 1], got {centre}")
        return cls(kind, int(data.get("count", 0)), mean, scale, strength, dict(data.get("extra") or {}),
                   origin, centre)


def estimate(vectors: np.ndarray, kind: str = "mean", strength: float = 1.0) -> DomainStats:
    """Statistics of a domain from its unit vectors [N, E] (N >= 1); kind 'mean' or 'coral-diag' (an 'offset'
    needs the model's source statistics: :func:`offset_stats`)."""
    if kind == "offset":
        raise ValueError("kind 'offset' needs the model's source statistics (domain_stats.offset_stats)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("estimate needs a non-empty [N, E] array of vectors")
    mean = x.mean(axis=0)
    scale = None
    if kind == "coral-diag":
        scale = np.sqrt(((x - mean) ** 2).mean(axis=0) + EPS).astype(np.float32)
    spread = float(((x - mean) ** 2).sum(axis=1).sum() / (len(x) - 1)) if len(x) > 1 else None
    return DomainStats(kind, len(x), mean.astype(np.float32), scale, float(strength),
                       {} if spread is None else {"spread": spread})


def shift(stats: DomainStats, reference: DomainStats) -> dict:
    """How far a domain lies from a reference (the model's source photos): squared distance of the means, the
    part of it the domain mean's estimation noise explains (spread / count), and z (see the module docstring)."""
    spread = stats.extra.get("spread") or reference.extra.get("spread")
    if not spread:
        raise ValueError("shift needs the spread of the domain or of the reference (estimate from >= 2 vectors)")
    d2 = float(((stats.mean.astype(np.float64) - reference.mean.astype(np.float64)) ** 2).sum())
    noise = float(spread) / max(int(stats.count), 1)
    return {"distance2": d2, "noise": noise, "spread": float(spread), "z": (d2 - noise) / float(spread)}


def auto_strength(stats: DomainStats, reference: DomainStats, z_low: float = Z_LOW, z_high: float = Z_HIGH,
                  top: float = TOP) -> float:
    """The strength the rule gives a domain (0..top) from its statistics and the model's source statistics:
    top x gate(z) x reliability (module docstring). Unlabelled photos only."""
    s = shift(stats, reference)
    gate = float(np.clip((s["z"] - z_low) / (z_high - z_low), 0.0, 1.0))
    reliability = max(0.0, 1.0 - s["noise"] / s["distance2"]) if s["distance2"] > 0 else 0.0
    return top * gate * reliability


def pair_strength(a: DomainStats | None, b: DomainStats | None) -> float:
    """The strength a comparison of two domains uses for both sides: the smaller of theirs (0 when one side has no
    domain: raw against raw)."""
    if a is None or b is None:
        return 0.0
    return float(min(a.strength, b.strength))


def with_strength(stats: DomainStats, strength: float) -> DomainStats:
    """The same statistics at another strength (0..1)."""
    from dataclasses import replace

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return replace(stats, strength=float(strength))


def auto_stats(vectors: np.ndarray, reference: DomainStats | np.ndarray, kind: str = "mean") -> DomainStats:
    """A domain's statistics with the strength of :func:`auto_strength`; `reference`: the model's source
    statistics (or its unlabelled source vectors). The gate and reliability go in ``extra``."""
    from dataclasses import replace

    ref = reference if isinstance(reference, DomainStats) else estimate(reference)
    stats = estimate(vectors, kind)
    s = shift(stats, ref) if stats.extra.get("spread") or ref.extra.get("spread") else None
    strength = auto_strength(stats, ref) if s is not None else 0.0
    extra = {**stats.extra, "rule": "auto", "z": None if s is None else s["z"]}
    return replace(stats, strength=strength, extra=extra)


def offset_stats(vectors: np.ndarray, reference: DomainStats | np.ndarray, top: float = OFFSET_TOP,
                 centre: float = 0.0, z_low: float = Z_LOW, z_high: float = Z_HIGH) -> DomainStats:
    """A domain's ``offset`` statistics: its vectors are moved by ``s (mean - reference.mean)`` towards the
    model's source photos, s = top x gate(z) x reliability (:func:`auto_strength`'s factors), so a domain close
    to the source (an ordinary photo domain) is left as the model gives it and no pairing is needed; ``centre``
    also removes that share of the source mean from every vector of the domain (0: not)."""
    from dataclasses import replace

    reference = reference if isinstance(reference, DomainStats) else estimate(reference)
    stats = estimate(vectors, "mean")
    s = shift(stats, reference) if stats.extra.get("spread") or reference.extra.get("spread") else None
    strength = auto_strength(stats, reference, z_low, z_high, top) if s is not None else 0.0
    extra = {**stats.extra, "rule": "offset", "top": float(top), "z": None if s is None else s["z"],
             "reference_count": int(reference.count), "reference_spread": reference.extra.get("spread")}
    return replace(stats, kind="offset", strength=float(strength), extra=extra,
                   origin=reference.mean.astype(np.float32), centre=float(centre))


def reference_of(stats: DomainStats) -> DomainStats | None:
    """The model's source statistics an ``offset`` domain was made with (its origin, with that reference's
    spread and count from ``extra``), so more photos can be counted in without the model's meta; None for
    other kinds."""
    if stats.origin is None:
        return None
    spread = stats.extra.get("reference_spread")
    return DomainStats("mean", int(stats.extra.get("reference_count") or 0), stats.origin, None, 1.0,
                       {} if spread is None else {"spread": float(spread)})


def normalise(vectors: np.ndarray, stats: DomainStats | None) -> np.ndarray:
    """Vectors [N, E] (or one [E]) normalised by a domain's statistics -> float32 unit vectors, same shape.
    None (no domain), or nothing to remove (strength 0, no scale), leaves them as they are."""
    x = np.asarray(vectors, dtype=np.float32)
    if stats is None:
        return x
    one = x.ndim == 1
    x = np.atleast_2d(x)
    if x.shape[1] != stats.mean.shape[0]:
        raise ValueError(f"vectors of length {x.shape[1]} against domain statistics of length {len(stats.mean)}")
    if stats.strength == 0 and stats.scale is None and not stats.centre:
        return x[0] if one else x  # nothing to remove: the vectors as the model gives them, bit for bit
    shift_ = stats.mean if stats.origin is None else stats.mean - stats.origin
    y = x - np.float32(stats.strength) * shift_
    if stats.origin is not None and stats.centre:
        y = y - np.float32(stats.centre) * stats.origin
    if stats.scale is not None:
        y = y / stats.scale
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), EPS)
    y = y.astype(np.float32)
    return y[0] if one else y
