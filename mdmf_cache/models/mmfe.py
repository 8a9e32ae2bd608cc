"""Multi-modal feature enhancement (MMFE): one pre-norm cross-attention layer fusing a text token with frames."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MMFE"]


class MMFE(nn.Module):
    """One-layer cross-attention transformer of one view (SPEC section 6).

    Query = concat(token, context), key = value = concat(token, frames), token at position 0.
    One LayerNorm is shared by q, k and v (pre-norm) and the residual adds the un-normed query;
    then a feed-forward block with its own residual and no norm before it.

    Args:
        dim: Width D.
        heads: Attention heads (head width D / heads).
        ffn_dim: Feed-forward hidden width.
        attn_dropout: Dropout after the out projection.
        ffn_dropout: Dropout after the GELU and after the second linear.
        num_positions: Length T+1 of learned position embeddings added to query, key and value;
            None = no position embeddings (released code).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        ffn_dim: int = 2048,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
        num_positions: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(num_positions, dim) * 0.02) if num_positions else None
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(attn_dropout))
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.GELU(),
            nn.Dropout(ffn_dropout),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(ffn_dropout),
        )

    def _split(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        return x.reshape(b, length, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T+1, D/H)

    def forward(self, token: Tensor | None, context: Tensor, frames: Tensor) -> Tensor:
        """Fuse.

        Args:
            token: ``(B, D)`` text token (class text, PPS choice, or zeros); None = no token
                position (frames only, as CLIP-FSAR's queries).
            context: ``(B, T, D)`` extractor output (or the frames themselves for NTC).
            frames: ``(B, T, D)`` frame embeddings.

        Returns:
            ``(B, T+1, D)`` with position 0 the token's output, or ``(B, T, D)`` without a token.
        """
        if token is None:
            query, kv = context, frames  # (B, T, D)
        else:
            query = torch.cat([token.unsqueeze(1), context], dim=1)  # (B, T+1, D)
            kv = torch.cat([token.unsqueeze(1), frames], dim=1)  # (B, T+1, D)
        if self.pos_embed is not None:
            pos = self.pos_embed if token is not None else self.pos_embed[1:]  # frames keep their positions
            query = query + pos
            kv = kv + pos
        normed_kv = self.norm(kv)
        q = self._split(self.to_q(self.norm(query)))  # (B, H, T+1, D/H)
        k = self._split(self.to_k(normed_kv))
        v = self._split(self.to_v(normed_kv))
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, T+1, D/H)
        attn = attn.transpose(1, 2).reshape(query.shape)  # (B, T+1, D)
        x = query + self.to_out(attn)
        return x + self.ffn(x)
