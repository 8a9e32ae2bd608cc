"""MoLo (Wang et al., CVPR 2023), motion-augmented long-short contrastive learning, as its authors released it, on
cached spatial maps of a frozen CLIP.

What the released ``CNN_BiMHM_MoLo`` computes (alibaba-mmai-research/CLIP-FSAR, ``models/base/few_shot.py``; loss
in the ``USE_CONTRASTIVE`` + ``USE_MOTION`` + ``USE_RECONS`` branch of ``runs/train_net_few_shot.py``; docs/heads.md
has the details), here on each frame's cached ``h x w`` map of width Dt (a ResNet's ``map``, or a ViT's patch
tokens with the class token dropped):

1. appearance: the map averaged over ``h x w`` -> ``(T, Dt)``; motion: ``motion_reduce`` (Conv3d Dt -> Dt/8, 3x3x3,
   over time and space) -> ``m``; ``motion_conv`` (Conv2d 3x3, per frame) -> ``m'``; the feature difference
   ``m'[t+1] - m[t]`` (T-1 frames); ``ReLU(motion_up(.))`` (1x1 conv back to Dt) averaged over ``h x w`` ->
   ``(T-1, Dt)``;
2. each branch: a learnable class token first, HyRSM's position encoder (``x sqrt(Dt / A) + B table``, dropout
   0.1, one module for both branches), a ``Transformer_v2`` (pre-norm attention, 8 heads of Dt/8, out
   projection with dropout 0.2; then a feed-forward Dt -> 2048 -> Dt, GELU, dropout 0.05; each with a
   residual), ReLU: ``(T+1, Dt)`` appearance and ``(T, Dt)`` motion sequences, position 0 the global token;
3. class logits ``Linear(Dt, C)`` of (appearance mean over its T+1 positions + motion mean over its T), for every
   support and query (training only: the loss is their only use);
4. prototypes: both sequences averaged over a class's K shots;
5. Bi-MHM on the frames (global token left out): ``1 - cos`` with 0.01 added to the product of norms, the sum over
   query frames of the min over prototype frames plus the reverse; logits = ``-(d_app + 0.3 d_motion)``;
6. long-short contrast (training): ``s2q[q, c] = scale x sum_t (1 - cos(prototype c frame t, query q's global
   token))``, ``q2s[q, c] = scale x sum_t (1 - cos(query q frame t, prototype c's global token))``, the same for
   motion with ``scale_motion`` (two learnable scalars, 1 at start).

Loss, per episode: ``CE(logits) + class_loss_weight x CE(class logits, split classes of the S + Q videos) +
contrastive_weight x (CE(-s2q) + CE(-q2s) + CE(-s2q_motion) + CE(-q2s_motion))``, every CE a mean; then the mean
over episodes. The released loss adds ``RECONS_COFF x`` a pixel-reconstruction loss: a decoder from the motion
differences to the raw frames' pixel differences. A feature cache holds no frame differences, so that term is
off and ``reconstruction=true`` is refused (docs/heads.md).

Every video's work (steps 1-3) is the video's own; from step 4 on only class means and distances. ``SPEC.per_video``
is False all the same: evaluation runs ``forward`` on whole episodes, in chunks in eval mode
(:data:`EVAL_ELEMENTS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.device import at_least_float32
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, in_chunks,
                                   query_classes, support_classes, with_correct)
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.layers.attention import PositionalEncoder, PreNormAttention
from mdmf_cache.layers.otam import cosine_distance, frame_distances

__all__ = ["MoLoOptions", "MoLo", "RELEASED", "FOLDER_VALUES", "TOKENS", "EVAL_ELEMENTS", "SPEC"]

#: The released configs' per-dataset values (``configs/projects/MoLo/<dataset>/MoLo_*_{1,5}shot_v1.yaml``):
#: ``USE_CLASSIFICATION_VALUE`` and ``POSITION_A`` / ``POSITION_B`` (the code's 10 / 1 where a config does not set
#: them). The 1-shot and 5-shot configs of a dataset agree on every head value.
RELEASED: dict[str, dict[str, float]] = {
    "hmdb51": {"class_loss_weight": 0.4, "position_a": 10.0, "position_b": 1.0},
    "ucf101": {"class_loss_weight": 0.6, "position_a": 10.0, "position_b": 1.0},
    "kinetics100": {"class_loss_weight": 0.1, "position_a": 2048.0, "position_b": 0.02},
    "ssv2-full": {"class_loss_weight": 0.8, "position_a": 10.0, "position_b": 1.0},
    "ssv2-small": {"class_loss_weight": 0.15, "position_a": 10.0, "position_b": 1.0},
}
#: A folder dataset (or any other) takes UCF101's values, as HyRSM's does (a scene-biased action set).
FOLDER_VALUES = "ucf101"

#: The ``extract --tokens`` SPEC the head reads on a ViT-B/16 cache: the last block's patch tokens pooled to the
#: released 7 x 7 map (its class token, kept first by the cache, is dropped). A ResNet cache gives ``map``.
TOKENS = "last@7x7"

#: Eval-mode forward runs this many elements' worth of episodes at a time (the direct evaluation path hands the
#: head 500 episodes at once; one video's motion maps alone are ``(T-1) h w Dt`` floats).
EVAL_ELEMENTS = 1 << 26


@dataclass
class MoLoOptions:
    """MoLo's options; the defaults are the released code's and configs'.

    Attributes:
        dim: D, the pooled features' width (data; MoLo reads the maps, not the pooled features).
        num_frames: T (data).
        num_classes: C, the train split's classes: the classification layer's outputs (data).
        token_dim, token_layers, token_grid, token_cls: the cached tokens' width Dt, layer count, ``(h, w)`` grid
            and whether a class token comes first (data, from the cache; None until a cache with tokens is read).
        heads: attention heads of both temporal transformers (``TRAIN.HEAD``, 8 when unset as in every config).
        ffn_dim: their feed-forward width (``Transformer_v2``'s ``mlp_dim`` 2048, whatever the width).
        motion_factor: the motion branch's channel reduction (``self.factor`` 8: Dt -> Dt / 8).
        position_a / position_b: the position encoder's ``A`` and ``B``; None: the released config's for the dataset.
        pe_dropout: dropout after the position encoder (0.1).
        attn_dropout: dropout after the attention's out projection (``dropout_atte`` 0.2).
        ffn_dropout: dropout inside the feed-forward blocks (``dropout_ffn`` 0.05).
        cos_eps: added to the product of norms in every cosine (0.01, ``cos_sim``).
        motion_weight: weight of the motion distance in the logits (``LOGIT_BALANCE_COFF``, unset: 0.3).
        bidirectional: Bi-MHM both ways; False = ``SINGLE_DIRECT`` (query frames to prototype frames only).
        class_loss_weight: weight of the video classification loss (``USE_CLASSIFICATION_VALUE``); None: per dataset.
        contrastive_weight: weight of each of the four long-short terms (``USE_CONTRASTIVE_COFF`` 0.05, every config).
        learn_scale: the long-short distances' two scales (appearance, motion) are learnable, as every config
            (``TEMP_COFF`` unset); False: both fixed to ``contrastive_scale`` (``TEMP_COFF``).
        contrastive_scale: the scales' start value when learned (the released 1), their value when fixed.
        reconstruction: the released pixel-reconstruction decoder and loss (``USE_RECONS``); refused: a feature
            cache holds no frame differences.
    """

    RELEASED: ClassVar[dict[str, dict[str, float]]] = RELEASED

    dim: int
    num_frames: int = 8
    num_classes: int = 64
    token_dim: int | None = None
    token_layers: int | None = None
    token_grid: tuple[int, int] | None = None
    token_cls: bool | None = None
    heads: int = 8
    ffn_dim: int = 2048
    motion_factor: int = 8
    position_a: float | None = None
    position_b: float | None = None
    pe_dropout: float = 0.1
    attn_dropout: float = 0.2
    ffn_dropout: float = 0.05
    cos_eps: float = 0.01
    motion_weight: float = 0.3
    bidirectional: bool = True
    class_loss_weight: float | None = None
    contrastive_weight: float = 0.05
    learn_scale: bool = True
    contrastive_scale: float = 1.0
    reconstruction: bool = False

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self, min_frames=2)  # the motion branch differences consecutive frames
        problems.sizes(self, ("heads", "ffn_dim", "motion_factor"))
        if self.token_layers is not None and self.token_layers != 1:
            problems.add("token_layers", self.token_layers,
                         f"molo reads one token layer (a cache extracted with --tokens {TOKENS}, or map on a ResNet)")
        dt = self.token_dim
        if dt is not None:
            for name in ("heads", "motion_factor"):
                value = getattr(self, name)
                if isinstance(value, int) and value >= 1 and dt % value:
                    problems.add(name, value, f"must divide the cached tokens' width Dt={dt}")
            if dt % 2:
                problems.add("token_dim", dt, "must be even (the sinusoidal position encoding)")
        if self.reconstruction:
            problems.add("reconstruction", True, "the cache holds no frame differences (MoLo's decoder reconstructs "
                                                 "raw pixel differences); leave it off")
        problems.check(self, ("pe_dropout", "attn_dropout", "ffn_dropout"), 0.0, 1.0, high_open=True)
        problems.check(self, "position_a", 0.0, low_open=True)
        problems.check(self, ("position_b", "cos_eps", "motion_weight", "class_loss_weight", "contrastive_weight"), 0.0)
        problems.check(self, "contrastive_scale", 0.0, low_open=True)
        problems.raise_any()

    def resolve(self, data: DataInfo) -> "MoLoOptions":
        """Fill the released per-dataset values that are still unset (the configs do not differ per shot)."""
        values = self.RELEASED.get(data.dataset, self.RELEASED[FOLDER_VALUES])
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self


class TransformerV2(nn.Module):
    """The released ``Transformer_v2`` at depth 1: ``x = PreNorm-Attention(x)`` (HyRSM's), then ``x = FFN(x) + x``
    with ``FFN = Linear(Dt, F), GELU, Dropout, Linear(F, Dt), Dropout``."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, attn_dropout: float, ffn_dropout: float) -> None:
        super().__init__()
        self.attn = PreNormAttention(dim, heads, attn_dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(ffn_dropout),
                                 nn.Linear(ffn_dim, dim), nn.Dropout(ffn_dropout))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, Dt) -> (B, L, Dt)``."""
        x = self.attn(x)
        return self.ffn(x) + x


class MoLo(FewShotHead):
    """The released MoLo head without its reconstruction decoder (see the module docstring)."""

    method = "molo"

    def __init__(self, options: MoLoOptions) -> None:
        super().__init__()
        o = self.options = options
        if o.position_a is None or o.position_b is None or o.class_loss_weight is None:
            raise ValueError("MoLo options must be resolved (HeadSpec.make_options) before building the head")
        if o.token_dim is None or o.token_grid is None or o.token_cls is None:
            raise ConfigError(f"molo reads cached spatial tokens: extract the cache with --tokens {TOKENS} "
                              "(ViT) or --tokens map (ResNet)")
        dt, r = o.token_dim, o.token_dim // o.motion_factor
        self.pe = PositionalEncoder(dt, o.num_frames + 1, o.pe_dropout, o.position_a, o.position_b)  # T+1: the token
        self.class_token = nn.Parameter(torch.randn(1, 1, dt))
        self.class_token_motion = nn.Parameter(torch.randn(1, 1, dt))
        block = lambda: TransformerV2(dt, o.heads, o.ffn_dim, o.attn_dropout, o.ffn_dropout)  # noqa: E731
        self.temporal_atte_before, self.temporal_atte_before_motion = block(), block()
        self.motion_reduce = nn.Conv3d(dt, r, kernel_size=3, padding=1)
        self.motion_conv = nn.Conv2d(r, r, kernel_size=3, padding=1)
        self.motion_up = nn.Conv2d(r, dt, kernel_size=1)
        self.classification_layer = nn.Linear(dt, o.num_classes)
        if o.learn_scale:  # as every released config (TEMP_COFF unset)
            self.scale = nn.Parameter(torch.full((1,), o.contrastive_scale))
            self.scale_motion = nn.Parameter(torch.full((1,), o.contrastive_scale))
        else:
            self.scale = self.scale_motion = o.contrastive_scale

    def maps(self, tokens: Tensor) -> Tensor:
        """``(B, T, 1, P, Dt)`` cached tokens -> ``(B, T, h*w, Dt)`` maps (a class token dropped)."""
        return tokens[:, :, 0, int(self.options.token_cls):]

    def motion(self, maps: Tensor) -> Tensor:
        """Step 1's motion frames: ``(B, T, h*w, Dt) -> (B, T-1, Dt)``."""
        b, t, hw, dt = maps.shape
        h, w = self.options.token_grid
        x = maps.reshape(b, t, h, w, dt).permute(0, 4, 1, 2, 3)  # (B, Dt, T, h, w)
        m = self.motion_reduce(x).transpose(1, 2)  # (B, T, r, h, w)
        r = m.shape[2]
        mc = self.motion_conv(m.reshape(b * t, r, h, w)).reshape(b, t, r, h, w)
        diff = (mc[:, 1:] - m[:, :-1]).permute(0, 1, 3, 4, 2)  # (B, T-1, h, w, r): conv'd next minus this frame
        up = F.relu(F.linear(diff, self.motion_up.weight.reshape(dt, r), self.motion_up.bias))  # the 1x1 conv
        return up.mean(dim=(2, 3))  # (B, T-1, Dt)

    def sequence(self, frames: Tensor, token: Tensor, transformer: nn.Module) -> Tensor:
        """Step 2: ``[token; frames]`` through the position encoder and ``transformer``, then ReLU:
        ``(B, L, Dt) -> (B, L+1, Dt)``."""
        x = torch.cat([token.to(frames.dtype).expand(frames.shape[0], -1, -1), frames], dim=1)
        return F.relu(transformer(self.pe(x)))

    def episodes(self, support_tokens: Tensor, query_tokens: Tensor, n: int) -> dict[str, Tensor]:
        """Steps 1-6 on ``(E, S, T, 1, P, Dt)`` class-major supports and ``(E, Q, T, 1, P, Dt)`` queries."""
        e, s, t = support_tokens.shape[:3]
        q, dt = query_tokens.shape[1], support_tokens.shape[-1]
        maps = self.maps(torch.cat([support_tokens, query_tokens], dim=1).reshape(e * (s + q), *support_tokens.shape[2:]))
        app = self.sequence(maps.mean(dim=2), self.class_token, self.temporal_atte_before)  # (E(S+Q), T+1, Dt)
        mot = self.sequence(self.motion(maps), self.class_token_motion, self.temporal_atte_before_motion)  # (.., T, Dt)
        app, mot = app.reshape(e, s + q, t + 1, dt), mot.reshape(e, s + q, t, dt)
        out: dict[str, Tensor] = {}
        if self.training:  # its only use is the loss
            out["class_logits"] = self.classification_layer(app.mean(dim=2) + mot.mean(dim=2))  # (E, S+Q, C)
        o = self.options
        with torch.autocast(maps.device.type, enabled=False):
            app, mot = at_least_float32(app), at_least_float32(mot)
            pa, qa = class_means(app[:, :s], n), app[:, s:]  # (E, N, T+1, Dt), (E, Q, T+1, Dt)
            pm, qm = class_means(mot[:, :s], n), mot[:, s:]  # (E, N, T, Dt), (E, Q, T, Dt)
            d_app, d_mot = self.bi_mhm(qa[:, :, 1:], pa[:, :, 1:]), self.bi_mhm(qm[:, :, 1:], pm[:, :, 1:])
            dist = d_app + o.motion_weight * d_mot
            out.update(logits=-dist, d_app=d_app, d_motion=d_mot)
            if self.training:
                out.update(logits_s2q=-self.scale * self.long_short(pa, qa[:, :, 0]).transpose(1, 2),
                           logits_q2s=-self.scale * self.long_short(qa, pa[:, :, 0]),
                           logits_s2q_motion=-self.scale_motion * self.long_short(pm, qm[:, :, 0]).transpose(1, 2),
                           logits_q2s_motion=-self.scale_motion * self.long_short(qm, pm[:, :, 0]))
        return out

    def bi_mhm(self, query: Tensor, proto: Tensor) -> Tensor:
        """Step 5: ``(E, Q, L, Dt), (E, N, L, Dt) -> (E, Q, N)``."""
        dist = frame_distances(query, proto, self.options.cos_eps)  # (E, Q, N, L query frames, L prototype frames)
        out = dist.min(dim=-1).values.sum(dim=-1)
        return out + dist.min(dim=-2).values.sum(dim=-1) if self.options.bidirectional else out

    def long_short(self, frames: Tensor, globals_: Tensor) -> Tensor:
        """Step 6, unscaled: ``sum_t (1 - cos(frames[a, t], globals_[b]))`` for ``frames (E, A, 1+L, Dt)`` (the
        global token at 0 left out) and ``globals_ (E, B, Dt)`` -> ``(E, A, B)``."""
        e, a, length, dt = frames.shape
        dist = cosine_distance(frames[:, :, 1:].reshape(e, a * (length - 1), dt), globals_, self.options.cos_eps)
        return dist.reshape(e, a, length - 1, -1).sum(dim=2)

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None, class_text: Tensor | None = None,
                support_tokens: Tensor | None = None, query_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``, ``"d_app"``, ``"d_motion"``; in training also ``"class_logits"`` ``(E, S+Q, C)``
        and the four long-short logits ``(E, Q, N)``. Reads the tokens; ``support``/``query`` only for their shapes,
        ``text``, ``classes``, ``class_text`` not at all (MoLo sees no text)."""
        e, s, q, n, t, _ = check_episode_shapes(support, query, text)
        self.check_tokens(support_tokens, (e, s, t), "support_tokens")
        self.check_tokens(query_tokens, (e, q, t), "query_tokens")
        if self.training:
            return with_correct(self.episodes(support_tokens, query_tokens, n), query_labels)
        o = self.options
        hw, dt = o.token_grid[0] * o.token_grid[1], o.token_dim
        per_episode = (s + q) * t * (hw * dt * 3 + 2 * o.ffn_dim)  # the maps, their motion copies; the FFN
        out = in_chunks(lambda lo, hi: self.episodes(support_tokens[lo:hi], query_tokens[lo:hi], n), e, per_episode,
                        EVAL_ELEMENTS)
        return with_correct(out, query_labels)

    def check_tokens(self, tokens: Tensor | None, lead: tuple[int, int, int], name: str) -> None:
        """A ValueError naming ``name`` unless ``tokens`` is ``(*lead, 1, P, Dt)`` as the options say."""
        o = self.options
        want = (*lead, 1, int(o.token_cls) + o.token_grid[0] * o.token_grid[1], o.token_dim)
        if tokens is None:
            raise ValueError(f"molo reads cached tokens: pass {name} {want} (a cache extracted with --tokens {TOKENS})")
        if tuple(tokens.shape) != want:
            raise ValueError(f"{name} shape {tuple(tokens.shape)} != (E, V, T, L, P, Dt) = {want}")

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per episode: query CE + ``class_loss_weight`` x the video classification CE (mean over the S + Q videos,
        each labelled with its split class) + ``contrastive_weight`` x the four long-short CEs; then the mean over
        episodes (the released loop divides every term but the reconstruction by its ``BATCH_SIZE`` episodes)."""
        o = self.options
        main = episode_ce(out["logits"], labels)
        total, parts = main, {"main": main.detach()}
        if "class_logits" in out and classes is not None:
            logits = out["class_logits"]  # (E, S+Q, C)
            e, sq, c = logits.shape
            ids = torch.cat([support_classes(classes, sq - labels.shape[1]), query_classes(classes, labels)], dim=1)
            videos = episode_ce(logits, ids)
            total = total + o.class_loss_weight * videos
            parts["videos"] = videos.detach()
        if "logits_s2q" in out:
            contrast = sum(episode_ce(out[k], labels) for k in
                           ("logits_s2q", "logits_q2s", "logits_s2q_motion", "logits_q2s_motion"))
            total = total + o.contrastive_weight * contrast
            parts["contrast"] = contrast.detach()
        parts["total"] = total.detach()
        return total, parts


SPEC = HeadSpec(
    name="molo",
    options=MoLoOptions,
    build=MoLo,
    summary="MoLo (CVPR 2023) as released on cached maps: motion differences, Bi-MHM, long-short contrast; "
            "no pixel reconstruction",
    source="Wang et al., MoLo: Motion-augmented Long-short Contrastive Learning for Few-shot Action Recognition, "
           "CVPR 2023; released code alibaba-mmai-research/CLIP-FSAR models/base/few_shot.py (CNN_BiMHM_MoLo), "
           "runs/train_net_few_shot.py, configs/projects/MoLo",
    per_video=False,
    space={"class-loss-weight": "0:1", "contrastive-weight": "0:0.2", "motion-weight": "0:1"},
    train_shot=lambda k: 1,  # every released config trains on 1-shot episodes (5-shot: SHOT_TEST 5)
    train_queries=lambda k: 6,  # QUERY_PER_CLASS 6 in every config
    tokens=TOKENS,
)
