"""TRX (Perrett et al., CVPR 2021), temporal-relational cross-transformers, as the FSAR codebase releases it.

What the released ``CNN_TRX`` computes (alibaba-mmai-research/CLIP-FSAR, ``models/base/few_shot.py``,
``CNN_TRX``, ``TemporalCrossTransformer``, ``PositionalEncoding``; docs/heads.md has the details) on
pooled per-frame features ``(V, T, D)``, once per tuple cardinality ``s`` in ``(2, 3)``:

* a sinusoidal position encoding scaled by 0.1 (a table of ``int(1.5 T)`` rows) is added to the frames,
  then dropout 0.1 (training only; each cardinality draws its own masks);
* every ordered ``s``-subset of the T frames (``itertools.combinations``, L of them) is concatenated
  into an ``s D`` vector and mapped to keys ``LayerNorm(k_linear(.))`` and values ``v_linear(.)``
  (1152 wide; values are not normed);
* per query tuple and class, a softmax of ``q_k . k / sqrt(1152)`` jointly over all ``K L`` support
  tuples of the class; the weighted sum of their values is the query-specific prototype ``P_c``;
* distance ``||q_v - P_c||^2 / L`` (summed over the L tuples and 1152 dims); logits = the mean over the
  cardinalities of minus the distances; loss = cross-entropy averaged over the queries.

The input width is D (the released code hard-codes 2048 for ResNet-50, else 512).

The released ``TemporalCrossTransformer`` also builds ``norm_v``, a LayerNorm it never applies. It is
left out here: it has no effect on any output or gradient, and an unused trainable parameter would stop
DistributedDataParallel (which expects a gradient for every parameter). The head therefore has
``11520 D + 9216`` parameters at the released sizes, the released module ``11520 D + 13824`` (plus its
tuple indices, stored as non-trainable ``nn.Parameter`` s; here buffers).

Computation order, same numbers: ``k_linear`` of a concatenated tuple is the sum over its ``s``
positions of the weight block of that position applied to the frame. The head projects each frame
once per position (``T s`` products per video instead of ``L``: 7x fewer at T = 8, s = 3) and sums
them per tuple, then adds the bias; up to rounding this is the released linear map. The
cross-attention and distance run in float32 (float64 stays float64) with autocast off.

Per-video evaluation (eval mode, no dropout): each video's tuple keys and values are computed once
(:class:`TRXScorer`); per episode only the cross-attention of each (query, class) runs, in chunks of
episodes so that memory does not grow with the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import Tensor, nn

from mdmf_cache.device import heads_autocast
from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, with_correct
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.attention import PositionalEncoding

__all__ = ["TRXOptions", "TRX", "TemporalCrossTransformer", "TRXScorer", "SPEC"]

#: Elements of the largest tensor of a chunk of episodes (the ``(e, Q, N, L, A)`` prototypes or the tuple
#: keys of the chunk's videos): 2^25 float32 = 128 MiB.
MATCH_BUDGET = 1 << 25


@dataclass
class TRXOptions:
    """TRX's options; the defaults are the released code's (``CNN_TRX.__init__``).

    Attributes:
        dim: D (data).
        num_frames: T (data).
        cardinalities: tuple sizes, one cross-transformer each (``temp_set`` [2, 3]).
        tuple_dim: width of the keys and values (``trans_linear_out_dim`` 1152).
        pe_dropout: dropout after the position encoding (``trans_dropout`` 0.1).
        pe_scale: scale of the sinusoidal position encoding (``pe_scale_factor`` 0.1).
    """

    dim: int
    num_frames: int = 8
    cardinalities: tuple[int, ...] = (2, 3)
    tuple_dim: int = 1152
    pe_dropout: float = 0.1
    pe_scale: float = 0.1

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("tuple_dim",))
        if not self.cardinalities or any(not 1 <= c <= self.num_frames for c in self.cardinalities):
            problems.add("cardinalities", self.cardinalities, f"each in 1..T={self.num_frames} (the frames per video)")
        problems.check(self, "pe_dropout", 0.0, 1.0, high_open=True)
        problems.check(self, "pe_scale", 0.0)
        problems.raise_any()


class TemporalCrossTransformer(nn.Module):
    """The released ``TemporalCrossTransformer`` for one tuple cardinality (without the unused ``norm_v``)."""

    def __init__(self, o: TRXOptions, cardinality: int) -> None:
        super().__init__()
        self.cardinality = s = cardinality
        self.pe = PositionalEncoding(o.dim, o.pe_dropout, int(o.num_frames * 1.5), o.pe_scale)
        self.k_linear = nn.Linear(o.dim * s, o.tuple_dim)
        self.v_linear = nn.Linear(o.dim * s, o.tuple_dim)
        self.norm_k = nn.LayerNorm(o.tuple_dim)
        tuples = torch.tensor(list(combinations(range(o.num_frames), s)), dtype=torch.long)  # (L, s)
        # select[l, t*s + p] = 1 where frame t is position p of tuple l: the per-tuple sum as one GEMM
        select = torch.zeros(len(tuples), o.num_frames * s, dtype=torch.bool)  # bool: constant under .to(dtype)
        select[torch.arange(len(tuples)).unsqueeze(1), tuples * s + torch.arange(s)] = True
        self.register_buffer("tuples", tuples, persistent=False)
        self.register_buffer("select", select, persistent=False)

    @property
    def num_tuples(self) -> int:
        return self.tuples.shape[0]

    def _tuple_linear(self, frames: Tensor, linear: nn.Linear) -> Tensor:
        """``linear`` of every tuple's concatenated frames: ``(B, T, D) -> (B, L, A)``.

        Frame ``p`` of a tuple meets the weight columns ``p D : (p + 1) D``: each frame is projected by
        every position's block once (one GEMM), and the blocks are summed per tuple (a 0/1 ``select``
        matrix: a second, small GEMM).
        """
        b, t, d = frames.shape
        s, a = self.cardinality, linear.out_features
        w = linear.weight.reshape(a, s, d).permute(2, 1, 0).reshape(d, s * a)  # (D, s*A): position-major blocks
        per_frame = (frames.reshape(b * t, d) @ w.to(frames.dtype)).reshape(b, t * s, a)  # row t*s + p
        return self.select.to(per_frame.dtype) @ per_frame + linear.bias.to(per_frame.dtype)  # (B, L, A)

    def keys_values(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Tuple keys (layer-normed) and values of ``frames (B, T, D)``: two ``(B, L, A)``."""
        x = self.pe(frames)
        return self.norm_k(self._tuple_linear(x, self.k_linear)), self._tuple_linear(x, self.v_linear)


