"""CLIP-MDMF (Guo et al., KBS 2024), this project's method: docs/method.md §6-8.

The Probability Prompt Selector picks a class text per query; two temporal views (LTC: local
convolutions, GTC: a causal TCN) each fuse the frames with a text token in their own MMFE; prototypes
are class means; each view's distance is bidirectional OTAM; the logits add the weighted view
distances; the loss is cross-entropy plus reliability-gated mutual distillation between the views.

A view is three stages, so that evaluation can run the expensive ones once per video:

1. ``context(name, frames, episodes)``: the view's temporal extractor, a function of the video alone;
2. ``fuse(name, frames, context, tokens)``: the view's MMFE, a function of the video and its text token;
3. ``head(support_out, query_out, n)``: prototypes, frame distances, OTAM and posteriors, per episode.

``forward`` runs them in order on whole episodes (training, and the direct evaluation path);
:meth:`MDMF.per_video` runs stages 1-2 once per distinct (video, token) of an episode list and only
stage 3 per episode. Both give the same logits because both call these methods.

All episodes of a batch go through one forward pass: supports and queries of every episode are
flattened into one batch of ``E * (S + Q)`` sequences (the LTCE's BatchNorm still takes its statistics
per episode), and the episode axis is kept for prototypes, distances and posteriors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mdmf_cache.device import heads_autocast
from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, class_means, with_correct
from mdmf_cache.heads.spec import HeadSpec
from mdmf_cache.heads.mdmf_losses import total_loss
from mdmf_cache.heads.mdmf_config import PRESETS, MDMFConfig
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import cosine_similarity, frame_distances, otam_distance
from mdmf_cache.layers.pps import ProbabilityPromptSelector, token_for
from mdmf_cache.layers.temporal import GTCE, LTCE

__all__ = ["MDMF", "TemporalView", "build_view", "build_mmfe", "SPEC"]


class TemporalView(nn.Module):
    """One view: a temporal context extractor (or none, for NTC) followed by its own MMFE.

    Args:
        mmfe: The view's fusion layer.
        extractor: ``(B, T, D) -> (B, T, D)`` context extractor; None = NTC (the MMFE query is the
            frames themselves).
    """

    def __init__(self, mmfe: MMFE, extractor: nn.Module | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.mmfe = mmfe

    def context(self, frames: Tensor, episodes: int = 1) -> Tensor:
        """``(E*B, T, D) -> (E*B, T, D)``: the extractor's output, or the frames without one."""
        return self.extractor(frames, episodes) if self.extractor is not None else frames

    def forward(self, frames: Tensor, token: Tensor | None, episodes: int = 1) -> Tensor:
        """``frames (E*B, T, D), token (E*B, D) -> (E*B, T+1, D)``."""
        return self.mmfe(token, self.context(frames, episodes), frames)


def build_mmfe(cfg: MDMFConfig) -> MMFE:
    """The one-layer cross-attention fusion block with the config's widths, dropouts and positions."""
    return MMFE(cfg.dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim, attn_dropout=cfg.mmfe_dropout,
                ffn_dropout=cfg.ffn_dropout, num_positions=cfg.num_frames + 1 if cfg.pos_embed else None)


def build_view(cfg: MDMFConfig, name: Literal["ltc", "gtc", "ntc"]) -> TemporalView:
    """One view's extractor and MMFE: ``"ltc"`` (LTCE), ``"gtc"`` (GTCE) or ``"ntc"`` (no extractor)."""
    extractor: nn.Module | None
    if name == "ltc":
        extractor = LTCE(cfg.dim, norm=cfg.ltce == "bn")
    elif name == "gtc":
        extractor = GTCE(cfg.dim, cfg.tcn_levels, cfg.tcn_kernel, cfg.tcn_dropout)
    elif name == "ntc":
        extractor = None
    else:
        raise ValueError(f"unknown view {name!r}; choose 'ltc', 'gtc' or 'ntc'")
    return TemporalView(build_mmfe(cfg), extractor)


