"""CLIP-CPM2C (Guo et al., Neurocomputing 2025), the consistency prototype and motion compensation head.

What the released ``CLIP_CPMMC_FSAR`` computes on pooled CLIP features, as the copy in D-XH/CLIP-MEI
(``models/model_cpm2c.py``, loss in ``run/main_run.py``) has it; the authors' original is
cofly2014/CPM-MC (``models/base/few_shot_clip_cpmmc.py``), which differs in one place (below).
docs/heads.md has the details.

Two streams, each through the same temporal transformer ``context2`` (CLIP-FSAR's: pre-norm attention
with one LayerNorm for q, k and v, 8 heads of D/8, out projection with dropout 0.2, feed-forward
D -> 2048 -> D with GELU and dropout 0.05, no positions):

* the **frames** ``x`` (T of them);
* the **motion** ``0.5 (c[t+1] - x[t] + c[t] - x[t+1])`` for t < T-1, with ``c = conv2(conv1(x))`` two
  width-preserving temporal convolutions (kernel 3): T-1 positions.

In each stream every sequence gets a token at position 0 and 0.1 x that token added to every position:

* supports: their class text ("real" supports); prototypes are the class means of the outputs;
* queries: a learnable class token per stream (``class_token``, ``class_token_motion``): the query's
  text is unknown, so the token stands in for it ("fake" queries);
* training only, for the consistency loss: supports with the learnable token, and queries with the
  text of their true class. The loss pulls the token passes towards the text passes:
  ``mean_S |real - fake|^2 + mean_Q |real - fake|^2`` over all T+1 positions, per stream.

Distance: OTAM (lambda 0.5, both directions, ``1 - cos`` with 0.01 added to the product of norms) of
the fake queries to the prototypes, token position dropped; ``normal_weight`` x the frame stream's +
``motion_weight`` x the motion stream's; logits = minus the distance.

Loss per episode (the released loop's, see :meth:`CPM2C.loss`): the cross-entropy of the logits summed
over the queries, plus 0.5 x the cross-entropy of ``scale x cos(time-mean of the raw features, every
train class's text)`` summed over supports and queries, plus ``tasks_per_batch x 0.001`` x the
consistency.

The released code also computes a "global" distance on the token outputs; every config weighs it 0
(``LMD: [0.5, 1, 0]``) in the loss and the logits, so it is not computed here.

Evaluation runs per video (:class:`CPM2CScorer`): in eval mode every pass depends on one video and its token
(a query's the learnable one, a support's its class text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mdmf_cache.device import heads_autocast
from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, query_classes,
                                   support_classes, with_correct)
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.layers.motion import motion_difference, squared_gap
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import cosine_similarity, frame_distances, otam_distance

__all__ = ["CPM2COptions", "CPM2C", "SPEC", "MOTION_WEIGHT", "transformer"]

#: ``MOTION_COFF`` of the released configs (D-XH/CLIP-MEI ``configs/cpm2c/{ucf,ssv2_otam,ssv2_cmn}.yaml``); a
#: dataset without a config takes 1, the authors' runner default (cofly2014/CPM-MC ``--motion_coeff``).
MOTION_WEIGHT = {"ucf101": 0.0, "ssv2-full": 1.0, "ssv2-small": 1.0}
DEFAULT_MOTION_WEIGHT = 1.0


@dataclass
class CPM2COptions:
    """CLIP-CPM2C's options; the defaults are the released code's and configs'.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        num_classes: C, the train split's classes: the video-text loss's classifier has one row per class (data).
        heads: attention heads of ``context2`` (head width D / heads).
        ffn_dim: its feed-forward width (2048).
        depth: its layers (``MODEL.TRANSFORMER_DEPTH``, 1 when unset as in every config).
        attn_dropout: dropout after the attention's out projection (0.2).
        ffn_dropout: dropout inside the feed-forward block (0.05).
        cos_eps: added to the product of norms in every cosine (0.01).
        otam_lambda: OTAM soft-min temperature (0.5, ``OTAM_cum_dist_v2``).
        otam_bidirectional: OTAM(D) + OTAM(D^T); False = ``SINGLE_DIRECT``.
        token_mix: the share of the token added to every position (0.1).
        normal_weight: weight of the frame stream in the distance and the consistency (``NORMAL_COFF``, 1).
        motion_weight: the motion stream's (``MOTION_COFF``); None: the released config's for the dataset
            (:data:`MOTION_WEIGHT`). At 0 the motion stream is not built.
        text_loss_weight: weight of the video-text cross-entropy (``LMD[0]``, 0.5).
        consistency_weight: weight of the consistency loss in the released per-task loss (0.001).
        tasks_per_batch: the released ``TASKS_PER_BATCH`` (16): the released loss divides its cross-entropies by
            it and not the consistency, so per episode the consistency weighs ``tasks_per_batch x
            consistency_weight`` against the cross-entropies. It does not set the episodes of a step
            (``--episodes-per-step`` does; its default is the released 16).
    """

    dim: int
    num_frames: int = 8
    num_classes: int = 64
    heads: int = 8
    ffn_dim: int = 2048
    depth: int = 1
    attn_dropout: float = 0.2
    ffn_dropout: float = 0.05
    cos_eps: float = 0.01
    otam_lambda: float = 0.5
    otam_bidirectional: bool = True
    token_mix: float = 0.1
    normal_weight: float = 1.0
    motion_weight: float | None = None
    text_loss_weight: float = 0.5
    consistency_weight: float = 0.001
    tasks_per_batch: int = 16

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self, min_frames=2)  # the motion stream differences frames
        problems.sizes(self, ("heads", "ffn_dim", "depth", "tasks_per_batch"))
        problems.heads_divide(self)
        problems.check(self, ("attn_dropout", "ffn_dropout"), 0.0, 1.0, high_open=True)
        problems.check(self, "otam_lambda", 0.0, low_open=True)
        problems.check(self, ("cos_eps", "token_mix", "normal_weight", "motion_weight", "text_loss_weight",
                              "consistency_weight"), 0.0)
        problems.raise_any()

    def resolve(self, data: DataInfo) -> "CPM2COptions":
        """Fill the released per-dataset value that is still unset (the motion weight)."""
        if self.motion_weight is None:
            self.motion_weight = MOTION_WEIGHT.get(data.dataset, DEFAULT_MOTION_WEIGHT)
        return self


def transformer(layers: nn.ModuleList, frames: Tensor, token: Tensor) -> Tensor:
    """Self-attention layers over ``[token; frames]``: ``(B, L, D), (B, D) -> (B, L+1, D)``, the token's output first."""
    x = layers[0](token, frames, frames)  # (B, L+1, D)
    for layer in layers[1:]:  # later layers: self-attention over the whole sequence
        x = layer(x[:, 0], x[:, 1:], x[:, 1:])
    return x


