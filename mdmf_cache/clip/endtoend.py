"""Full mode's model: the CLIP frame encoder in front of a registered few-shot head.

The head is the very module fast mode trains (same class, same checkpoint format); full mode only
puts the backbone in front of it, so a full-mode run's ``best.pt`` is read by the same evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdmf_cache.heads.base import FewShotHead

__all__ = ["EndToEnd"]


class EndToEnd(nn.Module):
    """Pixels of E episodes -> the head's outputs, with gradients into the backbone.

    Args:
        encoder: a :class:`~mdmf_cache.clip.finetune.FrameEncoder` (``(B, T, 3, H, W), episodes -> (B, T, D)``).
        head: the few-shot head.
    """

    def __init__(self, encoder: nn.Module, head: FewShotHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """Classify the queries of E episodes from their pixels.

        Args:
            support: ``(E, S, T, 3, H, W)`` normalised pixels, class-major as in the head.
            query: ``(E, Q, T, 3, H, W)``.
            text: ``(E, N, D)`` prompt embeddings of the episode's classes (frozen text tower), or
                ``(E, N, L)`` token ids when the text tower trains (encoded here, with gradients).
            query_labels, pps_noise, classes, class_text: as in the head's ``forward`` (:mod:`mdmf_cache.heads.base`).
        """
        e, s, q = support.shape[0], support.shape[1], query.shape[1]
        pix = torch.cat([support, query], dim=1).flatten(0, 1)  # (E*(S+Q), T, 3, H, W), episode-major
        frames = self.encoder(pix, episodes=e)  # (E*(S+Q), T, D)
        frames = frames.reshape(e, s + q, *frames.shape[1:])  # (E, S+Q, T, D)
        if not text.is_floating_point():
            n = text.shape[1]
            text = self.encoder.encode_text(text.flatten(0, 1)).reshape(e, n, -1)  # (E, N, D)
        return self.head(frames[:, :s], frames[:, s:], text, query_labels, pps_noise, classes, class_text)

