"""Attention blocks and position encodings that several released heads share, tensors in and out.

``MultiHeadAttention`` is the post-norm self-attention of the HyRSM codebase (used by ``hyrsm``, ``hyrsm++`` and
``mpl``); ``PreNormAttention`` the pre-norm self-attention of the CLIP-FSAR codebase's ``PreNormattention(Attention)``
(``hyrsm``, ``hyrsm++``, and ``emp-net``'s spatio-temporal blocks); ``PositionalEncoding`` the sinusoidal encoding of
the TRX codebase (used by ``trx`` and ``team``); ``PositionalEncoder`` the HyRSM codebase's scaled sinusoidal table (``hyrsm``, ``hyrsm++``, ``molo``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MultiHeadAttention", "PreNormAttention", "PositionalEncoding", "PositionalEncoder", "positional_table"]


class MultiHeadAttention(nn.Module):
    """The released post-norm ``MultiHeadAttention(n_head, D, d_k, d_v, dropout)``, self-attention only.

    ``w_qs``, ``w_ks``, ``w_vs`` without bias, initialised ``normal(0, sqrt(2 / (D + d_k)))``; softmax of
    ``q k^T / sqrt(d_k)`` with dropout on the probabilities; ``fc`` (xavier-normal weight), dropout, then
    ``LayerNorm(out + x)``.
    """

    def __init__(self, heads: int, dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.heads, self.d_k = heads, dim // heads
        self.w_qs = nn.Linear(dim, dim, bias=False)
        self.w_ks = nn.Linear(dim, dim, bias=False)
        self.w_vs = nn.Linear(dim, dim, bias=False)
        std = math.sqrt(2.0 / (dim + self.d_k))  # d_k = d_v
        for w in (self.w_qs, self.w_ks, self.w_vs):
            nn.init.normal_(w.weight, mean=0.0, std=std)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.fc.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, D) -> (B, L, D)``."""
        b, length, d = x.shape
        h, dk = self.heads, self.d_k
        split = lambda y: y.reshape(b, length, h, dk).transpose(1, 2)  # (B, H, L, d_k)
        q, k, v = split(self.w_qs(x)), split(self.w_ks(x)), split(self.w_vs(x))
        attn = self.attn_dropout((q @ k.transpose(-1, -2) / math.sqrt(dk)).softmax(dim=-1))  # (B, H, L, L)
        out = (attn @ v).transpose(1, 2).reshape(b, length, d)  # (B, L, H*d_k)
        return self.layer_norm(self.dropout(self.fc(out)) + x)


class PreNormAttention(nn.Module):
    """``Attention(LN(x)) + x``: the released ``PreNormattention(D, Attention(D, heads, head_dim, dropout))``.

    ``to_qkv`` (no bias) split q | k | v, heads the outer factor of the feature axis, softmax of
    ``q k^T / sqrt(head_dim)``; the out projection with dropout, the identity where one head is D wide (as
    released). ``head_dim`` None: D / heads (HyRSM's); EMP-Net's blocks use 4 heads of D / 8.
    """

    def __init__(self, dim: int, heads: int, dropout: float, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads if head_dim is None else head_dim
        inner = heads * self.head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if inner != dim or heads > 1 \
            else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        b, t, _ = x.shape
        h, hd = self.heads, self.head_dim
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        attn = (q @ k.transpose(-1, -2) * hd ** -0.5).softmax(dim=-1)  # (B, H, T, T)
        out = (attn @ v).transpose(1, 2).reshape(b, t, h * hd)  # (B, T, H*hd)
        return self.to_out(out) + x


class PositionalEncoding(nn.Module):
    """The released ``PositionalEncoding``: ``x + scale * [sin, cos](pos / 10000^(2i/D))``, then dropout."""

    def __init__(self, dim: int, dropout: float, max_len: int, scale: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        pe = torch.zeros(max_len, dim)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * -(math.log(10000.0) / dim))
        pe[:, 0::2] = torch.sin(position * div_term) * scale
        pe[:, 1::2] = (torch.cos(position * div_term) * scale)[:, : dim // 2]
        self.register_buffer("pe", pe)  # (max_len, D), in the checkpoint as in the released module

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return self.dropout(x + self.pe[: x.shape[1]].to(x.dtype))


def positional_table(dim: int, length: int) -> Tensor:
    """The released ``PositionalEncoder`` table ``(length, D)`` (float32, as stored there): for even channel
    ``i``, ``sin(p / 10000^(2i / D))`` at ``i`` and ``cos(p / 10000^(2(i+1) / D))`` at ``i + 1``."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(0, dim, 2, dtype=np.float64)[None]
    table = np.zeros((length, dim))
    table[:, 0::2] = np.sin(pos / 10000.0 ** (2 * i / dim))
    table[:, 1::2] = np.cos(pos / 10000.0 ** (2 * (i + 1) / dim))
    return torch.from_numpy(table).float()


class PositionalEncoder(nn.Module):
    """``x * sqrt(D / A) + B * table[:T]``, then dropout (the released ``PositionalEncoder``).

    The released table has 20 rows; this one has ``max(20, T)`` by the same formula.
    """

    def __init__(self, dim: int, num_frames: int, dropout: float, a: float, b: float) -> None:
        super().__init__()
        self.scale, self.b = math.sqrt(dim / a), b
        self.register_buffer("pe", positional_table(dim, max(20, num_frames)))  # (L, D), a buffer as released
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return self.dropout(x * self.scale + self.b * self.pe[: x.shape[1]].to(x.dtype))
