"""Temporal context extractors of the two views: LTCE (local, convolution) and GTCE (global, causal TCN)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

try:  # torch >= 2.1
    from torch.nn.utils.parametrizations import weight_norm
except ImportError:  # pragma: no cover - older torch
    from torch.nn.utils import weight_norm  # type: ignore[no-redef]

__all__ = ["LTCE", "TemporalBlock", "TCN", "GTCE"]


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
                layers += [nn.ReLU(), nn.BatchNorm1d(dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return self.net(x.transpose(1, 2)).transpose(1, 2)  # (B, D, T) inside, (B, T, D) out


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

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        last = self.tcn(x)[:, -1:, :]  # (B, 1, D)
        return last.expand_as(x) + x  # (B, T, D)
