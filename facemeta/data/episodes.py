"""Episodic multi-domain sampling for MFR and CDT: each step splits the source domains into
meta-train and meta-test, and draws B identities × 2 images (gallery, probe) per domain.

Every episode is a pure function of (seed, step), so resuming a run at step k replays exactly
the episodes an unbroken run would have seen, with no sampler state to save. The meta-test
domains rotate: within each cycle every split (choice of meta-test domains) is used once, in
an order shuffled per cycle, so every domain takes its turn in meta-test.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DomainBatch:
    """B identities of one domain: dataset indices of their gallery and probe images."""

    domain: int
    gallery: np.ndarray  # [B] dataset indices
    probe: np.ndarray  # [B] dataset indices
    labels: np.ndarray  # [B] global identity labels

    @property
    def local_labels(self) -> np.ndarray:
        """Labels 0..B-1, one per identity in this batch (for per-domain losses)."""
        return np.arange(len(self.gallery))

    @property
    def indices(self) -> np.ndarray:
        """Gallery indices then probe indices, [2B]."""
        return np.concatenate([self.gallery, self.probe])


@dataclass(frozen=True)
class Episode:
    """One meta-learning step: the meta-train domains' batches and the meta-test domains' batches."""

    step: int
    meta_train: list[DomainBatch]
    meta_test: list[DomainBatch]

    @property
    def indices(self) -> np.ndarray:
        """Every dataset index of the episode, meta-train first (for loading images in one go)."""
        return np.concatenate([b.indices for b in [*self.meta_train, *self.meta_test]])


class EpisodicDomainSampler:
    """Draw episodes over a labelled, multi-domain dataset.

    labels, domains: per image, its global identity label and its domain index.
    identities_per_domain: B; a domain with fewer eligible identities (>= 2 images) uses them all.
    meta_test_domains: how many source domains form the meta-test split each step.
    """

    def __init__(self, labels: Sequence[int], domains: Sequence[int], identities_per_domain: int = 16,
                 meta_test_domains: int = 1, seed: int = 0):
        labels = np.asarray(labels)
        domains = np.asarray(domains)
        if labels.shape != domains.shape:
            raise ValueError("labels and domains must have one entry per image")
        self.identities_per_domain = int(identities_per_domain)
        self.seed = int(seed)
        # domain -> list of index arrays, one per identity with at least two images
        self.pools: dict[int, list[np.ndarray]] = {}
        for d in np.unique(domains):
            idx_d = np.flatnonzero(domains == d)
            groups = [idx_d[labels[idx_d] == lab] for lab in np.unique(labels[idx_d])]
            eligible = [g for g in groups if len(g) >= 2]
            if len(eligible) >= 2:
                self.pools[int(d)] = eligible
        self.labels = labels
        self.domain_ids = sorted(self.pools)
        if len(self.domain_ids) < 2:
            raise ValueError("episodic sampling needs at least two domains with two or more identities "
                             "of at least two images each")
        if not 1 <= meta_test_domains < len(self.domain_ids):
            raise ValueError(f"meta_test_domains must be between 1 and {len(self.domain_ids) - 1}, "
                             f"got {meta_test_domains}")
        self.splits = list(itertools.combinations(self.domain_ids, meta_test_domains))

    def _split(self, step: int) -> tuple[list[int], list[int]]:
        cycle, pos = divmod(step, len(self.splits))
        order = np.random.default_rng([self.seed, 1, cycle]).permutation(len(self.splits))
        test = list(self.splits[order[pos]])
        return [d for d in self.domain_ids if d not in test], test

    def _domain_batch(self, domain: int, rng: np.random.Generator) -> DomainBatch:
        pool = self.pools[domain]
        chosen = rng.choice(len(pool), size=min(self.identities_per_domain, len(pool)), replace=False)
        gallery, probe = [], []
        for c in chosen:
            g, p = rng.choice(pool[c], size=2, replace=False)
            gallery.append(g)
            probe.append(p)
        gallery_arr = np.asarray(gallery)
        return DomainBatch(domain, gallery_arr, np.asarray(probe), self.labels[gallery_arr])

    def episode(self, step: int) -> Episode:
        """The episode of a given step (deterministic in seed and step)."""
        train_domains, test_domains = self._split(step)
        rng = np.random.default_rng([self.seed, 2, step])
        return Episode(step, [self._domain_batch(d, rng) for d in train_domains],
                       [self._domain_batch(d, rng) for d in test_domains])

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[Episode]:
        """Episodes start, start+1, ... (forever when stop is None)."""
        step = start
        while stop is None or step < stop:
            yield self.episode(step)
            step += 1
