"""Chamfer++ (Bertrand et al., 2023), matching-based few-shot recognition on frozen features, as its authors released it.

What the released ``MatchingBasedFewShotModel`` computes with the README's Chamfer++ command (jbertrand89/
temporal_matching, ``src/few_shot_models/matching_based_few_shot_model.py``, ``src/matching_functions/``;
``--backbone r2+1d_fc --feature_projection_dimension 1152 --matching_function chamfer --video_to_class_matching
joint --clip_tuple_length 3``; docs/heads.md has the details) on one vector per frame (there: per clip)
``(V, T, D)``:

1. every ordered 3-subset of the T frames (``itertools.combinations``, L = 56 at T = 8) is concatenated into a
   ``3 D`` vector, then ``LayerNorm(Linear(3 D, 1152))``;
2. tuple-to-tuple cosines ``<a, b> / (|a| |b| + 0.01)`` between a query and every support: ``(Q, S, L, L)``;
3. **joint** matching: the K supports of a class are concatenated along their tuples, ``(Q, N, L, K L)``;
4. symmetric Chamfer: ``(mean over query tuples of the max over the class's tuples + mean over the class's
   tuples of the max over query tuples) / 2``;
5. logits = that similarity x ``temperature_weight`` (learnable, 0.1) x ``global_temperature`` (100, fixed);
   loss = cross-entropy averaged over the queries.

``matching`` switches step 4 to the release's other matching functions (each as its module computes it):
``chamfer-query`` / ``chamfer-support`` (one direction), ``mean`` (mean over query tuples of the **sum** over
support tuples), ``max``, ``diag`` (mean of the diagonal), ``linear`` (a bias-free Linear on the flattened
matrix), ``otam`` (minus the mean of the two OTAM directions of ``1 - sim``, lambda 0.1), and ``visil``
(the release's ``--visil`` filter, four convolutions with two max-pools and a hardtanh, applied to the matrix
and to its transpose separately, then the symmetric Chamfer). ``class_matching=separate`` scores each
support alone and averages the K scores; ``projection=False`` is the release's plain ``r2+1d`` (no Linear,
no LayerNorm); ``tuple_length`` is ``--clip_tuple_length``.

A query's logits depend on its own frames and the supports only: the head is inductive. Per-video
evaluation (:class:`ChamferScorer`): each video's tuple embeddings once; per episode only the matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.device import heads_autocast
from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, with_correct
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import cosine_similarity, otam

__all__ = ["ChamferOptions", "Chamfer", "ViSiLFilter", "match", "ChamferScorer", "MATCHINGS", "MATCH_BUDGET", "SPEC"]

#: The ``--matching_function`` values of the released ``run_matching.py``, plus ``visil`` (its ``--visil`` filter).
MATCHINGS = ("chamfer", "chamfer-query", "chamfer-support", "mean", "max", "diag", "linear", "otam", "visil")

#: Elements of the largest tensor of a chunk of episodes (the ``(e, Q, S, L, L)`` similarities): 2^25 = 128 MiB in float32.
MATCH_BUDGET = 1 << 25


@dataclass
class ChamferOptions:
    """Chamfer++'s options; the defaults are the released README's Chamfer++ training command.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        matching: the matching function (:data:`MATCHINGS`; ``--matching_function``, ``chamfer`` = symmetric).
        class_matching: ``joint`` (a class's K supports matched as one sequence) or ``separate`` (each
            support alone, the K scores averaged) (``--video_to_class_matching``).
        tuple_length: frames per tuple (``--clip_tuple_length`` 3); 1 matches single frames.
        projection: ``Linear(tuple_length D, projection_dim)`` + LayerNorm on every tuple (``r2+1d_fc``); False:
            the concatenated frames as they are (``r2+1d``).
        projection_dim: the projection's width (``--feature_projection_dimension`` 1152).
        global_temperature: the fixed logit scale (``--matching_global_temperature 100``).
        learn_global_temperature: make it learnable (the release's default without ``--matching_global_temperature_fixed``).
        temperature_weight: the learnable logit scale's start (``--matching_temperature_weight 0.1``).
        learn_temperature_weight: learn it (True as released).
        cos_eps: added to the product of norms in the cosine (``cos_sim``'s 0.01).
        otam_lambda: OTAM's soft-min temperature (``OTAM_cum_dist``'s 0.1), for ``matching=otam``.
    """

    dim: int
    num_frames: int = 8
    matching: Literal["chamfer", "chamfer-query", "chamfer-support", "mean", "max", "diag", "linear", "otam",
                      "visil"] = "chamfer"
    class_matching: Literal["joint", "separate"] = "joint"
    tuple_length: int = 3
    projection: bool = True
    projection_dim: int = 1152
    global_temperature: float = 100.0
    learn_global_temperature: bool = False
    temperature_weight: float = 0.1
    learn_temperature_weight: bool = True
    cos_eps: float = 0.01
    otam_lambda: float = 0.1

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        if self.matching not in MATCHINGS:
            problems.add("matching", self.matching, f"choose one of {', '.join(MATCHINGS)}")
        if self.class_matching not in ("joint", "separate"):
            problems.add("class_matching", self.class_matching, "choose joint or separate")
        problems.sizes(self, ("tuple_length", "projection_dim"))
        if isinstance(self.tuple_length, int) and self.tuple_length > self.num_frames:
            problems.add("tuple_length", self.tuple_length, f"must be in 1..T={self.num_frames} (the frames per video)")
        problems.check(self, ("global_temperature", "temperature_weight", "otam_lambda"), 0.0, low_open=True)
        problems.check(self, "cos_eps", 0.0)
        if self.matching == "linear" and self.class_matching == "joint":
            problems.add("class_matching", self.class_matching, "matching=linear needs class_matching=separate (its "
                         "layer is sized for one support's tuples; joint matching multiplies them by K)")
        if self.matching == "visil" and 1 <= self.tuple_length <= self.num_frames \
                and math.comb(self.num_frames, self.tuple_length) < 4:
            problems.add("tuple_length", self.tuple_length,
                         f"matching=visil needs >= 4 tuples per video (two 2x2 max-pools); T={self.num_frames} "
                         f"frames give {math.comb(self.num_frames, self.tuple_length)}")
        problems.raise_any()

    @property
    def num_tuples(self) -> int:
        return math.comb(self.num_frames, self.tuple_length)


class ViSiLFilter(nn.Module):
    """The release's ``VisilFCN``: conv 3x3 (32) - maxpool 2 - ReLU - conv 3x3 (64) - maxpool 2 - ReLU -
    conv 3x3 (128) - conv 1x1 (1) - hardtanh, no biases; ``(B, Lq, Ls) -> (B, Lq // 4, Ls // 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(128, 1, 1, bias=False)

    def forward(self, sim: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(sim.unsqueeze(1)), 2))  # (B, 32, Lq/2, Ls/2)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, 64, Lq/4, Ls/4)
        return F.hardtanh(self.conv4(self.conv3(x))).squeeze(1)


def _chamfer(sim: Tensor) -> Tensor:
    """``(..., A, B) -> (...)``: the mean over rows of the max over columns."""
    return sim.amax(dim=-1).mean(dim=-1)


def match(sim: Tensor, matching: str, linear: nn.Linear | None = None, visil: ViSiLFilter | None = None,
          otam_lambda: float = 0.1) -> Tensor:
    """A matching function of the release on similarity matrices ``(..., Lq, Ls) -> (...)``."""
    if matching == "chamfer":
        return 0.5 * (_chamfer(sim) + _chamfer(sim.transpose(-1, -2)))
    if matching == "chamfer-query":
        return _chamfer(sim)
    if matching == "chamfer-support":
        return _chamfer(sim.transpose(-1, -2))
    if matching == "mean":
        return sim.sum(dim=-1).mean(dim=-1)
    if matching == "max":
        return sim.amax(dim=(-2, -1))
    if matching == "diag":
        return torch.diagonal(sim, dim1=-2, dim2=-1).mean(dim=-1)
    if matching == "linear":
        return linear(sim.flatten(-2)).squeeze(-1)
    if matching == "otam":
        dist = 1.0 - sim
        return -0.5 * (otam(dist, otam_lambda) + otam(dist.transpose(-1, -2), otam_lambda))
    if matching == "visil":
        lead = sim.shape[:-2]
        flat = lambda m: m.reshape(-1, *m.shape[-2:])  # (B, A, B') for the 2-D convolutions
        fwd = visil(flat(sim))
        bwd = visil(flat(sim.transpose(-1, -2)))
        return 0.5 * (_chamfer(fwd) + _chamfer(bwd)).reshape(lead)
    raise ValueError(f"unknown matching {matching!r}")


class Chamfer(FewShotHead):
    """The released matching-based head, Chamfer++ by default (see the module docstring)."""

    method = "chamfer"

    def __init__(self, options: ChamferOptions) -> None:
        super().__init__()
        o = self.options = options
        width = o.tuple_length * o.dim
        if o.projection:
            self.fc = nn.Linear(width, o.projection_dim)
            self.layer_norm = nn.LayerNorm(o.projection_dim)
        l = o.num_tuples
        if o.matching == "linear":
            self.linear = nn.Linear(l * l, 1, bias=False)  # the release sizes it T * T (tuple_length 1)
        if o.matching == "visil":
            self.visil = ViSiLFilter()
        self.global_temperature = nn.Parameter(torch.tensor(float(o.global_temperature)),
                                               requires_grad=o.learn_global_temperature)
        self.temperature_weight = nn.Parameter(torch.full((1,), float(o.temperature_weight)),
                                               requires_grad=o.learn_temperature_weight)
        tuples = torch.tensor(list(combinations(range(o.num_frames), o.tuple_length)), dtype=torch.long)  # (L, s)
        self.register_buffer("tuples", tuples, persistent=False)

    def embed(self, frames: Tensor) -> Tensor:
        """Step 1: ``(B, T, D) -> (B, L, P)`` tuple embeddings (P = projection_dim, or tuple_length D without projection)."""
        b = frames.shape[0]
        x = frames[:, self.tuples].reshape(b, self.tuples.shape[0], -1)  # (B, L, s D): the tuple's frames in order
        if self.options.projection:
            x = self.layer_norm(self.fc(x))
        return x

    def scores(self, support: Tensor, query: Tensor, n: int) -> Tensor:
        """Steps 2-5 on tuple embeddings ``support (E, S, L, P)`` class-major and ``query (E, Q, L, P)`` -> logits ``(E, Q, N)``."""
        o = self.options
        e, s, l, p = support.shape
        q = query.shape[1]
        k = s // n
        with torch.autocast(query.device.type, enabled=False):
            support, query = at_least_float32(support), at_least_float32(query)
            sim = cosine_similarity(query.reshape(e, q * l, p), support.reshape(e, s * l, p), o.cos_eps)  # (E, Q*L, S*L)
            sim = sim.reshape(e, q, l, s, l).permute(0, 1, 3, 2, 4)  # (E, Q, S, Lq, Ls)
            if o.class_matching == "joint":  # a class's K supports as one sequence of K L tuples
                sim = sim.reshape(e, q, n, k, l, l).permute(0, 1, 2, 4, 3, 5).reshape(e, q, n, l, k * l)
            score = match(sim, o.matching, getattr(self, "linear", None), getattr(self, "visil", None), o.otam_lambda)
            if o.class_matching == "separate":  # (E, Q, S) -> the mean over each class's K supports
                score = score.reshape(e, q, n, k).mean(dim=-1)
            return score * self.temperature_weight * self.global_temperature

    def chunk(self, s: int, q: int) -> int:
        """Episodes per chunk so that the similarities ``(e, Q, S, L, L)`` stay within :data:`MATCH_BUDGET` elements."""
        l = self.options.num_tuples
        return max(1, MATCH_BUDGET // (max(q * s * l * l, (s + q) * l * self.options.projection_dim)))

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``: the scaled query-to-class similarities. ``text`` only gives N."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        step = self.chunk(s, q)
        logits = []
        for i in range(0, e, step):
            sup, qry = support[i : i + step], query[i : i + step]
            b = sup.shape[0]
            sup = self.embed(sup.reshape(b * s, t, d)).reshape(b, s, -1, self.embed_width)
            qry = self.embed(qry.reshape(b * q, t, d)).reshape(b, q, -1, self.embed_width)
            logits.append(self.scores(sup, qry, n))
        return with_correct({"logits": torch.cat(logits)}, query_labels)

    @property
    def embed_width(self) -> int:
        o = self.options
        return o.projection_dim if o.projection else o.tuple_length * o.dim

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                  batch_size: int = 500) -> "ChamferScorer":
        return ChamferScorer(self, features, episodes)


class ChamferScorer:
    """Per-video evaluation: every video's tuple embeddings once (``L x P`` floats per video: 258 KB at L = 56,
    P = 1152 in float32); per episode only the similarities and the matching, chunked (:data:`MATCH_BUDGET`)."""

    def __init__(self, model: Chamfer, features: Tensor, episodes) -> None:
        self.model, self.episodes = model, episodes
        dev = features.device
        videos, slots = np.unique(np.concatenate([episodes.support, episodes.query], axis=1), return_inverse=True)
        slots = slots.reshape(len(episodes), -1)
        self.support_slot, self.query_slot = slots[:, : episodes.support.shape[1]], slots[:, episodes.support.shape[1]:]
        step = max(1, MATCH_BUDGET // (model.options.num_tuples * max(model.embed_width, model.options.dim)))
        with torch.no_grad(), heads_autocast(dev):
            vid = torch.as_tensor(videos, device=dev)
            self.table = torch.cat([model.embed(features[vid[i : i + step]].float())
                                    for i in range(0, len(vid), step)])  # (U, L, P)
        self.fused = len(videos)

    @torch.no_grad()
    def logits(self, lo: int, hi: int) -> Tensor:
        ep, dev = self.episodes, self.table.device
        s, q = ep.support.shape[1], ep.query.shape[1]
        step = self.model.chunk(s, q)
        out = []
        for i in range(lo, hi, step):
            j = min(i + step, hi)
            sup = self.table[torch.as_tensor(self.support_slot[i:j], device=dev)]  # (e, S, L, P)
            qry = self.table[torch.as_tensor(self.query_slot[i:j], device=dev)]  # (e, Q, L, P)
            out.append(self.model.scores(sup, qry, ep.way))
        return torch.cat(out)


SPEC = HeadSpec(
    name="chamfer",
    options=ChamferOptions,
    build=Chamfer,
    summary="Chamfer++ (2023) as released: projected frame triples, joint symmetric Chamfer matching, learnt temperature",
    source="Bertrand, Kalantidis and Tolias, Rethinking matching-based few-shot action recognition, arXiv "
           "2303.16084 (2023); released code jbertrand89/temporal_matching src/few_shot_models/"
           "matching_based_few_shot_model.py, src/matching_functions/, values from its README's Chamfer++ command",
    per_video=True,
    space={"temperature-weight": "0.01:1:log", "global-temperature": "10|100"},
    train_shot=lambda k: k,
    train_queries=lambda k: 1,  # the README's training command: --query_per_class 1
)
