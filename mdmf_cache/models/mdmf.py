"""The CLIP-MDMF heads: PPS, two temporal views (LTC, GTC) with MMFE fusion, prototypes and OTAM (SPEC 6-7).

All episodes of a batch go through one forward pass: supports and queries of every episode are
flattened into one batch of ``E * (S + Q)`` sequences for the extractors and the MMFE (the LTCE's
BatchNorm still takes its statistics per episode), and the episode axis is kept for prototypes,
distances and posteriors. The staged forward is :class:`~mdmf_cache.models.head.FewShotHead`'s.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mdmf_cache.models.config import MDMFConfig
from mdmf_cache.models.head import FewShotHead, at_least_float32, frame_distances, prototypes
from mdmf_cache.models.mmfe import MMFE
from mdmf_cache.models.otam import cosine_similarity
from mdmf_cache.models.pps import ProbabilityPromptSelector
from mdmf_cache.models.temporal import GTCE, LTCE

__all__ = ["TemporalView", "build_view", "build_mmfe", "MDMF", "build_head"]


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

    def context(self, frames: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, T, D) -> (E*B, T, D)``: the extractor's output, or the frames without one."""
        return self.extractor(frames, episodes) if self.extractor is not None else frames

    def forward(self, frames: Tensor, token: Tensor | None, episodes: int = 1) -> Tensor:
        """``frames (E*B, T, D), token (E*B, D) -> (E*B, T+1, D)``."""
        return self.mmfe(token, self.context(frames, episodes), frames)


def build_mmfe(cfg: MDMFConfig) -> MMFE:
    """The one-layer cross-attention fusion block with the config's widths, dropouts and positions."""
    return MMFE(
        cfg.dim,
        heads=cfg.heads,
        ffn_dim=cfg.ffn_dim,
        attn_dropout=cfg.mmfe_dropout,
        ffn_dropout=cfg.ffn_dropout,
        num_positions=cfg.num_frames + 1 if cfg.pos_embed else None,
    )


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
    return TemporalView(build_mmfe(cfg), extractor)


class MDMF(FewShotHead):
    """CLIP-MDMF few-shot heads over frozen (or cached) CLIP frame and text embeddings.

    Args:
        cfg: Head config (see :func:`mdmf_cache.models.config.build_config`).
    """

    query_has_token = True

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

    def query_choice(self, query: Tensor, text: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """PPS: ``(E, Q, T, D), (E, N, D) -> chosen (E, Q), prob (E, Q, N)``."""
        return self.pps(query, text, noise)

    def head(self, support_out: dict[str, Tensor], query_out: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """Distances, posteriors and logits from the fused outputs.

        Args:
            support_out: per view ``(E, S, T+1, D)``.
            query_out: per view ``(E, Q, T+1, D)``.
            n: N ways.

        Returns:
            ``"logits"`` ``(E, Q, N)`` = -(sum of weighted view distances); per view ``v``:
            ``"d_v"`` ``(E, Q, N)`` OTAM distance, ``"p_visual_v"`` = softmax(-d_v), ``"p_text_v"``
            = softmax over N of the cosine at position ``text_pos``.
        """
        cfg = self.cfg
        frame_dists, text_cosines = [], []
        with torch.autocast(next(iter(query_out.values())).device.type, enabled=False):  # float32 from here on
            for name in self.views:
                protos = prototypes(at_least_float32(support_out[name]), n)  # (E, N, T+1, D)
                query_fused = at_least_float32(query_out[name])  # (E, Q, T+1, D)
                frame_dists.append(frame_distances(query_fused[:, :, 1:], protos[:, :, 1:], cfg.cos_eps))  # (E, Q, N, T, T)
                text_cosines.append(
                    cosine_similarity(query_fused[:, :, cfg.text_pos], protos[:, :, cfg.text_pos], cfg.cos_eps)
                )  # (E, Q, D) x (E, N, D) -> (E, Q, N)
            dists = self.otam(frame_dists)  # (views, E, Q, N)
            out: dict[str, Tensor] = {}
            logits = torch.zeros_like(dists[0])
            for name, dist, text_cos in zip(self.views.keys(), dists, text_cosines):
                out[f"d_{name}"] = dist
                out[f"p_visual_{name}"] = torch.softmax(-dist, dim=-1)
                out[f"p_text_{name}"] = torch.softmax(text_cos, dim=-1)
                logits = logits - self._view_weight(name) * dist
        out["logits"] = logits
        return out


def build_head(cfg: MDMFConfig) -> FewShotHead:
    """The trainable head named by ``cfg.method``: ``"mdmf"`` or ``"clip-fsar"``."""
    if cfg.method == "clip-fsar":
        from mdmf_cache.models.fsar import CLIPFSAR

        return CLIPFSAR(cfg)
    return MDMF(cfg)
