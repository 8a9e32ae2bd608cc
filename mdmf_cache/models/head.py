"""What every trainable few-shot head of this project shares (MDMF and CLIP-FSAR).

A head is three stages, so that evaluation can run the expensive ones once per video:

1. ``context(name, frames, episodes)``: a view's temporal extractor, a function of the video alone;
2. ``fuse(name, frames, context, tokens)``: the view's transformer, a function of the video and the
   text token it is paired with (``None`` = no token position);
3. ``head(support_out, query_out, n)``: prototypes, frame distances, OTAM and posteriors, per episode.

``forward`` runs them in order on whole episodes (training, and the direct evaluation path);
:func:`mdmf_cache.evaluation.score` runs stages 1-2 once per distinct (video, token) of an episode
list and only stage 3 per episode. Both give the same logits because both call these methods.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdmf_cache.models.config import MDMFConfig
from mdmf_cache.models.otam import cosine_distance, otam_distance
from mdmf_cache.models.pps import token_for

__all__ = ["FewShotHead", "prototypes", "frame_distances", "at_least_float32"]


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a half type (bf16/fp16 under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prototypes(support_out: Tensor, n: int) -> Tensor:
    """Class mean over the K shots: ``(E, S, L, D)`` class-major -> ``(E, N, L, D)``."""
    e, s, length, d = support_out.shape
    return support_out.reshape(e, n, s // n, length, d).mean(dim=2)


def frame_distances(query_frames: Tensor, proto_frames: Tensor, eps: float) -> Tensor:
    """All query-prototype frame distances ``1 - cos``: ``(E, Q, T, D), (E, N, T, D) -> (E, Q, N, T, T)``."""
    e, q, t, d = query_frames.shape
    n = proto_frames.shape[1]
    dist = cosine_distance(query_frames.reshape(e, q * t, d), proto_frames.reshape(e, n * t, d), eps)  # (E, Q*T, N*T)
    return dist.reshape(e, q, t, n, t).permute(0, 1, 3, 2, 4)  # (E, Q, N, T, T)


class FewShotHead(nn.Module):
    """Base of the trainable heads: the staged forward described in the module docstring.

    Subclasses set ``self.views`` (an ``nn.ModuleDict`` of :class:`~mdmf_cache.models.mdmf.TemporalView`)
    and ``query_has_token``, and implement :meth:`query_choice`, :meth:`fuse` and :meth:`head`.
    """

    cfg: MDMFConfig
    views: nn.ModuleDict
    #: False: queries are fused without a token position (CLIP-FSAR); True: with the token PPS chose
    #: (or a zero token when PPS is off).
    query_has_token: bool = True

    def query_choice(self, query: Tensor, text: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``chosen (E, Q)`` episode class of each query's token (-1 = none) and ``prob (E, Q, N)``."""
        raise NotImplementedError

    def context(self, name: str, frames: Tensor, episodes: int = 1) -> Tensor:
        """View ``name``'s temporal context ``(E*B, T, D) -> (E*B, T, D)`` (frames for no extractor)."""
        return self.views[name].context(frames, episodes)

    def token_input(self, tokens: Tensor) -> Tensor:
        """What the fusion layer takes as a token: the text itself (MDMF), or a projection of it (CLIP-FSAR)."""
        return tokens

    def fuse(self, name: str, frames: Tensor, context: Tensor, tokens: Tensor | None) -> Tensor:
        """View ``name``'s fusion ``(B, T, D), (B, T, D), (B, D) | None -> (B, L, D)`` (L = T+1, or T without a token)."""
        return self.views[name].mmfe(None if tokens is None else self.token_input(tokens), context, frames)

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
        token_parts = mmfe.token_parts(self.token_input(tokens))  # and once per token
        return torch.cat([mmfe.attend(frame_parts, token_parts, pair_video[i : i + chunk], pair_token[i : i + chunk],
                                      token_output) for i in range(0, len(pair_video), chunk)])

    def head(self, support_out: dict[str, Tensor], query_out: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """Per-episode scores from fused supports ``(E, S, L, D)`` and queries ``(E, Q, L', D)`` per view."""
        raise NotImplementedError

    def forward(
        self,
        support: Tensor,
        query: Tensor,
        text: Tensor,
        query_labels: Tensor | None = None,
        pps_noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Classify the queries of E episodes.

        Args:
            support: ``(E, S, T, D)`` support frames, class-major: support ``s`` belongs to episode
                class ``s // K`` with ``K = S // N``.
            query: ``(E, Q, T, D)`` query frames.
            text: ``(E, N, D)`` text embeddings of the episode's classes, in episode-class order.
            query_labels: Optional ``(E, Q)`` episode-class labels; adds ``"correct"``.
            pps_noise: Optional ``(E, Q)`` uniforms for the PPS draws (default: torch's RNG).

        Returns:
            ``"logits"`` ``(E, Q, N)``, ``"query_token_class"`` ``(E, Q)`` (-1 = no class token),
            ``"pps_prob"`` ``(E, Q, N)``, the subclass's per-view outputs (see :meth:`head`) and,
            with labels, ``"correct"`` ``(E, Q)`` float.

        Raises:
            ValueError: if the shapes do not agree.
        """
        if support.dim() != 4 or query.dim() != 4 or text.dim() != 3:
            raise ValueError(
                f"expected support (E, S, T, D), query (E, Q, T, D), text (E, N, D); got "
                f"{tuple(support.shape)}, {tuple(query.shape)}, {tuple(text.shape)}"
            )
        e, s, t, d = support.shape
        q, n = query.shape[1], text.shape[1]
        if query.shape[0] != e or text.shape[0] != e or query.shape[2:] != (t, d) or text.shape[2] != d:
            raise ValueError(
                f"shape mismatch: support {tuple(support.shape)}, query {tuple(query.shape)}, text {tuple(text.shape)}"
            )
        if n == 0 or s % n:
            raise ValueError(f"S={s} supports are not a multiple of N={n} classes")

        chosen, pps_prob = self.query_choice(query, text, pps_noise)  # (E, Q), (E, Q, N)
        support_tokens = text.repeat_interleave(s // n, dim=1).reshape(e * s, d)  # support s gets class s // K
        query_tokens = token_for(text, chosen).reshape(e * q, d) if self.query_has_token else None
        frames = torch.cat([support, query], dim=1).reshape(e * (s + q), t, d)  # (E*(S+Q), T, D)
        support_out, query_out = {}, {}
        for name in self.views:
            # the extractor sees each episode's supports and queries together (batch statistics per episode)
            ctx = self.context(name, frames, e).reshape(e, s + q, t, d)  # (E, S+Q, T, D)
            fs = self.fuse(name, support.reshape(e * s, t, d), ctx[:, :s].reshape(e * s, t, d), support_tokens)
            fq = self.fuse(name, query.reshape(e * q, t, d), ctx[:, s:].reshape(e * q, t, d), query_tokens)
            support_out[name] = fs.reshape(e, s, *fs.shape[1:])  # (E, S, L, D)
            query_out[name] = fq.reshape(e, q, *fq.shape[1:])  # (E, Q, L', D)
        out = {"query_token_class": chosen, "pps_prob": pps_prob, **self.head(support_out, query_out, n)}
        if query_labels is not None:
            if query_labels.shape != (e, q):
                raise ValueError(f"query_labels shape {tuple(query_labels.shape)} != (E, Q) = {(e, q)}")
            out["correct"] = (out["logits"].argmax(dim=-1) == query_labels).float()
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
