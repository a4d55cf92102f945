"""The domain verbs of FaceRecognizer (facemeta.gallery.domains: where photos come from, with statistics from
unlabelled photos of it), and verify across domains with a FaceEmbedder alone (:func:`verify_across`, statistics
from a file: :func:`load_domain_file`). FaceRecognizer (recognizer.py) inherits :class:`DomainVerbs`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facemeta.errors import FacemetaError, GalleryError, NoFaceError, one_line


class DomainVerbs:
    """FaceRecognizer's domain methods. The class using it provides ``embedder``, ``threshold``, ``path``,
    ``exists()``, ``gallery(write)`` and the file helpers ``_image_files`` and ``_file_sha256``."""

    # -- domains (facemeta.gallery.domains): where photos come from, with statistics from unlabelled photos
    def _domain_name(self, domain: str | None) -> str | None:
        """The stored name of an existing domain of the gallery (None stays None); checked before any photo is read."""
        if domain is None:
            return None
        if not self.exists():
            raise GalleryError(f"no gallery at {self.path} yet, so no domain {domain!r}: add the domain first "
                               "(facemeta domain add)")
        return self.domain(domain).name

    def domain(self, name: str):
        """One domain of the gallery (facemeta.gallery.domains.Domain: statistics, photos, threshold)."""
        from facemeta.gallery import domains

        return domains.get_domain(self.gallery(), name)

    def domains(self) -> list:
        """Every domain of the gallery (empty when there is no gallery yet)."""
        from facemeta.gallery import domains

        return domains.list_domains(self.gallery()) if self.exists() else []

    def add_domain(self, name: str, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                   kind: str | None = None, strength: float | None = None,
                   on_image: Callable[[Path], None] | None = None, sources: Sequence[str] | None = None) -> DomainResult:
        """Count unlabelled photos (any people, one face each) into a domain, created (with the gallery) if new,
        and re-estimate its statistics; the people enrolled under it are normalised again without reading any
        image. A photo already counted (same sha256) is skipped, an unusable one reported in ``skipped``; one
        transaction. ``kind``/``strength``: facemeta.gallery.domain_stats.estimate's (default: the domain's own)."""
        from facemeta.gallery import domains

        name = domains.check_domain_name(name)
        paths = self._image_files([images] if isinstance(images, str | os.PathLike) else images)
        if not paths:
            raise GalleryError(f"no images given for domain {name!r}")
        if sources is not None and len(sources) != len(paths):
            raise GalleryError(f"{len(sources)} source labels for {len(paths)} images of domain {name!r}")
        label = dict(zip(paths, sources, strict=True)) if sources is not None else {}
        if self.exists():  # a look-alike of another domain's name is refused before any photo is read
            name = domains.check_new_domain(self.gallery(), name)
        known = domains.photo_hashes(self.gallery(), name) if self.exists() else set()
        result = DomainResult(name)
        vecs, recorded, hashes = [], [], []
        for p in paths:
            digest = self._file_sha256(p)
            if digest is not None and digest in known:
                result.already += 1
            else:
                try:
                    vecs.append(self.embedder.embed_file(p)[0])
                    recorded.append(label.get(p) or str(p.resolve()))
                    hashes.append(digest)
                    if digest is not None:
                        known.add(digest)
                except FacemetaError as exc:
                    result.skipped.append((str(p), one_line(exc, limit=1000)))
            if on_image:
                on_image(p)
        if vecs:
            result.domain = domains.add_photos(self.gallery(write=True), name, np.stack(vecs),
                                               fingerprint=self.embedder.fingerprint, sources=recorded,
                                               content_hashes=hashes, kind=kind, strength=strength,
                                               reference=model_reference(self.embedder))
            result.added = len(vecs)
        elif not result.already:
            first = f": {result.skipped[0][0]}: {result.skipped[0][1]}" if result.skipped else ""
            raise NoFaceError(f"none of the {len(paths)} image(s) for domain {name!r} gave a usable face{first}")
        else:
            result.domain = self.domain(name)
        if result.domain.photos < domains.FEW_PHOTOS:
            result.warning = (f"domain {name!r} rests on {result.domain.photos} photo(s); its estimate is rough "
                              f"below {domains.FEW_PHOTOS}: add more unlabelled photos of it")
        return result

    def remove_domain(self, name: str, force: bool = False) -> int:
        """Remove a domain; people enrolled under it stay (in the default domain) only with ``force``.
        Returns how many embeddings moved to the default domain."""
        from facemeta.gallery import domains

        return domains.remove_domain(self.gallery(write=True), name, force=force)

    def export_domain(self, name: str, out: str | os.PathLike) -> Path:
        """Write a domain's statistics to a small file that :func:`load_domain_file` (and `verify --domains`) reads."""
        from facemeta.gallery.domain_files import write_domain_file

        return write_domain_file(self.gallery(), name, out)

    def calibrate_domain(self, name: str, images: str | os.PathLike | Sequence[str | os.PathLike],
                         far: float = 1e-2) -> tuple[object, list[tuple[str, str]]]:
        """Set a domain's threshold at false-accept rate ``far`` from the impostor pairs of photos of DIFFERENT
        people of that domain (one photo each), normalised by its statistics. -> (the Domain, skipped images)."""
        from facemeta.gallery import domains
        from facemeta.gallery.domain_stats import normalise

        if not 0 < far < 1:
            raise GalleryError(f"the false-accept rate must be in (0, 1), got {far}")
        stats = self.domain(name).stats
        vecs, skipped = [], []
        for p in self._image_files([images] if isinstance(images, str | os.PathLike) else images):
            try:
                vecs.append(self.embedder.embed_file(p)[0])
            except FacemetaError as exc:
                skipped.append((str(p), one_line(exc, limit=1000)))
        if len(vecs) < 2:
            raise NoFaceError(f"calibrating domain {name!r} needs usable photos of at least two people, "
                              f"got {len(vecs)}")
        thr, pairs = domains.impostor_threshold(normalise(np.stack(vecs), stats), far)
        return domains.set_calibration(self.gallery(write=True), name, thr, far, pairs), skipped

    def across(self, found: list, domains: tuple, threshold: float | None = None):
        """Two embedded faces (facemeta.embedder.EmbeddedFace) normalised by their domains' statistics (None: the
        default domain), and :meth:`threshold_for` theirs -> (faces, threshold, its FAR or None, its source)."""
        import dataclasses

        from facemeta.gallery.domain_stats import normalise

        out = [f if d is None else dataclasses.replace(f, vector=normalise(f.vector, self.domain(d).stats))
               for f, d in zip(found, domains, strict=True)]
        thr, far, source = self.threshold_for(domains[1] if domains[1] is not None else domains[0], threshold,
                                              other=domains[0])
        return out, thr, far, source

    def threshold_for(self, domain: str | None = None, given: float | None = None,
                      other: str | None = None) -> tuple[float, float | None, str]:
        """The threshold a comparison with a photo of ``domain`` uses -> (threshold, its false-accept rate or None
        when unknown, where it came from): the one given (or this recognizer's), else the domain's calibrated
        one, else, when a photo is normalised (``domain``, ``other``), the model's threshold for normalised
        vectors (:func:`model_domain_threshold`), else the gallery's, else the model's. A threshold calibrated
        without normalisation keeps its FAR only when neither photo is normalised."""
        from facemeta.checks import check_threshold

        if given is not None or self.threshold is not None:
            return check_threshold(given if given is not None else self.threshold), None, "given"
        if domain is not None:
            d = self.domain(domain)
            if d.threshold is not None:
                return d.threshold, d.far, f"domain {d.name} (calibrated on {d.calibration_pairs} impostor pairs)"
        plain = domain is None and other is None
        named = [self.domain(d).stats for d in (domain, other) if d is not None]
        if named and (found := model_domain_threshold(self.embedder, named)) is not None:
            return found
        g = self.gallery() if self.exists() else None
        for thr, where in ((g.threshold if g else None, "gallery"), (self.embedder.threshold, "model")):
            if thr is not None:
                far = self.embedder.threshold_far if plain and thr == self.embedder.threshold else None
                note = "" if plain else " (not calibrated for this domain: `facemeta domain calibrate`)"
                return float(thr), far, where + note
        raise GalleryError(f"neither the gallery nor {self.embedder.model_path} has a threshold; pass --threshold")



