"""Training data: a dataset over aligned manifest rows, and a domain-balanced batch sampler.

Every batch of :class:`DomainBalancedBatchSampler` holds P identities x K images from every
source domain, so each step sees every domain and every identity in it has positives (what the
pair, triplet and domain-alignment losses need). The batches of an epoch are a pure function of
(seed, epoch), which makes them reproducible, resumable from a saved position, and splittable
between DDP processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from facemeta.data.manifest import ManifestRow
from facemeta.errors import ConfigError, ImageReadError


def read_rgb(path: str, image_size: int | None = None) -> np.ndarray:
    """Read an (aligned) image as RGB uint8 HxWx3, resized to image_size x image_size when it differs."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"cannot read image: {path}")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image_size and image.shape[:2] != (image_size, image_size):
        interp = cv2.INTER_AREA if image.shape[0] > image_size else cv2.INTER_LINEAR
        image = cv2.resize(image, (image_size, image_size), interpolation=interp)
    return image


class FaceDataset(Dataset):
    """Manifest rows as (image tensor, identity label, domain index).

    identity_to_label: identity name -> global int label; built from the sorted identity names of
    `rows` when not given (pass the training set's mapping to a validation set). Domain indices
    follow the sorted domain names unless domain_to_index is given. An index may be an int or an
    ``(index, seed)`` pair (as yielded by DomainBalancedBatchSampler(with_seeds=True)); the seed is
    passed to the transform so the augmentation of that draw is reproducible.
    A row whose ``extra["style"]`` names a style (facemeta.data.styles; rows of a synthetic domain) goes through
    it before the transform; `layout` is where the aligned faces' five landmarks sit (5x2 fractions of the side,
    ``facemeta.align.warp.template(size, chip) / size``), which the mask style needs.
    """

    def __init__(self, rows: Sequence[ManifestRow], transform: Callable | None = None,
                 identity_to_label: dict[str, int] | None = None, domain_to_index: dict[str, int] | None = None,
                 image_size: int | None = None, layout: np.ndarray | None = None):
        self.rows = list(rows)
        self.layout = layout
        if not self.rows:
            raise ConfigError("the training set is empty")
        self.transform = transform
        self.image_size = image_size
        if identity_to_label is None:
            identity_to_label = {name: i for i, name in enumerate(sorted({r.identity for r in self.rows}))}
        if domain_to_index is None:
            domain_to_index = {name: i for i, name in enumerate(sorted({r.domain for r in self.rows}))}
        unknown = sorted({r.identity for r in self.rows} - set(identity_to_label))
        if unknown:
            raise ConfigError(f"{len(unknown)} identit(ies) missing from identity_to_label, e.g. {unknown[0]!r}")
        unknown = sorted({r.domain for r in self.rows} - set(domain_to_index))
        if unknown:
            raise ConfigError(f"domain(s) missing from domain_to_index: {', '.join(unknown)}")
        self.identity_to_label = dict(identity_to_label)
        self.domain_to_index = dict(domain_to_index)
        self.labels = np.array([self.identity_to_label[r.identity] for r in self.rows], dtype=np.int64)
        self.domains = np.array([self.domain_to_index[r.domain] for r in self.rows], dtype=np.int64)
        self._seeded_worker: int | None = None

    @property
    def num_classes(self) -> int:
        """Size of the label space (for a classification head)."""
        return max(self.identity_to_label.values()) + 1

    def __len__(self) -> int:
        return len(self.rows)

    def _worker_reseed(self) -> None:
        # Forked DataLoader workers inherit identical augmentation generators: give each its own stream.
        info = get_worker_info()
        if info is not None and self._seeded_worker != info.id and hasattr(self.transform, "reseed"):
            self.transform.reseed(torch.initial_seed() % (1 << 63))
            self._seeded_worker = info.id

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), None)
        image = read_rgb(self.rows[index].path, self.image_size)
        style = self.rows[index].extra.get("style")
        if style:
            from facemeta.data.styles import apply_style

            if self.layout is None:
                raise ConfigError(f"row {self.rows[index].path} has style {style} but the dataset has no "
                                  "landmark layout")
            # its own stream, derived from the draw's seed: the same draw always gets the same style
            rng = np.random.default_rng(None if seed is None else [seed & 0xFFFFFFFFFFFFFFFF, 0x57E])
            image = apply_style(style, image, rng, self.layout)
        if self.transform is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        elif seed is not None:
            tensor = self.transform(image, seed=seed)
        else:
            self._worker_reseed()
            tensor = self.transform(image)
        return tensor, int(self.labels[index]), int(self.domains[index])


