"""CLIP-FSAR (Wang et al., IJCV 2023), the paper's main rival, as a fast-mode head on the same cache.

Its few-shot branch, built from this project's pieces: each support video's frames are joined by its
class text token (after a small MLP on the text, CLIP-FSAR's "mid layer") and go through one
temporal transformer (an MMFE-style layer in self-attention form: query = key = value); each query
video goes through the same transformer without a token (its label is unknown); prototypes are the
class means of the supports' frame outputs, and the distance is OTAM, as in MDMF.

Left out, on purpose: CLIP-FSAR's video-text classification loss. It is computed on the backbone's
features through a separate classification layer, so with CLIP frozen (fast mode) it cannot change
the few-shot logits; it only matters when the backbone is fine-tuned.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdmf_cache.models.config import MDMFConfig
from mdmf_cache.models.head import FewShotHead, at_least_float32, frame_distances, prototypes
from mdmf_cache.models.mdmf import TemporalView, build_mmfe

__all__ = ["CLIPFSAR"]


class CLIPFSAR(FewShotHead):
    """CLIP-FSAR's few-shot head: text-conditioned supports, one temporal transformer, OTAM.

    Args:
        cfg: Head config with ``method="clip-fsar"`` (uses ``dim``, ``num_frames``, ``pos_embed``,
            ``heads``, ``ffn_dim``, ``mmfe_dropout``, ``ffn_dropout``, ``cos_eps``, ``otam_*``).
    """

    query_has_token = False

    def __init__(self, cfg: MDMFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.ReLU(), nn.Linear(cfg.dim, cfg.dim))
        self.views = nn.ModuleDict({"fsar": TemporalView(build_mmfe(cfg), extractor=None)})

    def query_choice(self, query: Tensor, text: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """No prompt selection: every query is fused without a token. ``chosen`` is all -1."""
        e, q, n = query.shape[0], query.shape[1], text.shape[1]
        chosen = torch.full((e, q), -1, dtype=torch.long, device=query.device)
        return chosen, query.new_full((e, q, n), 1.0 / n)

    def token_input(self, tokens: Tensor) -> Tensor:
        """CLIP-FSAR's text MLP ("mid layer") before the text joins the support frames."""
        return self.text_proj(tokens)

    def head(self, support_out: dict[str, Tensor], query_out: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """``support_out["fsar"] (E, S, T+1, D)``, ``query_out["fsar"] (E, Q, T, D)`` -> ``logits``, ``d_fsar`` ``(E, Q, N)``."""
        with torch.autocast(query_out["fsar"].device.type, enabled=False):
            protos = prototypes(at_least_float32(support_out["fsar"][:, :, 1:]), n)  # frame outputs only, (E, N, T, D)
            dists = frame_distances(at_least_float32(query_out["fsar"]), protos, self.cfg.cos_eps)  # (E, Q, N, T, T)
            dist = self.otam([dists])[0]  # (E, Q, N)
        return {"logits": -dist, "d_fsar": dist}
