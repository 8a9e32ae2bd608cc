"""Frame samplers (docs/method.md §3): which T frame indices of an n-frame video to decode.

* ``tsn`` (design default): T equal segments of ``[0, n)``; test takes each segment's middle
  frame, train a uniformly random frame inside each segment.
* ``linspace`` (the released code's rule): ``floor(linspace(start, end, T))`` with a random
  padding of the ends at train time and ``start=1, end=n-2`` at test time.

Videos shorter than T frames get repeated indices; they never raise.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

logger = logging.getLogger(__name__)

from mdmf_cache.choices import SAMPLERS  # noqa: E402  (declared once)


def video_key(video_id: str) -> int:
    """A stable 64-bit integer for a video id (sha256; the same in every process and Python run)."""
    return int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:8], "little")


def video_rng(seed: int, video: str | int, view: int) -> np.random.Generator:
    """An independent random stream per (seed, video, view).

    Seeding from the triple (instead of drawing from one shared generator) makes a video's
    draws independent of worker scheduling and of which other videos are processed. The cache
    passes the video id (``class/video``), hashed by :func:`video_key`, so a video's train views
    do not depend on its row either: a cache can grow and still hold what a fresh run computes.

    Args:
        seed: Global seed (>= 0).
        video: The video id, or a non-negative integer standing for the video.
        view: Augmentation view number (>= 0).

    Returns:
        A fresh generator.
    """
    key = video_key(video) if isinstance(video, str) else int(video)
    if min(seed, key, view) < 0:
        raise ValueError(f"seed, video and view must be >= 0, got {(seed, video, view)}")
    return np.random.default_rng([seed, key, view])


def _tsn(n: int, t: int, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    """TSN on a partition of the frames: segment i is [floor(i*n/T), floor((i+1)*n/T)).

    Integer bounds make every frame belong to exactly one segment, so test (middle) and train
    (uniform) indices always lie in the same segment; sizes differ by at most one frame.
    """
    seg = np.arange(t, dtype=np.int64)
    starts = (seg * n) // t
    ends = ((seg + 1) * n) // t
    if train:
        # Segments are empty when n < T: fall back to the segment start (a repeated frame).
        picks = starts + rng.integers(0, np.maximum(ends - starts, 1))
    else:
        picks = (starts + ends) // 2
    return np.minimum(picks, n - 1)


def _linspace(n: int, t: int, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    """The released code's rule, with its constants (pad at most 5)."""
    if train:
        pad = int(min(5, (n - t) / 2))
        if pad >= 1:
            start = int(rng.integers(0, pad + 1))
            end = int(rng.integers(n - 1 - pad, n))
        else:
            start, end = 0, n - 1
    else:
        start, end = 1, n - 2
    if end - start < t:
        start, end = 0, n - 1
    return np.floor(np.linspace(start, end, t)).astype(np.int64)


def sample_indices(num_frames: int, num_segments: int = 8, sampler: str = "tsn",
                   train: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
    """Choose ``num_segments`` frame indices of a ``num_frames``-frame video.

    Args:
        num_frames: Frames in the video (n > 0).
        num_segments: Frames to sample (T).
        sampler: One of :data:`SAMPLERS`.
        train: Random (train) or deterministic (test) sampling.
        rng: Generator for train sampling (required when ``train``), e.g. :func:`video_rng`.

    Returns:
        int64 array (T,) of indices in ``[0, n)``, non-decreasing; repeats when n < T.

    Raises:
        ValueError: n <= 0, T <= 0, unknown sampler, or ``train`` without ``rng``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    n, t = int(num_frames), int(num_segments)
    if n <= 0:
        raise ValueError(f"cannot sample from a video with {n} frames")
    if t <= 0:
        raise ValueError(f"num_segments must be > 0, got {t}")
    if train and rng is None:
        raise ValueError("train sampling needs an rng (see video_rng)")
    if n < t:
        logger.debug("video has %d frames < %d segments: indices repeat", n, t)
    fn = _tsn if sampler == "tsn" else _linspace
    return fn(n, t, train, rng).astype(np.int64)
