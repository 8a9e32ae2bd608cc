"""The frame-difference motion feature and the consistency distance of the CPM2C / CLIP-MEI releases
(used by ``cpm2c`` and ``clip-mei``), tensors in and out."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["motion_difference", "squared_gap"]


def motion_difference(frames: Tensor, conv1: nn.Conv1d, conv2: nn.Conv1d) -> Tensor:
    """The released bidirectional motion feature: ``(B, T, D) -> (B, T-1, D)``.

    ``c = conv2(conv1(x))`` along time; position t is ``0.5 (c[t+1] - x[t] + c[t] - x[t+1])``.
    """
    x = frames.transpose(1, 2)  # (B, D, T)
    c = conv2(conv1(x))  # (B, D, T)
    forward = c[..., 1:] - x[..., :-1]
    backward = c[..., :-1] - x[..., 1:]
    return (0.5 * (forward + backward)).transpose(1, 2)  # (B, T-1, D)


def squared_gap(a: Tensor, b: Tensor) -> Tensor:
    """The released consistency distance per episode: ``(E, B, L, D)`` twice -> ``(E,)``, the mean over the B
    sequences of the squared Frobenius norm of their difference."""
    return (a - b).pow(2).sum(dim=(-2, -1)).mean(dim=1)
