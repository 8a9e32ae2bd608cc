"""E episodes in one forward pass train exactly like E single-episode passes (method.md §8, Batching).

The paper and the released code run one episode per iteration and average gradients over 16.
Batching episodes must not change the arithmetic: same loss, same gradients, same BatchNorm
running statistics, to float64 tolerance. Dropout is set to 0 here: its random masks cannot be
drawn identically for two batch shapes, and it is not a batch statistic. The PPS draws are
given as the same uniforms to both.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mdmf_cache.heads.mdmf_losses import total_loss
from mdmf_cache.heads.mdmf import MDMF
from mdmf_cache.heads.mdmf_config import build_config
from mdmf_cache.layers.temporal import EpisodeBatchNorm1d

D, T, E, N, K, QC = 16, 4, 3, 3, 2, 2  # width, frames, episodes, ways, shots, queries per class


def _episodes(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(E, N * K, T, D, generator=g, dtype=torch.float64)
    query = torch.randn(E, N * QC, T, D, generator=g, dtype=torch.float64)
    text = torch.randn(E, N, D, generator=g, dtype=torch.float64)
    labels = torch.arange(N).repeat_interleave(QC).expand(E, -1).contiguous()
    noise = torch.rand(E, N * QC, generator=g, dtype=torch.float64)
    return support, query, text, labels, noise


ARMS = [(preset, {"views": v}) for preset in ("paper", "reference") for v in ("both", "ltc", "gtc", "ntc")]
ARMS += [("paper", {"condition": "none"}), ("reference", {"ltce": "bn"})]  # every other head: tests/test_heads.py


@pytest.mark.parametrize("preset,overrides", ARMS, ids=[f"{p}-{o}" for p, o in ARMS])
def test_batched_step_equals_single_episode_passes(preset: str, overrides: dict) -> None:
    torch.manual_seed(0)
    cfg = build_config(preset, D, num_frames=T, heads=2, ffn_dim=32, mmfe_dropout=0.0, ffn_dropout=0.0,
                       tcn_dropout=0.0, **overrides)
    batched = MDMF(cfg).double().train()
    single = copy.deepcopy(batched)
    support, query, text, labels, noise = _episodes()

    loss, _ = total_loss(batched(support, query, text, pps_noise=noise), labels, cfg)
    loss.backward()

    accumulated = 0.0
    for i in range(E):  # the released code: one episode per forward/backward, gradients averaged
        li, _ = total_loss(single(support[i:i + 1], query[i:i + 1], text[i:i + 1], pps_noise=noise[i:i + 1]),
                           labels[i:i + 1], cfg)
        (li / E).backward()
        accumulated += li.item() / E

    assert loss.item() == pytest.approx(accumulated, rel=1e-12, abs=1e-12)
    grads = 0
    for (name, p), (_, p1) in zip(batched.named_parameters(), single.named_parameters()):
        if p.grad is None:
            assert p1.grad is None, name
            continue
        torch.testing.assert_close(p.grad, p1.grad, rtol=1e-9, atol=1e-11, msg=name)
        grads += 1
    assert grads > 0
    for (name, b), (_, b1) in zip(batched.named_buffers(), single.named_buffers()):
        torch.testing.assert_close(b, b1, rtol=1e-12, atol=1e-12, msg=name)
    if cfg.ltce == "bn" and "ltc" in cfg.view_names:
        assert int(batched.views["ltc"].extractor.net[2].num_batches_tracked) == E  # one update per episode


@pytest.mark.parametrize("momentum", [0.1, None])
def test_episode_batchnorm_matches_sequential_batchnorm(momentum) -> None:
    """Per-episode statistics and E sequential running-statistics updates, against nn.BatchNorm1d."""
    torch.manual_seed(1)
    bn = EpisodeBatchNorm1d(5, momentum=momentum).double().train()
    ref = nn.BatchNorm1d(5, momentum=momentum).double().train()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(4 * 3, 5, 7, dtype=torch.float64) * 3 + 1  # E=4 episodes of 3 sequences, T=7
    y = bn(x, episodes=4)
    y_ref = torch.cat([ref(chunk) for chunk in x.split(3)])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, key), getattr(ref, key), rtol=1e-12, atol=1e-12)
    # pooled statistics would differ: the test above can fail
    pooled = nn.BatchNorm1d(5, momentum=momentum).double().train()
    assert not torch.allclose(pooled(x), y)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x, episodes=4), ref(x))  # eval: running statistics, E irrelevant
