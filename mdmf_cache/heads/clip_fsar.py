"""CLIP-FSAR (Wang et al., IJCV 2023), the paper's main rival, as its authors released it.

What the released ``CNN_OTAM_CLIPFSAR`` head computes on pooled CLIP features (alibaba-mmai-research/
CLIP-FSAR, ``models/base/few_shot.py``; docs/heads.md has the details and the file:line references):

* one temporal transformer ``context2`` (pre-norm cross-attention with one LayerNorm shared by q, k
  and v, 8 heads of D/8, out projection with dropout 0.2, feed-forward D -> 2048 -> D with GELU and
  dropout 0.05, no position embeddings);
* queries: ``context2`` over their own T frames (no text);
* supports: the class text token, through the "mid layer" (the identity: an empty ``nn.Sequential``),
  is appended **after** the frames and the T+1 tokens go through ``context2``; the frame outputs are
  kept. The 5-shot configs set ``MERGE_BEFORE``: frames and tokens are averaged over the K shots per
  class *before* the transformer; otherwise its outputs are averaged;
* distance ``1 - cos`` with 0.01 added to the product of norms, OTAM with lambda 0.5 in both
  directions; logits = minus the distance, no temperature;
* loss: cross-entropy **averaged** over the queries, plus ``USE_CLASSIFICATION_VALUE`` (per dataset) x
  the cross-entropy of ``scale * cos(mean-pooled raw features, every train class's text)`` over the
  supports and queries, with ``scale`` a learnable scalar (init 1). On a frozen cache only ``scale``
  learns from that term; it reaches the backbone in full mode.
* the 5-shot configs train on 1-shot episodes (``SHOT: 1``, ``SHOT_TEST: 5``): :data:`SPEC`'s
  ``train_shot`` says so, and ``mdmf-cache train --method clip-fsar --shot 5`` trains that way unless
  ``--train-shot`` says otherwise.

Attention has no positions here, so where the token sits in the sequence does not change the frame
outputs; this module puts it first (the MMFE layout) and drops it. Left out, as in the released
default branch: the ``EVAL_TEXT`` and ``COMBINE`` evaluation variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.device import heads_autocast
from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, query_classes,
                                   support_classes, with_correct)
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import cosine_similarity, frame_distances, otam_distance

__all__ = ["CLIPFSAROptions", "CLIPFSAR", "SPEC", "TEXT_LOSS_WEIGHT"]

#: ``USE_CLASSIFICATION_VALUE`` of the released configs, per dataset (folder datasets: UCF101's and Kinetics' 1.5).
TEXT_LOSS_WEIGHT = {"hmdb51": 1.2, "ucf101": 1.5, "kinetics100": 1.5, "ssv2-full": 3.0, "ssv2-small": 3.0}


@dataclass
class CLIPFSAROptions:
    """CLIP-FSAR's options; the defaults are the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        heads: attention heads of ``context2`` (head width D / heads).
        ffn_dim: its feed-forward width (2048 whatever D is).
        depth: transformer layers (``TRAIN.TRANSFORMER_DEPTH``, 1 when unset as in every config).
        attn_dropout: dropout after the attention's out projection (0.2).
        ffn_dropout: dropout inside the feed-forward block (0.05).
        cos_eps: added to the product of norms in every cosine (0.01).
        otam_lambda: OTAM soft-min temperature (0.5, ``OTAM_cum_dist_v2``).
        otam_bidirectional: OTAM(D) + OTAM(D^T); False = ``SINGLE_DIRECT``.
        merge_before: average supports and tokens per class before the transformer (``MERGE_BEFORE``);
            None: the released configs' choice, True for a run for K > 1 shots (the 5-shot configs).
        mid_layer: the text token's "mid layer": ``identity`` (released) or ``mlp`` (Linear-ReLU-Linear,
            a variant).
        text_loss_weight: weight of the video-text classification loss (``USE_CLASSIFICATION_VALUE``);
            None: the released config's for the dataset (:data:`TEXT_LOSS_WEIGHT`).
        ce: ``mean`` over the queries (released) or ``sum`` (a variant, MDMF's reduction).
    """

    dim: int
    num_frames: int = 8
    heads: int = 8
    ffn_dim: int = 2048
    depth: int = 1
    attn_dropout: float = 0.2
    ffn_dropout: float = 0.05
    cos_eps: float = 0.01
    otam_lambda: float = 0.5
    otam_bidirectional: bool = True
    merge_before: bool | None = None
    mid_layer: Literal["identity", "mlp"] = "identity"
    text_loss_weight: float | None = None
    ce: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("heads", "ffn_dim", "depth"))
        problems.heads_divide(self)
        problems.check(self, ("attn_dropout", "ffn_dropout"), 0.0, 1.0, high_open=True)
        problems.check(self, "otam_lambda", 0.0, low_open=True)
        problems.check(self, ("cos_eps", "text_loss_weight"), 0.0)
        if self.mid_layer not in ("identity", "mlp"):
            problems.add("mid_layer", self.mid_layer, "choose identity or mlp")
        if self.ce not in ("mean", "sum"):
            problems.add("ce", self.ce, "choose mean or sum")
        problems.raise_any()

    def resolve(self, data: DataInfo) -> "CLIPFSAROptions":
        """Fill the released per-shot and per-dataset values that are still unset."""
        if self.merge_before is None:
            self.merge_before = data.shot > 1
        if self.text_loss_weight is None:
            self.text_loss_weight = TEXT_LOSS_WEIGHT.get(data.dataset, 1.5)
        return self


class CLIPFSAR(FewShotHead):
    """The released CLIP-FSAR head (see the module docstring)."""

    method = "clip-fsar"

    def __init__(self, options: CLIPFSAROptions) -> None:
        super().__init__()
        o = self.options = options
        d = o.dim
        self.mid_layer = nn.Identity() if o.mid_layer == "identity" else nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.scale = nn.Parameter(torch.ones(1))  # the text loss's temperature, learnable
        self.context2 = nn.ModuleList([MMFE(d, heads=o.heads, ffn_dim=o.ffn_dim, attn_dropout=o.attn_dropout,
                                            ffn_dropout=o.ffn_dropout, num_positions=None) for _ in range(o.depth)])

    def transform(self, frames: Tensor, token: Tensor | None = None) -> Tensor:
        """``context2`` self-attention over ``frames (B, T, D)`` (and a text ``token (B, D)``) -> frame outputs ``(B, T, D)``."""
        x = self.context2[0](token, frames, frames)  # (B, T+1, D) with the token's output first, or (B, T, D)
        for layer in self.context2[1:]:  # later layers: self-attention over the whole sequence
            x = layer(None, x, x) if token is None else layer(x[:, 0], x[:, 1:], x[:, 1:])
        return x if token is None else x[:, 1:]

    def prototypes(self, support: Tensor, text: Tensor) -> Tensor:
        """``support (E, S, T, D)`` class-major, ``text (E, N, D)`` -> prototypes ``(E, N, T, D)``."""
        e, s, t, d = support.shape
        n = text.shape[1]
        tokens = self.mid_layer(text)  # (E, N, D): every support of a class carries the same token
        if self.options.merge_before:  # average the K shots first, then one transformer pass per class
            out = self.transform(class_means(support, n).reshape(e * n, t, d), tokens.reshape(e * n, d))
            return out.reshape(e, n, t, d)
        out = self.transform(support.reshape(e * s, t, d), tokens.repeat_interleave(s // n, dim=1).reshape(e * s, d))
        return class_means(out.reshape(e, s, t, d), n)

    def distance(self, query_out: Tensor, protos: Tensor) -> Tensor:
        """OTAM distance ``(E, Q, T, D), (E, N, T, D) -> (E, Q, N)``, in float32 (or float64) under autocast."""
        o = self.options
        with torch.autocast(query_out.device.type, enabled=False):
            dist = frame_distances(at_least_float32(query_out), at_least_float32(protos), o.cos_eps)  # (E, Q, N, T, T)
            return otam_distance(dist, o.otam_lambda, o.otam_bidirectional)

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``, ``"d_fsar"`` and, when ``class_text (C, D)`` is given (training),
        ``"class_logits"`` ``(E, S+Q, C)`` of the video-text loss."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        out: dict[str, Tensor] = {}
        if class_text is not None:
            pooled = torch.cat([support, query], dim=1).mean(dim=2)  # (E, S+Q, D) raw features, mean over T
            out["class_logits"] = self.scale * cosine_similarity(pooled, class_text.to(pooled.dtype), self.options.cos_eps)
        query_out = self.transform(query.reshape(e * q, t, d)).reshape(e, q, t, d)  # (E, Q, T, D)
        dist = self.distance(query_out, self.prototypes(support, text))  # (E, Q, N)
        out.update(logits=-dist, d_fsar=dist)
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Query cross-entropy (mean over the queries) + ``text_loss_weight`` x the video-text cross-entropy
        (mean over supports and queries), per episode; then the mean over episodes."""
        main = episode_ce(out["logits"], labels, self.options.ce)
        total, parts = main, {"main": main.detach()}
        if "class_logits" in out and classes is not None and self.options.text_loss_weight:
            logits = out["class_logits"]  # (E, S+Q, C)
            e, sq, c = logits.shape
            ids = torch.cat([support_classes(classes, sq - labels.shape[1]), query_classes(classes, labels)], dim=1)
            text = F.cross_entropy(at_least_float32(logits.reshape(e * sq, c)), ids.reshape(-1), reduction="none").reshape(e, sq)
            text = text.mean(dim=1).mean()
            total = main + self.options.text_loss_weight * text
            parts["text"] = text.detach()
        parts["total"] = total.detach()
        return total, parts

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                  batch_size: int = 500) -> "CLIPFSARScorer":
        return CLIPFSARScorer(self, features, text, episodes, batch_size)


