"""Training-free baselines and the heads without parameters (OTAM, TSN): shapes, and each one's defining
behaviour on synthetic features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdmf_cache.evaluation.baselines import BASELINES, baseline_logits, get_baseline, protonet, zero_shot
from mdmf_cache.heads.otam import OTAM, OTAMOptions
from mdmf_cache.heads.tsn import TSN, TSNOptions

E, N, K, QPC, T, D = 3, 5, 2, 3, 6, 32


def _clusters(noise: float, seed: int = 0):
    """Class-major episodes whose videos are a class centre (per frame) plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(E, N, 1, D, generator=g), dim=-1) * 3  # (E, N, 1, D)
    support = centres.repeat_interleave(K, dim=1) + noise * torch.randn(E, N * K, T, D, generator=g)
    query = centres.repeat_interleave(QPC, dim=1) + noise * torch.randn(E, N * QPC, T, D, generator=g)
    text = torch.randn(E, N, D, generator=g)
    labels = torch.arange(N).repeat_interleave(QPC).expand(E, -1)
    return support, query, text, labels


@pytest.mark.parametrize("name", BASELINES)
def test_shapes(name: str) -> None:
    support, query, text, _ = _clusters(0.5)
    out = baseline_logits(name, support, query, text)
    assert out.shape == (E, N * QPC, N)
    assert torch.isfinite(out).all()
    assert get_baseline(name)(support, query, text).shape == (E, N * QPC, N)


def test_unknown_baseline() -> None:
    with pytest.raises(ValueError, match="protonet"):
        get_baseline("nearest")


def test_protonet_perfect_on_separated_clusters() -> None:
    support, query, text, labels = _clusters(0.1)
    assert (protonet(support, query, text).argmax(-1) == labels).all()
    # and the parameter-free heads too (every frame sits near its centre)
    for head in (OTAM(OTAMOptions(dim=D, num_frames=T)), TSN(TSNOptions(dim=D, num_frames=T))):
        assert (head(support, query, text)["logits"].argmax(-1) == labels).all(), head.method


def test_zero_shot_picks_text_equal_to_query_mean() -> None:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(E, N, T, D, generator=g)  # one query per class
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(E)])  # (E, N)
    # class perm[e, j] has the text equal to the mean of query j
    text = torch.empty(E, N, D)
    for e in range(E):
        text[e, perm[e]] = query[e].mean(dim=1)
    support = torch.randn(E, N * K, T, D, generator=g)  # ignored
    logits = zero_shot(support, query, text)
    assert torch.equal(logits.argmax(-1), perm)
    torch.testing.assert_close(logits.gather(-1, perm[..., None]).squeeze(-1), torch.ones(E, N))  # cosine 1


def test_otam_prefers_aligned_over_time_reversed() -> None:
    g = torch.Generator().manual_seed(2)
    seq = F.normalize(torch.randn(E, 1, T, D, generator=g), dim=-1)  # (E, 1, T, D) distinct frames
    reversed_seq = seq.flip(2)
    # class 0 = the sequence, class 1 = the same frames time-reversed (identical mean)
    support = torch.cat([seq.expand(E, K, T, D), reversed_seq.expand(E, K, T, D)], dim=1)  # (E, 2K, T, D)
    query = seq + 0.05 * torch.randn(E, 1, T, D, generator=g)
    text = torch.zeros(E, 2, D)
    logits = OTAM(OTAMOptions(dim=D, num_frames=T))(support, query, text)["logits"]  # (E, 1, 2)
    assert (logits[..., 0] > logits[..., 1] + 0.1).all(), logits
    # mean pooling cannot tell them apart
    for scores in (protonet(support, query, text), TSN(TSNOptions(dim=D, num_frames=T))(support, query, text)["logits"]):
        torch.testing.assert_close(scores[..., 0], scores[..., 1], atol=1e-5, rtol=0)
