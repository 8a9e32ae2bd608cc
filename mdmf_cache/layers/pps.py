"""Probability Prompt Selector (PPS): picks a class text embedding as each query's token (docs/method.md §6)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mdmf_cache.layers.otam import cosine_similarity

__all__ = ["pps_scores", "ProbabilityPromptSelector", "token_for"]


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

    In training mode the class is drawn from the categorical distribution (no gradient). In eval
    mode it is again a draw (``test_rule="sample"``: the paper describes only the draw and the
    released code draws) or the argmax (``test_rule="argmax"``, an option of this project).
    Disabled, every query token is zero.

    A draw is the inverse CDF of the distribution at a uniform number ``u`` per query: the first class
    whose cumulative probability exceeds ``u``. The uniforms come from torch's global RNG unless
    given (``noise``): evaluation passes seeded uniforms that are a function of the episode list, so
    every evaluation path (and any batch size) makes the same draws.

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
        test_rule: Literal["argmax", "sample"] = "sample",
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

    @torch.no_grad()
    def choose(self, prob: Tensor, noise: Tensor | None = None) -> Tensor:
        """The class each query takes its token from: ``prob (E, Q, N) -> (E, Q)`` long (-1 when off).

        Args:
            prob: Selector distribution.
            noise: Optional ``(E, Q)`` uniforms in [0, 1) for the draws (default: torch's global RNG).
        """
        e, q, n = prob.shape
        if not self.enabled:
            return torch.full((e, q), -1, dtype=torch.long, device=prob.device)
        if self.training or self.test_rule == "sample":
            u = torch.rand(e, q, device=prob.device, dtype=prob.dtype) if noise is None else noise
            below = prob.cumsum(dim=-1) <= u.to(prob.device, prob.dtype).unsqueeze(-1)  # (E, Q, N)
            return below.sum(dim=-1).clamp_max(n - 1)  # inverse CDF, (E, Q)
        return prob.argmax(dim=-1)  # (E, Q)

    def forward(self, query: Tensor, text: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Select each query's token class.

        Args:
            query: ``(E, Q, T, D)`` query frame embeddings.
            text: ``(E, N, D)`` class text embeddings in episode-class order.
            noise: Optional ``(E, Q)`` uniforms for the draws (see :meth:`choose`).

        Returns:
            ``chosen (E, Q)`` long class index (-1 when disabled; :func:`token_for` gives the tokens),
            ``prob (E, Q, N)`` the selector distribution (computed even when disabled).
        """
        prob = self.probabilities(query, text)  # (E, Q, N)
        return self.choose(prob, noise), prob


def token_for(text: Tensor, chosen: Tensor) -> Tensor:
    """Query tokens: ``text (E, N, D)``, ``chosen (E, Q)`` (-1 = none) -> ``(E, Q, D)``, zeros for -1."""
    e, q = chosen.shape
    tokens = text.gather(1, chosen.clamp_min(0).unsqueeze(-1).expand(e, q, text.shape[-1]))  # (E, Q, D)
    return tokens * (chosen >= 0).unsqueeze(-1).to(tokens.dtype)
