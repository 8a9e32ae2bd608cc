"""The CLIP-MDMF heads: PPS, two temporal views (LTC, GTC) with MMFE fusion, prototypes and OTAM (SPEC 6-7).

All episodes of a batch go through one forward pass: supports and queries of every episode are
flattened into one batch of ``E * (S + Q)`` sequences for the extractors and the MMFE, and the
episode axis is kept for prototypes, distances and posteriors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mdmf_cache.models.config import MDMFConfig
from mdmf_cache.models.mmfe import MMFE
from mdmf_cache.models.otam import cosine_distance, cosine_similarity, otam_distance
from mdmf_cache.models.pps import ProbabilityPromptSelector
from mdmf_cache.models.temporal import GTCE, LTCE

__all__ = ["TemporalView", "build_view", "MDMF"]


class TemporalView(nn.Module):
    """One view: a temporal context extractor (or none, for NTC) followed by its own MMFE.

    Args:
        mmfe: The view's fusion layer.
        extractor: ``(B, T, D) -> (B, T, D)`` context extractor; None = NTC (the MMFE query is the
            frames themselves).
    """

    def __init__(self, mmfe: MMFE, extractor: nn.Module | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.mmfe = mmfe

    def forward(self, frames: Tensor, token: Tensor) -> Tensor:
        """``frames (B, T, D), token (B, D) -> (B, T+1, D)``."""
        context = self.extractor(frames) if self.extractor is not None else frames
        return self.mmfe(token, context, frames)


def build_view(cfg: MDMFConfig, name: Literal["ltc", "gtc", "ntc"]) -> TemporalView:
    """Build one view's extractor and MMFE from the config.

    Args:
        cfg: Head config.
        name: ``"ltc"`` (LTCE), ``"gtc"`` (GTCE) or ``"ntc"`` (no extractor).

    Returns:
        The view module.
    """
    extractor: nn.Module | None
    if name == "ltc":
        extractor = LTCE(cfg.dim, norm=cfg.ltce == "bn")
    elif name == "gtc":
        extractor = GTCE(cfg.dim, cfg.tcn_levels, cfg.tcn_kernel, cfg.tcn_dropout)
    elif name == "ntc":
        extractor = None
    else:
        raise ValueError(f"unknown view {name!r}; choose 'ltc', 'gtc' or 'ntc'")
    mmfe = MMFE(
        cfg.dim,
        heads=cfg.heads,
        ffn_dim=cfg.ffn_dim,
        attn_dropout=cfg.mmfe_dropout,
        ffn_dropout=cfg.ffn_dropout,
        num_positions=cfg.num_frames + 1 if cfg.pos_embed else None,
    )
    return TemporalView(mmfe, extractor)


class MDMF(nn.Module):
    """CLIP-MDMF few-shot heads over frozen (or cached) CLIP frame and text embeddings.

    Args:
        cfg: Head config (see :func:`mdmf_cache.models.config.build_config`).
    """

    def __init__(self, cfg: MDMFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pps = ProbabilityPromptSelector(
            score=cfg.pps_score,
            test_rule=cfg.pps_test,
            temperature=cfg.pps_temperature,
            eps=cfg.cos_eps,
            topk=cfg.pps_topk,
            enabled=cfg.pps,
        )
        self.views = nn.ModuleDict({name: build_view(cfg, name) for name in cfg.view_names})

    def _view_weight(self, name: str) -> float:
        if self.cfg.views != "both":
            return 1.0
        return self.cfg.alpha_ltc if name == "ltc" else self.cfg.alpha_gtc

    def forward(
        self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Classify the queries of E episodes.

        Args:
            support: ``(E, S, T, D)`` support frames, class-major: support ``s`` belongs to episode
                class ``s // K`` with ``K = S // N``.
            query: ``(E, Q, T, D)`` query frames.
            text: ``(E, N, D)`` text embeddings of the episode's classes, in episode-class order.
            query_labels: Optional ``(E, Q)`` episode-class labels; adds ``"correct"``.

        Returns:
            ``"logits"`` ``(E, Q, N)`` = -(sum of weighted view distances); per view ``v`` in
            ``ltc``/``gtc``/``ntc``: ``"d_v"`` ``(E, Q, N)`` OTAM distance, ``"p_visual_v"`` =
            softmax(-d_v), ``"p_text_v"`` = softmax over N of the token-position cosine;
            ``"query_token_class"`` ``(E, Q)`` (-1 with PPS off); ``"pps_prob"`` ``(E, Q, N)``;
            with labels, ``"correct"`` ``(E, Q)`` float.

        Raises:
            ValueError: if the shapes do not agree.
        """
        cfg = self.cfg
        if support.dim() != 4 or query.dim() != 4 or text.dim() != 3:
            raise ValueError(
                f"expected support (E, S, T, D), query (E, Q, T, D), text (E, N, D); got "
                f"{tuple(support.shape)}, {tuple(query.shape)}, {tuple(text.shape)}"
            )
        e, s, t, d = support.shape
        q, n = query.shape[1], text.shape[1]
        if query.shape[0] != e or text.shape[0] != e or query.shape[2:] != (t, d) or text.shape[2] != d:
            raise ValueError(
                f"shape mismatch: support {tuple(support.shape)}, query {tuple(query.shape)}, text {tuple(text.shape)}"
            )
        if n == 0 or s % n:
            raise ValueError(f"S={s} supports are not a multiple of N={n} classes")
        k = s // n

        query_tokens, chosen, pps_prob = self.pps(query, text)  # (E, Q, D), (E, Q), (E, Q, N)
        support_tokens = text.repeat_interleave(k, dim=1)  # (E, S, D): support s gets class s // K
        frames = torch.cat([support, query], dim=1).reshape(e * (s + q), t, d)  # (E*(S+Q), T, D)
        tokens = torch.cat([support_tokens, query_tokens], dim=1).reshape(e * (s + q), d)  # (E*(S+Q), D)

        out: dict[str, Tensor] = {"query_token_class": chosen, "pps_prob": pps_prob}
        frame_dists, text_cosines = [], []
        for view in self.views.values():
            fused = view(frames, tokens).reshape(e, s + q, t + 1, d)  # (E, S+Q, T+1, D)
            support_out, query_out = fused[:, :s], fused[:, s:]  # (E, S, T+1, D), (E, Q, T+1, D)
            protos = support_out.reshape(e, n, k, t + 1, d).mean(dim=2)  # (E, N, T+1, D)

            frame_dist = cosine_distance(
                query_out[:, :, 1:].reshape(e, q * t, d),  # (E, Q*T, D)
                protos[:, :, 1:].reshape(e, n * t, d),  # (E, N*T, D)
                cfg.cos_eps,
            )  # (E, Q*T, N*T)
            frame_dists.append(frame_dist.reshape(e, q, t, n, t).permute(0, 1, 3, 2, 4))  # (E, Q, N, T, T)
            text_cosines.append(
                cosine_similarity(query_out[:, :, cfg.text_pos], protos[:, :, cfg.text_pos], cfg.cos_eps)
            )  # (E, Q, D) x (E, N, D) -> (E, Q, N)

        # OTAM of every view (and both directions) in one pass: its T-step recurrence is a chain of
        # small kernels, so batching the views halves the launches; the arithmetic is unchanged.
        dists = otam_distance(torch.stack(frame_dists), cfg.otam_lambda, cfg.otam_bidirectional)  # (views, E, Q, N)

        logits = query.new_zeros(e, q, n)
        for name, dist, text_cos in zip(self.views.keys(), dists, text_cosines):
            out[f"d_{name}"] = dist
            out[f"p_visual_{name}"] = torch.softmax(-dist, dim=-1)
            out[f"p_text_{name}"] = torch.softmax(text_cos, dim=-1)
            logits = logits - self._view_weight(name) * dist
        out["logits"] = logits
        if query_labels is not None:
            if query_labels.shape != (e, q):
                raise ValueError(f"query_labels shape {tuple(query_labels.shape)} != (E, Q) = {(e, q)}")
            out["correct"] = (logits.argmax(dim=-1) == query_labels).float()
        return out
