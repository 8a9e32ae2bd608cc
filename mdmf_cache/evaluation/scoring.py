"""Episode evaluation on in-memory features: accuracy per episode and per class.

Two paths give the same logits:

* **direct** (:func:`evaluate_episodes`): gather each batch of episodes and run the method on it.
  Used for the training-free baselines and for heads that cannot be split per video (HyRSM: every
  support's representation depends on the query and the whole episode), and kept as the reference.
* **per video** (:func:`evaluate_per_video`, the default for heads whose ``SPEC.per_video`` is True):
  in eval mode the per-video part of such a head depends only on the video (and, for MDMF, the text
  token it is paired with). The head's scorer (``head.per_video``) runs that part once per distinct
  video (or (video, token) pair) the episode list uses, and only the per-episode stage (prototypes,
  distances, OTAM) per episode. 10,000 episodes over a test split of a few thousand videos cost about
  as much as running those videos through the head a few times, instead of 300,000 times.
* **tokens** (:func:`evaluate_token_episodes`, a token head's only path: ``SPEC.tokens`` set, ``per_video``
  False): the direct path, chunk by chunk, with each chunk's tokens read through the split's
  :class:`~mdmf_cache.store.tokens.TokenReader` (``split.tokens``) while the next chunk's rows are prefetched.

The PPS draws of both paths use the same seeded uniforms, one per (episode, query), a function of the
seed and the episode list only, so both paths (and every batch size) make the same draws.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mdmf_cache import heads as head_registry
from mdmf_cache.device import heads_autocast
from mdmf_cache.evaluation.baselines import get_baseline
from mdmf_cache.data.episodes import EpisodeSampler, Episodes, gather, mean_ci
from mdmf_cache.heads.base import FewShotHead
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.store.read import FeatureSplit
from mdmf_cache.store.tokens import DEFAULT_BUDGET, TokenReader, episode_rows, episode_tokens

log = logging.getLogger(__name__)

# (support (E,S,T,D), query (E,Q,T,D), text (E,N,D), pps uniforms (E,Q)) -> logits (E,Q,N)
LogitsFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class EvalResult:
    """Accuracy over a list of episodes.

    Attributes:
        episode_acc: (E,) fraction of correct queries per episode.
        class_correct / class_total: (C,) per split class, over all queries.
        logits: (E, Q, N) float32 on the CPU when asked for (``keep_logits``), else None.
        fused: sequences fused per view by the per-video path (distinct (video, token) pairs), else None.
    """

    episode_acc: np.ndarray
    class_correct: np.ndarray
    class_total: np.ndarray
    logits: np.ndarray | None = None
    fused: int | None = None

    @property
    def mean(self) -> float:
        return mean_ci(self.episode_acc)[0]

    @property
    def ci95(self) -> float:
        return mean_ci(self.episode_acc)[1]

    def summary(self, classes: list[str] | None = None) -> dict:
        mean, ci = mean_ci(self.episode_acc * 100)
        out = {"accuracy": mean, "ci95": ci, "episodes": int(len(self.episode_acc))}
        if classes is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                per = self.class_correct / self.class_total * 100
            out["per_class"] = {c: (None if self.class_total[i] == 0 else float(per[i])) for i, c in enumerate(classes)}
        return out


def pps_uniforms(episodes: Episodes, seed: int) -> np.ndarray:
    """The seeded uniforms of the PPS draws at test, ``(E, Q)`` float64: a function of (seed, episode count, Q)."""
    return np.random.default_rng([seed, 3]).random(episodes.query.shape)


class _Tally:
    """Accumulates per-episode and per-class accuracy (on the device; one copy to the host at the end)."""

    def __init__(self, num_classes: int, device: torch.device, keep_logits: bool) -> None:
        self.accs: list[Tensor] = []
        self.logits: list[Tensor] | None = [] if keep_logits else None
        self.correct_c = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.total_c = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, logits: Tensor, ep: Episodes) -> None:
        labels = torch.as_tensor(ep.query_labels, device=logits.device)  # (E, Q)
        correct = (logits.argmax(dim=-1) == labels).double()  # (E, Q)
        self.accs.append(correct.mean(dim=1))
        true_cls = torch.as_tensor(ep.classes, device=logits.device).gather(1, labels)  # (E, Q) split class
        self.correct_c.index_add_(0, true_cls.flatten(), correct.flatten())
        self.total_c.index_add_(0, true_cls.flatten(), torch.ones_like(correct.flatten()))
        if self.logits is not None:
            self.logits.append(logits.float().cpu())

    def result(self) -> EvalResult:
        acc = torch.cat(self.accs).cpu().numpy() if self.accs else np.empty(0, dtype=np.float64)
        logits = torch.cat(self.logits).numpy() if self.logits else None
        return EvalResult(acc, self.correct_c.cpu().numpy(), self.total_c.cpu().numpy(), logits)


@torch.no_grad()
def evaluate_episodes(
    logits_fn: LogitsFn,
    split: FeatureSplit,
    episodes: Episodes,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
    uniforms: np.ndarray | None = None,
    keep_logits: bool = False,
    inputs: Callable[[int, int], dict] | None = None,
) -> EvalResult:
    """Direct path: score ``episodes`` in batches of ``batch_size`` with ``logits_fn``.

    Args:
        logits_fn: the method, e.g. a model in eval mode wrapped to return its logits.
        split: features on the compute device.
        episodes: the fixed episode list.
        on_batch: called with the number of episodes just scored (progress bars).
        uniforms: ``(E, Q)`` PPS uniforms (default: zeros; baselines ignore them).
        keep_logits: also return every episode's logits.
        inputs: ``(lo, hi) -> kwargs`` given to ``logits_fn`` besides the features, for episodes ``lo:hi`` (a token
            head's tokens).
    """
    dev = split.features.device
    tally = _Tally(split.num_classes, dev, keep_logits)
    if uniforms is None:
        uniforms = np.zeros(episodes.query.shape)
    for lo in range(0, len(episodes), batch_size):
        ep = episodes[lo : lo + batch_size]
        support, query, text, _ = gather(split.features, split.text, ep)
        extra = inputs(lo, lo + len(ep)) if inputs is not None else {}
        logits = logits_fn(support, query, text, torch.as_tensor(uniforms[lo : lo + batch_size], device=dev), **extra)
        tally.add(logits, ep)  # (E, Q, N)
        if on_batch:
            on_batch(len(ep))
    return tally.result()


@torch.no_grad()
def evaluate_per_video(
    model,
    split: FeatureSplit,
    episodes: Episodes,
    uniforms: np.ndarray,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
    keep_logits: bool = False,
) -> EvalResult:
    """Per-video path of a head in eval mode (see the module docstring); the direct path's logits.

    Args:
        model: a head whose ``SPEC.per_video`` is True, in eval mode.
        split: features on the compute device (view 0 of every video: val/test caches hold one view).
        episodes: the fixed episode list.
        uniforms: ``(E, Q)`` PPS uniforms, as given to the direct path.
        batch_size: episodes per batch (and the scorer's per-video batches, times 30).
        on_batch: called with the number of episodes just scored.
        keep_logits: also return every episode's logits.
    """
    if model.training:
        raise ValueError("the per-video path needs the model in eval mode (dropout off, running statistics)")
    scorer = model.per_video(split.features[:, 0], split.text, episodes, uniforms, batch_size)  # per-video work, once
    tally = _Tally(split.num_classes, split.features.device, keep_logits)
    for lo in range(0, len(episodes), batch_size):
        hi = min(lo + batch_size, len(episodes))
        tally.add(scorer.logits(lo, hi), episodes[lo:hi])  # per-episode work
        if on_batch:
            on_batch(hi - lo)
    result = tally.result()
    result.fused = scorer.fused
    return result


@torch.no_grad()
def evaluate_token_episodes(
    model,
    split: FeatureSplit,
    episodes: Episodes,
    uniforms: np.ndarray,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
    keep_logits: bool = False,
) -> EvalResult:
    """A token head on the direct path: chunks of episodes small enough that their tokens fit the reader's budget
    (:meth:`~mdmf_cache.store.tokens.TokenReader.chunk_episodes`, at most ``batch_size``), each chunk's tokens read
    through ``split.tokens`` while the next chunk's rows are prefetched.

    Raises:
        ValueError: ``split.tokens`` is not set (whoever loads the split opens its reader).
    """
    reader = split.tokens
    if reader is None:
        raise ValueError(f"{model.method} reads tokens: open the split's TokenReader as split.tokens first")
    dev = split.features.device

    def tokens(lo: int, hi: int) -> dict:
        support_tokens, query_tokens = episode_tokens(reader, episodes[lo:hi], dev)  # (E,S,T,L,P,Dt) (E,Q,T,L,P,Dt)
        if hi < len(episodes):  # the next chunk read while the head computes this one
            reader.prefetch(episode_rows(episodes[hi : 2 * hi - lo]))
        return {"support_tokens": support_tokens, "query_tokens": query_tokens}

    step = reader.chunk_episodes(episodes.support.shape[1] + episodes.query.shape[1], batch_size)
    return evaluate_episodes(head_logits(model), split, episodes, step, on_batch, uniforms, keep_logits, tokens)


def head_logits(model) -> LogitsFn:
    """An eval-mode head as a LogitsFn (the direct path; a token head's tokens as keyword arguments)."""
    return lambda support, query, text, u, **tokens: model(support, query, text, pps_noise=u, **tokens)["logits"]


def parameter_free_head(method: str, split: FeatureSplit):
    """A registered head without parameters (OTAM, TSN), built for the split's width and frames, in eval mode."""
    spec = head_registry.get(method)
    _, _, t, d = split.features.shape
    info = DataInfo(dim=int(d), num_frames=int(t), num_classes=split.num_classes,
                    tokens=split.tokens.info if split.tokens is not None and spec.tokens else None)
    return spec.build(spec.make_options(None, {}, info)).to(split.features.device).eval()


def score(method: str, split: FeatureSplit, episodes: Episodes, model=None, seed: int = 0, batch_size: int = 500,
          on_batch: Callable[[int], None] | None = None, path: str = "per-video",
          keep_logits: bool = False) -> EvalResult:
    """Score one method on one episode list.

    Args:
        method: the head's registry name (``model`` given, or a head without parameters) or a baseline.
        model: a trained head in eval mode (None: a baseline, or a head without parameters built here).
        path: ``per-video`` (heads that declare it; the others and the baselines take the direct path)
            or ``direct``; a token head always takes :func:`evaluate_token_episodes`.

    The PPS draws use :func:`pps_uniforms` (seeded). torch's RNG is forked, so a caller's training RNG
    stream is untouched.
    """
    if path not in ("per-video", "direct"):
        raise ValueError(f"path {path!r}: choose 'per-video' or 'direct'")
    if model is None and method in head_registry.parameter_free():
        model = parameter_free_head(method, split)
    dev = split.features.device
    uniforms = pps_uniforms(episodes, seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if model is None:  # a training-free baseline
            baseline = get_baseline(method)
            with torch.autocast(dev.type, enabled=False):
                return evaluate_episodes(lambda support, query, text, u: baseline(support, query, text), split,
                                         episodes, batch_size, on_batch, uniforms, keep_logits)
        if head_registry.get(model.method).tokens:  # one path: the direct one, through the token reader
            with heads_autocast(dev):
                return evaluate_token_episodes(model, split, episodes, uniforms, batch_size, on_batch, keep_logits)
        if path == "per-video" and head_registry.get(model.method).per_video:
            return evaluate_per_video(model, split, episodes, uniforms, batch_size, on_batch, keep_logits)
        with heads_autocast(dev):
            return evaluate_episodes(head_logits(model), split, episodes, batch_size, on_batch, uniforms, keep_logits)


# ----------------------------------------------------------------------- scoring a run or a baseline


class TokenSplits:
    """The split as each method reads it, for a recipe that scores several on one split (compare, ablate): the
    split itself, or for a token head (``SPEC.tokens``) the split with a :class:`TokenReader` of its tokens, one
    reader for all of them, opened on first use and stopped by :meth:`close` (or the ``with`` block's end).

    ``splits(method)`` raises the reader's one-line CacheError when the cache has no token arrays."""

    def __init__(self, split: FeatureSplit, cache: str | Path, name: str, budget: int = DEFAULT_BUDGET) -> None:
        self.split, self.cache, self.name, self.budget = split, cache, name, budget
        self.reader: TokenReader | None = None

    def __call__(self, method: str) -> FeatureSplit:
        spec = head_registry.get(method).tokens if method in head_registry.METHODS else None
        if not spec:
            return self.split
        if self.reader is None:
            self.reader = TokenReader(self.cache, self.name, self.budget, spec)
        return dataclasses.replace(self.split, tokens=self.reader)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> "TokenSplits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def episode_list(split: FeatureSplit, way: int, shot: int, queries: int, n: int, seed: int) -> Episodes:
    """The seeded test episode list: a function of (split labels, way, shot, queries, n, seed) only."""
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    return sampler.sample(n, way, shot, queries, np.random.default_rng([seed, 2, shot]))


def validate(model: FewShotHead, split: FeatureSplit, episodes: Episodes, seed: int) -> float:
    """Mean val accuracy (%) on the fixed list, per-video path where the head has one (RNG forked: training
    draws are unaffected)."""
    was_training = model.training
    model.eval()
    acc = score(model.method, split, episodes, model, seed).mean * 100
    model.train(was_training)
    return acc
