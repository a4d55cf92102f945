"""N-way K-shot episode sampling over any labelled dataset.

An episode picks ``n_way`` classes, then ``k_shot`` support and ``n_query`` query examples of
each (disjoint), and relabels the classes 0..n_way−1 in a random order. Only classes with at
least k_shot + n_query examples are eligible. Episode ``i`` depends only on (seed, i), so
sampling is reproducible, resumable and the same in every worker.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .functional import check_int

__all__ = ["Episode", "EpisodeSampler", "episode_tensors"]


@dataclass(frozen=True)
class Episode:
    """One few-shot task: dataset indices and episode labels (0..n_way−1) of support and query.

    Support and query are ordered class by class (label 0 first); ``classes[j]`` is the dataset
    label behind episode label j.

    >>> labels = ["ann", "ann", "bob", "bob", "cy", "cy"]
    >>> ep = EpisodeSampler(labels, n_way=2, k_shot=1, n_query=1, seed=0).episode(0)
    >>> ep.support_labels, ep.query_labels
    ((0, 1), (0, 1))
    >>> all(labels[i] == ep.classes[y] for i, y in zip(ep.support + ep.query, ep.support_labels + ep.query_labels))
    True
    """

    classes: tuple[Hashable, ...]
    support: tuple[int, ...]
    support_labels: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]


class EpisodeSampler:
    """Reproducible N-way K-shot episodes over ``labels`` (one label per dataset item).

    Iterating yields ``num_episodes`` episodes; ``episode(i)`` gives any one directly.

    >>> sampler = EpisodeSampler([0, 0, 0, 1, 1, 1, 2, 2, 2], n_way=3, k_shot=2, n_query=1, num_episodes=5, seed=7)
    >>> ep = sampler.episode(3)
    >>> len(ep.support), len(ep.query), sorted(ep.classes)
    (6, 3, [0, 1, 2])
    >>> ep == EpisodeSampler([0, 0, 0, 1, 1, 1, 2, 2, 2], 3, 2, 1, 5, seed=7).episode(3)  # a function of (seed, i)
    True
    >>> len(list(sampler))
    5
    """

    def __init__(
        self,
        labels: Sequence[Hashable],
        n_way: int,
        k_shot: int,
        n_query: int = 1,
        num_episodes: int = 1000,
        seed: int = 0,
    ) -> None:
        self.n_way = check_int("n_way", n_way, low=1)
        self.k_shot = check_int("k_shot", k_shot, low=1)
        self.n_query = check_int("n_query", n_query, low=0)
        self.num_episodes = check_int("num_episodes", num_episodes, low=0)
        self.seed = int(seed)
        by_class: dict[Hashable, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        need = self.k_shot + self.n_query
        self.by_class = {y: idx for y, idx in by_class.items() if len(idx) >= need}
        # A stable class order, whatever the label type, so episodes do not depend on dict order.
        self.classes = sorted(self.by_class, key=lambda y: (type(y).__name__, str(y)))
        if len(self.classes) < self.n_way:
            raise ValueError(
                f"{self.n_way}-way episodes need {self.n_way} classes with >= {need} examples each; "
                f"the labels have {len(self.classes)} such classes (of {len(by_class)})"
            )

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.num_episodes):
            yield self.episode(i)

    def episode(self, index: int) -> Episode:
        """Episode number ``index`` (a pure function of seed and index)."""
        rng = np.random.default_rng([self.seed, int(index)])
        picked = rng.choice(len(self.classes), size=self.n_way, replace=False)
        classes, support, s_lab, query, q_lab = [], [], [], [], []
        for label, ci in enumerate(picked):
            y = self.classes[int(ci)]
            members = self.by_class[y]
            chosen = rng.choice(len(members), size=self.k_shot + self.n_query, replace=False)
            items = [members[int(j)] for j in chosen]
            classes.append(y)
            support += items[: self.k_shot]
            s_lab += [label] * self.k_shot
            query += items[self.k_shot:]
            q_lab += [label] * self.n_query
        return Episode(tuple(classes), tuple(support), tuple(s_lab), tuple(query), tuple(q_lab))


def _item_input(item: Any) -> Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def episode_tensors(dataset: Any, episode: Episode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack an episode's inputs: (x_support, y_support, x_query, y_query).

    ``dataset[i]`` may return the input alone or a tuple whose first element is the input (as
    torchvision-style datasets do); labels are the episode's 0..n_way−1 labels (int64).
    """
    xs = torch.stack([_item_input(dataset[i]) for i in episode.support])
    ys = torch.tensor(episode.support_labels, dtype=torch.long)
    if episode.query:
        xq = torch.stack([_item_input(dataset[i]) for i in episode.query])
    else:
        xq = xs.new_empty((0, *xs.shape[1:]))
    yq = torch.tensor(episode.query_labels, dtype=torch.long)
    return xs, ys, xq, yq
