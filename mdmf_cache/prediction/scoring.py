"""Class probabilities of unlabelled videos from a trained head and a few labelled supports per class.

:func:`class_probabilities` is what ``mdmf-cache predict`` scores with, and the Python API for the same
job on features already in memory::

    probs = class_probabilities(head, [support_a, support_b, support_c], query, text)  # (Q, N)

It uses only the head contract of :mod:`mdmf_cache.heads.base`, so any registered head works. The rules
(docs/predict.md):

* **One episode per query.** Query ``j`` is scored in its own episode, ``Q = 1``, against every support:
  a prediction depends on the supports alone, never on which other videos are being labelled (heads whose
  queries interact, such as set-matching ones, would otherwise change their answers with the folder). A
  transductive head (``SPEC.transductive``: ``mpl``, ``clip-mei``) therefore sees no other query: its answer is
  the head's with that query alone (its released test episodes have one query per class, N in all).
  A token head (``SPEC.tokens``) also takes the videos' tokens (``support_tokens``, ``query_tokens``: the
  queries' may be a function that reads a batch of them at a time) and runs the direct path.
  Heads with a per-video path (``SPEC.per_video``) run each video once and only the per-episode stage per
  query; the others run every episode through ``forward`` in batches. Both give the same logits.
* **K shots per class.** The contract needs the same K for every class. ``shot`` None takes the smallest
  class's count. A class with more than K supports is scored with ``subsets`` K-subsets of them, drawn
  with ``seed``, and the probabilities are averaged over the subsets; when every class has exactly K
  supports there is one pass with all of them.
* **Probabilities** are ``softmax(logits)`` over the N support classes, per pass, then averaged.
* **MDMF's prompt selector** (PPS) chooses each query's text token among the support classes. At
  prediction it takes the argmax of the selector's distribution by default (``pps_test="argmax"``), so
  a prediction is not a draw; ``"sample"`` keeps the run's draw, with one uniform per query that is a
  function of ``seed`` and the query's key only (:func:`query_uniforms`). Heads without a selector ignore it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from mdmf_cache import heads as head_registry
from mdmf_cache.device import heads_autocast
from mdmf_cache.data.episodes import Episodes
from mdmf_cache.errors import ConfigError

__all__ = ["class_probabilities", "support_subsets", "query_uniforms", "pps_rule"]


def support_subsets(counts: Sequence[int], shot: int | None = None, subsets: int = 10,
                    seed: int = 0) -> tuple[int, list[list[np.ndarray]]]:
    """K and the support subsets scored: one list of per-class index arrays (each of length K) per pass.

    Every class with exactly K supports: one pass with all of them. Otherwise ``subsets`` passes, each
    with K supports of every class drawn without replacement (sorted; a class with K supports takes all
    of them every time) from ``numpy.random.default_rng([seed, 11])``.

    Raises:
        ConfigError: a class without supports, fewer than 2 classes, or ``shot`` above the smallest count.
    """
    counts = [int(c) for c in counts]
    if len(counts) < 2:
        raise ConfigError(f"{len(counts)} support class(es): a prediction needs at least 2 classes to choose between")
    if min(counts) < 1:
        raise ConfigError(f"support class {counts.index(min(counts))} has no support video")
    k = min(counts) if shot is None else int(shot)
    if k < 1:
        raise ConfigError(f"shot {k}: must be >= 1")
    if k > min(counts):
        raise ConfigError(f"shot {k}: the smallest support class has {min(counts)} videos; pass a shot of at most "
                          f"{min(counts)} or add supports")
    if all(c == k for c in counts):
        return k, [[np.arange(k) for _ in counts]]
    rng = np.random.default_rng([seed, 11])
    return k, [[np.sort(rng.choice(c, k, replace=False)) if c > k else np.arange(k) for c in counts]
               for _ in range(subsets)]


def query_uniforms(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """``(Q,)`` uniforms in [0, 1) for the PPS draws (``pps_test="sample"``), one per query, each a function
    of ``seed`` and the query's key (its path) only: a query draws the same token whatever else is labelled."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        out[i] = np.random.default_rng([seed, 5, h]).random()
    return out


