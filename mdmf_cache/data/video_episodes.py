"""Full mode's input: training episodes decoded from the videos, with fresh augmentation every episode.

Episode ``i`` of a run (its global index, counted from 0 over the whole run) is a pure function of
``(seed, i)``: its classes, videos and PPS uniforms come from one generator seeded ``[seed, 7, i]``,
and each of its videos' frame indices, crop and flip from a generator seeded ``[seed, 8, i, slot]``.
So any process can decode any episode: DataLoader workers in any order, DDP ranks taking different
shares of an update, and a resumed run (the sampler's state is the episode counter alone).

Decoding, TSN/linspace train sampling and the random crop and flip are those of ``extract``. The
resize, crop and normalisation (``preprocess_clips``, as in ``extract``) run on the GPU in the training
process when it trains on a GPU (:func:`episode_pixels`), and in the workers when it trains on the CPU
(``normalize`` set), where they would otherwise stall the model's cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mdmf_cache.data.episodes import EpisodeSampler
from mdmf_cache.errors import ConfigError, VideoReadError
from mdmf_cache.data.preprocess import Crop, preprocess_clips
from mdmf_cache.data.sampling import sample_indices
from mdmf_cache.data.video import decode_clip

#: Other videos of the same class tried when one of an episode's videos cannot be decoded.
SUBSTITUTES = 5


def check_class_sizes(labels: np.ndarray, classes: list[str], need: int, split: str, what: str) -> None:
    """Every class of a split must have ``need`` videos (K + Q) for the episodes full mode samples from all classes.

    Raises:
        ConfigError: naming the classes that have fewer (and how many they have).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    small = np.flatnonzero(counts < need)
    if len(small):
        named = ", ".join(f"{classes[c]} ({counts[c]})" for c in small[:5]) + (", ..." if len(small) > 5 else "")
        raise ConfigError(f"{what} needs {need} videos per class in the {split} split; {len(small)} classes have "
                          f"fewer: {named}; lower --shot or the queries, or check --root for missing videos")


@dataclass
class EpisodeVideos(Dataset):
    """Global episode index -> that episode's decoded train clips (a map-style dataset for a DataLoader).

    Attributes:
        paths: (Nv,) the split's usable video files.
        labels: (Nv,) class index per video.
        num_classes: C.
        way, shot, queries: N, K and queries per class.
        num_frames: T.
        sampler: ``tsn`` | ``linspace`` (train rule).
        flip: random horizontal flips.
        seed: the run's seed.
        decoder: video backend (``auto``, ``pyav``, ...).
        normalize: ``clip`` | ``none``: preprocess in the worker (CPU training); None: return decoded frames.
    """

    paths: list[Path]
    labels: np.ndarray
    num_classes: int
    way: int
    shot: int
    queries: int
    num_frames: int = 8
    sampler: str = "tsn"
    flip: bool = True
    seed: int = 0
    decoder: str = "auto"
    normalize: str | None = None

    def __post_init__(self) -> None:
        self._sampler = EpisodeSampler(self.labels, self.num_classes)
        self._sampler.check(self.way, self.shot, self.queries, split="train")

    def __len__(self) -> int:  # any index is valid; the trainer's sampler says which are drawn
        return 2**62

    def plan(self, index: int) -> tuple[Any, np.ndarray]:
        """Episode ``index``: its :class:`~mdmf_cache.data.episodes.Episodes` (one episode) and PPS uniforms ``(Q,)``."""
        rng = np.random.default_rng([self.seed, 7, index])
        ep = self._sampler.sample(1, self.way, self.shot, self.queries, rng)
        return ep, rng.random(ep.query.shape[1])

    def _decode(self, index: int, slot: int, video: int) -> tuple[torch.Tensor, Crop, list[str], int, bool]:
        """One video of the episode (or a substitute of its class when it cannot be decoded): frames, crop, errors,
        the video decoded, and whether it has fewer than T decodable frames (indices repeated)."""
        rng = np.random.default_rng([self.seed, 8, index, slot])
        errors: list[str] = []
        candidates = [video]
        while candidates:
            v = candidates.pop(0)
            try:
                clip = decode_clip(self.paths[v], lambda n: sample_indices(n, self.num_frames, self.sampler, True, rng),
                                   backend=self.decoder)
            except Exception as e:  # noqa: BLE001 - VideoReadError or any decoder error: try another video
                errors.append(f"{self.paths[v]}: {e}")
                if len(errors) == 1:  # substitutes: other videos of the class, in a seeded order
                    c = self.labels[video]
                    members = self._sampler.members[c, : self._sampler.counts[c]]
                    candidates = list(rng.permutation(members[members != video])[:SUBSTITUTES])
                continue
            # (T, H, W, 3) uint8
            return torch.from_numpy(clip.frames), Crop.random(rng, self.flip), errors, v, clip.num_frames < self.num_frames
        raise VideoReadError(f"episode {index}: {len(errors)} videos of one class could not be decoded: "
                             + "; ".join(errors[:3]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        ep, noise = self.plan(int(index))
        videos = np.concatenate([ep.support[0], ep.query[0]])  # (S+Q,) support then query rows
        frames, crops, errors, used, short = [], [], [], [], []
        for slot, v in enumerate(videos):
            f, c, err, u, few = self._decode(int(index), slot, int(v))
            frames.append(f)
            crops.append(c)
            errors += err
            used.append(u)
            if few:
                short.append(u)
        if self.normalize is not None:  # (S+Q, T, 3, 224, 224) float32, ready for the model
            frames = preprocess_clips(frames, crops, "cpu", normalize=self.normalize)
        return {"index": int(index), "frames": frames, "crops": crops, "classes": ep.classes[0],
                "labels": ep.query_labels[0], "noise": noise, "support": ep.shot * ep.way, "errors": errors,
                "videos": used, "short": short,  # the videos decoded; those with fewer than T frames
                "decode_s": time.perf_counter() - t0}  # decoding, plus preprocessing when done here


def collate_episodes(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def episode_pixels(items: list[dict[str, Any]], device: torch.device, normalize: str) -> tuple[torch.Tensor, ...]:
    """Decoded episodes -> model inputs on ``device``.

    Returns:
        support pixels ``(E, S, T, 3, 224, 224)``, query pixels ``(E, Q, T, 3, 224, 224)``, classes ``(E, N)``
        (split class indices), query labels ``(E, Q)`` and PPS uniforms ``(E, Q)``.
    """
    if not items:
        raise ValueError("no episodes to stack")
    e, s = len(items), items[0]["support"]
    if torch.is_tensor(items[0]["frames"]):  # preprocessed by the worker
        pix = torch.stack([it["frames"] for it in items]).to(device, non_blocking=True)  # (E, S+Q, T, 3, 224, 224)
    else:
        clips = [f for it in items for f in it["frames"]]
        crops = [c for it in items for c in it["crops"]]
        pix = preprocess_clips(clips, crops, device, normalize=normalize)  # (E*(S+Q), T, 3, 224, 224)
        pix = pix.reshape(e, len(items[0]["frames"]), *pix.shape[1:])
    classes = torch.as_tensor(np.stack([it["classes"] for it in items]), device=device)
    labels = torch.as_tensor(np.stack([it["labels"] for it in items]), device=device)
    noise = torch.as_tensor(np.stack([it["noise"] for it in items]), device=device)
    return pix[:, :s], pix[:, s:], classes, labels, noise
