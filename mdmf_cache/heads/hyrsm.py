"""HyRSM (Wang et al., CVPR 2022), the hybrid relation-guided set matching head, as its authors released it.

What the released ``CNN_HyRSM_1shot`` and ``CNN_HyRSM_5shot`` heads compute on pooled per-frame features
(alibaba-mmai-research/CLIP-FSAR, ``models/base/few_shot.py``; docs/heads.md has the details):

1. every video: ``F = ReLU(PreNorm-Attention(PE(x)))``, where ``PE`` scales the frames by
   ``sqrt(D / A)`` and adds ``B`` x a sinusoid table that is not the textbook one (the exponent uses the
   channel index itself times 2, so the sin/cos of a pair have different frequencies), then dropout
   0.1; the attention is self-attention over the T frames (8 heads of D/8, out projection and dropout
   0.2, no feed-forward);
2. a per-frame classification layer ``Linear(D, C)`` over the train split's C classes, on ``F`` of
   every support and query (training only: its loss is the only use);
3. the 5-shot head averages ``F`` over the K shots into prototypes here, **before** the set module;
   the 1-shot head keeps every support;
4. per query, the set {time-mean of every support (or prototype)} + {time-mean of the query} goes
   through a post-norm multi-head attention (8 heads, probability dropout 0.1, output dropout 0.05,
   normal/xavier init), then ReLU: one relation vector per member, as this query sees the episode;
5. ``layer2 = Conv1d(2D, D, 1)`` on each frame concatenated with its video's relation vector;
6. frame distance ``1 - <n(s_t), n(q_u)>`` with ``n = F.normalize``; Bi-MHM: the sum over support
   frames of the min over query frames plus the sum over query frames of the min over support frames;
7. the 1-shot head averages these distances over a class's supports; logits = minus the distance.

Loss: cross-entropy (mean over the queries) + ``USE_CLASSIFICATION_VALUE`` (per dataset) x the
cross-entropy of the per-frame class logits against the split class of each frame's video.

Every support's representation depends on the query and on the whole episode (steps 3-5), so there is no
per-video evaluation path: evaluation runs ``forward`` on whole episodes, in chunks of episodes in
eval mode (:data:`EVAL_ELEMENTS`). ``layer2`` is applied as its two halves, the frame half once per
video and the relation half once per (query, member): the same sums as the concatenation.

HyRSM++ (:mod:`mdmf_cache.heads.hyrsm_pp`) is this module plus a temporal-coherence regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, in_chunks,
                                   query_classes, support_classes, with_correct)
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.attention import MultiHeadAttention, PositionalEncoder, PreNormAttention
from mdmf_cache.layers.otam import bi_mhm

__all__ = ["HyRSMOptions", "HyRSM",
           "RELEASED", "FOLDER_VALUES", "EVAL_ELEMENTS", "SPEC"]

#: The released configs' per-dataset values (``configs/projects/hyrsm/<dataset>/HyRSM_*_{1..5}shot_v1.yaml`` of
#: alibaba-mmai-research/HyRSM): ``USE_CLASSIFICATION_VALUE`` and ``POSITION_A`` / ``POSITION_B`` (10 / 1 where
#: a config does not set them). The same for every shot of a dataset.
RELEASED: dict[str, dict[str, float]] = {
    "ssv2-full": {"class_loss_weight": 0.6, "position_a": 10.0, "position_b": 1.0},
    "ssv2-small": {"class_loss_weight": 0.15, "position_a": 10.0, "position_b": 1.0},
    "hmdb51": {"class_loss_weight": 0.15, "position_a": 10.0, "position_b": 1.0},
    "ucf101": {"class_loss_weight": 0.15, "position_a": 10.0, "position_b": 1.0},
    "kinetics100": {"class_loss_weight": 0.4, "position_a": 2048.0, "position_b": 0.01},
}
#: The dataset whose values a folder dataset (or any other) takes: UCF101, a scene-biased action set like
#: most folders of one's own videos, with the released defaults of the position encoder.
FOLDER_VALUES = "ucf101"

#: Eval-mode forward runs this many elements' worth of episodes at a time (about 256 MB of float32 per
#: intermediate): the direct evaluation path hands the head 500 episodes at once.
EVAL_ELEMENTS = 1 << 26


@dataclass
class HyRSMOptions:
    """HyRSM's options; the defaults are the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        num_classes: C, the train split's classes: the per-frame classification layer's outputs (data).
        form: ``1shot`` (``CNN_HyRSM_1shot``: every support in the set, distances averaged per class) or
            ``5shot`` (``CNN_HyRSM_5shot``: class prototypes formed before the set module); None: as the
            released configs use them, ``1shot`` for a run for K = 1 and ``5shot`` for K >= 2.
        heads: attention heads of both attention layers (``TRAIN.HEAD``, 8 when unset as in every config).
        position_a / position_b: the position encoder's ``A`` (frames scaled by ``sqrt(D / A)``) and ``B``
            (weight of the table); None: the released config's for the dataset (:data:`RELEASED`).
        pe_dropout: dropout after the position encoder (0.1).
        attn_dropout: dropout after the temporal attention's out projection (0.2).
        set_attn_dropout: dropout on the set attention's probabilities (0.1).
        set_dropout: dropout after the set attention's out projection (0.05).
        class_loss_weight: weight of the per-frame classification loss (``USE_CLASSIFICATION_VALUE``);
            None: the released config's for the dataset.
    """

    #: per-dataset values :meth:`resolve` fills in (a subclass's table has more fields)
    RELEASED: ClassVar[dict[str, dict[str, float]]] = RELEASED

    dim: int
    num_frames: int = 8
    num_classes: int = 64
    form: Literal["1shot", "5shot"] | None = None
    heads: int = 8
    position_a: float | None = None
    position_b: float | None = None
    pe_dropout: float = 0.1
    attn_dropout: float = 0.2
    set_attn_dropout: float = 0.1
    set_dropout: float = 0.05
    class_loss_weight: float | None = None

    def __post_init__(self) -> None:
        self.problems().raise_any()

    def problems(self) -> Problems:
        """What is wrong with these options (a subclass adds its own)."""
        problems = Problems()
        problems.data(self)
        if self.dim % 2:
            problems.add("dim", self.dim, "must be even (the sinusoidal position encoding)")
        problems.sizes(self, ("heads",))
        problems.heads_divide(self)
        if self.form not in (None, "1shot", "5shot"):
            problems.add("form", self.form, "choose 1shot or 5shot, or leave it unset")
        problems.check(self, ("pe_dropout", "attn_dropout", "set_attn_dropout", "set_dropout"), 0.0, 1.0,
                       high_open=True)
        problems.check(self, "position_a", 0.0, low_open=True)
        problems.check(self, ("position_b", "class_loss_weight"), 0.0)
        return problems

    def resolve(self, data: DataInfo) -> "HyRSMOptions":
        """Fill the released per-shot and per-dataset values that are still unset."""
        if self.form is None:
            self.form = "1shot" if data.shot == 1 else "5shot"
        values = self.RELEASED.get(data.dataset, self.RELEASED[FOLDER_VALUES])
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self


class HyRSM(FewShotHead):
    """The released HyRSM head, both forms (see the module docstring)."""

    method = "hyrsm"

    def __init__(self, options: HyRSMOptions) -> None:
        super().__init__()
        o = self.options = options
        if o.form is None or o.position_a is None or o.position_b is None or o.class_loss_weight is None:
            raise ValueError("HyRSM options must be resolved (HeadSpec.make_options) before building the head")
        d = o.dim
        self.pe = PositionalEncoder(d, o.num_frames, o.pe_dropout, o.position_a, o.position_b)
        self.temporal_atte_before = PreNormAttention(d, o.heads, o.attn_dropout)
        self.temporal_atte = MultiHeadAttention(o.heads, d, o.set_dropout, o.set_attn_dropout)
        self.layer2 = nn.Conv1d(2 * d, d, kernel_size=1)  # per frame: [frame; relation vector] -> D
        self.classification_layer = nn.Linear(d, o.num_classes)

    def encode(self, x: Tensor) -> Tensor:
        """Step 1 for ``(B, T, D)`` videos: ``ReLU(PreNorm-Attention(PE(x)))``."""
        return F.relu(self.temporal_atte_before(self.pe(x)))

    def relate(self, members: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 4-5: the set module per query, then ``layer2``.

        Args:
            members: ``(E, M, T, D)`` encoded supports (1-shot form) or prototypes (5-shot form).
            query: ``(E, Q, T, D)`` encoded queries.

        Returns:
            every member as each query sees it ``(E, Q, M, T, D)``, and the queries ``(E, Q, T, D)``.
        """
        e, m, t, d = members.shape
        q = query.shape[1]
        tokens = torch.cat([members.mean(dim=2)[:, None].expand(e, q, m, d), query.mean(dim=2)[:, :, None]], dim=2)
        rel = F.relu(self.temporal_atte(tokens.reshape(e * q, m + 1, d))).reshape(e, q, m + 1, d)  # one set per query
        w = self.layer2.weight.squeeze(-1)  # (D, 2D): [frame half | relation half]
        rel = F.linear(rel, w[:, d:], self.layer2.bias)  # (E, Q, M+1, D)
        support_out = F.linear(members, w[:, :d])[:, None] + rel[:, :, :m, None]  # (E, Q, M, T, D)
        query_out = F.linear(query, w[:, :d]) + rel[:, :, m:]  # (E, Q, T, D)
        return support_out, query_out

    def episodes(self, support: Tensor, query: Tensor, n: int) -> dict[str, Tensor]:
        """Steps 1-7 on ``support (E, S, T, D)`` class-major and ``query (E, Q, T, D)``; in training also the
        per-frame class logits ``(E, S+Q, T, C)`` and the head's extra terms (:meth:`extra_terms`)."""
        e, s, t, d = support.shape
        q = query.shape[1]
        fs = self.encode(support.reshape(e * s, t, d)).reshape(e, s, t, d)
        fq = self.encode(query.reshape(e * q, t, d)).reshape(e, q, t, d)
        out: dict[str, Tensor] = {}
        if self.training:  # its only use is the loss
            out["class_logits"] = self.classification_layer(torch.cat([fs, fq], dim=1))  # (E, S+Q, T, C)
        members = class_means(fs, n) if self.options.form == "5shot" else fs  # (E, M, T, D), M = N or S
        support_out, query_out = self.relate(members, fq)
        with torch.autocast(support.device.type, enabled=False):
            support_out, query_out = at_least_float32(support_out), at_least_float32(query_out)
            dist = bi_mhm(support_out, query_out)  # (E, Q, M)
            if self.options.form == "1shot":  # mean over each class's K supports
                dist = dist.reshape(e, q, n, s // n).mean(dim=-1)
            out.update(logits=-dist, d_hyrsm=dist)
            if self.training:
                out.update(self.extra_terms(support_out, query_out))
        return out

    def extra_terms(self, support_out: Tensor, query_out: Tensor) -> dict[str, Tensor]:
        """Per-episode training terms of a variant (HyRSM++'s regulariser); HyRSM has none."""
        return {}

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)`` and ``"d_hyrsm"``; in training ``"class_logits"`` ``(E, S+Q, T, C)``.
        ``text``, ``classes`` and ``class_text`` are not used (HyRSM sees no text)."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        if self.training:
            return with_correct(self.episodes(support, query, n), query_labels)
        m = n if self.options.form == "5shot" else s
        per_episode = (s + q) * t * 4 * d + q * m * t * d * 2  # qkv and encoded frames; the (Q, M, T, D) copies
        out = in_chunks(lambda lo, hi: self.episodes(support[lo:hi], query[lo:hi], n), e, per_episode, EVAL_ELEMENTS)
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Query cross-entropy (mean over the queries) + ``class_loss_weight`` x the per-frame cross-entropy
        (mean over the (S+Q) T frames, each labelled with its video's split class), per episode; then the
        mean over episodes."""
        main = episode_ce(out["logits"], labels)
        total, parts = main, {"main": main.detach()}
        if "class_logits" in out and classes is not None:
            logits = out["class_logits"]  # (E, S+Q, T, C)
            e, sq, t, c = logits.shape
            ids = torch.cat([support_classes(classes, sq - labels.shape[1]), query_classes(classes, labels)], dim=1)
            ids = ids.repeat_interleave(t, dim=1)  # (E, (S+Q) T): every frame of a video has its class
            frames = F.cross_entropy(at_least_float32(logits.reshape(e * sq * t, c)), ids.reshape(-1), reduction="none")
            frames = frames.reshape(e, sq * t).mean(dim=1).mean()
            total = total + self.options.class_loss_weight * frames
            parts["frames"] = frames.detach()
        total = self.extra_loss(out, total, parts)
        parts["total"] = total.detach()
        return total, parts

    def extra_loss(self, out: dict[str, Tensor], total: Tensor, parts: dict[str, Tensor]) -> Tensor:
        """``total`` with a variant's extra terms added (and logged in ``parts``); HyRSM adds nothing."""
        return total


def released_train_queries(k: int) -> int:
    """``QUERY_PER_CLASS`` of the released K-shot configs: 8 - K (7 at K = 1, 3 at K = 5); 1 beyond K = 7."""
    return max(8 - k, 1)


SPEC = HeadSpec(
    name="hyrsm",
    options=HyRSMOptions,
    build=HyRSM,
    summary="HyRSM (CVPR 2022) as released: temporal attention, per-query set attention, Bi-MHM distances",
    source="Wang et al., Hybrid relation guided set matching for few-shot action recognition, CVPR 2022; released "
           "code alibaba-mmai-research/CLIP-FSAR models/base/few_shot.py (CNN_HyRSM_1shot, CNN_HyRSM_5shot), "
           "configs alibaba-mmai-research/HyRSM configs/projects/hyrsm",
    per_video=False,  # every support's representation depends on the query and the whole episode
    space={"class-loss-weight": "0:1"},
    train_shot=lambda k: k,
    train_queries=released_train_queries,
)