def tuple_distances(qk: Tensor, qv: Tensor, ck: Tensor, cv: Tensor) -> Tensor:
    """Query-to-class distances of one cardinality, in float32 (float64 stays float64), autocast off.

    Args:
        qk, qv: query tuple keys and values ``(E, Q, L, A)``.
        ck, cv: support tuple keys and values per class ``(E, N, K L, A)``.

    Returns:
        ``(E, Q, N)``: ``||q_v - P_c||^2 / L``, ``P_c`` the softmax-weighted (jointly over the class's
        ``K L`` tuples, per query tuple) sum of the class's values.
    """
    e, q, l, a = qk.shape
    n, kl = ck.shape[1:3]
    with torch.autocast(qk.device.type, enabled=False):
        qk, qv, ck, cv = (at_least_float32(x) for x in (qk, qv, ck, cv))
        # one GEMM per episode for all (query tuple, class tuple) scores, no broadcast copies
        scores = qk.reshape(e, q * l, a) @ ck.reshape(e, n * kl, a).transpose(1, 2) / math.sqrt(a)  # (E, Q*L, N*KL)
        attn = scores.reshape(e, q * l, n, kl).softmax(dim=-1).transpose(1, 2)  # (E, N, Q*L, KL)
        protos = attn @ cv  # (E, N, Q*L, A): each query tuple's prototype of each class
        diff = qv.reshape(e, 1, q * l, a) - protos
        return (diff.pow(2).reshape(e, n, q, l * a).sum(dim=-1) / l).transpose(1, 2)  # (E, Q, N)