class CPM2C(FewShotHead):
    """The released CLIP-CPM2C head (see the module docstring)."""

    method = "cpm2c"

    def __init__(self, options: CPM2COptions) -> None:
        super().__init__()
        o = self.options = options
        if o.motion_weight is None:
            raise ValueError("motion_weight is unset: build the options with resolve() (HeadSpec.make_options)")
        d = o.dim
        self.scale = nn.Parameter(torch.ones(1))  # the video-text loss's temperature, learnable
        self.context2 = nn.ModuleList([MMFE(d, heads=o.heads, ffn_dim=o.ffn_dim, attn_dropout=o.attn_dropout,
                                            ffn_dropout=o.ffn_dropout, num_positions=None) for _ in range(o.depth)])
        self.class_token = nn.Parameter(torch.randn(d))
        self.motion = o.motion_weight != 0  # at MOTION_COFF 0 the motion stream changes nothing: not built
        if self.motion:
            self.motion_conv1 = nn.Conv1d(d, d, kernel_size=3, padding=1)
            self.motion_conv2 = nn.Conv1d(d, d, kernel_size=3, padding=1)
            self.class_token_motion = nn.Parameter(torch.randn(d))

    def streams(self, videos: Tensor) -> list[tuple[str, Tensor, Tensor, float]]:
        """``(name, sequence (E, B, L, D), learnable token (D,), weight)`` per stream of ``videos (E, B, T, D)``."""
        o = self.options
        out = [("frames", videos, self.class_token, o.normal_weight)]
        if self.motion:
            e, b, t, d = videos.shape
            motion = motion_difference(videos.reshape(e * b, t, d), self.motion_conv1, self.motion_conv2)
            out.append(("motion", motion.reshape(e, b, t - 1, d), self.class_token_motion, float(o.motion_weight)))
        return out

    def modulate(self, seq: Tensor, token: Tensor) -> Tensor:
        """``[token; seq + mix x token]`` through ``context2``: ``(E, B, L, D), (E, B, D) -> (E, B, L+1, D)``."""
        e, b, length, d = seq.shape
        token = token.to(seq.dtype)
        x = seq + self.options.token_mix * token.unsqueeze(2)
        return transformer(self.context2, x.reshape(e * b, length, d), token.reshape(e * b, d)).reshape(e, b, length + 1, d)

    def distance(self, query_out: Tensor, protos: Tensor) -> Tensor:
        """OTAM distance ``(E, Q, L, D), (E, N, L, D) -> (E, Q, N)``, in float32 (or float64) under autocast."""
        o = self.options
        with torch.autocast(query_out.device.type, enabled=False):
            dist = frame_distances(at_least_float32(query_out), at_least_float32(protos), o.cos_eps)  # (E, Q, N, L, L)
            return otam_distance(dist, o.otam_lambda, o.otam_bidirectional)

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``; with ``class_text (C, D)`` (training) ``"class_logits"`` ``(E, S+Q, C)``; in
        training mode what :meth:`loss` needs for the consistency (the query side needs the query labels, which
        only the loss has)."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        o = self.options
        out: dict[str, Tensor] = {}
        if class_text is not None:
            if class_text.shape != (o.num_classes, d):
                raise ValueError(f"class_text {tuple(class_text.shape)} != (num_classes, D) = ({o.num_classes}, {d})")
            pooled = torch.cat([support, query], dim=1).mean(dim=2)  # (E, S+Q, D) raw features, mean over T
            out["class_logits"] = self.scale * cosine_similarity(pooled, class_text.to(pooled.dtype), o.cos_eps)
        support_text = text.repeat_interleave(s // n, dim=1)  # (E, S, D): each support carries its class's text
        dist = 0.0
        for name, seq, token, weight in self.streams(torch.cat([support, query], dim=1)):
            sup, qry = seq[:, :s], seq[:, s:]  # (E, S, L, D), (E, Q, L, D)
            real = self.modulate(sup, support_text)  # (E, S, L+1, D)
            fake = self.modulate(qry, token.expand(e, q, d))  # (E, Q, L+1, D)
            dist = dist + weight * self.distance(fake[:, :, 1:], class_means(real[:, :, 1:], n))
            if self.training:
                sup_fake = self.modulate(sup, token.expand(e, s, d))
                out[f"{name}_support_gap"] = squared_gap(real, sup_fake)  # (E,)
                out[f"{name}_query"], out[f"{name}_query_fake"] = qry, fake
        if self.training:
            out["text"] = text
        out["logits"] = -dist
        return with_correct(out, query_labels)

    def consistency(self, out: dict[str, Tensor], labels: Tensor) -> Tensor:
        """The released consistency per episode ``(E,)``: per stream, the support gap plus the query gap between the
        learnable-token pass and the pass with the query's true class text, weighted as the distance."""
        o = self.options
        e, q = labels.shape
        query_text = out["text"].gather(1, labels.unsqueeze(-1).expand(-1, -1, out["text"].shape[-1]))  # (E, Q, D)
        total = 0.0
        for name, weight in (("frames", o.normal_weight), ("motion", o.motion_weight)):
            if f"{name}_query" not in out:
                continue
            real = self.modulate(out[f"{name}_query"], query_text)  # (E, Q, L+1, D)
            total = total + weight * (out[f"{name}_support_gap"] + squared_gap(out[f"{name}_query_fake"], real))
        return total

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per episode: the query cross-entropy summed over the queries, ``text_loss_weight`` x the video-text
        cross-entropy summed over supports and queries, ``tasks_per_batch x consistency_weight`` x the consistency
        (training mode only); then the mean over episodes.

        The released per-task loss is ``(0.5 CE_text + CE) / TASKS_PER_BATCH + 0.001 x consistency``, summed over
        the tasks of a step; times ``tasks_per_batch`` and averaged over the episodes of a step it is this one, so
        at ``--episodes-per-step`` = ``tasks_per_batch`` the gradient of a step is the released one."""
        o = self.options
        main = episode_ce(out["logits"], labels, "sum")
        total, parts = main, {"main": main.detach()}
        if "class_logits" in out and classes is not None and o.text_loss_weight:
            logits = out["class_logits"]  # (E, S+Q, C)
            ids = torch.cat([support_classes(classes, logits.shape[1] - labels.shape[1]), query_classes(classes, labels)], dim=1)
            text = episode_ce(logits, ids, "sum")
            total = total + o.text_loss_weight * text
            parts["text"] = text.detach()
        if "text" in out and o.consistency_weight:
            cons = self.consistency(out, labels).mean()
            total = total + o.tasks_per_batch * o.consistency_weight * cons
            parts["consistency"] = cons.detach()
        parts["total"] = total.detach()
        return total, parts

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                  batch_size: int = 500) -> "CPM2CScorer":
        return CPM2CScorer(self, features, text, episodes, batch_size)


class CPM2CScorer:
    """Per-video evaluation of CPM2C: in eval mode a query's passes depend on the video alone (the learnable
    tokens) and a support's on the video and its class's text, so each stream's transformer pass runs once per
    video; per episode only the prototypes (class means) and OTAM."""

    def __init__(self, model: CPM2C, features: Tensor, text: Tensor, episodes, batch_size: int = 500) -> None:
        if model.training:
            raise ValueError("the per-video path needs the model in eval mode (dropout off)")
        self.model, self.episodes = model, episodes
        self.chunk = max(batch_size * 30, 1)  # videos per transformer batch
        query_videos, query_slot = np.unique(episodes.query, return_inverse=True)
        support_videos, support_slot = np.unique(episodes.support, return_inverse=True)
        self.query_slot, self.support_slot = query_slot.reshape(episodes.query.shape), support_slot.reshape(episodes.support.shape)
        cls = np.zeros(len(support_videos), dtype=np.int64)  # a support always carries its own class's text
        cls[self.support_slot.ravel()] = np.repeat(episodes.classes, episodes.shot, axis=1).ravel()
        with torch.no_grad(), heads_autocast(features.device):
            self.query_tables = self._tables(features, query_videos, None)
            self.support_tables = self._tables(features, support_videos, text[torch.as_tensor(cls, device=text.device)])
        self.fused = len(query_videos) + len(support_videos)

    def _tables(self, features: Tensor, videos: np.ndarray, tokens: Tensor | None) -> list[Tensor]:
        """Per stream, the frame outputs ``(U, L, D)`` of the videos' passes (``tokens (U, D)``: their class texts;
        None: the learnable token)."""
        model, dev = self.model, features.device
        parts: list[list[Tensor]] = []
        for i in range(0, len(videos), self.chunk):
            x = features[torch.as_tensor(videos[i : i + self.chunk], device=dev)].float()[None]  # (1, B, T, D)
            b = x.shape[1]
            outs = [model.modulate(seq, (token.expand(1, b, -1) if tokens is None else tokens[i : i + b][None]))[0, :, 1:]
                    for _, seq, token, _ in model.streams(x)]  # (B, L, D) per stream
            parts.append(outs)
        return [torch.cat(col) for col in zip(*parts)]

    @torch.no_grad()
    def logits(self, lo: int, hi: int) -> Tensor:
        model, ep = self.model, self.episodes[lo:hi]
        dev = self.query_tables[0].device
        q_slots = torch.as_tensor(self.query_slot[lo:hi], device=dev)  # (E, Q)
        s_slots = torch.as_tensor(self.support_slot[lo:hi], device=dev)  # (E, S)
        weights = [model.options.normal_weight] + ([float(model.options.motion_weight)] if model.motion else [])
        with heads_autocast(dev):
            dist = sum(w * model.distance(qt[q_slots], class_means(st[s_slots], ep.way))
                       for w, qt, st in zip(weights, self.query_tables, self.support_tables))
        return -dist


SPEC = HeadSpec(
    name="cpm2c",
    options=CPM2COptions,
    build=CPM2C,
    summary="CLIP-CPM2C (Neurocomputing 2025) as released: text-modulated supports, a learned query token held "
            "consistent with the text, a motion stream, OTAM",
    source="Guo et al., Consistency prototype module and motion compensation for few-shot action recognition "
           "(CLIP-CPM2C), Neurocomputing 611 (2025) 128649; released code D-XH/CLIP-MEI models/model_cpm2c.py "
           "(CLIP_CPMMC_FSAR, loss in run/main_run.py), the authors' original cofly2014/CPM-MC",
    per_video=True,
    space={"text-loss-weight": "0:1", "consistency-weight": "0.0001:0.01:log", "motion-weight": "0:1"},
    train_shot=lambda k: k,  # TRAIN.SHOT is the test shot too
    train_queries=lambda k: 4,  # QUERY_PER_CLASS 4 (ucf, ssv2_otam; the ssv2_cmn config has 5)
)