class DomainBalancedBatchSampler(Sampler[list[int]]):
    """Batches of P identities x K images from every domain (batch size = domains x P x K).

    labels, domains: per dataset item, its identity label and domain index (FaceDataset.labels/.domains).
    Only identities with at least K images in a domain are eligible; each domain needs at least P
    of them. Within an epoch, identities of a domain are drawn from a shuffled cycle (all are used
    before any repeats) and each identity's images from its own shuffled cycle; a batch never
    repeats an image. num_batches: batches per process per epoch (default: enough batches for the
    eligible images to be seen about once over all processes). rank/world_size: the epoch's global
    batch sequence is dealt round-robin, process r taking batches r, r+W, r+2W, ...
    with_seeds: yield (index, seed) pairs whose seeds make FaceDataset's augmentations reproducible.
    """

    def __init__(self, labels: Sequence[int], domains: Sequence[int], identities_per_domain: int = 8,
                 images_per_identity: int = 2, seed: int = 0, num_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, with_seeds: bool = False):
        labels = np.asarray(labels, dtype=np.int64)
        domains = np.asarray(domains, dtype=np.int64)
        if labels.ndim != 1 or labels.shape != domains.shape:
            raise ConfigError("labels and domains need one entry per image")
        self.P, self.K = int(identities_per_domain), int(images_per_identity)
        if self.P < 1 or self.K < 1:
            raise ConfigError(f"identities_per_domain and images_per_identity must be >= 1, got {self.P}, {self.K}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.with_seeds = bool(with_seeds)
        # domain -> list of index arrays (one per eligible identity, sorted by label)
        self.pools: dict[int, list[np.ndarray]] = {}
        for d in np.unique(domains):
            idx_d = np.flatnonzero(domains == d)
            groups = [idx_d[labels[idx_d] == lab] for lab in np.unique(labels[idx_d])]
            eligible = [g for g in groups if len(g) >= self.K]
            if len(eligible) < self.P:
                raise ConfigError(f"domain {int(d)} has {len(eligible)} identities with >= {self.K} images; "
                                  f"identities_per_domain={self.P} needs at least that many")
            self.pools[int(d)] = eligible
        self.domain_ids = sorted(self.pools)
        self.batch_size = len(self.domain_ids) * self.P * self.K
        eligible_images = sum(len(g) for pool in self.pools.values() for g in pool)
        if num_batches is None:
            num_batches = max(1, eligible_images // (self.batch_size * self.world_size))
        if num_batches < 1:
            raise ConfigError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = int(num_batches)
        self.epoch = 0
        self._start = 0  # batches of this epoch to skip on the next iteration (resume)
        self._position = 0  # batches of this epoch handed out so far (including skipped ones)

    def __len__(self) -> int:
        return self.num_batches - self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its batch order); a pending resume position is cleared."""
        self.epoch = int(epoch)
        self._start = 0
        self._position = 0

    def epoch_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every process's batches of an epoch, in global order (dataset indices, [batch_size] each)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        total = self.num_batches * self.world_size
        per_domain = []
        for d in self.domain_ids:
            pool = self.pools[d]
            # identity cycle: concatenated permutations, P per batch, no identity twice in a batch
            order: list[int] = []
            picks = np.empty((total, self.P), dtype=np.int64)
            pos = 0
            for b in range(total):
                if pos + self.P > len(order):
                    # new cycle: the leftovers of the old one first, then the others shuffled
                    rest = order[pos:]
                    order = rest + [i for i in rng.permutation(len(pool)).tolist() if i not in rest]
                    pos = 0
                picks[b] = order[pos:pos + self.P]
                pos += self.P
            # image cycles per identity
            cursors: dict[int, tuple[np.ndarray, int]] = {}
            chosen = np.empty((total, self.P, self.K), dtype=np.int64)
            for b in range(total):
                for j, ident in enumerate(picks[b]):
                    perm, c = cursors.get(int(ident), (None, 0))
                    if perm is None or c + self.K > len(perm):
                        perm, c = rng.permutation(pool[ident]), 0
                    chosen[b, j] = perm[c:c + self.K]
                    cursors[int(ident)] = (perm, c + self.K)
            per_domain.append(chosen.reshape(total, self.P * self.K))
        return [np.concatenate([dom[b] for dom in per_domain]) for b in range(total)]

    def _item_seeds(self, epoch: int, batch: int) -> np.ndarray:
        state = np.random.SeedSequence([self.seed, 0xA06, epoch, batch]).generate_state(self.batch_size, np.uint64)
        return (state >> np.uint64(1)).astype(np.int64)

    def __iter__(self) -> Iterator[list]:
        batches = self.epoch_batches()
        start, self._start = self._start, 0
        self._position = start
        for b in range(start, self.num_batches):
            g = b * self.world_size + self.rank
            idx = batches[g].tolist()
            self._position = b + 1
            if self.with_seeds:
                yield list(zip(idx, self._item_seeds(self.epoch, g).tolist(), strict=True))
            else:
                yield idx

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where this process is: epoch and batches of it done. A DataLoader with workers pulls batches
        ahead of training, so pass `consumed` = batches of this epoch actually trained on."""
        return {"epoch": self.epoch, "position": self._position if consumed is None else int(consumed),
                "seed": self.seed, "num_batches": self.num_batches, "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields exactly the batches of `state`'s epoch after its position."""
        for key in ("seed", "num_batches", "batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"sampler state was saved with {key}={state[key]}, this run has "
                                  f"{getattr(self, key)}: cannot resume the same batch order")
        position = int(state["position"])
        if not 0 <= position <= self.num_batches:
            raise ConfigError(f"sampler position {position} is outside 0..{self.num_batches}")
        self.epoch = int(state["epoch"])
        self._start = self._position = position
