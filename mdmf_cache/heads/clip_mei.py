"""CLIP-MEI (Deng et al., Knowledge-Based Systems 2025), as its authors released it, with its test label leak removed.

What the released ``CNN`` of D-XH/CLIP-MEI (``models/model_clipmei.py``, loss in ``run/main_run.py``)
computes on pooled CLIP features; docs/heads.md has the details and the line references. Two
transformers, ``context1`` and ``context2``, each one pre-norm attention layer (one LayerNorm for q,
k and v, 8 heads of width 256 whatever D, out projection with dropout 0.2) and a feed-forward block
D -> 2048 -> D (GELU, dropout 0.05), no positions. A "modulated" sequence is ``[token; x + 0.1
token]`` through ``context2`` (T+1 positions, the token's output first).

1. **QSA** (query-specific semantics). Supports are modulated by their class text; the prototypes are
   the class means of the frame outputs. A query's token is ``FFN(g x mean(query))``: an MLP
   (D -> 2048 -> D, GELU, dropout 0.05) of the episode's mean class text ``g`` scaled by the query's
   mean over frames *and* channels (one number per query). Queries are modulated by their token.
   Distance ``d_qsa`` = OTAM of the modulated queries to the prototypes.
2. **TFE** (task feature enhancement), **transductive**: per frame position, ``context1`` attends over
   the videos of the episode. Supports: the sequence {N class tokens, every support}, a class token
   being the mean of the class's supports and *all the episode's queries*; queries: {the mean of the
   class tokens, every query}. Distance ``d_tfe`` = OTAM of the enhanced queries to the class means of
   the enhanced supports, plus OTAM of the query token to the class tokens (the same for every query).
3. logits = ``-(0.5 d_qsa + d_tfe)``; OTAM with lambda 0.5 in both directions, ``1 - cos`` with 0.01
   added to the product of norms.

Training terms (weighted 0.001 in the released per-task loss, see :meth:`CLIPMEI.loss`):

* consistency: queries modulated by their **true** class text against the token-modulated ones, all
  T+1 positions; text distance: the token against the true text, and the two passes' token outputs;
* **MIC** (motion compensation): every video's motion vector (CPM2C's bidirectional difference with two
  temporal convolutions, averaged over time) is the token of a ``context2`` pass over ``x + 0.1 m``;
  the motion of the output frames is pulled towards the output token; weighted by ``alpha``, a
  learnable scalar initialised to 1.

The release builds ``g`` from the texts of the queries' **true** classes (``target_context_support.mean(0)``),
at test time too: a label leak. Here ``g`` is the mean of the episode's class texts, the same value
whenever every class has as many queries (every released episode), with no labels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mdmf_cache.heads.base import (FewShotHead, check_episode_shapes, class_means, episode_ce, in_chunks,
                                   with_correct)
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.layers.motion import motion_difference, squared_gap
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import frame_distances, otam_distance

__all__ = ["CLIPMEIOptions", "CLIPMEI", "SPEC", "EVAL_ELEMENTS"]

#: Eval-mode forward runs this many elements' worth of episodes at a time (the direct evaluation path hands the
#: head 500 episodes at once; at D = 1024 one episode's attention projections alone are ~0.5 M floats per video).
EVAL_ELEMENTS = 1 << 26


@dataclass
class CLIPMEIOptions:
    """CLIP-MEI's options; the defaults are the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        heads: attention heads of ``context1`` and ``context2`` (8).
        head_dim: their head width (``dim_head_k`` 256, whatever D).
        ffn_dim: their feed-forward width (2048).
        token_ffn_dim: the hidden width of the query-token MLP (``token_trans``' ``FeedForward(D, 2048)``).
        attn_dropout: dropout after the attention's out projection (0.2).
        ffn_dropout: dropout inside the feed-forward blocks (0.05).
        token_dropout: dropout inside the query-token MLP (0.05).
        cos_eps: added to the product of norms in every cosine (0.01).
        otam_lambda: OTAM soft-min temperature (0.5, ``OTAM_cum_dist_v2``).
        otam_bidirectional: OTAM(D) + OTAM(D^T); False = ``SINGLE_DIRECT``.
        token_mix: the share of the token added to every position (0.1).
        qsa_weight: weight of the QSA distance in the logits (0.5).
        aux_weight: weight of consistency + text distance + alpha x motion in the released per-task loss (0.001).
        tasks_per_batch: the released ``TASKS_PER_BATCH`` (16): the released loss divides the cross-entropy by it
            and not the auxiliary terms, so per episode they weigh ``tasks_per_batch x aux_weight`` against it. It
            does not set the episodes of a step (``--episodes-per-step`` does; its default is the released 16).
    """

    dim: int
    num_frames: int = 8
    heads: int = 8
    head_dim: int = 256
    ffn_dim: int = 2048
    token_ffn_dim: int = 2048
    attn_dropout: float = 0.2
    ffn_dropout: float = 0.05
    token_dropout: float = 0.05
    cos_eps: float = 0.01
    otam_lambda: float = 0.5
    otam_bidirectional: bool = True
    token_mix: float = 0.1
    qsa_weight: float = 0.5
    aux_weight: float = 0.001
    tasks_per_batch: int = 16

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self, min_frames=2)  # MIC differences frames
        problems.sizes(self, ("heads", "head_dim", "ffn_dim", "token_ffn_dim", "tasks_per_batch"))
        problems.check(self, ("attn_dropout", "ffn_dropout", "token_dropout"), 0.0, 1.0, high_open=True)
        problems.check(self, "otam_lambda", 0.0, low_open=True)
        problems.check(self, ("cos_eps", "token_mix", "qsa_weight", "aux_weight"), 0.0)
        problems.raise_any()


class CLIPMEI(FewShotHead):
    """The released CLIP-MEI head, the query token made from the episode's class texts (see the module docstring)."""

    method = "clip-mei"

    def __init__(self, options: CLIPMEIOptions) -> None:
        super().__init__()
        o = self.options = options
        d = o.dim
        layer = lambda: MMFE(d, heads=o.heads, ffn_dim=o.ffn_dim, attn_dropout=o.attn_dropout,  # noqa: E731
                             ffn_dropout=o.ffn_dropout, num_positions=None, head_dim=o.head_dim)
        self.context1, self.context2 = layer(), layer()
        self.motion_conv1 = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.motion_conv2 = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.token_mlp = nn.Sequential(nn.Linear(d, o.token_ffn_dim), nn.GELU(), nn.Dropout(o.token_dropout),
                                       nn.Linear(o.token_ffn_dim, d), nn.Dropout(o.token_dropout))
        self.mo_alpha = nn.Parameter(torch.ones(1))  # MIC's weight, learnable as released

    def modulate(self, seq: Tensor, token: Tensor) -> Tensor:
        """``[token; seq + mix x token]`` through ``context2``: ``(E, B, L, D), (E, B, D) -> (E, B, L+1, D)``."""
        e, b, length, d = seq.shape
        token = token.to(seq.dtype)
        x = seq + self.options.token_mix * token.unsqueeze(2)
        return self.context2(token.reshape(e * b, d), x.reshape(e * b, length, d), x.reshape(e * b, length, d)
                             ).reshape(e, b, length + 1, d)

    def motion(self, videos: Tensor) -> Tensor:
        """Each video's motion vector, the time-mean of the bidirectional difference: ``(B, T, D) -> (B, D)``."""
        return motion_difference(videos, self.motion_conv1, self.motion_conv2).mean(dim=1)

    def motion_gap(self, support: Tensor, query: Tensor) -> Tensor:
        """MIC's training distance per episode ``(E,)``: supports' and queries' mean over videos of
        ``|motion(output frames) - output token|^2`` of the pass with the motion vector as token."""
        e, s, t, d = support.shape
        videos = torch.cat([support, query], dim=1)  # (E, S+Q, T, D)
        m = self.motion(videos.reshape(-1, t, d)).reshape(e, -1, d)  # (E, S+Q, D)
        out = self.modulate(videos, m)  # (E, S+Q, T+1, D)
        again = self.motion(out[:, :, 1:].reshape(-1, t, d)).reshape(e, -1, d)  # (E, S+Q, D)
        gap = (again - out[:, :, 0]).pow(2).sum(dim=-1)  # (E, S+Q)
        return gap[:, :s].mean(dim=1) + gap[:, s:].mean(dim=1)

    def task_enhance(self, support: Tensor, query: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TFE: ``context1`` over the videos of the episode at each frame position.

        Args:
            support: ``(E, S, T, D)`` class-major; query ``(E, Q, T, D)``.

        Returns:
            the enhanced supports ``(E, S, T, D)``, queries ``(E, Q, T, D)``, class tokens ``(E, N, T, D)`` and
            query token ``(E, 1, T, D)``.
        """
        e, s, t, d = support.shape
        q, k = query.shape[1], s // n
        tokens = (support.reshape(e, n, k, t, d).sum(dim=2) + query.sum(dim=1, keepdim=True)) / (k + q)  # (E, N, T, D)
        query_token = tokens.mean(dim=1, keepdim=True)  # (E, 1, T, D)

        def across_videos(videos: Tensor) -> Tensor:  # (E, B, T, D): attention over the B videos, per frame position
            b = videos.shape[1]
            x = videos.transpose(1, 2).reshape(e * t, b, d)  # (E*T, B, D)
            return self.context1(None, x, x).reshape(e, t, b, d).transpose(1, 2)  # (E, B, T, D)

        sup = across_videos(torch.cat([tokens, support], dim=1))  # (E, N+S, T, D)
        qry = across_videos(torch.cat([query_token, query], dim=1))  # (E, 1+Q, T, D)
        return sup[:, n:], qry[:, 1:], sup[:, :n], qry[:, :1]

    def distance(self, query_out: Tensor, protos: Tensor) -> Tensor:
        """OTAM distance ``(E, Q, T, D), (E, N, T, D) -> (E, Q, N)``, in float32 (or float64) under autocast."""
        o = self.options
        with torch.autocast(query_out.device.type, enabled=False):
            dist = frame_distances(at_least_float32(query_out), at_least_float32(protos), o.cos_eps)  # (E, Q, N, T, T)
            return otam_distance(dist, o.otam_lambda, o.otam_bidirectional)

    def episodes(self, support: Tensor, query: Tensor, text: Tensor) -> dict[str, Tensor]:
        e, s, t, d = support.shape
        n = text.shape[1]
        o = self.options
        out: dict[str, Tensor] = {}
        # QSA: text-modulated supports, queries modulated by a token made from the episode's class texts
        mean_text = text.mean(dim=1).to(query.dtype)  # (E, D): no query label is read
        query_token = self.token_mlp(mean_text[:, None, :] * query.mean(dim=(2, 3))[..., None])  # (E, Q, D)
        real = self.modulate(support, text.repeat_interleave(s // n, dim=1))  # (E, S, T+1, D)
        fake = self.modulate(query, query_token)  # (E, Q, T+1, D)
        d_qsa = self.distance(fake[:, :, 1:], class_means(real[:, :, 1:], n))  # (E, Q, N)
        # TFE on the QSA outputs (transductive: every query sees the others)
        sup, qry, class_tokens, token_q = self.task_enhance(real[:, :, 1:], fake[:, :, 1:], n)
        d_tfe = self.distance(qry, class_means(sup, n)) + self.distance(token_q, class_tokens)  # (E, Q, N) + (E, 1, N)
        out["logits"] = -(o.qsa_weight * d_qsa + d_tfe)
        if self.training:  # what the loss needs; the query side of the consistency needs the labels, which it has
            out.update(text=text, query=query, query_fake=fake, query_token=query_token,
                       motion_gap=self.motion_gap(support, query))
        return out

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``; in training mode also what :meth:`loss` needs. ``classes`` and ``class_text``
        are not used (the release has no classifier over the train classes)."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        if self.training:
            return with_correct(self.episodes(support, query, text), query_labels)
        o = self.options
        per_episode = (s + q + n + 1) * (t + 1) * (4 * o.heads * o.head_dim + o.ffn_dim)  # q, k, v, out; the FFN
        logits = in_chunks(lambda lo, hi: self.episodes(support[lo:hi], query[lo:hi], text[lo:hi])["logits"], e,
                           per_episode, EVAL_ELEMENTS)
        return with_correct({"logits": logits}, query_labels)

    def auxiliary(self, out: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The released auxiliary distances per episode ``(E,)``: ``consistency`` (true-text against token-modulated
        queries, T+1 positions), ``text`` (half the token's and the token outputs' squared gaps to the true text's)
        and ``motion`` (MIC's)."""
        text = out["text"]
        query_text = text.gather(1, labels.unsqueeze(-1).expand(-1, -1, text.shape[-1])).to(out["query"].dtype)  # (E, Q, D)
        real = self.modulate(out["query"], query_text)  # (E, Q, T+1, D)
        fake = out["query_fake"]
        token_gap = (query_text - out["query_token"]).pow(2).sum(dim=-1).mean(dim=1)  # (E,)
        output_gap = (real[:, :, 0] - fake[:, :, 0]).pow(2).sum(dim=-1).mean(dim=1)
        return {"consistency": squared_gap(real, fake), "text": 0.5 * (token_gap + output_gap), "motion": out["motion_gap"]}

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per episode: the cross-entropy summed over the queries + ``tasks_per_batch x aux_weight`` x (consistency
        + text distance + alpha x motion) in training mode; then the mean over episodes.

        The released per-task loss is ``CE / TASKS_PER_BATCH + 0.001 x (...)``, summed over the tasks of a step;
        times ``tasks_per_batch`` and averaged over the episodes of a step it is this one, so at
        ``--episodes-per-step`` = ``tasks_per_batch`` the gradient of a step is the released one."""
        o = self.options
        main = episode_ce(out["logits"], labels, "sum")
        total, parts = main, {"main": main.detach()}
        if "text" in out and o.aux_weight:
            aux = {k: v.mean() for k, v in self.auxiliary(out, labels).items()}
            dists = aux["consistency"] + aux["text"] + self.mo_alpha.squeeze(0) * aux["motion"]
            total = total + o.tasks_per_batch * o.aux_weight * dists
            parts.update({k: v.detach() for k, v in aux.items()}, alpha=self.mo_alpha.detach().squeeze(0))
        parts["total"] = total.detach()
        return total, parts


SPEC = HeadSpec(
    name="clip-mei",
    options=CLIPMEIOptions,
    build=CLIPMEI,
    summary="CLIP-MEI (KBS 2025) as released, without its test label leak: query-specific text tokens, "
            "transductive task enhancement, motion compensation, OTAM",
    source="Deng et al., CLIP-MEI: Exploit more effective information for few-shot action recognition, "
           "Knowledge-Based Systems (2025) 113965; released code D-XH/CLIP-MEI models/model_clipmei.py (CNN, loss in "
           "run/main_run.py)",
    per_video=False,  # TFE: every query's logits depend on the whole episode
    transductive=True,
    test_queries=lambda k: 1,  # TEST.QUERY_PER_CLASS 1 in every config
    space={"qsa-weight": "0:1", "aux-weight": "0.0001:0.01:log"},
    train_shot=lambda k: k,  # TRAIN.SHOT is the test shot too
    train_queries=lambda k: 4,  # TRAIN.QUERY_PER_CLASS 4 in every config
)
