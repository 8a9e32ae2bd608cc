"""``preprocess_clips`` as it was first written: clamp and normalise the whole resized frame, then crop.

Kept only as the reference the crop-first version is tested (and benchmarked) against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mdmf_cache.data.preprocess import CLIP_MEAN, CLIP_STD
from mdmf_cache.data.preprocess import _crop_box, resized_size


def ref_preprocess_clips(clips, crops, device="cpu", size=224, short=256, normalize="clip") -> torch.Tensor:
    device = torch.device(device)
    out = [None] * len(clips)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, clip in enumerate(clips):
        groups.setdefault(tuple(clip.shape), []).append(i)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    for shape, members in groups.items():
        t, h, w, _ = shape
        x = torch.stack([torch.as_tensor(clips[i]) for i in members]).to(device)
        x = x.reshape(len(members) * t, h, w, 3).permute(0, 3, 1, 2).float()
        rh, rw = resized_size(h, w, short)
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).div_(255.0)
        if normalize == "clip":
            x = (x - mean) / std
        x = x.reshape(len(members), t, 3, rh, rw)
        for j, i in enumerate(members):
            top, left = _crop_box(rh, rw, size, crops[i])
            c = x[j, :, :, top : top + size, left : left + size]
            out[i] = c.flip(-1) if crops[i].flip else c
    return torch.stack(out)
