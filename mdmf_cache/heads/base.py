"""What every head module shares: the forward/loss contract, shape checks, episode-label helpers, the
released code's cross-entropy, and the per-video scoring protocol.

The contract (``forward``)::

    support (E, S, T, D)   class-major: support s belongs to episode class s // K, K = S // N
    query   (E, Q, T, D)
    text    (E, N, D)      the episode classes' prompt embeddings, in episode-class order
    query_labels (E, Q)    optional; adds "correct"
    pps_noise    (E, Q)    optional uniforms for heads that draw (MDMF's prompt selector)
    classes      (E, N)    optional split class ids of the episode classes (auxiliary classification losses)
    class_text   (C, D)    optional prompt embeddings of every class of the split (CLIP-FSAR's text loss)
    support_tokens (E, S, T, L, P, Dt)  a token head's (``SPEC.tokens`` set): the cached tokens of the
    query_tokens   (E, Q, T, L, P, Dt)  same videos and view, L layers in the cache's order, P tokens per
                                        frame (class token first where the cache has one), float32
    -> {"logits": (E, Q, N), ...}

``loss(out, labels, classes)`` returns the scalar loss (per episode as the released code computes
it for one episode, then the **mean over the E episodes**: a batch of E episodes trains like E
single-episode passes whose gradients are averaged) and detached 0-dim parts (``main``,
``total``, and the head's own terms).

Per-video scoring (heads whose ``SPEC.per_video`` is True): ``head.per_video(features, text,
episodes, uniforms, batch_size)`` returns a :class:`PerVideoScorer` that has done each video's work
once and scores episodes ``lo:hi`` on demand with the same logits as ``forward`` in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mdmf_cache.device import at_least_float32

__all__ = ["FewShotHead", "PerVideoScorer", "check_episode_shapes", "episode_ce", "support_classes",
           "query_classes", "class_means", "with_correct", "in_chunks"]


class PerVideoScorer(Protocol):
    """Episodes scored from per-video work done once (see the module docstring)."""

    #: sequences the per-video stage computed (distinct (video, token) pairs, videos, ...), for reports
    fused: int

    def logits(self, lo: int, hi: int) -> Tensor:
        """``(hi - lo, Q, N)`` logits of episodes ``lo:hi`` of the list the scorer was made for."""
        ...


class FewShotHead(nn.Module):
    """Base of every head: ``method`` (its registry name), ``options`` (its resolved options dataclass),
    and the released code's default loss, cross-entropy averaged over each episode's queries."""

    method: str = ""
    options: Any

    def loss(self, out: dict[str, Tensor], labels: Tensor, classes: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``F.cross_entropy`` (mean over the queries) per episode, then the mean over episodes."""
        main = episode_ce(out["logits"], labels)
        return main, {"main": main.detach(), "total": main.detach()}

    def per_video(self, features: Tensor, text: Tensor, episodes, uniforms: np.ndarray, batch_size: int = 500) -> PerVideoScorer:
        raise NotImplementedError(f"{self.method} has no per-video evaluation path")


def check_episode_shapes(support: Tensor, query: Tensor, text: Tensor) -> tuple[int, int, int, int, int, int]:
    """``(E, S, Q, N, T, D)`` of an episode batch; a ValueError naming the shapes when they do not agree."""
    if support.dim() != 4 or query.dim() != 4 or text.dim() != 3:
        raise ValueError(f"expected support (E, S, T, D), query (E, Q, T, D), text (E, N, D); got "
                         f"{tuple(support.shape)}, {tuple(query.shape)}, {tuple(text.shape)}")
    e, s, t, d = support.shape
    q, n = query.shape[1], text.shape[1]
    if query.shape[0] != e or text.shape[0] != e or query.shape[2:] != (t, d) or text.shape[2] != d:
        raise ValueError(f"shape mismatch: support {tuple(support.shape)}, query {tuple(query.shape)}, "
                         f"text {tuple(text.shape)}")
    if n == 0 or s % n:
        raise ValueError(f"S={s} supports are not a multiple of N={n} classes")
    return e, s, q, n, t, d


def episode_ce(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of each episode's queries (``mean``: the released code's ``F.cross_entropy``; ``sum``:
    summed over the queries), then the mean over episodes: ``(E, Q, N), (E, Q) -> ()``."""
    e, q, n = logits.shape
    ce = F.cross_entropy(at_least_float32(logits.reshape(e * q, n)), labels.reshape(e * q), reduction="none").reshape(e, q)
    return (ce.sum(dim=1) if reduction == "sum" else ce.mean(dim=1)).mean()


def support_classes(classes: Tensor, s: int) -> Tensor:
    """Split class of every support: ``classes (E, N)``, S class-major supports -> ``(E, S)``."""
    return classes.repeat_interleave(s // classes.shape[1], dim=1)


def query_classes(classes: Tensor, labels: Tensor) -> Tensor:
    """Split class of every query: ``classes (E, N)``, episode labels ``(E, Q)`` -> ``(E, Q)``."""
    return classes.gather(1, labels)


def class_means(x: Tensor, n: int) -> Tensor:
    """Mean over the K shots: ``(E, S, ...)`` class-major -> ``(E, N, ...)``."""
    e, s = x.shape[:2]
    return x.reshape(e, n, s // n, *x.shape[2:]).mean(dim=2)


def with_correct(out: dict[str, Tensor], query_labels: Tensor | None) -> dict[str, Tensor]:
    """``out`` plus ``"correct"`` ``(E, Q)`` float when labels are given (a ValueError if their shape is off)."""
    if query_labels is not None:
        if query_labels.shape != out["logits"].shape[:2]:
            raise ValueError(f"query_labels shape {tuple(query_labels.shape)} != (E, Q) = {tuple(out['logits'].shape[:2])}")
        out["correct"] = (out["logits"].argmax(dim=-1) == query_labels).float()
    return out


def in_chunks(fn: Callable[[int, int], Any], e: int, per_episode: int, budget: int) -> Any:
    """``fn(lo, hi)`` on episodes ``lo:hi`` in chunks of at most ``budget // per_episode`` episodes (at least one),
    concatenated along the episodes: a Tensor, or a dict of Tensors key by key. How a head's direct evaluation
    path bounds its memory: episodes are independent, so the chunks give the logits of one pass."""
    step = max(1, budget // max(per_episode, 1))
    parts = [fn(lo, min(lo + step, e)) for lo in range(0, e, step)]
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return torch.cat(parts)