def episode_chunk(model: "TRX", s: int, q: int, n: int) -> int:
    """Episodes per chunk so that the largest tensor of a chunk (prototypes ``(e, Q, N, L, A)``, or the
    tuple keys of its videos ``(e (S + Q), L, A)``) stays within :data:`MATCH_BUDGET` elements."""
    la = max(tr.num_tuples for tr in model.transformers) * model.options.tuple_dim
    return max(1, MATCH_BUDGET // (max(q * n, s + q) * la))


class TRX(FewShotHead):
    """The released TRX head (see the module docstring)."""

    method = "trx"

    def __init__(self, options: TRXOptions) -> None:
        super().__init__()
        self.options = options
        self.transformers = nn.ModuleList([TemporalCrossTransformer(options, s) for s in options.cardinalities])

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``: minus the tuple distances, averaged over the cardinalities. ``text``
        only gives N."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        step = episode_chunk(self, s, q, n)  # episodes are independent: chunks bound the memory of a large batch
        logits = torch.cat([self.episode_logits(support[i : i + step], query[i : i + step], n)
                            for i in range(0, e, step)])
        return with_correct({"logits": logits}, query_labels)

    def episode_logits(self, support: Tensor, query: Tensor, n: int) -> Tensor:
        """``support (E, S, T, D)`` class-major, ``query (E, Q, T, D)`` -> logits ``(E, Q, N)``."""
        e, s, t, d = support.shape
        q = query.shape[1]
        logits = []
        for tr in self.transformers:
            sk, sv = tr.keys_values(support.reshape(e * s, t, d))  # (E*S, L, A)
            qk, qv = tr.keys_values(query.reshape(e * q, t, d))  # (E*Q, L, A)
            l, a = sk.shape[1:]
            per_class = (e, n, (s // n) * l, a)  # class-major supports: (E, N, K*L, A)
            dist = tuple_distances(qk.reshape(e, q, l, a), qv.reshape(e, q, l, a),
                                   sk.reshape(per_class), sv.reshape(per_class))
            logits.append(-dist)
        return torch.stack(logits, dim=-1).mean(dim=-1)

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                  batch_size: int = 500) -> "TRXScorer":
        return TRXScorer(self, features, episodes, batch_size)


class TRXScorer:
    """Per-video evaluation of TRX: the tuple keys and values of every video the episodes use, once per
    video; per episode the cross-attention of each (query, class), chunked (:data:`MATCH_BUDGET`).

    Memory: ``(28 + 56) x 2 x A`` floats per distinct video at T = 8 (774 KB at A = 1152, float32),
    whatever the number of episodes.
    """

    def __init__(self, model: TRX, features: Tensor, episodes, batch_size: int = 500) -> None:
        if model.training:
            raise ValueError("the per-video path needs the model in eval mode (dropout off)")
        self.model, self.episodes = model, episodes
        dev = features.device
        videos, slots = np.unique(np.concatenate([episodes.support, episodes.query], axis=1), return_inverse=True)
        slots = slots.reshape(len(episodes), -1)
        self.support_slot, self.query_slot = slots[:, : episodes.support.shape[1]], slots[:, episodes.support.shape[1]:]
        step = episode_chunk(model, 1, 0, 0)  # videos per chunk of the tables
        self.tables: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad(), heads_autocast(dev):
            vid = torch.as_tensor(videos, device=dev)
            for tr in model.transformers:
                parts = [tr.keys_values(features[vid[i : i + step]].float()) for i in range(0, len(vid), step)]
                self.tables.append((torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])))  # (U, L, A)
        self.fused = len(videos)

    @torch.no_grad()
    def logits(self, lo: int, hi: int) -> Tensor:
        ep = self.episodes
        dev = self.tables[0][0].device
        n, s, q = ep.way, ep.support.shape[1], ep.query.shape[1]
        step = episode_chunk(self.model, s, q, n)
        out = []
        for i in range(lo, hi, step):
            j = min(i + step, hi)
            s_idx = torch.as_tensor(self.support_slot[i:j], device=dev)  # (e, S)
            q_idx = torch.as_tensor(self.query_slot[i:j], device=dev)  # (e, Q)
            per = []
            for keys, values in self.tables:
                per_class = (j - i, n, -1, keys.shape[-1])  # (e, N, K*L, A)
                per.append(-tuple_distances(keys[q_idx], values[q_idx], keys[s_idx].reshape(per_class),
                                            values[s_idx].reshape(per_class)))
            out.append(torch.stack(per, dim=-1).mean(dim=-1))
        return torch.cat(out)


SPEC = HeadSpec(
    name="trx",
    options=TRXOptions,
    build=TRX,
    summary="TRX (CVPR 2021) as released: cross-transformers over frame pairs and triples",
    source="Perrett et al., Temporal-relational CrossTransformers for few-shot action recognition, CVPR 2021; "
           "released code alibaba-mmai-research/CLIP-FSAR (CNN_TRX). No released config: trained with the "
           "shared loop's values (the run's shot, 5 queries per class)",
    per_video=True,
    train_shot=lambda k: k,
    train_queries=lambda k: 5,
)
