"""Temporal context extractors of the two views: LTCE (local, convolution) and GTCE (global, causal TCN).

Everything runs in the ``(B, T, D)`` layout of the features. A ``Conv1d(D, D, k)`` over T is computed as
one matmul: the k input positions each output position reads are gathered into a ``(B, T', k*D)``
unfolding (zeros where the kernel reaches past the ends) and multiplied by the ``(D, k*D)`` view of
the convolution's weight. The parameters stay ``nn.Conv1d`` modules (weight-normed in the TCN), so
state dicts are those of the channels-first layers. The matmul runs at the BLAS's speed on any
device; note that on the AMD dev CPU oneDNN's ``conv1d`` (k = 3, T = 8) was faster still, so there
the gain comes from the pruned GTCE (``bench/heads_cpu.py`` times both).

The GTCE only uses the TCN's last time step, so :meth:`TCN.last` computes, block by block, only the
positions the next block reads: 21 of the 48 convolution positions at T = 8, kernel 3, dilations
1, 2, 4.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm  # torch >= 2.1: ``conv.weight`` is always current

__all__ = ["EpisodeRunningStats", "EpisodeBatchNorm1d", "conv_as_matmul", "LTCE", "TemporalBlock", "TCN", "GTCE"]


class EpisodeRunningStats:
    """Mixin for a ``nn.BatchNorm*d``: E sequential running-statistics updates in closed form.

    Shared by :class:`EpisodeBatchNorm1d` (the heads) and ``mdmf_cache.clip.finetune.EpisodeBatchNorm2d``
    (the fine-tuned CLIP ResNet): both normalise E stacked episodes with per-episode statistics and
    update the running statistics as E consecutive single-episode passes would. With momentum m and
    per-episode statistics s_1..s_E: ``r <- (1 - m)^E r + sum_i m (1 - m)^(E - i) s_i``; with
    ``momentum=None`` (cumulative average) one step per episode.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    momentum: float | None

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased: Tensor) -> None:
        """E sequential updates from per-episode ``mean`` and unbiased variance ``unbiased``, both ``(E, D)``."""
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