class CLIPFSARScorer:
    """Per-video evaluation of CLIP-FSAR: each query's transformer pass once per video; each support's
    once per video (its token is its class's text), or, with ``merge_before`` at K > 1, one pass per
    class of each episode on the class's mean frames (that mean depends on the episode)."""

    def __init__(self, model: CLIPFSAR, features: Tensor, text: Tensor, episodes, batch_size: int = 500) -> None:
        if model.training:
            raise ValueError("the per-video path needs the model in eval mode (dropout off)")
        self.model, self.episodes, self.features, self.text = model, episodes, features, text
        dev, seq = features.device, max(batch_size * 30, 1)
        self.merge = bool(model.options.merge_before) and episodes.shot > 1
        query_videos, self.query_slot = np.unique(episodes.query, return_inverse=True)
        self.query_slot = self.query_slot.reshape(episodes.query.shape)
        with torch.no_grad(), heads_autocast(dev):
            qv = torch.as_tensor(query_videos, device=dev)
            self.query_table = torch.cat([model.transform(features[qv[i : i + seq]].float())
                                          for i in range(0, len(qv), seq)])  # (Uq, T, D)
            self.fused = len(query_videos)
            if not self.merge:  # a support video always carries its own class's token
                sv, self.support_slot = np.unique(episodes.support, return_inverse=True)
                self.support_slot = self.support_slot.reshape(episodes.support.shape)
                cls = np.zeros(len(sv), dtype=np.int64)
                cls[self.support_slot.ravel()] = np.repeat(episodes.classes, episodes.shot, axis=1).ravel()
                tokens = model.mid_layer(text.float())  # (C, D)
                svt, clt = torch.as_tensor(sv, device=dev), torch.as_tensor(cls, device=dev)
                self.support_table = torch.cat([model.transform(features[svt[i : i + seq]].float(), tokens[clt[i : i + seq]])
                                                for i in range(0, len(sv), seq)])  # (Us, T, D)
                self.fused += len(sv)
            else:
                self.fused += len(episodes) * episodes.way

    @torch.no_grad()
    def logits(self, lo: int, hi: int) -> Tensor:
        model, ep = self.model, self.episodes[lo:hi]
        dev = self.query_table.device
        n = ep.way
        with heads_autocast(dev):
            query_out = self.query_table[torch.as_tensor(self.query_slot[lo:hi], device=dev)]  # (E, Q, T, D)
            if self.merge:
                support = self.features[torch.as_tensor(ep.support, device=dev)].float()  # (E, S, T, D)
                protos = model.prototypes(support, self.text[torch.as_tensor(ep.classes, device=dev)].float())
            else:
                slots = torch.as_tensor(self.support_slot[lo:hi], device=dev)  # (E, S)
                protos = class_means(self.support_table[slots], n)  # (E, N, T, D)
            return -model.distance(query_out, protos)


SPEC = HeadSpec(
    name="clip-fsar",
    options=CLIPFSAROptions,
    build=CLIPFSAR,
    summary="CLIP-FSAR (IJCV 2023) as released: text-conditioned supports, a temporal transformer, OTAM",
    source="Wang et al., CLIP-guided prototype modulating for few-shot action recognition, IJCV 2023; released "
           "code alibaba-mmai-research/CLIP-FSAR (CNN_OTAM_CLIPFSAR)",
    per_video=True,
    train_shot=lambda k: 1,  # every released config trains on 1-shot episodes (5-shot: SHOT_TEST 5)
    train_queries=lambda k: 5,
)
