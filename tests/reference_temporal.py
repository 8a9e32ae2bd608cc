"""The channels-first temporal layers as they were first written (``nn.Conv1d`` over (B, D, T), full TCN).

Kept only as the reference the matmul layers are tested (and benchmarked) against: same modules,
same parameter names, so one state dict loads into both. Not part of the package.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from mdmf_cache.layers.temporal import EpisodeBatchNorm1d


class RefLTCE(nn.Module):
    """Conv1d(D, D, 3, pad 1) twice over (B, D, T) (with ReLU-BN after each when ``norm``)."""

    def __init__(self, dim: int, norm: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            layers.append(nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2))
            if norm:
                layers += [nn.ReLU(), EpisodeBatchNorm1d(dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        h = x.transpose(1, 2)  # (E*B, D, T)
        for layer in self.net:
            h = layer(h, episodes) if isinstance(layer, EpisodeBatchNorm1d) else layer(h)
        return h.transpose(1, 2)


class RefTemporalBlock(nn.Module):
    """Causal block on (B, D, T): left-padded weight-normed convs, ReLU, dropout, ReLU(out + x)."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.trim = (kernel_size - 1) * dilation
        self.conv1 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(dim, dim, kernel_size, dilation=dilation))
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop1(self.act(self.conv1(F.pad(x, (self.trim, 0)))))
        out = self.drop2(self.act(self.conv2(F.pad(out, (self.trim, 0)))))
        return self.act(out + x)


class RefTCN(nn.Module):
    def __init__(self, dim: int, levels: int = 3, kernel_size: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[RefTemporalBlock(dim, kernel_size, 2**i, dropout) for i in range(levels)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)


class RefGTCE(nn.Module):
    """The full TCN over all T positions, then its last step over T plus the input."""

    def __init__(self, dim: int, levels: int = 3, kernel_size: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.tcn = RefTCN(dim, levels, kernel_size, dropout)

    def forward(self, x: Tensor, episodes: int = 1) -> Tensor:
        return self.tcn(x)[:, -1:, :].expand_as(x) + x
