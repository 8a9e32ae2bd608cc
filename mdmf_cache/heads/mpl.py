"""MPL, match-guided prototype learning, as its authors released it (``mpl_few_shot``).

What the released head computes (jayzh-research/MPL-FSAR, ``models/base/few_shot.py``, class
``mpl_few_shot`` with ``SlidingWindowPrototypeGenerator2``, ``MultiHeadAttention``, ``Transformer_v1``
and ``hausdorff_dist_window`` of the same file; docs/heads.md has the details) on projected CLIP frame
embeddings ``(V, T, D)``. It encodes the class prompts at start-up and never uses them: ``text`` is
ignored here.

1. **query-augmented supports** (``TOP_K_TEST`` = k > 0): Bi-MHM distance of every support to every
   query of the episode (``1 - cos`` frame distances with ``F.normalize``; the sum over one video's
   frames of the min over the other's, both ways); per support, the k nearest queries are added to it,
   weighted by ``F.normalize(far_j - near_j)`` over the ranks j (``near_j`` / ``far_j`` the j-th
   smallest / largest distance; at k = 1 the weight is 1);
2. **prototypes**: the class mean of the augmented supports plus the shot attention: per window of
   ``proto_window`` consecutive frames (1 as released), the K shots' frames of the window through a
   post-norm multi-head attention (HyRSM's ``MultiHeadAttention``: 8 heads, dropout 0.1 on the
   probabilities and 0.2 after ``fc``), averaged over the shots, and each frame averaged over the
   windows that hold it;
3. ``context2`` (CLIP-FSAR's ``Transformer_v1``: pre-norm attention over the T frames, out-projection
   dropout 0.1, feed-forward D -> 2048 -> D with dropout 0.05) on every prototype;
4. **key frames**: frame distances between the prototypes of step 2 (before ``context2``) and the
   queries, restricted to a band ``|i - j| <= match_window`` (9: all of T = 8); for each prototype frame
   the index of its nearest query frame, and for each query frame the index of its nearest prototype
   frame. As released, a prototype's key vector averages its own (``context2``) frames at the first
   kind of index (a *query* frame position) over every query and frame, and a query's key vector averages
   its frames at the second kind (a *prototype* frame position) over every class and frame;
   ``key_frames=matched`` swaps them (each video read at its own matched positions), a variant;
5. **joint attention**: ``context2`` again, over the Q query keys and the N prototype keys of the
   episode as one sequence; each key + its video's time-mean is prepended to its frames (T + 1 tokens);
6. Bi-MHM distance of every query to every prototype over the T + 1 tokens; logits = minus it.

Loss: cross-entropy averaged over the queries (``USE_CLASSIFICATION`` branch with no class logits).

Steps 1, 4 and 5 make every query's logits depend on the other queries of its episode: the head is
**transductive** (``SPEC.transductive``), and its released test episodes have one query per class
(``QUERY_PER_CLASS_TEST: 1`` in every config; ``SPEC.test_queries``). There is no per-video path; in
eval mode the episodes run in chunks (:data:`EVAL_ELEMENTS`). The distances, the top-k choice and its
weights are computed in float32 (float64 stays float64) with autocast off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, class_means, in_chunks, with_correct
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.layers.attention import MultiHeadAttention
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.layers.otam import bi_mhm
from mdmf_cache.device import at_least_float32

__all__ = ["MPLOptions", "MPL", "TOP_K", "FOLDER_VALUES", "EVAL_ELEMENTS", "SPEC"]

#: ``DATA.TOP_K_TEST`` per dataset, for a 1-shot and a K >= 2 shot run (docs/heads.md says which config file gave
#: each value). Kinetics-100 1-shot and both SSv2-Full configs do not set it (they fail as written): Kinetics-100
#: takes the value of its other config, SSv2-Full those of SSv2-Small at the same shot.
TOP_K: dict[str, dict[int, int]] = {
    "hmdb51": {1: 1, 5: 1},
    "kinetics100": {1: 1, 5: 1},
    "ssv2-small": {1: 1, 5: 2},
    "ssv2-full": {1: 1, 5: 2},
    "ucf101": {1: 1, 5: 1},
}
#: The dataset whose values a folder dataset (or any other) takes, as for HyRSM.
FOLDER_VALUES = "ucf101"

#: Eval-mode forward runs this many elements' worth of episodes at a time (about 256 MB of float32 per
#: intermediate): the direct evaluation path hands the head 500 episodes at once.
EVAL_ELEMENTS = 1 << 26


@dataclass
class MPLOptions:
    """MPL's options; the defaults are the released code's and configs'.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        heads: heads of both attention modules (8, written in the released constructor).
        ffn_dim: ``context2``'s feed-forward width (``Transformer_v1``'s 2048 whatever D is).
        attn_dropout: ``context2``'s dropout after the out projection (``dropout_atte=0.1``).
        ffn_dropout: ``context2``'s feed-forward dropout (0.05).
        proto_window: frames per window of the shot attention (``SlidingWindowPrototypeGenerator2(D, 1)``).
        proto_dropout: the shot attention's dropout after ``fc`` (0.2).
        proto_attn_dropout: the shot attention's dropout on its probabilities (0.1).
        top_k: queries added to each support (``DATA.TOP_K_TEST``; 0 = none); None: the released config's for
            the dataset and shot (:data:`TOP_K`). At most Q are taken (the released ``topk`` fails beyond).
        top_k_train: the same in training; None: ``top_k`` (the released forward reads ``TOP_K_TEST`` in
            training too; the configs' ``TOP_K`` is never read).
        match_window: the band ``|i - j| <= W`` of the key-frame matching (``HAUSDORFF_WINDOW_SIZE`` 9).
        key_frames: ``released`` (each video read at its partner's matched frame positions) or ``matched``
            (at its own, a variant).
    """

    dim: int
    num_frames: int = 8
    heads: int = 8
    ffn_dim: int = 2048
    attn_dropout: float = 0.1
    ffn_dropout: float = 0.05
    proto_window: int = 1
    proto_dropout: float = 0.2
    proto_attn_dropout: float = 0.1
    top_k: int | None = field(default=None, metadata={"min": 0})
    top_k_train: int | None = field(default=None, metadata={"min": 0})
    match_window: int = field(default=9, metadata={"min": 0})
    key_frames: Literal["released", "matched"] = "released"

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("heads", "ffn_dim", "proto_window"))
        problems.heads_divide(self)
        if isinstance(self.proto_window, int) and self.proto_window > self.num_frames:
            problems.add("proto_window", self.proto_window, f"must be in 1..T={self.num_frames} (the frames per video)")
        problems.check(self, ("attn_dropout", "ffn_dropout", "proto_dropout", "proto_attn_dropout"), 0.0, 1.0,
                       high_open=True)
        problems.check(self, ("top_k", "top_k_train", "match_window"), 0.0)  # 0: no query added; a diagonal band
        if self.key_frames not in ("released", "matched"):
            problems.add("key_frames", self.key_frames, "choose released or matched")
        problems.raise_any()

    def resolve(self, data: DataInfo) -> "MPLOptions":
        """Fill the released per-dataset and per-shot values that are still unset."""
        if self.top_k is None:
            self.top_k = TOP_K.get(data.dataset, TOP_K[FOLDER_VALUES])[1 if data.shot == 1 else 5]
        if self.top_k_train is None:
            self.top_k_train = self.top_k
        return self


class MPL(FewShotHead):
    """The released MPL head (see the module docstring)."""

    method = "mpl"

    def __init__(self, options: MPLOptions) -> None:
        super().__init__()
        o = self.options = options
        if o.top_k is None or o.top_k_train is None:
            raise ValueError("MPL options must be resolved (HeadSpec.make_options) before building the head")
        d = o.dim
        self.proto_attention = MultiHeadAttention(o.heads, d, o.proto_dropout, o.proto_attn_dropout)
        self.context2 = MMFE(d, heads=o.heads, ffn_dim=o.ffn_dim, attn_dropout=o.attn_dropout,
                             ffn_dropout=o.ffn_dropout, num_positions=None)

    def transform(self, x: Tensor) -> Tensor:
        """``context2`` self-attention over the tokens of each row: ``(B, L, D) -> (B, L, D)``."""
        return self.context2(None, x, x)

    def add_nearest_queries(self, support: Tensor, query: Tensor, k: int) -> Tensor:
        """Step 1: ``support (E, S, T, D)`` plus the weighted sum of each support's k nearest queries ``(E, Q, T, D)``."""
        e, s = support.shape[:2]
        with torch.autocast(support.device.type, enabled=False):
            dist = bi_mhm(at_least_float32(support)[:, None], at_least_float32(query)).transpose(1, 2)  # (E, S, Q)
            near, index = dist.topk(k, dim=-1, largest=False)  # (E, S, k)
            far = dist.topk(k, dim=-1).values  # (E, S, k): j-th largest beside the j-th smallest
            weight = F.normalize(far - near, dim=-1)  # (E, S, k)
        picked = query[torch.arange(e, device=query.device)[:, None, None], index]  # (E, S, k, T, D)
        return support + (weight[..., None, None] * picked).sum(dim=2)

    def shot_attention(self, support: Tensor, n: int) -> Tensor:
        """Step 2's attention term: ``(E, S, T, D)`` class-major -> ``(E, N, T, D)``."""
        e, s, t, d = support.shape
        k, w = s // n, self.options.proto_window
        nw = t - w + 1  # windows
        windows = support.reshape(e, n, k, t, d).unfold(3, w, 1)  # (E, N, K, nw, D, w)
        tokens = windows.permute(0, 1, 3, 2, 5, 4).reshape(e * n * nw, k * w, d)  # one set of K*w frames per window
        out = self.proto_attention(tokens).reshape(e, n, nw, k, w, d).mean(dim=3)  # (E, N, nw, w, D): mean over shots
        # frame i = the mean over the windows holding it (window v holds frames v .. v + w - 1)
        summed = sum(F.pad(out[:, :, :, p], (0, 0, p, w - 1 - p)) for p in range(w))  # (E, N, T, D)
        i = torch.arange(t, device=support.device)
        counts = (torch.clamp(i, max=nw - 1) - torch.clamp(i - w + 1, min=0) + 1).to(summed.dtype)  # (T,)
        return summed / counts[:, None]

    def key_frame_weights(self, protos: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Step 4's frame weights: ``(E, N, T)`` over each prototype's frames, ``(E, Q, T)`` over each query's
        (the mean of the picked frames as weights: picks / picks made), from ``protos (E, N, T, D)`` and
        ``query (E, Q, T, D)``. No gradient flows through the choice."""
        o = self.options
        e, n, t, _ = protos.shape
        q = query.shape[1]
        with torch.no_grad(), torch.autocast(protos.device.type, enabled=False):
            p, x = F.normalize(at_least_float32(protos), dim=-1), F.normalize(at_least_float32(query), dim=-1)
            dist = 1.0 - p[:, None] @ x[:, :, None].transpose(-1, -2)  # (E, Q, N, T proto frames, T query frames)
            i = torch.arange(t, device=protos.device)
            outside = (i[:, None] - i[None, :]).abs() > o.match_window  # (T, T)
            dist = dist.masked_fill(outside, math.inf)
            to_query = dist.argmin(dim=-1)  # (E, Q, N, T): nearest query frame of each prototype frame
            to_proto = dist.argmin(dim=-2)  # (E, Q, N, T): nearest prototype frame of each query frame
            if o.key_frames == "matched":
                to_query, to_proto = to_proto, to_query
            # a prototype reads its frames at to_query (over every query and frame), a query at to_proto
            proto_w = F.one_hot(to_query, t).sum(dim=(1, 3)) / (q * t)  # (E, N, T)
            query_w = F.one_hot(to_proto, t).sum(dim=(2, 3)) / (n * t)  # (E, Q, T)
        return proto_w.to(protos.dtype), query_w.to(query.dtype)

    def episodes(self, support: Tensor, query: Tensor, n: int) -> Tensor:
        """Steps 1-6 on ``support (E, S, T, D)`` class-major and ``query (E, Q, T, D)`` -> distances ``(E, Q, N)``."""
        e, s, t, d = support.shape
        q = query.shape[1]
        k = min(self.options.top_k_train if self.training else self.options.top_k, q)
        if k > 0:
            support = self.add_nearest_queries(support, query, k)
        protos = class_means(support, n) + self.shot_attention(support, n)  # (E, N, T, D)
        ctx = self.transform(protos.reshape(e * n, t, d)).reshape(e, n, t, d)
        proto_w, query_w = self.key_frame_weights(protos, query)
        proto_key = torch.einsum("ent,entd->end", proto_w.to(ctx.dtype), ctx)  # (E, N, D)
        query_key = torch.einsum("eqt,eqtd->eqd", query_w.to(query.dtype), query)  # (E, Q, D)
        joint = self.transform(torch.cat([query_key, proto_key.to(query_key.dtype)], dim=1))  # (E, Q+N, D): one sequence
        proto_key = joint[:, q:] + ctx.mean(dim=2)
        query_key = joint[:, :q] + query.mean(dim=2)
        with torch.autocast(support.device.type, enabled=False):
            protos_out = at_least_float32(torch.cat([proto_key[:, :, None], ctx], dim=2))  # (E, N, T+1, D)
            query_out = at_least_float32(torch.cat([query_key[:, :, None], query.to(query_key.dtype)], dim=2))
            return bi_mhm(protos_out[:, None], query_out)  # (E, Q, N)

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)`` and ``"d_mpl"``. ``text``, ``classes`` and ``class_text`` are not used (the
        released head encodes prompts and never reads them)."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        if self.training:
            dist = self.episodes(support, query, n)
        else:  # episodes are independent: chunks bound the memory of the direct evaluation path's batches
            per_episode = (s + q) * t * 4 * d + n * t * (4 * d + 2 * self.options.ffn_dim) + q * n * t * t
            dist = in_chunks(lambda lo, hi: self.episodes(support[lo:hi], query[lo:hi], n), e, per_episode, EVAL_ELEMENTS)
        return with_correct({"logits": -dist, "d_mpl": dist}, query_labels)


def released_train_queries(k: int) -> int:
    """``QUERY_PER_CLASS`` of the released configs: 5 for a 1-shot run, 2 for K >= 2 (docs/heads.md)."""
    return 5 if k == 1 else 2


SPEC = HeadSpec(
    name="mpl",
    options=MPLOptions,
    build=MPL,
    summary="MPL as released: query-augmented supports, shot attention, match-guided key frames, joint attention",
    source="MPL: Match-guided Prototype Learning for Few-shot Action Recognition; released code "
           "jayzh-research/MPL-FSAR models/base/few_shot.py (mpl_few_shot), configs configs/projects/MPL",
    per_video=False,  # every support and query depends on the whole episode (transductive)
    transductive=True,
    test_queries=lambda k: 1,  # QUERY_PER_CLASS_TEST: 1 in every released config
    space={"top-k": "0:3"},
    train_shot=lambda k: k,
    train_queries=released_train_queries,
)
