"""Probability Prompt Selector (PPS): picks a class text embedding as each query's token (SPEC section 6)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mdmf_cache.models.otam import cosine_similarity

__all__ = ["pps_scores", "ProbabilityPromptSelector"]


def pps_scores(
    query: Tensor, text: Tensor, score: Literal["mean", "top4"], eps: float, topk: int = 4
) -> Tensor:
    """Query-to-class scores of the selector.

    Args:
        query: ``(E, Q, T, D)`` query frame embeddings.
        text: ``(E, N, D)`` class text embeddings.
        score: ``"mean"`` = cos(mean over T of the query, text) (paper); ``"top4"`` = mean of the
            ``topk`` largest per-frame cosines (released code).
        eps: Cosine eps (added to the product of norms).
        topk: Frames averaged by ``"top4"`` (clipped to T).

    Returns:
        ``(E, Q, N)`` scores.
    """
    if score == "mean":
        return cosine_similarity(query.mean(dim=2), text, eps)  # (E, Q, D) x (E, N, D) -> (E, Q, N)
    if score == "top4":
        e, q, t, d = query.shape
        frame_cos = cosine_similarity(query.reshape(e, q * t, d), text, eps)  # (E, Q*T, N)
        frame_cos = frame_cos.reshape(e, q, t, -1)  # (E, Q, T, N)
        return frame_cos.topk(min(topk, t), dim=2).values.mean(dim=2)  # (E, Q, N)
    raise ValueError(f"unknown PPS score {score!r}; choose 'mean' or 'top4'")


class ProbabilityPromptSelector(nn.Module):
    """Draws one class text per query from ``softmax(score / temperature)``.

    In training mode the class is drawn from the categorical distribution (torch's global RNG, no
    gradient). In eval mode it is the argmax (``test_rule="argmax"``) or again a draw
    (``test_rule="sample"``, the released code). Disabled, every query token is zero.

    Args:
        score: ``"mean"`` or ``"top4"`` (see :func:`pps_scores`).
        test_rule: ``"argmax"`` or ``"sample"``.
        temperature: Softmax temperature t.
        eps: Cosine eps.
        topk: Frames averaged by the ``"top4"`` score.
        enabled: False = PPS off (zero tokens).
    """

    def __init__(
        self,
        score: Literal["mean", "top4"] = "mean",
        test_rule: Literal["argmax", "sample"] = "argmax",
        temperature: float = 0.005,
        eps: float = 1e-8,
        topk: int = 4,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.score = score
        self.test_rule = test_rule
        self.temperature = temperature
        self.eps = eps
        self.topk = topk
        self.enabled = enabled

    @torch.no_grad()
    def probabilities(self, query: Tensor, text: Tensor) -> Tensor:
        """Selector distribution ``softmax(s / t)``: ``(E, Q, T, D), (E, N, D) -> (E, Q, N)``."""
        scores = pps_scores(query, text, self.score, self.eps, self.topk)  # (E, Q, N)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, query: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Select the query tokens.

        Args:
            query: ``(E, Q, T, D)`` query frame embeddings.
            text: ``(E, N, D)`` class text embeddings in episode-class order.

        Returns:
            ``tokens (E, Q, D)`` (zeros when disabled), ``chosen (E, Q)`` long class index (-1 when
            disabled), ``prob (E, Q, N)`` the selector distribution (computed even when disabled).
        """
        prob = self.probabilities(query, text)  # (E, Q, N)
        e, q, n = prob.shape
        if not self.enabled:
            tokens = query.new_zeros(e, q, text.shape[-1])  # (E, Q, D)
            return tokens, torch.full((e, q), -1, dtype=torch.long, device=query.device), prob
        with torch.no_grad():
            if self.training or self.test_rule == "sample":
                chosen = torch.multinomial(prob.reshape(e * q, n), 1).reshape(e, q)  # (E, Q)
            else:
                chosen = prob.argmax(dim=-1)  # (E, Q)
        tokens = text.gather(1, chosen.unsqueeze(-1).expand(e, q, text.shape[-1]))  # (E, Q, D)
        return tokens, chosen, prob
