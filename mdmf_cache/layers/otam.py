"""Cosine frame distances, the OTAM alignment distance (docs/method.md §7) and the Bi-MHM set distance of HyRSM (used
by ``hyrsm``, ``hyrsm++`` and ``mpl``), as pure batched functions."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


__all__ = ["cosine_similarity", "cosine_distance", "frame_distances", "otam", "otam_distance", "bi_mhm"]


def cosine_similarity(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """All-pairs cosine ``<a_i, b_j> / (|a_i| |b_j| + eps)`` (eps added to the product of norms).

    Args:
        a: ``(..., M, D)``.
        b: ``(..., P, D)``; leading dims broadcast with ``a``.
        eps: Added to the product of the norms (0.01 in the released code).

    Returns:
        ``(..., M, P)``.
    """
    dots = a @ b.transpose(-1, -2)  # (..., M, P)
    norms = a.norm(dim=-1).unsqueeze(-1) * b.norm(dim=-1).unsqueeze(-2)  # (..., M, P)
    return dots / (norms + eps)


def cosine_distance(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """All-pairs frame distance ``1 - cos`` (see :func:`cosine_similarity`).

    Args:
        a: ``(..., M, D)``, e.g. query frames ``(..., T, D)``.
        b: ``(..., P, D)``, e.g. prototype frames ``(..., T, D)``.
        eps: Added to the product of the norms.

    Returns:
        ``(..., M, P)``.
    """
    return 1.0 - cosine_similarity(a, b, eps)


def frame_distances(query_frames: Tensor, proto_frames: Tensor, eps: float) -> Tensor:
    """All query-prototype frame distances ``1 - cos``: ``(E, Q, T, D), (E, N, T, D) -> (E, Q, N, T, T)``."""
    e, q, t, d = query_frames.shape
    n = proto_frames.shape[1]
    dist = cosine_distance(query_frames.reshape(e, q * t, d), proto_frames.reshape(e, n * t, d), eps)  # (E, Q*T, N*T)
    return dist.reshape(e, q, t, n, t).permute(0, 1, 3, 2, 4)  # (E, Q, N, T, T)


def otam(dist: Tensor, lam: float = 0.5) -> Tensor:
    """One-direction OTAM distance: soft-DTW over a zero-padded frame-distance matrix.

    The prototype-frame axis is padded with a zero column on each side (T x (T+2) cells ``c``).
    Row 0 is a plain running sum. For rows ``l >= 1`` column 0 stays 0, column 1 and the last
    column take ``dist + smin(up-left, left, up)``, the inner columns ``dist + smin(up-left, left)``.
    The distance is the bottom-right cell.

    Within a row the left neighbour makes the recurrence sequential, but in log space it is linear:
    with ``z = -c / lam``, ``a_m = -dist_m / lam`` and ``g_m`` the logsumexp of the previous-row
    terms (up-left, plus up in columns 1 and T+1), ``z_m = a_m + logaddexp(g_m, z_{m-1})`` and
    ``z_0 = 0``. Writing ``A_m = a_1 + ... + a_m`` this unrolls to
    ``z_m = A_m + logcumsumexp([0, g_1 - A_0, ..., g_m - A_{m-1}])_m``, so each row is one
    ``logcumsumexp`` and the only Python loop is over the T rows.

    Args:
        dist: ``(..., T, T)`` frame distances, rows = the sequence being aligned (e.g. query
            frames), columns = the other sequence (prototype frames). Any leading dims.
        lam: Soft-min temperature.

    Returns:
        ``(...)`` the OTAM distance.
    """
    # One unbind instead of indexing a row per step: the backward of T row slices would allocate
    # and accumulate T full-size gradients, the backward of unbind is one stack.
    rows = torch.nn.functional.pad(dist, (1, 1)).unbind(dim=-2)  # T rows of (..., T+2)
    prev = rows[0].cumsum(dim=-1)  # row 0: running sum, (..., T+2)
    for padded_row in rows[1:]:
        cost = -padded_row[..., 1:] / lam  # a_1..a_{T+1}, (..., T+1)
        neg_prev = -prev / lam  # (..., T+2), computed once for up-left and up
        up_left = neg_prev[..., :-1]  # c[row-1, m-1] for m = 1..T+1, (..., T+1)
        up = neg_prev[..., 1:]  # c[row-1, m], used in columns 1 and T+1 only
        # Columns 1 and T+1 also see the cell above; inner columns only see up-left.
        g = torch.cat(
            [
                torch.logaddexp(up_left[..., :1], up[..., :1]),
                up_left[..., 1:-1],
                torch.logaddexp(up_left[..., -1:], up[..., -1:]),
            ],
            dim=-1,
        )
        cum_cost = cost.cumsum(dim=-1)  # A_1..A_{T+1}
        shifted = torch.cat([torch.zeros_like(cum_cost[..., :1]), cum_cost[..., :-1]], dim=-1)  # A_0..A_T
        terms = torch.cat([torch.zeros_like(g[..., :1]), g - shifted], dim=-1)  # (..., T+2): z_0 term first
        z = cum_cost + torch.logcumsumexp(terms, dim=-1)[..., 1:]  # z_1..z_{T+1}
        prev = torch.cat([torch.zeros_like(z[..., :1]), -lam * z], dim=-1)  # column 0 stays 0
    return prev[..., -1]


def otam_distance(dist: Tensor, lam: float = 0.5, bidirectional: bool = True) -> Tensor:
    """OTAM distance of a view: ``otam(D) + otam(D^T)``, or ``otam(D)`` alone.

    Args:
        dist: ``(..., T, T)`` frame distances (rows = query frames, columns = prototype frames).
        lam: Soft-min temperature.
        bidirectional: Add the transposed direction (the released code's Kinetics 1-shot config
            uses one direction only).

    Returns:
        ``(...)``.
    """
    if not bidirectional:
        return otam(dist, lam)
    # both directions in one pass (half the kernel launches of two calls, same arithmetic)
    both = otam(torch.stack([dist, dist.transpose(-1, -2)]), lam)  # (2, ...)
    return both[0] + both[1]


def bi_mhm(support: Tensor, query: Tensor) -> Tensor:
    """Bi-MHM distances ``(..., M, T, D), (..., T, D) -> (..., M)``: ``1 - cos`` frame distances (``F.normalize``),
    summed min over the query frames per support frame plus summed min over the support frames per query frame."""
    dist = 1.0 - F.normalize(support, dim=-1) @ F.normalize(query, dim=-1).unsqueeze(-3).transpose(-1, -2)  # (..., M, T, T)
    return dist.min(dim=-1).values.sum(dim=-1) + dist.min(dim=-2).values.sum(dim=-1)