class EpisodeBatchNorm1d(EpisodeRunningStats, nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of each episode, not of the whole batch.

    The paper (and the released code) trains on one episode per forward pass, so a BatchNorm
    normalises with that episode's statistics and updates its running statistics once per episode.
    Given ``episodes = E`` episodes stacked episode-major along the batch axis, this normalises each
    episode with its own mean and variance and updates the running statistics exactly as E
    consecutive single-episode passes would (:class:`EpisodeRunningStats`; the running variance
    takes the unbiased variance, as ``nn.BatchNorm1d`` does). In eval mode, or with E = 1, it is
    ``nn.BatchNorm1d`` (same parameters and buffers, so state dicts are interchangeable).
    """

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, D, T) -> (E*B, D, T)``, statistics over (B, T) of each episode; or channels-last rows
        ``(E*R, D) -> (E*R, D)`` (e.g. R = B*T rows of a ``(B, T, D)`` batch), statistics over each
        episode's R rows."""
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
            n = xe.shape[1] * xe.shape[3]
            self._update_running(mean.reshape(episodes, d), var.reshape(episodes, d) * (n / max(n - 1, 1)))
        return y.reshape(x.shape)


@lru_cache(maxsize=512)
def _taps(out_pos: tuple[int, ...], in_pos: tuple[int, ...], offsets: tuple[int, ...], device: torch.device) -> Tensor:
    """``(P_out, k)`` rows of the zero-padded input each tap reads: 0 = the zero row, i + 1 = ``in_pos[i]``.

    Cached per device, so a step copies no index to the GPU.
    """
    where = {p: i + 1 for i, p in enumerate(in_pos)}
    return torch.tensor([[where.get(p + o, 0) for o in offsets] for p in out_pos], dtype=torch.long, device=device)


@lru_cache(maxsize=512)
def _rows(wanted: tuple[int, ...], have: tuple[int, ...], device: torch.device) -> Tensor:
    """Index of positions ``wanted`` among the rows ``have`` (cached per device)."""
    return _taps(wanted, have, (0,), device).reshape(-1) - 1


def conv_as_matmul(x: Tensor, conv: nn.Conv1d, index: Tensor) -> Tensor:
    """``Conv1d(D, D', k)`` at chosen positions as one matmul: ``(B, P_in, D) -> (B, P_out, D')``.

    Args:
        x: ``(B, P_in, D)`` the input at P_in positions (channels last).
        conv: The convolution whose ``weight (D', D, k)`` and ``bias (D',)`` are used.
        index: ``(P_out, k)`` long, row of ``[zeros, x]`` read by tap j of output position p (see
            :func:`_taps`); tap j multiplies ``weight[:, :, j]``, as in ``conv1d``.
    """
    b, _, d = x.shape
    p_out, k = index.shape
    padded = F.pad(x, (0, 0, 1, 0))  # (B, 1 + P_in, D), row 0 = zeros
    cols = padded.index_select(1, index.reshape(-1)).reshape(b, p_out, k * d)  # (B, P_out, k*D) tap-major
    weight = conv.weight  # (D', D, k)
    return F.linear(cols, weight.transpose(1, 2).reshape(weight.shape[0], k * d), conv.bias)  # (B, P_out, D')


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
        self.kernel_size = kernel_size
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        for _ in range(2):
            layers.append(nn.Conv1d(dim, dim, kernel_size, padding=pad))
            if norm:
                layers += [nn.ReLU(), EpisodeBatchNorm1d(dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, T, D) -> (E*B, T, D)``; BatchNorm statistics per episode (E = ``episodes``)."""
        t = x.shape[1]
        pad = self.kernel_size // 2
        positions = tuple(range(t))
        index = _taps(positions, positions, tuple(range(-pad, self.kernel_size - pad)), x.device)  # (T, k)
        h = x
        for layer in self.net:
            if isinstance(layer, nn.Conv1d):
                h = conv_as_matmul(h, layer, index)
            elif isinstance(layer, EpisodeBatchNorm1d):
                h = layer(h.reshape(-1, h.shape[-1]), episodes).reshape(h.shape)  # rows (E*B*T, D), episode-major
            else:
                h = layer(h)
        return h


class TemporalBlock(nn.Module):
    """Causal residual block: [weight_norm(Conv1d) -> right trim -> ReLU -> Dropout] x 2, ReLU(out + x).

    Output t sees inputs t, t - d, ..., t - (k-1)d (zeros before 0), as the released code's
    pad-both-sides-then-trim-the-right convolution, without computing the trimmed outputs.

    Args:
        dim: Width D (in = out, so no 1x1 downsample).
        kernel_size: Convolution kernel k.
        dilation: Dilation d.
        dropout: Dropout probability.
    """

    def __init__(self, dim: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.conv1 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Input offsets read by taps 0..k-1: ``-(k-1)d, ..., -d, 0``."""
        return tuple(-(self.kernel_size - 1 - j) * self.dilation for j in range(self.kernel_size))

    def needs(self, out_pos: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Positions ``(inputs, first-conv outputs)`` this block reads to produce ``out_pos``."""
        mid = tuple(sorted({p + o for p in out_pos for o in self.offsets if p + o >= 0}))
        inp = tuple(sorted({p + o for p in mid for o in self.offsets if p + o >= 0} | set(out_pos)))
        return inp, mid

    def forward(self, x: Tensor, in_pos: tuple[int, ...] | None = None, out_pos: tuple[int, ...] | None = None) -> Tensor:
        """``(B, P_in, D) -> (B, P_out, D)`` channels last, at positions ``out_pos`` (default: all).

        Args:
            x: The block's input at positions ``in_pos`` (default: all T); it must hold every
                position :meth:`needs` names for ``out_pos``.
            in_pos: Sorted time positions of the rows of ``x``.
            out_pos: Sorted positions to compute.
        """
        in_pos = tuple(range(x.shape[1])) if in_pos is None else in_pos
        out_pos = in_pos if out_pos is None else out_pos
        _, mid = self.needs(out_pos)
        h = self.drop1(self.act(conv_as_matmul(x, self.conv1, _taps(mid, in_pos, self.offsets, x.device))))
        h = self.drop2(self.act(conv_as_matmul(h, self.conv2, _taps(out_pos, mid, self.offsets, x.device))))
        if out_pos != in_pos:
            x = x.index_select(1, _rows(out_pos, in_pos, x.device))  # the residual at the output positions
        return self.act(h + x)


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
        for block in self.blocks:
            x = block(x)
        return x

    def last(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, 1, D)``: ``forward(x)[:, -1:]``, computing only the positions it depends on."""
        outs = [(x.shape[1] - 1,)]  # output positions of each block, last block first
        for block in reversed(self.blocks):
            outs.append(block.needs(outs[-1])[0])
        outs.reverse()  # outs[0]: positions of x read; outs[i + 1]: block i's outputs
        h = x if len(outs[0]) == x.shape[1] else x.index_select(1, _rows(outs[0], tuple(range(x.shape[1])), x.device))
        for i, block in enumerate(self.blocks):
            h = block(h, outs[i], outs[i + 1])
        return h


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
        return self.tcn.last(x).expand_as(x) + x  # (B, 1, D) over T, plus the input
