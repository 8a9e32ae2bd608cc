"""STRM (Thatipelli et al., CVPR 2022), spatio-temporal relation modelling, on cached patch maps.

What the released ``CNN_STRM`` computes (Anirudh257/strm, ``model.py``: ``CNN_STRM``, ``Self_Attn_Bot``,
``MLP_Mix_Enrich``, ``DistanceLoss``, ``TemporalCrossTransformer``; the loss in ``run.py`` ``train_task`` and
``utils.loss``; docs/heads.md has the details), here on the cached tokens of every frame ``(P, Dt)``:

1. **patches.** The frame's h x w map (a ResNet ``map``; a ViT's patch tokens, its class token dropped) is
   adaptive-**max**-pooled to 4 x 4 (the release's ``AdaptiveMaxPool2d((4, 4))`` on the ResNet's 7 x 7), 16
   patches in row-major order;
2. **patch-level enrichment** (``Self_Attn_Bot``): ``x = PE(x)`` (the TRX sinusoid scaled by 0.1, a table of 24
   rows, dropout 0.1); ``attn = softmax(q(x) k(x)^T)`` (three biased ``Dt -> Dt`` maps, **no** ``1/sqrt(d)``);
   ``y = gamma attn v(x) + x`` (``gamma`` a learnable scalar initialised to 0); ``y + MLP(y)``, the MLP
   ``Dt -> Dt/2 -> Dt/2 -> Dt`` with ReLU after the first two; then the mean over the 16 patches: one vector per
   frame;
3. **query-class distance on the patch-enriched frames** (``DistanceLoss``, one per cardinality s): dropout 0.1
   on the frames, every ordered s-tuple concatenated, ``ReLU(W (s Dt -> Dt/2))``; per (query, class) the mean
   over the query's L tuples of the Euclidean distance (``torch.cdist``) to the nearest of the class's K L
   tuples; logits ``-d``, the mean over the cardinalities (``logits_patch``);
4. **frame-level enrichment** (``MLP_Mix_Enrich``): ``x = PE(x)`` (12 rows, dropout 0.1); a token MLP over the T
   frames (``T -> T -> T``, ReLU) plus ``x``; a channel MLP (``Dt -> Dt -> Dt``, ReLU) plus its input;
5. **TRX** on the enriched frames (the ``trx`` head's cross-transformers, :mod:`mdmf_cache.heads.trx`):
   ``logits_frame``;
6. logits = ``logits_frame + 0.1 logits_patch`` (what the release classifies by, in training and test);
   loss per episode = ``CE(logits_frame) + 0.1 CE(logits_patch)``, each **summed** over the queries
   (``utils.loss``), then the mean over the episodes (the release divides by its 16 accumulated tasks).

Everything up to step 3's distances is per video, and no query label is read: the head is inductive.

The release keeps its ``DistanceLoss`` modules in a plain Python list, so ``model.parameters()`` (its optimiser)
and ``model.eval()`` never reach them: ``W`` of step 3 stays at its random initialisation (gradients still flow
through it into step 2) and its dropout is on at test time too. Here they are registered: ``W`` trains and the
dropout follows the module's mode. ``unregistered_distance=True`` gives the release's behaviour (``W`` frozen,
still saved in the checkpoint so that a reloaded head scores as it trained; dropout always on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.device import at_least_float32
from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, episode_ce, in_chunks, with_correct
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.heads.trx import TRX, TRXOptions
from mdmf_cache.layers.attention import PositionalEncoding

__all__ = ["STRMOptions", "STRM", "PatchAttention", "FrameEnrichment", "EVAL_ELEMENTS", "SPEC"]

#: Eval-mode forward runs this many elements' worth of episodes at a time: the patch attention's
#: ``(e (S + Q) T, 16, Dt)`` activations, the TRX prototypes and the tuple distances are the largest tensors.
EVAL_ELEMENTS = 1 << 25


@dataclass
class STRMOptions:
    """STRM's options; the defaults are the released code's (``model.py``, ``run.py`` and ``scripts/run_strm_*.sh``).

    Attributes:
        dim: D (data; the pooled features', unused but for the shapes: the head reads the tokens).
        num_frames: T (data).
        token_dim: Dt, the tokens' width (data; None: a head built without token information takes D).
        token_layers: L, the cached token layers (data; must be 1: one patch map per frame).
        token_grid: (h, w) of the cached patch grid (data; at least ``patch_grid`` each way).
        token_cls: the cache's tokens start with a class token (data; a ViT's, dropped here).
        patch_grid: the side of the patch grid the map is pooled to (``AdaptiveMaxPool2d((4, 4))``, 16 patches).
        patch_pool: how: ``max`` (released) or ``avg``.
        cardinalities: tuple sizes, one TRX cross-transformer and one patch distance each (``--temp_set 2`` in
            every released script; ``run.py``'s own default is 2 3).
        tuple_dim: width of the TRX keys and values (``trans_linear_out_dim`` 1152).
        pe_scale: scale of every sinusoidal position encoding (``pe_scale_factor`` 0.1).
        patch_dropout: dropout after the patches' position encoding (0.1).
        frame_dropout: dropout after the frame enrichment's position encoding (0.1).
        pe_dropout: dropout after the TRX position encoding (``trans_dropout`` 0.1).
        distance_dropout: dropout on the frames before the patch distance's tuples (0.1).
        aux_weight: weight of the patch distance's logits in the logits and of its cross-entropy in the loss (0.1).
        ce: the cross-entropy ``sum`` over an episode's queries (released, ``utils.loss``) or its ``mean``.
        unregistered_distance: the release's bug (module docstring): the patch distance's map is never trained and
            its dropout is on in eval mode too. False (the default): registered like every other layer.
    """

    dim: int
    num_frames: int = 8
    token_dim: int | None = None
    token_layers: int | None = None
    token_grid: tuple[int, int] | None = None
    token_cls: bool | None = None
    patch_grid: int = 4
    patch_pool: Literal["max", "avg"] = "max"
    cardinalities: tuple[int, ...] = (2,)
    tuple_dim: int = 1152
    pe_scale: float = 0.1
    patch_dropout: float = 0.1
    frame_dropout: float = 0.1
    pe_dropout: float = 0.1
    distance_dropout: float = 0.1
    aux_weight: float = 0.1
    ce: Literal["sum", "mean"] = "sum"
    unregistered_distance: bool = False

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("patch_grid", "tuple_dim"))
        if self.token_layers is not None and self.token_layers != 1:
            problems.add("token_layers", self.token_layers,
                         "strm reads one patch map per frame (extract --tokens last@7x7 on a ViT, map on a ResNet)")
        g = self.patch_grid
        if self.token_grid is not None and isinstance(g, int) and min(self.token_grid) < g:
            problems.add("token_grid", f"{self.token_grid[0]}x{self.token_grid[1]}",
                         f"strm pools the patch map to {g}x{g} and needs at least that many patches each way")
        if self.width < 2:
            problems.add("token_dim" if self.token_dim is not None else "dim", self.width,
                         "must be >= 2 (the bottleneck and the patch distance are Dt/2 wide)")
        if not self.cardinalities or any(not 1 <= c <= self.num_frames for c in self.cardinalities):
            problems.add("cardinalities", self.cardinalities, f"each in 1..T={self.num_frames} (the frames per video)")
        problems.check(self, ("pe_scale", "aux_weight"), 0.0)
        problems.check(self, ("patch_dropout", "frame_dropout", "pe_dropout", "distance_dropout"), 0.0, 1.0,
                       high_open=True)
        problems.raise_any()

    @property
    def width(self) -> int:
        """Dt, the width everything after the tokens has."""
        return self.token_dim if self.token_dim is not None else self.dim


class PatchAttention(nn.Module):
    """Step 2, the released ``Self_Attn_Bot``: ``(B, P, Dt) -> (B, P, Dt)`` over the P = 16 patches of a frame."""

    def __init__(self, dim: int, patches: int, dropout: float, pe_scale: float) -> None:
        super().__init__()
        half = dim // 2
        self.pe = PositionalEncoding(dim, dropout, int(patches * 1.5), pe_scale)
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim)
        self.value_proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1))  # the attention enters the residual at zero weight at first
        self.mlp = nn.Sequential(nn.Linear(dim, half), nn.ReLU(), nn.Linear(half, half), nn.ReLU(), nn.Linear(half, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pe(x)
        attn = (self.query_proj(x) @ self.key_proj(x).transpose(1, 2)).softmax(dim=-1)  # (B, P, P), unscaled as released
        y = self.gamma.to(x.dtype) * (attn @ self.value_proj(x)) + x
        return self.mlp(y) + y


class FrameEnrichment(nn.Module):
    """Step 4, the released ``MLP_Mix_Enrich``: ``(B, T, Dt) -> (B, T, Dt)``."""

    def __init__(self, dim: int, frames: int, dropout: float, pe_scale: float) -> None:
        super().__init__()
        self.pe = PositionalEncoding(dim, dropout, int(frames * 1.5), pe_scale)
        self.token_mlp = nn.Sequential(nn.Linear(frames, frames), nn.ReLU(), nn.Linear(frames, frames))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pe(x)
        x = self.token_mlp(x.transpose(1, 2)).transpose(1, 2) + x  # mixes the T frames of each channel
        return self.channel_mlp(x) + x


def nearest_tuple_distances(qe: Tensor, se: Tensor) -> Tensor:
    """Step 3's distances, in float32 (float64 stays float64), autocast off.

    Args:
        qe: query tuple embeddings ``(E, Q, L, A)``.
        se: support tuple embeddings per class ``(E, N, K L, A)``.

    Returns:
        ``(E, Q, N)``: the mean over the query's L tuples of the Euclidean distance to the class's nearest tuple.
    """
    e, q, l, a = qe.shape
    with torch.autocast(qe.device.type, enabled=False):
        qe, se = at_least_float32(qe), at_least_float32(se)
        dist = torch.cdist(qe.reshape(e, 1, q * l, a), se)  # (E, N, Q*L, K*L)
        nearest = dist.min(dim=-1).values  # min, not amin: the release's gradient goes to one tuple
        return nearest.reshape(e, -1, q, l).mean(dim=-1).transpose(1, 2)


class STRM(FewShotHead):
    """The released STRM head on cached patch maps (see the module docstring)."""

    method = "strm"

    def __init__(self, options: STRMOptions) -> None:
        super().__init__()
        self.options = o = options
        w = o.width
        self.patch_attention = PatchAttention(w, o.patch_grid ** 2, o.patch_dropout, o.pe_scale)
        self.frame_enrichment = FrameEnrichment(w, o.num_frames, o.frame_dropout, o.pe_scale)
        self.trx = TRX(TRXOptions(dim=w, num_frames=o.num_frames, cardinalities=o.cardinalities,
                                  tuple_dim=o.tuple_dim, pe_dropout=o.pe_dropout, pe_scale=o.pe_scale))
        self.distance_maps = nn.ModuleList([nn.Linear(w * s, w // 2) for s in o.cardinalities])  # DistanceLoss.clsW
        if o.unregistered_distance:
            self.distance_maps.requires_grad_(False)

    def patch_frames(self, tokens: Tensor) -> Tensor:
        """Steps 1-2: tokens ``(B, P, Dt)`` of B frames -> one vector per frame ``(B, Dt)``."""
        o = self.options
        b, p, dt = tokens.shape
        cls, (h, w) = self._layout(p)
        grid = tokens[:, int(cls):].transpose(1, 2).reshape(b, dt, h, w)  # row-major patches -> (B, Dt, h, w)
        g = o.patch_grid
        if (h, w) != (g, g):
            grid = (F.adaptive_max_pool2d if o.patch_pool == "max" else F.adaptive_avg_pool2d)(grid, (g, g))
        return self.patch_attention(grid.flatten(2).transpose(1, 2)).mean(dim=1)  # (B, g*g, Dt) -> (B, Dt)

    def _layout(self, p: int) -> tuple[bool, tuple[int, int]]:
        """(class token first, (h, w)) of P tokens per frame: the options' (the cache's), else a square grid."""
        o = self.options
        if o.token_grid is not None:
            cls, grid = bool(o.token_cls), o.token_grid
            if p != int(cls) + grid[0] * grid[1]:
                raise ValueError(f"{p} tokens per frame, but the head was built for a {grid[0]}x{grid[1]} grid"
                                 f"{' plus a class token' if cls else ''}")
        else:
            side = math.isqrt(p)
            cls = side * side != p
            side = math.isqrt(p - 1) if cls else side
            if side * side != p - int(cls):
                raise ValueError(f"{p} tokens per frame are neither a square grid nor one plus a square grid")
            grid = (side, side)
        if min(grid) < o.patch_grid:
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid is smaller than strm's {o.patch_grid}x{o.patch_grid}")
        return cls, grid

    def patch_logits(self, frames: Tensor, s: int, n: int) -> Tensor:
        """Step 3 for patch-enriched frames ``(E, S + Q, T, Dt)`` (supports first, class-major) -> ``(E, Q, N)``."""
        e, v, t, d = frames.shape
        o = self.options
        per = []
        for tr, proj in zip(self.trx.transformers, self.distance_maps):
            x = F.dropout(frames.reshape(e * v, t, d), o.distance_dropout,
                          training=self.training or o.unregistered_distance)
            # the same linear map of concatenated tuples as TRX's keys and values (one GEMM per position)
            emb = F.relu(tr._tuple_linear(x, proj)).reshape(e, v, tr.num_tuples, -1)  # (E, S+Q, L, Dt/2)
            se = emb[:, :s].reshape(e, n, -1, emb.shape[-1])  # (E, N, K*L, Dt/2)
            per.append(-nearest_tuple_distances(emb[:, s:], se))
        return torch.stack(per, dim=-1).mean(dim=-1)

    def episodes(self, support_tokens: Tensor, query_tokens: Tensor, n: int) -> dict[str, Tensor]:
        """Steps 1-6 for ``(E, S, T, 1, P, Dt)`` class-major supports and ``(E, Q, T, 1, P, Dt)`` queries."""
        e, s, t, _, p, dt = support_tokens.shape
        q = query_tokens.shape[1]
        tokens = torch.cat([support_tokens, query_tokens], dim=1)  # per-frame work: supports and queries at once
        frames = self.patch_frames(tokens.reshape(e * (s + q) * t, p, dt)).reshape(e, s + q, t, dt)
        logits_patch = self.patch_logits(frames, s, n)
        enriched = self.frame_enrichment(frames.reshape(e * (s + q), t, dt)).reshape(e, s + q, t, dt)
        logits_frame = self.trx.episode_logits(enriched[:, :s], enriched[:, s:], n)
        return {"logits": logits_frame + self.options.aux_weight * logits_patch, "logits_frame": logits_frame,
                "logits_patch": logits_patch}

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None, class_text: Tensor | None = None,
                support_tokens: Tensor | None = None, query_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)`` and its two terms ``"logits_frame"``, ``"logits_patch"``. Reads the tokens;
        ``support``, ``query`` and ``text`` only give E, S, Q, N and T."""
        e, s, q, n, t, _ = check_episode_shapes(support, query, text)
        if support_tokens is None or query_tokens is None:
            raise ValueError("strm reads cached patch tokens: pass support_tokens and query_tokens "
                             "(a cache extracted with --tokens last@7x7 on a ViT, or map on a ResNet)")
        if support_tokens.dim() != 6 or query_tokens.dim() != 6 or support_tokens.shape[:3] != (e, s, t) \
                or query_tokens.shape[:3] != (e, q, t) or support_tokens.shape[3:] != query_tokens.shape[3:]:
            raise ValueError(f"expected support_tokens (E, S, T, L, P, Dt) = ({e}, {s}, {t}, ...) and query_tokens "
                             f"({e}, {q}, {t}, ...); got {tuple(support_tokens.shape)}, {tuple(query_tokens.shape)}")
        l, _, dt = support_tokens.shape[3:]
        if l != 1 or dt != self.options.width:
            raise ValueError(f"strm reads one token layer of width {self.options.width}; got L={l}, Dt={dt}")
        if self.training:
            return with_correct(self.episodes(support_tokens, query_tokens, n), query_labels)
        o = self.options
        tuples = max(tr.num_tuples for tr in self.trx.transformers)
        per_episode = max((s + q) * t * o.patch_grid ** 2 * dt,  # the patch attention's activations
                          q * tuples * n * o.tuple_dim,  # the TRX prototypes
                          q * tuples * s * tuples)  # the patch distance's (query tuple, support tuple) table
        out = in_chunks(lambda lo, hi: self.episodes(support_tokens[lo:hi], query_tokens[lo:hi], n), e,
                        per_episode, EVAL_ELEMENTS)
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``CE(logits_frame) + aux_weight CE(logits_patch)`` (each summed over the queries, or averaged with
        ``ce=mean``), per episode; then the mean over episodes."""
        reduction = self.options.ce
        frame = episode_ce(out["logits_frame"], labels, reduction)
        patch = episode_ce(out["logits_patch"], labels, reduction)
        total = frame + self.options.aux_weight * patch
        return total, {"main": frame.detach(), "patch": patch.detach(), "total": total.detach()}


SPEC = HeadSpec(
    name="strm",
    options=STRMOptions,
    build=STRM,
    summary="STRM (CVPR 2022) as released: patch attention on 4x4 patches, frame MLP-mixing, TRX, patch distance loss",
    source="Thatipelli et al., Spatio-temporal Relation Modeling for Few-shot Action Recognition, CVPR 2022; "
           "released code Anirudh257/strm model.py (CNN_STRM), run.py and utils.loss (the loss), scripts/run_strm_*.sh "
           "(temp_set 2, 5-shot, 4 queries per class; 5 on Kinetics)",
    per_video=False,
    train_shot=lambda k: k,
    train_queries=lambda k: 4,  # hmdb, ucf and ssv2 scripts; the Kinetics one trains with 5
    tokens="last@7x7",
)