class MDMF(FewShotHead):
    """CLIP-MDMF few-shot heads over frozen (or cached) CLIP frame and text embeddings.

    Args:
        cfg: Head options (see :func:`mdmf_cache.heads.mdmf_config.build_config`).
    """

    method = "mdmf"

    def __init__(self, cfg: MDMFConfig) -> None:
        super().__init__()
        self.cfg = self.options = cfg
        self.pps = ProbabilityPromptSelector(score=cfg.pps_score, test_rule=cfg.pps_test, temperature=cfg.pps_temperature,
                                             eps=cfg.cos_eps, topk=cfg.pps_topk, enabled=cfg.pps)
        self.views = nn.ModuleDict({name: build_view(cfg, name) for name in cfg.view_names})

    def _view_weight(self, name: str) -> float:
        if self.cfg.views != "both":
            return 1.0
        return self.cfg.alpha_ltc if name == "ltc" else self.cfg.alpha_gtc

    def query_choice(self, query: Tensor, text: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """PPS: ``(E, Q, T, D), (E, N, D) -> chosen (E, Q)`` (-1 = PPS off), ``prob (E, Q, N)``."""
        return self.pps(query, text, noise)

    def context(self, name: str, frames: Tensor, episodes: int = 1) -> Tensor:
        """View ``name``'s temporal context ``(E*B, T, D) -> (E*B, T, D)`` (the frames for no extractor)."""
        return self.views[name].context(frames, episodes)

    def fuse(self, name: str, frames: Tensor, context: Tensor, tokens: Tensor) -> Tensor:
        """View ``name``'s fusion ``(B, T, D), (B, T, D), (B, D) -> (B, T+1, D)``."""
        return self.views[name].mmfe(tokens, context, frames)

    def fuse_pairs(self, name: str, frames: Tensor, context: Tensor, tokens: Tensor, pair_video: Tensor,
                   pair_token: Tensor, chunk: int = 4096, token_output: bool = True) -> Tensor:
        """:meth:`fuse` of P (video, token) pairs, the per-position work done once per video and per token.

        Args:
            frames, context: ``(U, T, D)`` of U videos.
            tokens: ``(M, D)`` distinct tokens.
            pair_video, pair_token: ``(P,)`` indices into them.
            chunk: pairs per attention/feed-forward batch.
            token_output: False = only the frame positions' outputs ``(P, T, D)`` (the token's own
                output feeds only the distillation posteriors, which evaluation does not read).

        Returns:
            ``(P, T+1, D)``, equal to ``fuse(frames[pair_video], context[pair_video], tokens[pair_token])``
            (or its positions 1..T).
        """
        mmfe = self.views[name].mmfe
        frame_parts = mmfe.frame_parts(context, frames)  # norms and q/k/v projections once per video
        token_parts = mmfe.token_parts(tokens)  # and once per token
        return torch.cat([mmfe.attend(frame_parts, token_parts, pair_video[i : i + chunk], pair_token[i : i + chunk],
                                      token_output) for i in range(0, len(pair_video), chunk)])

    def head(self, support_out: dict[str, Tensor], query_out: dict[str, Tensor], n: int,
             frames_only: bool = False) -> dict[str, Tensor]:
        """Distances, posteriors and logits from the fused outputs.

        Args:
            support_out: per view ``(E, S, T+1, D)`` (``frames_only``: ``(E, S, T, D)``, the frame positions).
            query_out: per view ``(E, Q, T+1, D)`` (``frames_only``: ``(E, Q, T, D)``).
            n: N ways.
            frames_only: the inputs hold the frame positions alone: the logits, without the text posteriors
                (they feed only the distillation loss; the per-video evaluation stores no more).

        Returns:
            ``"logits"`` ``(E, Q, N)`` = -(sum of weighted view distances); per view ``v``:
            ``"d_v"`` ``(E, Q, N)`` OTAM distance, ``"p_visual_v"`` = softmax(-d_v), ``"p_text_v"``
            = softmax over N of the cosine at position ``text_pos`` (not with ``frames_only``).
        """
        cfg = self.cfg
        first = 0 if frames_only else 1  # where the frame positions start
        frame_dists, text_cosines = [], []
        with torch.autocast(next(iter(query_out.values())).device.type, enabled=False):  # float32 from here on
            for name in self.views:
                protos = class_means(at_least_float32(support_out[name]), n)  # (E, N, L, D)
                query_fused = at_least_float32(query_out[name])  # (E, Q, L, D)
                frame_dists.append(frame_distances(query_fused[:, :, first:], protos[:, :, first:], cfg.cos_eps))  # (E, Q, N, T, T)
                if not frames_only:
                    text_cosines.append(
                        cosine_similarity(query_fused[:, :, cfg.text_pos], protos[:, :, cfg.text_pos], cfg.cos_eps)
                    )  # (E, Q, D) x (E, N, D) -> (E, Q, N)
            dists = self.otam(frame_dists)  # (views, E, Q, N)
            out: dict[str, Tensor] = {}
            logits = torch.zeros_like(dists[0])
            for i, (name, dist) in enumerate(zip(self.views.keys(), dists)):
                out[f"d_{name}"] = dist
                out[f"p_visual_{name}"] = torch.softmax(-dist, dim=-1)
                if not frames_only:
                    out[f"p_text_{name}"] = torch.softmax(text_cosines[i], dim=-1)
                logits = logits - self._view_weight(name) * dist
        out["logits"] = logits
        return out

    def otam(self, frame_dists: list[Tensor]) -> Tensor:
        """OTAM of every view's ``(E, Q, N, T, T)`` frame distances in one pass -> ``(views, E, Q, N)``.

        OTAM's soft-min runs in float32 even under bf16 autocast (a log-sum-exp over small
        differences); its T-step recurrence is a chain of small kernels, so batching the views
        halves the launches, with the same arithmetic.
        """
        stacked = torch.stack(frame_dists)
        with torch.autocast(stacked.device.type, enabled=False):
            return otam_distance(at_least_float32(stacked), self.cfg.otam_lambda, self.cfg.otam_bidirectional)

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """Classify the queries of E episodes (the contract of :mod:`mdmf_cache.heads.base`).

        Returns:
            ``"logits"`` ``(E, Q, N)``, ``"query_token_class"`` ``(E, Q)`` (-1 = no class token),
            ``"pps_prob"`` ``(E, Q, N)``, the per-view outputs of :meth:`head` and, with labels,
            ``"correct"`` ``(E, Q)``.
        """
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        chosen, pps_prob = self.query_choice(query, text, pps_noise)  # (E, Q), (E, Q, N)
        support_tokens = text.repeat_interleave(s // n, dim=1).reshape(e * s, d)  # support s gets class s // K
        query_tokens = token_for(text, chosen).reshape(e * q, d)  # zeros where PPS is off
        frames = torch.cat([support, query], dim=1).reshape(e * (s + q), t, d)  # (E*(S+Q), T, D)
        support_out, query_out = {}, {}
        for name in self.views:
            # the extractor sees each episode's supports and queries together (batch statistics per episode)
            ctx = self.context(name, frames, e).reshape(e, s + q, t, d)  # (E, S+Q, T, D)
            fs = self.fuse(name, support.reshape(e * s, t, d), ctx[:, :s].reshape(e * s, t, d), support_tokens)
            fq = self.fuse(name, query.reshape(e * q, t, d), ctx[:, s:].reshape(e * q, t, d), query_tokens)
            support_out[name] = fs.reshape(e, s, *fs.shape[1:])  # (E, S, T+1, D)
            query_out[name] = fq.reshape(e, q, *fq.shape[1:])  # (E, Q, T+1, D)
        out = {"query_token_class": chosen, "pps_prob": pps_prob, **self.head(support_out, query_out, n)}
        return with_correct(out, query_labels)

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy summed over the queries plus ``lam`` x the mutual distillation (docs/method.md §8)."""
        return total_loss(out, labels, self.cfg)

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                  batch_size: int = 500) -> "MDMFScorer":
        return MDMFScorer(self, features, text, episodes, uniforms, batch_size)


class MDMFScorer:
    """Per-video evaluation of MDMF: extractors once per video, fusion once per distinct (video, token) pair.

    In eval mode (no dropout, BatchNorm on running statistics) a support's fusion depends only on
    (video, its class text) and a query's on (video, the class PPS drew), so stages 1-2 run once per
    distinct pair and only prototypes, distances and OTAM run per episode. 10,000 5-shot episodes touch
    300,000 (video, token) slots but only a few thousand distinct pairs.

    Memory is bounded: only the frame positions of each fused pair are kept (the token's own output
    feeds only the distillation posteriors); the support pairs (a support always carries its own class's
    text: at most one pair per video) are kept for the whole list, the query pairs that are not support
    pairs only for the ``chunk_episodes`` episodes being scored (one shared by two chunks is fused twice),
    and the attention runs ``pair_batch`` pairs at a time. The extractors' outputs are computed once per
    video of the list.

    Args:
        model: an :class:`MDMF` in eval mode.
        features: ``(Nv, T, D)`` the split's videos (one view), on the compute device.
        text: ``(C, D)`` the split's prompt embeddings.
        episodes: the episode list (:class:`~mdmf_cache.data.episodes.Episodes`).
        uniforms: ``(E, Q)`` the seeded PPS uniforms of the list.
        batch_size: episodes per PPS batch.
        chunk_episodes: episodes whose query pairs are fused and kept at once.
        pair_batch: videos per extractor batch and pairs per attention/feed-forward batch (default: 256 on a
            CPU, 4096 on a GPU).
    """

    def __init__(self, model: MDMF, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray,
                 batch_size: int = 500, chunk_episodes: int = 1000, pair_batch: int | None = None) -> None:
        if model.training:
            raise ValueError("the per-video path needs the model in eval mode (dropout off, running statistics)")
        self.model, self.episodes, self.features = model, episodes, features
        dev = features.device
        # sequences per extractor/attention batch: small on a CPU (its memory is the host's), large on a GPU
        self.chunk_episodes = max(chunk_episodes, 1)
        self.pair_batch = pair_batch or (4096 if dev.type == "cuda" else 256)
        c, e_all, k = text.shape[0], len(episodes), episodes.shot
        self.keys = c + 1  # token keys: 0..C-1 class texts, C the zero token of PPS-off queries
        self.text_keys = torch.cat([text.float(), text.new_zeros(1, text.shape[1]).float()])  # (C+1, D)

        # 1. each query's token: the PPS draw on its own episode (cheap: cosines of mean frames)
        self.query_key = np.empty(episodes.query.shape, dtype=np.int64)  # (E, Q) split class of the token
        with torch.no_grad():
            for lo in range(0, e_all, batch_size):
                ep = episodes[lo : lo + batch_size]
                query = features[torch.as_tensor(ep.query, device=dev)].float()  # (E, Q, T, D)
                ep_text = text[torch.as_tensor(ep.classes, device=dev)].float()  # (E, N, D)
                chosen, _ = model.query_choice(query, ep_text, torch.as_tensor(uniforms[lo : lo + batch_size], device=dev))
                chosen = chosen.cpu().numpy()  # (E, Q) episode class, -1 = PPS off
                split_cls = np.take_along_axis(ep.classes, np.clip(chosen, 0, None), axis=1)
                self.query_key[lo : lo + len(ep)] = np.where(chosen >= 0, split_cls, c)

        # 2. each video's context, once per view
        self.videos = np.unique(np.concatenate([episodes.support.ravel(), episodes.query.ravel()]))  # (U,)
        with torch.no_grad(), heads_autocast(dev):
            frames_v = features[torch.as_tensor(self.videos, device=dev)].float()  # (U, T, D)
            b = self.pair_batch
            self.context = {name: torch.cat([model.context(name, frames_v[i : i + b]) for i in range(0, len(self.videos), b)])
                            for name in model.views}
        del frames_v

        # 3. the support pairs, fused once for the whole list
        support_key = np.repeat(episodes.classes, k, axis=1)  # (E, S) each support's own class
        self.support_codes, slot = np.unique(episodes.support * self.keys + support_key, return_inverse=True)
        self.support_slot = slot.reshape(episodes.support.shape)
        self.support_table = self._fuse(self.support_codes)  # per view (Ps, T, D)
        self.fused = len(self.support_codes)
        self.query_range, self.query_table, self.query_slot = (0, 0), {}, None

    @torch.no_grad()
    def _fuse(self, codes: np.ndarray) -> dict[str, Tensor]:
        """Frame-position outputs of the pairs ``codes`` (video * keys + token, sorted), per view: ``(P, T, D)``.

        ``pair_batch`` pairs at a time, each batch's videos' norms and projections computed for that batch
        (the codes are sorted by video, so a video's pairs fall in one or two batches)."""
        model, dev = self.model, self.features.device
        t, d = self.features.shape[1:]
        out = {name: self.features.new_empty((len(codes), t, d), dtype=torch.float32) for name in model.views}
        with heads_autocast(dev):
            tokens = {name: model.views[name].mmfe.token_parts(self.text_keys) for name in model.views}  # (C+1, D) each
            for lo in range(0, len(codes), self.pair_batch):
                batch = codes[lo : lo + self.pair_batch]
                videos, pair_video = np.unique(batch // self.keys, return_inverse=True)
                at = torch.as_tensor(np.searchsorted(self.videos, videos), device=dev)  # rows in self.context
                frames_v = self.features[torch.as_tensor(videos, device=dev)].float()  # (U_b, T, D)
                pv = torch.as_tensor(pair_video, device=dev)
                pk = torch.as_tensor(batch % self.keys, device=dev)
                for name in model.views:
                    mmfe = model.views[name].mmfe
                    parts = mmfe.frame_parts(self.context[name][at], frames_v)
                    out[name][lo : lo + len(batch)] = mmfe.attend(parts, tokens[name], pv, pk, token_output=False)
        return out

    def _query_chunk(self, lo: int, hi: int) -> None:
        """The query pairs of episodes ``lo .. lo + chunk`` (covering ``hi``): those that are support pairs are
        read from the support table, the others fused now; the previous chunk's are dropped first."""
        start, stop = lo, min(len(self.episodes), max(hi, lo + self.chunk_episodes))
        self.query_table = {}
        rows = self.episodes.query[start:stop] * self.keys + self.query_key[start:stop]  # (E', Q)
        codes, slot = np.unique(rows, return_inverse=True)
        at = np.minimum(np.searchsorted(self.support_codes, codes), len(self.support_codes) - 1)
        known = self.support_codes[at] == codes
        index = np.where(known, at, np.cumsum(~known) - 1)  # into the support table, or into the new pairs
        self.query_table = self._fuse(codes[~known])
        self.query_known, self.query_index = known, index
        self.query_slot = slot.reshape(rows.shape)
        self.query_range = (start, stop)
        self.fused += int((~known).sum())

    @torch.no_grad()
    def logits(self, lo: int, hi: int) -> Tensor:
        """Per episode: prototypes, distances, OTAM. The prototypes (class means of the supports' outputs)
        are averaged straight from the pair table, without gathering every support's output first, and
        reach the head as one "shot" per class (its mean over K = 1 shot is the identity)."""
        if not (self.query_range[0] <= lo and hi <= self.query_range[1]):
            self._query_chunk(lo, hi)
        step = max(1, self.pair_batch // 2)  # episodes per per-episode pass (its prototypes and queries in float32)
        if hi - lo > step:
            return torch.cat([self.logits(a, min(a + step, hi)) for a in range(lo, hi, step)])
        model, n = self.model, self.episodes.way
        dev = self.features.device
        sp = torch.as_tensor(self.support_slot[lo:hi], device=dev)
        slots = self.query_slot[lo - self.query_range[0] : hi - self.query_range[0]]  # (E, Q) into the chunk's pairs
        known = torch.as_tensor(self.query_known[slots], device=dev)
        index = torch.as_tensor(self.query_index[slots], device=dev)
        with heads_autocast(dev):
            support_out = {name: _pair_class_means(self.support_table[name], sp, n) for name in model.views}  # (E, N, T, D)
            query_out = {}
            for name in model.views:
                q = self.support_table[name].new_empty((*slots.shape, *self.support_table[name].shape[1:]))  # (E, Q, T, D)
                q[known] = self.support_table[name][index[known]]
                q[~known] = self.query_table[name][index[~known]]
                query_out[name] = q
            return model.head(support_out, query_out, n, frames_only=True)["logits"]


def _pair_class_means(table: Tensor, slots: Tensor, n: int) -> Tensor:
    """``table (P, L, D)`` fused pairs, ``slots (E, S)`` class-major support pairs -> ``(E, N, L, D)`` class means."""
    e, s = slots.shape
    p, length, d = table.shape
    means = torch.nn.functional.embedding_bag(slots.reshape(e * n, s // n), table.reshape(p, length * d), mode="mean")
    return means.reshape(e, n, length, d)


def _build(cfg: MDMFConfig) -> MDMF:
    return MDMF(cfg)


SPEC = HeadSpec(
    name="mdmf",
    options=MDMFConfig,
    build=_build,
    summary="CLIP-MDMF: prompt selector, two temporal views (LTC, GTC) with MMFE fusion, OTAM, mutual distillation",
    source="Guo et al., Multi-view distillation based on multi-modal fusion for few-shot action recognition "
           "(CLIP-MDMF), KBS 2024; released code cofly2014/CLIP-MDMF",
    per_video=True,
    presets={name: dict(values) for name, values in PRESETS.items()},  # paper first: the default
    space={"lambda": "0.1:2", "alpha-ltc": "0.25:2", "alpha-gtc": "0.25:2", "pps-temperature": "0.001:0.1:log"},
    train_shot=lambda k: k,
    train_queries=lambda k: 5,
)

