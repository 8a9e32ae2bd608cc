"""Pixel preprocessing (docs/method.md §4), batched on the compute device.

Resize the short side to 256 (bilinear), then a 224 crop: centre at test; at train a random crop
anywhere plus a horizontal flip with p 0.5, one draw per video (and view) shared by all its frames.
Then CLIP mean/std normalisation (paper) or raw [0, 1] pixels (released code).

Clips of the same frame size are resized in one ``interpolate`` call, so a batch of UCF101 videos
(all 320x240) is a single kernel launch per step instead of a PIL call per frame. Clamping and
normalisation run after the crop, on the pixels that are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mdmf_cache.choices import NORMALIZATIONS  # declared once

#: CLIP's pixel mean and std (RGB), the paper preset's normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Crop:
    """Where to crop one clip: offsets as fractions of the free range, plus a flip.

    ``Crop.centre()`` is the test crop. Fractions keep a draw independent of the frame size.
    """

    fy: float = 0.5
    fx: float = 0.5
    flip: bool = False

    @staticmethod
    def centre() -> "Crop":
        return Crop()

    @staticmethod
    def random(rng: np.random.Generator, flip: bool = True) -> "Crop":
        fy, fx, coin = rng.random(3)
        return Crop(float(fy), float(fx), bool(flip and coin < 0.5))


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to ``short``, aspect kept."""
    if h <= w:
        return short, max(short, round(w * short / h))
    return max(short, round(h * short / w)), short


def _crop_box(h: int, w: int, size: int, crop: Crop) -> tuple[int, int]:
    top = min(int(crop.fy * (h - size + 1)), h - size)
    left = min(int(crop.fx * (w - size + 1)), w - size)
    return top, left


def preprocess_clips(
    clips: list[np.ndarray | torch.Tensor],
    crops: list[Crop],
    device: torch.device | str = "cpu",
    size: int = 224,
    short: int = 256,
    normalize: str = "clip",
) -> torch.Tensor:
    """Decoded clips -> model-ready pixels.

    Args:
        clips: B clips, each uint8 (T, H, W, 3) RGB; sizes may differ between clips.
        crops: one Crop per clip.
        device: where the arithmetic runs.
        size: crop side (224).
        short: resize target of the short side (256).
        normalize: ``clip`` (CLIP mean/std) or ``none`` ([0, 1] pixels).

    Returns:
        float32 (B, T, 3, size, size) on ``device``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if len(clips) != len(crops):
        raise ValueError(f"{len(clips)} clips but {len(crops)} crops")
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(clips)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, clip in enumerate(clips):
        groups.setdefault(tuple(clip.shape), []).append(i)
    for shape, members in groups.items():
        t, h, w, _ = shape
        x = torch.stack([torch.as_tensor(clips[i]) for i in members]).to(device, non_blocking=True)
        x = x.reshape(len(members) * t, h, w, 3).permute(0, 3, 1, 2).float()  # (B*T, 3, H, W)
        rh, rw = resized_size(h, w, short)
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        x = x.reshape(len(members), t, 3, rh, rw)
        for j, i in enumerate(members):
            top, left = _crop_box(rh, rw, size, crops[i])
            c = x[j, :, :, top : top + size, left : left + size]
            out[i] = c.flip(-1) if crops[i].flip else c
    # per-pixel arithmetic on the crops only (bit-identical to doing it before cropping; 224^2 of 256x341)
    pix = torch.stack(out).clamp_(0, 255).div_(255.0)  # (B, T, 3, size, size)
    if normalize == "clip":
        mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
        pix.sub_(mean).div_(std)
    return pix