@dataclass
class DomainResult:
    """What :meth:`FaceRecognizer.add_domain` did: the domain (facemeta.gallery.domains.Domain) as it now is,
    photos added, photos skipped as already counted, unusable ones with the reason, and a warning when the
    domain rests on few photos."""

    name: str
    domain: object = None
    added: int = 0
    already: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warning: str | None = None


def model_reference(embedder):
    """The model's source statistics (checkpoint meta ``domain_reference``: mean, spread and count of unlabelled
    photos of its training domain, written by tools/domain_threshold.py) as a DomainStats, or None when the
    model has none (domains then use the plain mean, as before the offset rule)."""
    from facemeta.gallery.domain_stats import DomainStats

    entry = (getattr(embedder, "meta", None) or {}).get("domain_reference")
    if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
        return None
    try:
        ref = DomainStats.from_dict(entry["stats"])
    except (ValueError, KeyError, TypeError):
        return None
    dim = getattr(embedder, "embedding_size", None)
    return ref if ref.extra.get("spread") and (dim is None or len(ref.mean) == dim) else None


def model_domain_threshold(embedder, stats: list) -> tuple[float, float, str] | None:
    """The model's threshold for vectors normalised by their domain (checkpoint meta ``domain_threshold``, from
    tools/domain_threshold.py: held-out source pairs normalised the same way) -> (threshold, FAR, source), when
    every domain statistic in ``stats`` is of its kind and strength (any strength where the entry's strength is
    null: an ``offset`` leaves the source domain as it is; meta ``domain_threshold_mean`` for the plain mean); None
    otherwise or when the model has none."""
    meta = getattr(embedder, "meta", None) or {}
    for entry in (meta.get("domain_threshold"), meta.get("domain_threshold_mean")):
        if not stats or not isinstance(entry, dict) or not isinstance(entry.get("threshold"), int | float):
            continue
        any_strength = entry.get("strength") is None
        if all(s.kind == entry.get("kind") and (any_strength or s.strength == entry.get("strength")) for s in stats):
            return float(entry["threshold"]), entry.get("far"), "model, for normalised vectors (held-out source pairs)"
    return None