@contextlib.contextmanager
def pps_rule(head, rule: str | None):
    """Within the block, a head with a prompt selector (``head.pps.test_rule``: MDMF) uses ``rule`` at eval
    (``argmax`` or ``sample``); other heads, and ``rule`` None, are left as they are."""
    pps = getattr(head, "pps", None)
    if rule is None or not hasattr(pps, "test_rule"):
        yield
        return
    old = pps.test_rule
    pps.test_rule = rule
    try:
        yield
    finally:
        pps.test_rule = old


def _episodes(passes: list[list[np.ndarray]], counts: list[int], num_query: int) -> Episodes:
    """Episodes over rows ``[every support, class after class; the Q queries]``: for pass p and query j (episode
    ``p * Q + j``) the supports of pass p, class-major, and query j alone."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    support = np.stack([np.concatenate([o + idx for o, idx in zip(offsets, picks)]) for picks in passes])  # (P, S)
    p, s, q, n = len(passes), support.shape[1], num_query, len(counts)
    e = p * q
    zeros = np.zeros((e, 1), dtype=np.int64)
    return Episodes(classes=np.broadcast_to(np.arange(n), (e, n)).copy(), support=np.repeat(support, q, axis=0),
                    query=np.tile(sum(counts) + np.arange(q), p).reshape(e, 1), query_labels=zeros,
                    support_view=np.zeros((e, s), dtype=np.int64), query_view=zeros)


@torch.no_grad()
def _logits(head, support: Sequence[Tensor], passes: list[list[np.ndarray]], query: Tensor, text: Tensor,
            uniforms: np.ndarray, batch_size: int, path: str, support_tokens: Sequence[Tensor] | None = None,
            query_tokens: QueryTokens | None = None) -> Tensor:
    """``(P, Q, N)`` logits of every pass and query, one episode per (pass, query) (module docstring)."""
    q, n, dev = query.shape[0], text.shape[0], query.device
    if support_tokens is not None:  # a token head: the direct path, each batch's query tokens fetched as it comes
        return _token_logits(head, support, passes, query, text, uniforms, batch_size, support_tokens, query_tokens)
    if path == "per-video" and head_registry.get(head.method).per_video:
        # one scorer for every pass: each video's own work once, the per-episode stage per (pass, query)
        episodes = _episodes(passes, [x.shape[0] for x in support], q)
        e = len(episodes)
        scorer = head.per_video(torch.cat([*support, query]), text, episodes, np.tile(uniforms, len(passes)).reshape(e, 1),
                                batch_size)
        logits = torch.cat([scorer.logits(lo, min(lo + batch_size, e)) for lo in range(0, e, batch_size)])  # (P*Q, 1, N)
        return logits.float().reshape(len(passes), q, n)
    out = []
    with heads_autocast(dev):
        for picks in passes:
            chosen = torch.cat([x[torch.as_tensor(idx, device=dev)] for x, idx in zip(support, picks)])  # (S, T, D) class-major
            for lo in range(0, q, batch_size):
                hi = min(lo + batch_size, q)
                e = hi - lo  # episodes of this batch: one per query
                u = torch.as_tensor(uniforms[lo:hi].reshape(e, 1), device=dev)
                logits = head(chosen.expand(e, *chosen.shape), query[lo:hi].unsqueeze(1), text.expand(e, *text.shape),
                              pps_noise=u)["logits"]  # (E, 1, N)
                out.append(logits[:, 0].float())
    return torch.cat(out).reshape(len(passes), q, n)


#: A token head's query tokens: ``(Q, T, L, P, Dt)``, or ``(lo, hi) -> (hi - lo, T, L, P, Dt)`` for queries
#: ``lo:hi`` (read as they are scored: a folder of queries need not fit in memory).
QueryTokens = Union[Tensor, Callable[[int, int], Tensor]]


def _token_logits(head, support, passes, query, text, uniforms, batch_size, support_tokens, query_tokens) -> Tensor:
    q, n, dev = query.shape[0], text.shape[0], query.device
    fetch = query_tokens if callable(query_tokens) else (lambda lo, hi: query_tokens[lo:hi])
    out = torch.empty(len(passes), q, n, device=dev)
    with heads_autocast(dev):
        for lo in range(0, q, batch_size):  # queries outer: each batch's tokens read once for every pass
            hi = min(lo + batch_size, q)
            e = hi - lo  # episodes of this batch: one per query
            qt = fetch(lo, hi).to(dev).float().unsqueeze(1)  # (E, 1, T, L, P, Dt)
            u = torch.as_tensor(uniforms[lo:hi].reshape(e, 1), device=dev)
            for i, picks in enumerate(passes):
                pick = [torch.as_tensor(idx, device=dev) for idx in picks]
                chosen = torch.cat([x[k] for x, k in zip(support, pick)])  # (S, T, D) class-major
                chosen_t = torch.cat([x.to(dev)[k] for x, k in zip(support_tokens, pick)]).float()  # (S, T, L, P, Dt)
                logits = head(chosen.expand(e, *chosen.shape), query[lo:hi].unsqueeze(1), text.expand(e, *text.shape),
                              pps_noise=u, support_tokens=chosen_t.expand(e, *chosen_t.shape), query_tokens=qt)["logits"]
                out[i, lo:hi] = logits[:, 0].float()  # (E, N)
    return out


def class_probabilities(head, support: Sequence[Tensor], query: Tensor, text: Tensor, *, shot: int | None = None,
                        subsets: int = 10, seed: int = 0, pps_test: str | None = "argmax",
                        query_keys: Sequence[str] | None = None, batch_size: int = 128,
                        path: str = "per-video", support_tokens: Sequence[Tensor] | None = None,
                        query_tokens: QueryTokens | None = None) -> Tensor:
    """Probabilities of every query over the support classes (the rules are the module docstring's).

    Args:
        head: a trained head in eval mode (``mdmf_cache.heads.factory.load_head``).
        support: N tensors ``(K_c, T, D)``, the frame features of class c's supports (class order = column order).
        query: ``(Q, T, D)`` the query videos' frame features.
        text: ``(N, D)`` the classes' prompt embeddings, in the same order.
        shot: K per class and pass (None: the smallest class's count).
        subsets: passes averaged when some class has more than K supports.
        seed: the subsets' and the PPS draws' seed.
        pps_test: a prompt selector's rule (``argmax``, ``sample``; None: the run's).
        query_keys: one key per query for its PPS uniform (default: its index).
        batch_size: queries (episodes) per forward pass.
        path: ``per-video`` (heads that have it) or ``direct`` (every episode through ``forward``; same logits).
        support_tokens: a token head's (``SPEC.tokens``): N tensors ``(K_c, T, L, P, Dt)``, the supports' tokens.
        query_tokens: a token head's: :data:`QueryTokens` of the queries (both or neither; the direct path).

    Returns:
        ``(Q, N)`` float64 on the CPU; every row sums to 1.

    Raises:
        ConfigError: fewer than 2 classes, a class without supports, or ``shot`` above a class's count.
        ValueError: shapes that do not agree, or a head in training mode.
    """
    if head.training:
        raise ValueError("class_probabilities needs the head in eval mode (head.eval())")
    if (support_tokens is None) != (query_tokens is None) or (
            support_tokens is None and head_registry.get(head.method).tokens):
        raise ValueError(f"{head.method}: give both support_tokens and query_tokens to a token head, neither otherwise")
    if path not in ("per-video", "direct"):
        raise ValueError(f"path {path!r}: choose 'per-video' or 'direct'")
    n = len(support)
    if text.dim() != 2 or text.shape[0] != n:
        raise ValueError(f"text {tuple(text.shape)}: expected (N, D) with N = {n} support classes")
    if query.dim() != 3 or any(x.dim() != 3 or x.shape[1:] != query.shape[1:] for x in support):
        raise ValueError(f"expected supports (K_c, T, D) and query (Q, T, D) of the same T, D; got "
                         f"{[tuple(x.shape) for x in support]}, {tuple(query.shape)}")
    _, passes = support_subsets([x.shape[0] for x in support], shot, subsets, seed)
    keys = [str(i) for i in range(query.shape[0])] if query_keys is None else list(query_keys)
    uniforms = query_uniforms(keys, seed)  # (Q,) used only by a selector that draws
    dev = query.device
    if query.shape[0] == 0:
        return torch.zeros(0, n, dtype=torch.float64)
    with pps_rule(head, pps_test), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        logits = _logits(head, [x.to(dev).float() for x in support], passes, query.float(), text.to(dev).float(),
                         uniforms, batch_size, path, support_tokens, query_tokens)  # (P, Q, N)
    return torch.softmax(logits.double(), dim=-1).mean(dim=0).cpu()  # (Q, N)
