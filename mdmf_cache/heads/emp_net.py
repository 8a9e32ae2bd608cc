"""EMP-Net (Wu et al., ECCV 2024) as its authors released it, on cached CLIP ViT tokens.

What the released ``EMP_Net`` head (cong-wu/EMP-Net, ``models/base/few_shot.py``; docs/heads.md has the details)
computes on the tokens of CLIP ViT-B/16's blocks 4, 8 and 12, each after ``ln_post`` and the projection, all
1 + h*w tokens of every frame (``extract --tokens 4,8,12``). Every transformer is one layer of 4 heads of D / 8, a
feed-forward block D -> D / 4 -> D (GELU), attention dropout 0.2, feed-forward dropout 0.05, no positions:

1. **skip fusion**: ``f = ST3(ST2(ST1(x4) + x8) + x12)``; a spatio-temporal block (``Transformer_v3``) attends
   over each frame's patches and, separately, over the T class tokens of the video, then one feed-forward
   block acts on every token;
2. three levels: the class tokens (T per video), the patches (h*w per frame) and the frames (the patch mean);
3. **interactive reasoning**: the tokens attend over time; each frame's patches attend over {its token,
   its patches}; the frames (their mean plus the new patches' mean) attend over time;
4. **text-visual matching**, every support and query against the episode's N class texts (``1 - cos`` with
   0.01 added to the product of norms): patches averaged over time, the 49 best patches per class averaged;
   frames, the 2 best frames averaged; tokens averaged over time; a softmax over the N classes each;
5. **text fusion** of the supports (``merge_before``, the 5-shot configs: first averaged over the K shots):
   at each level, ``class text + x`` attends over ``{x, class text}``; for the patches along time, per patch
   position. Queries: the same transformers as self-attention. Then the class means;
6. **support-query matching**: OTAM (lambda 0.5, both directions) of the tokens, the frames and the
   patches' spatial mean; a softmax over the classes of minus each distance;
7. logits = the mean of the six probabilities (the query rows of step 4, and step 6); loss = the
   cross-entropy of each of the three step-6 probabilities (as logits, over the queries) plus that of each of
   the three step-4 probabilities (over the supports and the queries).

The release hard-codes a 5-way episode and reads its class texts off the first five (shuffled) supports; here
each episode class takes its own text, whatever N and K (docs/heads.md: the release's 5-shot text bug).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mdmf_cache.device import at_least_float32
from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, class_means, episode_ce, in_chunks, with_correct
from mdmf_cache.heads.spec import DataInfo, HeadSpec, Problems
from mdmf_cache.layers.attention import PreNormAttention
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.layers.otam import cosine_similarity, frame_distances, otam_distance

__all__ = ["EMPNetOptions", "EMPNet", "SPEC", "LAYERS", "EVAL_ELEMENTS"]

#: The token layers the head fuses, shallowest first: ViT-B/16 blocks 4, 8, 12 (``extract --tokens``).
LAYERS = "4,8,12"
#: Eval-mode forward runs this many elements' worth of episodes at a time (one 5-way 1-shot test episode at the
#: released sizes, 10 videos x 8 frames x 197 tokens x 512, holds ~8 M floats per activation).
EVAL_ELEMENTS = 1 << 27


@dataclass
class EMPNetOptions:
    """EMP-Net's options; the defaults are the released code's.

    Attributes:
        dim: D, the text width (data).
        num_frames: T (data).
        token_dim: Dt, the cached tokens' width (data; must be D: the tokens are after CLIP's projection).
        token_layers: L, the cached token layers (data; must be 3).
        token_grid: (h, w) of the cached patch grid (data).
        token_cls: the cached tokens start with the class token (data; must be true).
        heads: attention heads of every transformer (4).
        head_divisor: each head is D // head_divisor wide (``dim_head_k = mid_dim // 8``).
        ffn_divisor: the feed-forward blocks are D // ffn_divisor wide (``mlp_dim = mid_dim // 4``).
        attn_dropout: dropout after every attention's out projection (``dropout_atte`` 0.2).
        ffn_dropout: dropout inside every feed-forward block (0.05).
        cos_eps: added to the product of norms in every cosine (0.01).
        otam_lambda: OTAM soft-min temperature (0.5).
        patch_topk: patches per video whose text similarity is averaged (49 of 14 x 14).
        frame_topk: frames per video whose text similarity is averaged (2).
        merge_before: average the K shots of a class before the text fusion (``MERGE_BEFORE``); None: the
            released configs' choice, True for a run for K > 1 shots (every 5-shot config sets it).
    """

    dim: int
    num_frames: int = 8
    token_dim: int | None = None
    token_layers: int | None = None
    token_grid: tuple[int, int] | None = None
    token_cls: bool | None = None
    heads: int = 4
    head_divisor: int = 8
    ffn_divisor: int = 4
    attn_dropout: float = 0.2
    ffn_dropout: float = 0.05
    cos_eps: float = 0.01
    otam_lambda: float = 0.5
    patch_topk: int = 49
    frame_topk: int = 2
    merge_before: bool | None = None

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.sizes(self, ("heads", "head_divisor", "ffn_divisor", "patch_topk", "frame_topk"))
        for name in ("head_divisor", "ffn_divisor"):
            value = getattr(self, name)
            if isinstance(value, int) and value > self.dim:
                problems.add(name, value, f"must be <= the features' width D={self.dim} (a width of D // {name})")
        problems.check(self, ("attn_dropout", "ffn_dropout"), 0.0, 1.0, high_open=True)
        problems.check(self, "otam_lambda", 0.0, low_open=True)
        problems.check(self, "cos_eps", 0.0)
        if isinstance(self.frame_topk, int) and self.frame_topk > self.num_frames:
            problems.add("frame_topk", self.frame_topk, f"must be <= the frames per video T={self.num_frames}")
        # the token fields are unknown (None) until a cache with token arrays is read; then they must fit
        if self.token_layers is not None and self.token_layers != 3:
            problems.add("token_layers", self.token_layers, f"EMP-Net fuses exactly 3 ViT layers: extract with "
                                                            f"--tokens {LAYERS}")
        if self.token_cls is not None and not self.token_cls:
            problems.add("token_cls", self.token_cls, f"EMP-Net needs each frame's class token first (ViT tokens, "
                                                      f"--tokens {LAYERS}), not a ResNet map")
        if self.token_dim is not None and self.token_dim != self.dim:
            problems.add("token_dim", self.token_dim, f"must equal the text width D={self.dim} (ViT tokens after "
                                                      f"CLIP's projection)")
        if self.token_grid is not None and isinstance(self.patch_topk, int):
            patches = int(self.token_grid[0]) * int(self.token_grid[1])
            if self.patch_topk > patches:
                problems.add("patch_topk", self.patch_topk, f"must be <= the cached patches per frame, "
                                                            f"{self.token_grid[0]}x{self.token_grid[1]}={patches}")
        problems.raise_any()

    @property
    def head_dim(self) -> int:
        return self.dim // self.head_divisor

    @property
    def ffn_dim(self) -> int:
        return self.dim // self.ffn_divisor

    def resolve(self, data: DataInfo) -> "EMPNetOptions":
        """Fill the released per-shot value where still unset."""
        if self.merge_before is None:
            self.merge_before = data.shot > 1
        return self


class SpatioTemporalBlock(nn.Module):
    """The released ``Transformer_v3``: pre-norm self-attention over each frame's patches and, with other
    weights, over the video's T class tokens; then one feed-forward block (with its residual, no norm before it)
    on every token."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, attn_dropout: float,
                 ffn_dropout: float) -> None:
        super().__init__()
        self.spatial = PreNormAttention(dim, heads, attn_dropout, head_dim)
        self.temporal = PreNormAttention(dim, heads, attn_dropout, head_dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(ffn_dropout), nn.Linear(ffn_dim, dim),
                                 nn.Dropout(ffn_dropout))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, P, D) -> (B, T, P, D)``, class token first."""
        b, t, p, d = x.shape
        patches = self.spatial(x[:, :, 1:].reshape(b * t, p - 1, d)).reshape(b, t, p - 1, d)
        cls = self.temporal(x[:, :, 0])  # (B, T, D)
        x = torch.cat([cls.unsqueeze(2), patches], dim=2)
        return x + self.ffn(x)


def attend(layer: MMFE, queries: Tensor, keys: Tensor, extra: Tensor | None = None) -> Tensor:
    """The released ``Transformer_v1(q, k, v)`` (one layer) with ``q = queries (B, L, D)`` and ``k = v = keys``,
    plus ``extra (B, D)`` as one more key/value where given: ``(B, L, D)``. Only the query positions' outputs
    are computed (the extra one answers, it does not ask)."""
    token = None if extra is None else layer.token_parts(extra)
    return layer.attend(layer.frame_parts(queries, keys), token, token_output=False)


class EMPNet(FewShotHead):
    """The released EMP-Net head on cached tokens (see the module docstring)."""

    method = "emp-net"

    def __init__(self, options: EMPNetOptions) -> None:
        super().__init__()
        o = self.options = options
        d = o.dim
        hd, ffn = o.head_dim, o.ffn_dim
        self.reason = nn.ModuleList([SpatioTemporalBlock(d, o.heads, hd, ffn, o.attn_dropout, o.ffn_dropout)
                                     for _ in range(3)])  # spatialtemporal_reasion_1..3

        def transformer() -> MMFE:  # Transformer_v1: one pre-norm cross-attention layer and its FFN
            return MMFE(d, heads=o.heads, ffn_dim=ffn, attn_dropout=o.attn_dropout, ffn_dropout=o.ffn_dropout,
                        num_positions=None, head_dim=hd)

        self.inter_token, self.inter_patch, self.inter_frame = transformer(), transformer(), transformer()
        self.fusion_token, self.fusion_frame, self.fusion_patch = transformer(), transformer(), transformer()

    # -- the steps of the module docstring, on V videos of E episodes

    def levels(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-3: ``(B, T, 3, P, D)`` cached tokens -> tokens ``(B, T, D)``, patches ``(B, T, M, D)``, frames
        ``(B, T, D)``, M = P - 1."""
        f = self.reason[0](tokens[:, :, 0])
        f = self.reason[1](f + tokens[:, :, 1])
        f = self.reason[2](f + tokens[:, :, 2])  # (B, T, P, D)
        b, t, p, d = f.shape
        patch, frame = f[:, :, 1:], f[:, :, 1:].mean(dim=2)  # (B, T, M, D), (B, T, D)
        token = attend(self.inter_token, f[:, :, 0], f[:, :, 0])  # (B, T, D), over time
        patch = attend(self.inter_patch, patch.reshape(b * t, p - 1, d), patch.reshape(b * t, p - 1, d),
                       token.reshape(b * t, d)).reshape(b, t, p - 1, d)  # over {the frame's token, its patches}
        frame = frame + patch.mean(dim=2)
        return token, patch, attend(self.inter_frame, frame, frame)

    def text_match(self, token: Tensor, patch: Tensor, frame: Tensor, text: Tensor) -> Tensor:
        """Step 4: ``(E, V, T, D)``, ``(E, V, T, M, D)``, ``(E, V, T, D)`` and ``text (E, N, D)`` -> class
        probabilities ``(E, 3, V, N)`` (patches, frames, tokens), in float32 (or float64) under autocast."""
        o = self.options
        with torch.autocast(token.device.type, enabled=False):
            token, patch, frame, text = map(at_least_float32, (token, patch, frame, text))
            e, v, t, m, d = patch.shape
            n = text.shape[1]
            cos = lambda x: cosine_similarity(x.reshape(e, -1, d), text, o.cos_eps)  # (E, ..., N)
            by_patch = cos(patch).reshape(e, v, t, m, n).mean(dim=2)  # (E, V, M, N), mean over time
            by_patch = by_patch.topk(o.patch_topk, dim=2).values.mean(dim=2)  # (E, V, N)
            by_frame = cos(frame).reshape(e, v, t, n).topk(o.frame_topk, dim=2).values.mean(dim=2)
            by_token = cos(token).reshape(e, v, t, n).mean(dim=2)
            return torch.stack([by_patch, by_frame, by_token], dim=1).softmax(dim=-1)

    def fuse_supports(self, token: Tensor, patch: Tensor, frame: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step 5 for G videos (or prototypes) with their class text ``ctx (G, D)``: ``ctx + x`` attends over
        ``{x, ctx}``; patches ``(G, T, M, D)`` along time, per patch position."""
        g, t, m, d = patch.shape
        token = attend(self.fusion_token, token + ctx[:, None], token, ctx)
        frame = attend(self.fusion_frame, frame + ctx[:, None], frame, ctx)
        seq = patch.permute(0, 2, 1, 3).reshape(g * m, t, d)  # (G M, T, D): each patch position over time
        ctx_m = ctx.repeat_interleave(m, dim=0)  # (G M, D)
        seq = attend(self.fusion_patch, seq + ctx_m[:, None], seq, ctx_m)
        return token, seq.reshape(g, m, t, d).permute(0, 2, 1, 3), frame

    def fuse_queries(self, token: Tensor, patch: Tensor, frame: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step 5 for queries: the same transformers as self-attention."""
        g, t, m, d = patch.shape
        seq = patch.permute(0, 2, 1, 3).reshape(g * m, t, d)
        seq = attend(self.fusion_patch, seq, seq).reshape(g, m, t, d).permute(0, 2, 1, 3)
        return attend(self.fusion_token, token, token), seq, attend(self.fusion_frame, frame, frame)

    def distance(self, query: Tensor, protos: Tensor) -> Tensor:
        """OTAM ``(E, Q, T, D), (E, N, T, D) -> (E, Q, N)``, in float32 (or float64) under autocast."""
        o = self.options
        with torch.autocast(query.device.type, enabled=False):
            dist = frame_distances(at_least_float32(query), at_least_float32(protos), o.cos_eps)  # (E, Q, N, T, T)
            return otam_distance(dist, o.otam_lambda, True)

    def episodes(self, support_tokens: Tensor, query_tokens: Tensor, text: Tensor) -> dict[str, Tensor]:
        """The whole head on E episodes: ``"logits"`` ``(E, Q, N)``, ``"matching"`` ``(E, 3, Q, N)`` (step 6) and
        ``"text_matching"`` ``(E, 3, S+Q, N)`` (step 4), levels in the order patches, frames, tokens."""
        e, s, t, _, p, d = support_tokens.shape
        q, n = query_tokens.shape[1], text.shape[1]
        v, m = s + q, p - 1
        tokens = torch.cat([support_tokens, query_tokens], dim=1).to(text.dtype)  # (E, V, T, 3, P, D)
        token, patch, frame = self.levels(tokens.reshape(e * v, t, 3, p, d))  # every video alike: one pass
        token, frame = token.reshape(e, v, t, d), frame.reshape(e, v, t, d)
        patch = patch.reshape(e, v, t, m, d)
        text_matching = self.text_match(token, patch, frame, text)  # (E, 3, V, N)

        sup = [x[:, :s] for x in (token, patch, frame)]  # (E, S, ...) class-major
        merge = bool(self.options.merge_before)
        if merge:
            sup = [class_means(x, n) for x in sup]  # (E, N, ...): one prototype per class, then its text
        g = sup[0].shape[1]
        ctx = text if merge else text.repeat_interleave(s // n, dim=1)  # (E, G, D): each member's class text
        fused = self.fuse_supports(*(x.reshape(e * g, *x.shape[2:]) for x in sup), ctx.reshape(e * g, d))
        sup = [x.reshape(e, g, *x.shape[1:]) for x in fused]
        if not merge:
            sup = [class_means(x, n) for x in sup]
        qry = self.fuse_queries(*(x[:, s:].reshape(e * q, *x.shape[2:]) for x in (token, patch, frame)))
        qry = [x.reshape(e, q, *x.shape[1:]) for x in qry]

        # patches enter OTAM as their spatial mean
        pairs = [(qry[1].mean(dim=3), sup[1].mean(dim=3)), (qry[2], sup[2]), (qry[0], sup[0])]
        matching = torch.stack([(-self.distance(a, b)).softmax(dim=-1) for a, b in pairs], dim=1)  # (E, 3, Q, N)
        logits = (matching.sum(dim=1) + text_matching[:, :, s:].sum(dim=1)) / 6.0
        return {"logits": logits, "matching": matching, "text_matching": text_matching}

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None, class_text: Tensor | None = None,
                support_tokens: Tensor | None = None, query_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)`` (the mean of six class probabilities) and what :meth:`loss` needs. Reads the
        tokens and the class texts; the pooled ``support``/``query`` only for their shapes; ``classes`` and
        ``class_text`` not at all (no classifier over the train classes)."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        check_tokens(support_tokens, query_tokens, e, s, q, t, d)
        if self.training:
            return with_correct(self.episodes(support_tokens, query_tokens, text), query_labels)
        o = self.options
        p = support_tokens.shape[4]
        per_episode = (s + q) * t * p * (8 * d + 3 * o.heads * o.head_dim + o.heads * p)
        out = in_chunks(lambda lo, hi: self.episodes(support_tokens[lo:hi], query_tokens[lo:hi], text[lo:hi]), e,
                        per_episode, EVAL_ELEMENTS)
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per episode, as released: the cross-entropy (mean over the queries) of each support-query probability
        (``main``) plus that of each text probability over the supports and queries (``text``), the
        probabilities taken as logits; then the mean over episodes."""
        matching, text_matching = out["matching"], out["text_matching"]  # (E, 3, Q, N), (E, 3, S+Q, N)
        e, _, q, n = matching.shape
        s = text_matching.shape[2] - q
        video_labels = torch.cat([torch.arange(n, device=labels.device).repeat_interleave(s // n).expand(e, -1),
                                  labels], dim=1)  # (E, S+Q): supports class-major, then the queries
        main = sum(episode_ce(matching[:, i], labels) for i in range(3))
        text = sum(episode_ce(text_matching[:, i], video_labels) for i in range(3))
        total = main + text
        return total, {"main": main.detach(), "text": text.detach(), "total": total.detach()}


def check_tokens(support_tokens: Tensor | None, query_tokens: Tensor | None, e: int, s: int, q: int, t: int,
                 d: int) -> None:
    """A ValueError naming the shapes unless the tokens are ``(E, S, T, 3, P, D)`` and ``(E, Q, T, 3, P, D)``
    with a class token and at least one patch (P >= 2)."""
    if support_tokens is None or query_tokens is None:
        raise ValueError(f"emp-net reads cached tokens: pass support_tokens and query_tokens (a cache extracted "
                         f"with --tokens {LAYERS})")
    st, qt = tuple(support_tokens.shape), tuple(query_tokens.shape)
    if len(st) != 6 or len(qt) != 6 or st[:3] != (e, s, t) or qt[:3] != (e, q, t) or st[3:] != qt[3:] \
            or st[3] != 3 or st[4] < 2 or st[5] != d:
        raise ValueError(f"expected support_tokens (E, S, T, 3, P, D) = ({e}, {s}, {t}, 3, P, {d}) and query_tokens "
                         f"({e}, {q}, {t}, 3, P, {d}); got {st}, {qt}")


SPEC = HeadSpec(
    name="emp-net",
    options=EMPNetOptions,
    build=EMPNet,
    summary="EMP-Net (ECCV 2024) as released on cached ViT tokens (blocks 4, 8, 12): skip fusion, multi-level "
            "reasoning, text-visual and OTAM matching",
    source="Wu et al., Efficient Few-Shot Action Recognition via Multi-Level Post-Reasoning, ECCV 2024; released code "
           "cong-wu/EMP-Net models/base/few_shot.py (EMP_Net; loss in runs/train_net_few_shot.py)",
    per_video=False,
    train_shot=lambda k: k,  # TRAIN.SHOT is the test shot
    train_queries=lambda k: 5,  # QUERY_PER_CLASS 5 in every config
    tokens=LAYERS,
)
