"""``preprocess_clips`` crops before clamping and normalising: bit-identical to the old order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdmf_cache.data.preprocess import Crop, preprocess_clips
from reference_preprocess import ref_preprocess_clips


@pytest.mark.parametrize("normalize", ["clip", "none"])
def test_crop_first_is_bit_identical(normalize: str) -> None:
    rng = np.random.default_rng(0)
    # mixed sizes (landscape, portrait, smaller than the crop), saturated pixels so the clamp matters
    shapes = [(3, 240, 320), (3, 240, 320), (3, 330, 200), (3, 120, 160)]
    clips = [rng.integers(0, 256, size=(*s, 3), dtype=np.uint8) for s in shapes]
    clips[0][:, :40] = 255
    clips[1][:, :, :30] = 0
    crops = [Crop.centre(), Crop.random(rng), Crop(0.9, 0.1, True), Crop(0.0, 1.0, True)]
    new = preprocess_clips(clips, crops, normalize=normalize)
    old = ref_preprocess_clips(clips, crops, normalize=normalize)
    assert new.shape == (4, 3, 3, 224, 224) and new.dtype == torch.float32
    assert torch.equal(new, old)
    assert not torch.equal(new[2], new[2].flip(-1))  # the flip is applied (the comparison can fail)
