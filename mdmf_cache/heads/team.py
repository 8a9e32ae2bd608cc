"""TEAM (Lee et al., CVPR 2025), temporal alignment-free matching with pattern tokens, as its authors released it.

What the released ``TEAM`` head computes (leesb7426/TEAM, ``model.py`` class ``TEAM`` over ``TEAM_pos``,
``model_util.py`` ``Discriminative_Pattern_Matching``; docs/heads.md has the details) on one vector per
frame ``(V, T, D)``:

1. every video is a set of M **pattern tokens**: ``x + PE`` (the TRX sinusoid table scaled by 0.1, then
   dropout 0.1) is attended by the M learnable tokens ``P (M, D)``: one single-head attention, queries
   ``LN(P)``, keys and values ``LN(x + PE)`` (one LayerNorm for both), softmax of ``q k^T / sqrt(D // 8)``,
   dropout 0.1 on the probabilities and on the output ``O (M, D)``; no projections;
2. two views of that output: ``pos = f(P + O)`` and ``neg = f(P - O)``, ``f(y) = ReLU(y + MLP(y))``,
   ``MLP`` = Linear-ReLU-Linear (D -> D -> D), shared;
3. supports are first averaged over the K shots (raw frames, class-major); each class prototype c gets
   step 1-2 (``pos_c``, ``neg_c``); the **adaptation** removes what class c shares with every other
   class j: with ``O_c`` and ``O_j`` from fresh passes of step 1, ``s+_cj = cos(pos_c, pos_j)`` and
   ``s-_cj = cos(neg_c, neg_j)`` per token,
   ``disc+_c = mean_j f(P + O_c - s+_cj (O_j - O_c))`` and ``disc-_c = mean_j f(P - O_c + s-_cj (O_j - O_c))``
   (j over the N - 1 other classes);
4. queries get step 1-2 only (``pos_q``, ``neg_q``); token-wise distances, no alignment:
   ``d+(q, c) = sum_m (1 - cos(disc+_c,m, pos_q,m))``, and
   ``d-(q, c) = (max_{j != c} d(disc+_j, neg_q) + max_{j != c} d(disc-_j, pos_q)) / 2`` with the same
   token-wise ``d``;
5. logits = ``-(d+ + d-)``; loss = ``CE(-d+) + CE(-d-)`` (each averaged over the queries).

A query's logits depend on its own frames and the supports only: the head is inductive. Every support
representation depends on the whole support set (step 3), so there is no per-video evaluation path:
evaluation runs ``forward`` on whole episodes, in chunks (:data:`EVAL_ELEMENTS`).

``M`` (``--agg_num`` of the released scripts) is set per dataset, shot and backbone: :data:`PATTERNS`.
The released code sizes everything from the backbone width (2048 for ResNet-50, 768 for ViT-B/16); here
from the cache's D. The released ``n_head = 8`` only sets the attention temperature (``d_k = D // 8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, in_chunks,
                                   with_correct)
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.attention import PositionalEncoding

__all__ = ["TEAMOptions", "TEAM", "PatternMatching", "PATTERNS", "FOLDER_VALUES", "EVAL_ELEMENTS", "SPEC"]

#: ``--agg_num`` (M pattern tokens) of the released ``scripts/run_<dataset>.sh``: (1-shot, 5-shot) per backbone.
#: The ResNet-50 scripts cover HMDB51, Kinetics and UCF101; SSv2-Small has ViT-B/16 scripts only.
PATTERNS: dict[str, dict[str, tuple[int, int]]] = {
    "vit": {"hmdb51": (50, 60), "kinetics100": (80, 80), "ucf101": (70, 70), "ssv2-small": (50, 80)},
    "resnet": {"hmdb51": (60, 70), "kinetics100": (60, 80), "ucf101": (60, 80)},
}
#: The dataset whose M a dataset without a released script takes (a folder dataset; SSv2-Full takes SSv2-Small's).
FOLDER_VALUES = "ucf101"

#: Eval-mode forward runs this many elements' worth of episodes at a time: the adapted supports
#: ``(e, N, N-1, M, D)`` (and their MLP activations) are the largest tensors.
EVAL_ELEMENTS = 1 << 25


@dataclass
class TEAMOptions:
    """TEAM's options; the defaults are the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        patterns: M, the learnable pattern tokens (``--agg_num``); None: the released script's for the dataset
            and shot (:data:`PATTERNS`; the 1-shot value at K = 1, the 5-shot one at K >= 2).
        released_backbone: which released scripts' M to take: ``vit`` (ImageNet ViT-B/16, the closer one to a
            CLIP ViT) or ``resnet`` (ImageNet ResNet-50; SSv2 has no ResNet script and takes the ViT one).
        heads: only sets the attention temperature ``sqrt(D // heads)`` (``n_head = 8``; the attention has one head).
        pe_scale: scale of the sinusoidal position encoding (0.1).
        pe_dropout: dropout after the position encoding (0.1).
        attn_dropout: dropout on the attention probabilities (0.1).
        out_dropout: dropout on the attention output (``refine``, 0.1).
    """

    dim: int
    num_frames: int = 8
    patterns: int | None = None
    released_backbone: Literal["vit", "resnet"] = "vit"
    heads: int = 8
    pe_scale: float = 0.1
    pe_dropout: float = 0.1
    attn_dropout: float = 0.1
    out_dropout: float = 0.1

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("patterns", "heads"))
        if self.released_backbone not in ("vit", "resnet"):
            problems.add("released_backbone", self.released_backbone, "choose vit or resnet")
        if isinstance(self.heads, int) and self.heads > self.dim:
            problems.add("heads", self.heads, f"must be in 1..D={self.dim} (the temperature is sqrt(D // heads))")
        problems.check(self, "pe_scale", 0.0)
        problems.check(self, ("pe_dropout", "attn_dropout", "out_dropout"), 0.0, 1.0, high_open=True)
        problems.raise_any()

    def resolve(self, data: DataInfo) -> "TEAMOptions":
        """Fill M from the released scripts when it is unset."""
        if self.patterns is None:
            table = PATTERNS[self.released_backbone]
            dataset = "ssv2-small" if data.dataset.startswith("ssv2") else data.dataset
            one, five = table.get(dataset) or PATTERNS["vit"].get(dataset) or table[FOLDER_VALUES]
            self.patterns = one if data.shot == 1 else five
        return self


class PatternMatching(nn.Module):
    """Steps 1-2 (and the adaptation of step 3): the released ``Discriminative_Pattern_Matching``."""

    def __init__(self, o: TEAMOptions) -> None:
        super().__init__()
        if o.patterns is None:
            raise ValueError("TEAM options must be resolved (HeadSpec.make_options) before building the head")
        d = o.dim
        self.patterns = nn.Parameter(torch.randn(o.patterns, d))  # P (M, D), standard normal as released
        self.pe = PositionalEncoding(d, o.pe_dropout, int(o.num_frames * 1.5), o.pe_scale)
        self.ln = nn.LayerNorm(d)  # one LayerNorm for the tokens and the frames
        self.temperature = (d // o.heads) ** 0.5
        self.attn_dropout = nn.Dropout(o.attn_dropout)
        self.out_dropout = nn.Dropout(o.out_dropout)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def attend(self, x: Tensor) -> Tensor:
        """Step 1: ``x (B, T, D)`` -> the tokens' attention output ``O (B, M, D)``."""
        kv = self.ln(self.pe(x))  # (B, T, D)
        q = self.ln(self.patterns).to(kv.dtype) / self.temperature  # (M, D)
        attn = self.attn_dropout((q @ kv.transpose(1, 2)).softmax(dim=-1))  # (B, M, T)
        return self.out_dropout(attn @ kv)  # (B, M, D)

    def refine(self, y: Tensor) -> Tensor:
        """``ReLU(y + MLP(y))``."""
        return F.relu(y + self.mlp(y))

    def views(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """Step 2: ``O (..., M, D)`` -> ``pos``, ``neg`` (..., M, D)."""
        p = self.patterns.to(out.dtype)
        return self.refine(p + out), self.refine(p - out)


def token_distances(a: Tensor, b: Tensor) -> Tensor:
    """``sum_m (1 - cos(a_m, b_m))`` for every (query, class): ``b (E, Q, M, D)``, ``a (E, N, M, D)`` -> ``(E, Q, N)``.
    The cosine is ``F.cosine_similarity``'s (each vector divided by ``max(|v|, 1e-8)``)."""
    sim = torch.einsum("eqmd,enmd->eqnm", F.normalize(b, dim=-1, eps=1e-8), F.normalize(a, dim=-1, eps=1e-8))
    return (1.0 - sim).sum(dim=-1)


def max_over_others(dist: Tensor) -> Tensor:
    """``(E, Q, N)`` -> ``(E, Q, N)``: for class c the largest distance among the other N - 1 classes."""
    n = dist.shape[-1]
    self_mask = torch.eye(n, dtype=torch.bool, device=dist.device)  # [c, j]: j == c
    others = dist.unsqueeze(-2).expand(*dist.shape[:-1], n, n)  # (E, Q, N [c], N [j])
    return others.masked_fill(self_mask, float("-inf")).amax(dim=-1)


class TEAM(FewShotHead):
    """The released TEAM head (see the module docstring)."""

    method = "team"

    def __init__(self, options: TEAMOptions) -> None:
        super().__init__()
        self.options = options
        self.dpm = PatternMatching(options)

    def adapted_supports(self, protos: Tensor) -> tuple[Tensor, Tensor]:
        """Step 3: class prototypes ``(E, N, T, D)`` -> ``disc+``, ``disc-`` ``(E, N, M, D)``."""
        e, n, t, d = protos.shape
        dpm = self.dpm
        pos, neg = dpm.views(dpm.attend(protos.reshape(e * n, t, d)).reshape(e, n, -1, d))  # (E, N, M, D)
        m = pos.shape[2]
        others = torch.tensor([[j for j in range(n) if j != c] for c in range(n)], device=protos.device)  # (N, N-1)
        own = dpm.attend(protos.reshape(e * n, t, d)).reshape(e, n, 1, m, d)  # a fresh pass, as released
        other = dpm.attend(protos[:, others].reshape(e * n * (n - 1), t, d)).reshape(e, n, n - 1, m, d)
        cos = lambda x: F.cosine_similarity(x.unsqueeze(2), x[:, others], dim=-1).unsqueeze(-1)  # (E, N, N-1, M, 1)
        p = dpm.patterns.to(own.dtype)
        gap = other - own  # (E, N, N-1, M, D)
        disc_pos = dpm.refine(p + own - cos(pos) * gap).mean(dim=2)  # mean over the other classes
        disc_neg = dpm.refine(p - own + cos(neg) * gap).mean(dim=2)
        return disc_pos, disc_neg

    def episodes(self, support: Tensor, query: Tensor, n: int) -> dict[str, Tensor]:
        """Steps 1-5 for ``support (E, S, T, D)`` class-major and ``query (E, Q, T, D)``."""
        e, q, t, d = query.shape
        disc_pos, disc_neg = self.adapted_supports(class_means(support, n))  # (E, N, M, D)
        q_pos, q_neg = self.dpm.views(self.dpm.attend(query.reshape(e * q, t, d)).reshape(e, q, -1, d))  # (E, Q, M, D)
        with torch.autocast(query.device.type, enabled=False):
            disc_pos, disc_neg, q_pos, q_neg = (at_least_float32(x) for x in (disc_pos, disc_neg, q_pos, q_neg))
            d_pos = token_distances(disc_pos, q_pos)  # (E, Q, N)
            d_neg = (max_over_others(token_distances(disc_pos, q_neg))
                     + max_over_others(token_distances(disc_neg, q_pos))) / 2
        return {"logits": -(d_pos + d_neg), "logits_pos": -d_pos, "logits_neg": -d_neg}

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)`` and the two terms ``"logits_pos"``, ``"logits_neg"``. ``text`` only gives N."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        if n < 2:
            raise ValueError(f"TEAM needs N >= 2 classes per episode (its adaptation compares each class with the others); got {n}")
        if self.training:
            return with_correct(self.episodes(support, query, n), query_labels)
        m = self.options.patterns
        out = in_chunks(lambda lo, hi: self.episodes(support[lo:hi], query[lo:hi], n), e,
                        n * n * m * d * 2 + (s + q) * t * d, EVAL_ELEMENTS)
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE(logits_pos) + CE(logits_neg)`` (each the mean over the queries), per episode; then the mean over episodes."""
        pos, neg = episode_ce(out["logits_pos"], labels), episode_ce(out["logits_neg"], labels)
        total = pos + neg
        return total, {"main": total.detach(), "pos": pos.detach(), "neg": neg.detach(), "total": total.detach()}


SPEC = HeadSpec(
    name="team",
    options=TEAMOptions,
    build=TEAM,
    summary="TEAM (CVPR 2025) as released: M pattern tokens per video, class-adapted supports, token-wise cosine",
    source="Lee et al., TEAM: Temporal alignment-free video matching for few-shot action recognition, CVPR 2025; "
           "released code leesb7426/TEAM model.py (TEAM), model_util.py (Discriminative_Pattern_Matching), "
           "M per dataset and shot from scripts/run_*.sh",
    per_video=False,  # every support's representation depends on the episode's other classes
    space={"patterns": "20:100"},
    train_shot=lambda k: k,
    train_queries=lambda k: 6,  # run_train.py's --query_per_class default; no script sets it
)
