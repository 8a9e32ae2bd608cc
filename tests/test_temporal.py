"""The matmul temporal layers equal the channels-first Conv1d layers they replace.

Reference: ``tests/reference_temporal.py`` (the layers as they were). Same state dict loads into
both; outputs, input gradients, parameter gradients and BatchNorm buffers agree to float64
round-off, for LTCE (both presets), the full TCN and the pruned GTCE, and for the whole heads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mdmf_cache.heads.mdmf_losses import total_loss
from mdmf_cache.heads.mdmf import MDMF
from mdmf_cache.heads.mdmf_config import build_config
from mdmf_cache.layers.temporal import GTCE, LTCE, TCN, conv_as_matmul
from reference_temporal import RefGTCE, RefLTCE, RefTCN

D = 12
F64 = dict(rtol=1e-10, atol=1e-12)


def _pair(new: nn.Module, ref: nn.Module) -> tuple[nn.Module, nn.Module]:
    new, ref = new.double(), ref.double()
    assert list(new.state_dict()) == list(ref.state_dict())  # checkpoints load either way
    ref.load_state_dict(new.state_dict())
    return new, ref


def _check(new: nn.Module, ref: nn.Module, x: torch.Tensor, **kwargs) -> None:
    """Same outputs, input gradients, parameter gradients and buffers."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = new(xa, **kwargs), ref(xb, **kwargs)
    torch.testing.assert_close(ya, yb, **F64)
    w = torch.randn_like(ya)  # a loss that weighs every output differently
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **F64)
    for (name, pa), (_, pb) in zip(new.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **F64, msg=name)
    for (name, ba), (_, bb) in zip(new.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(ba, bb, **F64, msg=name)


def test_conv_as_matmul_is_conv1d() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(D, 7, 3, padding=2, dilation=2).double()
    x = torch.randn(4, 6, D, dtype=torch.float64)  # (B, T, D)
    offsets = (-2, 0, 2)
    index = torch.tensor([[t + o + 1 if 0 <= t + o < 6 else 0 for o in offsets] for t in range(6)])
    torch.testing.assert_close(conv_as_matmul(x, conv, index), conv(x.transpose(1, 2)).transpose(1, 2), **F64)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("t", [1, 2, 8])
def test_ltce_equals_conv1d_layers(norm: bool, t: int) -> None:
    torch.manual_seed(0)
    new, ref = _pair(LTCE(D, norm=norm), RefLTCE(D, norm=norm))
    x = torch.randn(3 * 4, t, D, dtype=torch.float64) * 2 + 0.5
    _check(new.train(), ref.train(), x, episodes=3)  # per-episode BatchNorm statistics and running updates
    _check(new.train(), ref.train(), x)  # one episode
    _check(new.eval(), ref.eval(), x)  # running statistics


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 13])
def test_tcn_and_pruned_gtce_equal_full_tcn(t: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, t, D, dtype=torch.float64)
    tcn, ref_tcn = _pair(TCN(D, dropout=0.0), RefTCN(D, dropout=0.0))
    _check(tcn.train(), ref_tcn.train(), x)
    gtce, ref_gtce = _pair(GTCE(D, dropout=0.0), RefGTCE(D, dropout=0.0))
    _check(gtce.train(), ref_gtce.train(), x)
    gtce.eval(), ref_gtce.eval()
    torch.testing.assert_close(gtce.tcn.last(x), ref_gtce.tcn(x)[:, -1:], **F64)


def test_gtce_computes_only_the_positions_the_last_step_reads(monkeypatch) -> None:
    import mdmf_cache.layers.temporal as temporal

    computed = []
    real = temporal.conv_as_matmul
    monkeypatch.setattr(temporal, "conv_as_matmul",
                        lambda x, conv, index: computed.append(index.shape[0]) or real(x, conv, index))
    GTCE(D).eval()(torch.randn(2, 8, D))  # kernel 3, dilations 1, 2, 4, T = 8
    assert len(computed) == 6 and sum(computed) == 21  # of 6 convs x 8 positions = 48
    computed.clear()
    TCN(D).eval()(torch.randn(2, 8, D))  # the full TCN computes all of them
    assert sum(computed) == 48


def test_gtce_dropout_is_still_applied_in_training() -> None:
    torch.manual_seed(2)
    gtce = GTCE(D, dropout=0.5).double()
    x = torch.randn(4, 8, D, dtype=torch.float64)
    assert not torch.equal(gtce.train()(x), gtce(x))  # different masks
    assert torch.equal(gtce.eval()(x), gtce(x))


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_heads_with_matmul_layers_equal_heads_with_conv1d_layers(preset: str) -> None:
    """The whole MDMF heads: same loss, parameter gradients and buffers with either layer set."""
    torch.manual_seed(3)
    cfg = build_config(preset, D, num_frames=8, heads=2, ffn_dim=24, mmfe_dropout=0.0, ffn_dropout=0.0,
                       tcn_dropout=0.0)
    new = MDMF(cfg).double().train()
    ref = copy.deepcopy(new)
    ref.views["ltc"].extractor = RefLTCE(D, norm=cfg.ltce == "bn").double()
    ref.views["gtc"].extractor = RefGTCE(D, cfg.tcn_levels, cfg.tcn_kernel, 0.0).double()
    ref.load_state_dict(new.state_dict())
    e, n, k, q = 2, 3, 2, 2
    g = torch.Generator().manual_seed(0)
    support = torch.randn(e, n * k, 8, D, generator=g, dtype=torch.float64)
    query = torch.randn(e, n * q, 8, D, generator=g, dtype=torch.float64)
    text = torch.randn(e, n, D, generator=g, dtype=torch.float64)
    noise = torch.rand(e, n * q, generator=g, dtype=torch.float64)
    labels = torch.arange(n).repeat_interleave(q).expand(e, -1)
    losses = []
    for model in (new, ref):
        loss, _ = total_loss(model(support, query, text, pps_noise=noise), labels, cfg)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for (name, pa), (_, pb) in zip(new.named_parameters(), ref.named_parameters()):
        if pa.grad is not None or pb.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, **F64, msg=name)
    for (name, ba), (_, bb) in zip(new.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(ba, bb, **F64, msg=name)
