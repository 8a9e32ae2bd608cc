"""Few-shot episodes sampled in memory, many at once.

An episode picks N classes of a split, K support and ``q`` query videos per class (disjoint), and
for training a random cached view per video. Index arithmetic runs vectorised in numpy (E episodes
per call); the features stay where they are (on the GPU in fast mode) and are gathered with one
indexing op per batch. Reading the same episodes row by row from Zarr would run at ~50 episodes/s.

Order convention (what the model expects): supports are class-major, support s belongs to episode
class s // K; queries are class-major too, query j has label j // q.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdmf_cache.errors import ConfigError


@dataclass
class Episodes:
    """Indices of E episodes into a split (all int64 numpy arrays).

    Attributes:
        classes: (E, N) split class index of each episode class.
        support: (E, S) row indices, S = N*K, class-major.
        query: (E, Q) row indices, Q = N*q, class-major.
        query_labels: (E, Q) episode class of each query (0..N-1).
        support_view / query_view: (E, S) / (E, Q) cached view per video.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    support_view: np.ndarray
    query_view: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def way(self) -> int:
        return self.classes.shape[1]

    @property
    def shot(self) -> int:
        return self.support.shape[1] // self.way

    def __getitem__(self, sl: slice) -> "Episodes":
        return Episodes(*(getattr(self, f)[sl] for f in self.__dataclass_fields__))

    def save(self, path: Path | str) -> None:
        np.savez_compressed(path, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path | str) -> "Episodes":
        with np.load(path) as z:
            return cls(**{f: z[f] for f in cls.__dataclass_fields__})


class EpisodeSampler:
    """Samples episodes from a split's labels.

    Args:
        labels: (N_videos,) class index per usable video.
        num_classes: C classes in the split.
        views: V cached views per video (a random one is drawn per video when ``random_view``).
    """

    def __init__(self, labels: np.ndarray, num_classes: int, views: int = 1):
        labels = np.asarray(labels)
        self.views = views
        self.counts = np.bincount(labels, minlength=num_classes)  # (C,)
        maxn = int(self.counts.max()) if len(labels) else 0
        self.members = np.full((num_classes, max(maxn, 1)), -1, dtype=np.int64)  # (C, maxn) padded rows
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        for c in range(num_classes):
            self.members[c, : self.counts[c]] = order[starts[c] : starts[c] + self.counts[c]]

    def check(self, way: int, shot: int, queries: int, split: str | None = None) -> np.ndarray:
        """Classes with at least shot + queries videos; raises ConfigError if fewer than ``way``.

        Args:
            split: the split's name, for the message.
        """
        eligible = np.flatnonzero(self.counts >= shot + queries)
        if len(eligible) < way:
            raise ConfigError(
                f"{way}-way {shot}-shot with {queries} queries per class needs {way} classes with >= "
                f"{shot + queries} videos; {f'the {split} split' if split else 'the split'} has {len(eligible)} (of "
                f"{len(self.counts)} classes); "
                "use fewer --way/--shot/queries or a larger split"
            )
        return eligible

    def sample(
        self, n: int, way: int, shot: int, queries: int, rng: np.random.Generator, random_view: bool = False
    ) -> Episodes:
        """Sample ``n`` episodes at once."""
        eligible = self.check(way, shot, queries)
        m = shot + queries
        # classes: the first `way` of a random permutation of the eligible classes, per episode
        pick = np.argsort(rng.random((n, len(eligible))), axis=1)[:, :way]
        classes = eligible[pick]  # (E, N)
        # videos: the first m of a random permutation of each class's members, i.e. the members with the m
        # smallest random keys in key order; argpartition finds them without sorting the whole class
        # (the same slots as a full argsort: keys are distinct)
        cnt = self.counts[classes]  # (E, N)
        width = self.members.shape[1]
        keys = rng.random((n, way, width))
        keys[np.arange(width)[None, None, :] >= cnt[..., None]] = np.inf  # padding sorts last
        slots = _smallest(keys, m)  # (E, N, m)
        rows = self.members[classes[..., None], slots]  # (E, N, m)
        support = rows[:, :, :shot].reshape(n, way * shot)  # (E, S)
        query = rows[:, :, shot:].reshape(n, way * queries)  # (E, Q)
        labels = np.broadcast_to(np.arange(way)[None, :, None], (n, way, queries)).reshape(n, -1)
        if random_view and self.views > 1:
            sv = rng.integers(0, self.views, size=support.shape)
            qv = rng.integers(0, self.views, size=query.shape)
        else:
            sv, qv = np.zeros_like(support), np.zeros_like(query)
        return Episodes(classes, support, query, np.ascontiguousarray(labels), sv, qv)


def _smallest(keys: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` smallest keys along the last axis, in ascending key order (``argsort(keys)[..., :m]``
    for distinct keys) in O(width) per row instead of a full sort."""
    width = keys.shape[-1]
    if m >= width:
        return np.argsort(keys, axis=-1)[..., :m]
    part = np.argpartition(keys, m - 1, axis=-1)[..., :m]  # the m smallest, in no order
    order = np.argsort(np.take_along_axis(keys, part, axis=-1), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def gather(features, text, ep: Episodes, device=None, dtype=None):
    """Episode tensors from in-memory split features.

    Args:
        features: (N_videos, V, T, D) torch tensor (any device, usually float16).
        text: (C, D) torch tensor of class prompt embeddings.
        ep: E episodes.

    Returns:
        support (E, S, T, D), query (E, Q, T, D), text (E, N, D), query_labels (E, Q) on
        ``features.device`` as ``dtype`` (float32 by default).
    """
    import torch

    dev = features.device if device is None else device
    dtype = dtype or torch.float32

    def idx(a):
        return torch.as_tensor(a, device=features.device)

    support = features[idx(ep.support), idx(ep.support_view)].to(dev, dtype)  # (E, S, T, D)
    query = features[idx(ep.query), idx(ep.query_view)].to(dev, dtype)  # (E, Q, T, D)
    txt = text[idx(ep.classes)].to(dev, dtype)  # (E, N, D)
    return support, query, txt, torch.as_tensor(ep.query_labels, device=dev)


def mean_ci(acc: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and the 95% half-width 1.96 * std / sqrt(n) (in the units of ``acc``)."""
    acc = np.asarray(acc, dtype=np.float64)
    if len(acc) == 0:
        return float("nan"), float("nan")
    return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(len(acc)))
