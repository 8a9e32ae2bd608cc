"""Temporal context extractors of the two views: LTCE (local, convolution) and GTCE (global, causal TCN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

try:  # torch >= 2.1
    from torch.nn.utils.parametrizations import weight_norm
except ImportError:  # pragma: no cover - older torch
    from torch.nn.utils import weight_norm  # type: ignore[no-redef]

__all__ = ["EpisodeBatchNorm1d", "LTCE", "TemporalBlock", "TCN", "GTCE"]


class EpisodeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of each episode, not of the whole batch.

    The paper (and the released code) trains on one episode per forward pass, so a BatchNorm
    normalises with that episode's statistics and updates its running statistics once per episode.
    Given ``episodes = E`` episodes stacked episode-major along the batch axis, this normalises each
    episode with its own mean and variance and updates the running statistics exactly as E
    consecutive single-episode passes would: with momentum m and per-episode statistics s_1..s_E,
    ``r <- (1 - m)^E r + sum_i m (1 - m)^(E - i) s_i`` (the running variance takes the unbiased
    variance, as ``nn.BatchNorm1d`` does). In eval mode, or with E = 1, it is ``nn.BatchNorm1d``
    (same parameters and buffers, so state dicts are interchangeable).
    """

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, D, T) -> (E*B, D, T)``, statistics over (B, T) of each episode."""
        if episodes == 1 or not (self.training or not self.track_running_stats):
            return super().forward(x)
        b, d = x.shape[:2]
        if b % episodes:
            raise ValueError(f"batch of {b} is not {episodes} equal episodes")
        xe = x.reshape(episodes, b // episodes, d, -1)  # (E, B, D, T)
        mean = xe.mean(dim=(1, 3), keepdim=True)  # (E, 1, D, 1)
        var = xe.var(dim=(1, 3), unbiased=False, keepdim=True)  # (E, 1, D, 1)
        y = (xe - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        if self.training and self.track_running_stats:
            self._update_running(mean.reshape(episodes, d), var.reshape(episodes, d), xe.shape[1] * xe.shape[3])
        return y.reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: int) -> None:
        """E sequential running-statistics updates from per-episode ``mean``/``var`` ``(E, D)``."""
        unbiased = var * (n / max(n - 1, 1))  # (E, D)
        e = mean.shape[0]
        if self.momentum is None:  # cumulative moving average: one step per episode
            for i in range(e):
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(f * mean[i])
                self.running_var.mul_(1 - f).add_(f * unbiased[i])
            return
        m = self.momentum
        # weight of episode i's statistics after all E updates: m (1 - m)^(E - 1 - i)
        w = m * (1 - m) ** torch.arange(e - 1, -1, -1, dtype=mean.dtype, device=mean.device)  # (E,)
        keep = (1 - m) ** e
        self.running_mean.mul_(keep).add_((w[:, None] * mean).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(keep).add_((w[:, None] * unbiased).sum(0).to(self.running_var.dtype))
        self.num_batches_tracked.add_(e)


class LTCE(nn.Module):
    """Local temporal context extractor: two Conv1d(D, D, 3, pad 1) over T.

    Args:
        dim: Width D.
        norm: False = Conv, Conv with nothing between (released code, a linear block); True =
            Conv-ReLU-BN-Conv-ReLU-BN (paper Eq. 3).
        kernel_size: Convolution kernel (odd, "same" padding).
    """

    def __init__(self, dim: int, norm: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        for _ in range(2):
            layers.append(nn.Conv1d(dim, dim, kernel_size, padding=pad))
            if norm:
                layers += [nn.ReLU(), EpisodeBatchNorm1d(dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, T, D) -> (E*B, T, D)``; BatchNorm statistics per episode (E = ``episodes``)."""
        h = x.transpose(1, 2)  # (E*B, D, T)
        for layer in self.net:
            h = layer(h, episodes) if isinstance(layer, EpisodeBatchNorm1d) else layer(h)
        return h.transpose(1, 2)  # (E*B, T, D)


class TemporalBlock(nn.Module):
    """Causal residual block: [weight_norm(Conv1d) -> right trim -> ReLU -> Dropout] x 2, ReLU(out + x).

    Args:
        dim: Width D (in = out, so no 1x1 downsample).
        kernel_size: Convolution kernel k.
        dilation: Dilation d; output t only sees inputs <= t. The released code pads (k-1)*d on
            both sides and trims the right; here the input is padded on the left only, which gives
            the same outputs without computing the (k-1)*d trimmed ones (up to 2x the conv work at
            T = 8, dilation 4).
        dropout: Dropout probability.
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.trim = (kernel_size - 1) * dilation  # left padding
        self.conv1 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def _causal(self, conv: nn.Module, x: Tensor) -> Tensor:
        return conv(F.pad(x, (self.trim, 0)) if self.trim else x)  # (B, D, T + trim) -> (B, D, T)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, T) -> (B, D, T)`` (channels first)."""
        out = self.drop1(self.act(self._causal(self.conv1, x)))
        out = self.drop2(self.act(self._causal(self.conv2, out)))
        return self.act(out + x)


class TCN(nn.Module):
    """Stack of causal :class:`TemporalBlock` with dilations 1, 2, 4, ...

    Args:
        dim: Width D.
        levels: Number of blocks.
        kernel_size: Convolution kernel.
        dropout: Dropout probability.
    """

    def __init__(self, dim: int, levels: int = 3, kernel_size: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TemporalBlock(dim, kernel_size, 2**i, dropout) for i in range(levels)])

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``; output t depends on inputs 0..t only."""
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)  # (B, D, T) inside


class GTCE(nn.Module):
    """Global temporal context extractor: the TCN's last step repeated over T, plus the input.

    Args:
        dim: Width D.
        levels: TCN blocks.
        kernel_size: TCN kernel.
        dropout: TCN dropout.
    """

    def __init__(self, dim: int, levels: int = 3, kernel_size: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.tcn = TCN(dim, levels, kernel_size, dropout)

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        """``(B, T, D) -> (B, T, D)``; ``episodes`` is unused (no batch statistics here)."""
        last = self.tcn(x)[:, -1:, :]  # (B, 1, D)
        return last.expand_as(x) + x  # (B, T, D)