def load_domain_file(path: str | os.PathLike, embedder=None):
    """A domain statistics file (`facemeta domain export`) -> facemeta.gallery.domains.DomainFile; with an
    ``embedder`` (FaceEmbedder), refused unless it was made with that model."""
    from facemeta.gallery.domain_files import read_domain_file

    return read_domain_file(path, None if embedder is None else embedder.fingerprint)


def verify_across(embedder, a: str | os.PathLike, b: str | os.PathLike, domain_a=None, domain_b=None,
                  threshold: float | None = None, far: float | None = None):
    """Verify two photos with a FaceEmbedder, each face normalised by its domain's statistics first
    (``domain_a``/``domain_b``: a Domain or DomainFile, or None for the default domain). The threshold is the
    one given, else the calibrated one of ``domain_b`` (then ``domain_a``), else the model's (its FAR only
    when neither photo is normalised). -> facemeta.embedder.Verification."""
    from facemeta.checks import check_threshold
    from facemeta.embedder import Verification
    from facemeta.gallery.domain_stats import normalise

    for d in (domain_a, domain_b):
        if d is not None and d.fingerprint != embedder.fingerprint:
            raise GalleryError(f"domain {d.name!r} was made with model {d.fingerprint}, not {embedder.fingerprint}")
    if threshold is None:
        calibrated = [d for d in (domain_b, domain_a) if d is not None and d.threshold is not None]
        if calibrated:
            threshold, far = calibrated[0].threshold, calibrated[0].far
        elif (found := model_domain_threshold(embedder, [d.stats for d in (domain_a, domain_b) if d])) is not None:
            threshold, far, _ = found
        elif embedder.threshold is not None:
            threshold = embedder.threshold
            far = embedder.threshold_far if domain_a is None and domain_b is None else None
        else:
            raise GalleryError(f"{embedder.model_path} has no calibrated threshold; pass --threshold")
    threshold = check_threshold(threshold)
    ea, fa = embedder.embed_file(a)
    eb, fb = embedder.embed_file(b)
    va = normalise(ea, None if domain_a is None else domain_a.stats)
    vb = normalise(eb, None if domain_b is None else domain_b.stats)
    score = float(np.dot(va, vb))
    return Verification(score, float(threshold), far, bool(score >= threshold), [fa.to_dict(), fb.to_dict()])
