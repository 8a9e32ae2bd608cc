"""OTAM and cosine distances against a plain-Python transcription of docs/method.md §7."""

from __future__ import annotations

import math

import pytest
import torch

from mdmf_cache.layers.otam import cosine_distance, cosine_similarity, otam, otam_distance


def _soft_min(values: list[float], lam: float) -> float:
    low = min(values)
    return low - lam * math.log(sum(math.exp(-(v - low) / lam) for v in values))


def _otam_loop(dist: list[list[float]], lam: float) -> float:
    """method.md §7 written out cell by cell: pad a zero column each side, row 0 a running sum, then
    column 0 stays 0, column 1 and the last column smin(up-left, left, up), inner smin(up-left, left)."""
    rows = len(dist)
    padded = [[0.0, *row, 0.0] for row in dist]
    width = len(padded[0])
    cum = [[0.0] * width for _ in range(rows)]
    for m in range(1, width):
        cum[0][m] = cum[0][m - 1] + padded[0][m]
    for r in range(1, rows):
        for m in range(1, width):
            options = [cum[r - 1][m - 1], cum[r][m - 1]]
            if m == 1 or m == width - 1:
                options.append(cum[r - 1][m])
            cum[r][m] = padded[r][m] + _soft_min(options, lam)
    return cum[rows - 1][width - 1]


@pytest.mark.parametrize("frames", [1, 2, 5, 8])
@pytest.mark.parametrize("lam", [0.5, 0.1])
def test_otam_matches_loop(frames: int, lam: float) -> None:
    gen = torch.Generator().manual_seed(frames)
    dist = torch.rand(3, 2, frames, frames, generator=gen, dtype=torch.float64) * 2
    got = otam(dist, lam)
    assert got.shape == (3, 2)
    want = torch.tensor([[_otam_loop(d.tolist(), lam) for d in row] for row in dist], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_otam_float32_large_distances_stable() -> None:
    gen = torch.Generator().manual_seed(0)
    dist = (torch.rand(4, 8, 8, generator=gen) * 20).requires_grad_()
    got = otam(dist, 0.5)
    want = torch.tensor([_otam_loop(d.tolist(), 0.5) for d in dist.detach()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    assert torch.isfinite(dist.grad).all()


def test_otam_distance_directions() -> None:
    dist = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    both = otam_distance(dist, 0.5, bidirectional=True)
    torch.testing.assert_close(both, otam(dist, 0.5) + otam(dist.transpose(-1, -2), 0.5))
    torch.testing.assert_close(otam_distance(dist, 0.5, bidirectional=False), otam(dist, 0.5))


def test_otam_lower_for_aligned_than_shuffled() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 16, generator=gen)
    query = base + 0.05 * torch.randn(8, 16, generator=gen)
    shuffled = base[torch.tensor([7, 2, 5, 0, 3, 6, 1, 4])]
    aligned_d = otam_distance(cosine_distance(query, base, 0.01))
    shuffled_d = otam_distance(cosine_distance(query, shuffled, 0.01))
    assert aligned_d < shuffled_d


def test_reference_cosine_eps_value() -> None:
    a = torch.tensor([[3.0, 4.0]])
    b = torch.tensor([[3.0, 4.0], [4.0, -3.0]])
    cos = cosine_similarity(a, b, eps=0.01)
    torch.testing.assert_close(cos, torch.tensor([[25.0 / 25.01, 0.0]]))
    torch.testing.assert_close(cosine_distance(a, b, eps=0.01), torch.tensor([[1 - 25.0 / 25.01, 1.0]]))


def test_cosine_batched_shapes() -> None:
    a, b = torch.randn(2, 3, 8, 16), torch.randn(2, 3, 6, 16)
    assert cosine_distance(a, b, 1e-8).shape == (2, 3, 8, 6)
