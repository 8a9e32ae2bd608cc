"""Multi-modal feature enhancement (MMFE): one pre-norm cross-attention layer fusing a text token with frames."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MMFE"]


class MMFE(nn.Module):
    """One-layer cross-attention transformer of one view (docs/method.md §6).

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
        head_dim: Width of each head; None = D / heads (q, k, v are then D wide). CLIP-MEI's
            transformers use 256 whatever D, so their q, k, v are ``heads x 256`` wide.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        ffn_dim: int = 2048,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
        num_positions: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        inner = dim if head_dim is None else heads * head_dim  # q, k, v width
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(num_positions, dim) * 0.02) if num_positions else None
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(attn_dropout))
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            nn.GELU(),
            nn.Dropout(ffn_dropout),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(ffn_dropout),
        )

    def _split(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        return x.reshape(b, length, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T+1, head width)

    def frame_parts(self, context: Tensor, frames: Tensor) -> dict[str, Tensor]:
        """What a video contributes, whatever its token: ``(B, T, D)`` each of ``query`` (the residual
        input, context + positions), and the projections ``q`` (of the normed query), ``k``, ``v`` (of
        the normed frames). The norm and the projections act per position, so they need no token."""
        pos = self.pos_embed[1:] if self.pos_embed is not None else 0.0
        query = context + pos  # (B, T, D)
        normed_kv = self.norm(frames + pos)
        return {"query": query, "q": self.to_q(self.norm(query)), "k": self.to_k(normed_kv), "v": self.to_v(normed_kv)}

    def token_parts(self, token: Tensor) -> dict[str, Tensor]:
        """What a token contributes at position 0: ``(M, D)`` each (query and key/value inputs are the same)."""
        query = token + self.pos_embed[0] if self.pos_embed is not None else token  # (M, D)
        normed = self.norm(query)
        return {"query": query, "q": self.to_q(normed), "k": self.to_k(normed), "v": self.to_v(normed)}

    def attend(self, frame_parts: dict[str, Tensor], token_parts: dict[str, Tensor] | None = None,
               pair_video: Tensor | None = None, pair_token: Tensor | None = None,
               token_output: bool = True) -> Tensor:
        """Attention, out projection and feed-forward for (video, token) pairs.

        Args:
            frame_parts: :meth:`frame_parts` of B videos.
            token_parts: :meth:`token_parts` of M tokens; None = no token position.
            pair_video: ``(P,)`` video of each pair (default: 0..B-1).
            pair_token: ``(P,)`` token of each pair (default: 0..M-1).
            token_output: False = the frame positions' outputs only (the token still attends as a
                key/value); evaluation needs no more, and skips 1/(T+1) of the work.

        Returns:
            ``(P, T+1, D)``, position 0 the token's output, or ``(P, T, D)`` without a token (or
            without its output).
        """
        parts = {k: v if pair_video is None else v[pair_video] for k, v in frame_parts.items()}  # (P, T, D)
        if token_parts is not None:
            tok = {k: (v if pair_token is None else v[pair_token]).unsqueeze(1) for k, v in token_parts.items()}
            parts = {k: torch.cat([tok[k], parts[k]], dim=1) for k in parts}  # (P, T+1, D)
        query, q = parts["query"], parts["q"]
        if token_parts is not None and not token_output:
            query, q = query[:, 1:], q[:, 1:]  # frame positions ask, the token still answers
        k, v = self._split(parts["k"]), self._split(parts["v"])  # (P, H, T+1, D/H)
        attn = F.scaled_dot_product_attention(self._split(q), k, v)  # (P, H, L, D/H)
        attn = attn.transpose(1, 2).reshape(*query.shape[:2], -1)  # (P, L, heads x head width)
        x = query + self.to_out(attn)
        return x + self.ffn(x)

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
        return self.attend(self.frame_parts(context, frames), None if token is None else self.token_parts(token))
