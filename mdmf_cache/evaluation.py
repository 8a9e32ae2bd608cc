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

The PPS draws of both paths use the same seeded uniforms, one per (episode, query), a function of the
seed and the episode list only, so both paths (and every batch size) make the same draws.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import heads as head_registry
from .backbone import heads_autocast
from .baselines import BASELINES, get_baseline
from .episodes import EpisodeSampler, Episodes, gather, mean_ci
from .heads.spec import DataInfo
from .configs import EvalConfig
from .errors import ConfigError
from .store import FeatureSplit

log = logging.getLogger(__name__)

# (support (E,S,T,D), query (E,Q,T,D), text (E,N,D), pps uniforms (E,Q)) -> logits (E,Q,N)
LogitsFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: What ``eval`` scores: ``run`` (the head a run was trained with), a registered head, or a training-free baseline.
METHODS = ("run", *head_registry.METHODS, *BASELINES)


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
) -> EvalResult:
    """Direct path: score ``episodes`` in batches of ``batch_size`` with ``logits_fn``.

    Args:
        logits_fn: the method, e.g. a model in eval mode wrapped to return its logits.
        split: features on the compute device.
        episodes: the fixed episode list.
        on_batch: called with the number of episodes just scored (progress bars).
        uniforms: ``(E, Q)`` PPS uniforms (default: zeros; baselines ignore them).
        keep_logits: also return every episode's logits.
    """
    dev = split.features.device
    tally = _Tally(split.num_classes, dev, keep_logits)
    if uniforms is None:
        uniforms = np.zeros(episodes.query.shape)
    for lo in range(0, len(episodes), batch_size):
        ep = episodes[lo : lo + batch_size]
        support, query, text, _ = gather(split.features, split.text, ep)
        logits = logits_fn(support, query, text, torch.as_tensor(uniforms[lo : lo + batch_size], device=dev))
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


def head_logits(model) -> LogitsFn:
    """An eval-mode head as a LogitsFn (the direct path)."""
    return lambda support, query, text, u: model(support, query, text, pps_noise=u)["logits"]


def parameter_free_head(method: str, split: FeatureSplit):
    """A registered head without parameters (OTAM, TSN), built for the split's width and frames, in eval mode."""
    spec = head_registry.get(method)
    _, _, t, d = split.features.shape
    info = DataInfo(dim=int(d), num_frames=int(t), num_classes=split.num_classes)
    return spec.build(spec.make_options(None, {}, info)).to(split.features.device).eval()


def score(method: str, split: FeatureSplit, episodes: Episodes, model=None, seed: int = 0, batch_size: int = 500,
          on_batch: Callable[[int], None] | None = None, path: str = "per-video",
          keep_logits: bool = False) -> EvalResult:
    """Score one method on one episode list.

    Args:
        method: the head's registry name (``model`` given, or a head without parameters) or a baseline.
        model: a trained head in eval mode (None: a baseline, or a head without parameters built here).
        path: ``per-video`` (heads that declare it; the others and the baselines take the direct path)
            or ``direct``.

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
        if path == "per-video" and head_registry.get(model.method).per_video:
            return evaluate_per_video(model, split, episodes, uniforms, batch_size, on_batch, keep_logits)
        with heads_autocast(dev):
            return evaluate_episodes(head_logits(model), split, episodes, batch_size, on_batch, uniforms, keep_logits)


# ----------------------------------------------------------------------- scoring a run or a baseline


def episode_list(split: FeatureSplit, way: int, shot: int, queries: int, n: int, seed: int) -> Episodes:
    """The seeded test episode list: a function of (split labels, way, shot, queries, n, seed) only."""
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    return sampler.sample(n, way, shot, queries, np.random.default_rng([seed, 2, shot]))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate; returns the results dict that is also written to ``results.json``."""
    from mdmf_cache.backbone import resolve_device
    from mdmf_cache.fileio import atomic_write_json, writing
    from mdmf_cache.errors import CacheError
    from mdmf_cache.runs import check_identity, full_run_cache, load_run, read_run_file, run_cache
    from mdmf_cache.store import load_split_features

    cfg.validate()
    target = Path(cfg.target)
    device = resolve_device(cfg.device)
    model = None
    method, trained_shot = cfg.method, None
    # 1. what is scored
    full_mode = False
    if (target / "config.json").is_file() and (target / "best.pt").is_file():
        run_cfg = read_run_file(target / "config.json")
        if run_cfg.get("mode") == "full":  # the fine-tuned backbone's features: extracted here, extended when the tree grew
            full_mode = cfg.cache is None
            cache = full_run_cache(target, run_cfg, cfg.split, str(device), cfg.cache, progress, cfg.way, cfg.root,
                                   cfg.eval_cache)
        else:
            cache = run_cache(target, run_cfg, cfg.cache)
            check_identity(run_cfg.get("cache_identity"), cache, f"eval {target}")
        trained_shot = int(run_cfg.get("shot", 5))
        run_method = run_cfg.get("method", "mdmf")
        if method in ("run", *head_registry.METHODS):
            if method != "run" and method != run_method:
                raise ConfigError(f"--method {method}: {target} was trained as {run_method}; evaluate a "
                                  f"{method} run (mdmf-cache train CACHE --method {method}) on the same --seed "
                                  "for identical episodes, or compare both in one table with mdmf-cache compare "
                                  f"CACHE --methods {run_method},{method}")
            method = run_method
            model, _ = load_run(target, str(device))
            if cfg.pps_test and method == "mdmf":  # the same trained heads under the other test rule
                model.cfg.pps_test = model.pps.test_rule = cfg.pps_test
        default_out = target / f"eval_{method}_{cfg.split}"
    elif (target / "zarr.json").is_file():
        cache = str(target)
        if method == "run" or (method in head_registry.METHODS and method not in head_registry.parameter_free()):
            scored = ", ".join((*head_registry.parameter_free(), *BASELINES))
            raise ConfigError(f"{target} is a cache: a trained head needs its run directory "
                              f"(mdmf-cache train {target} --out runs/NAME), or pick one that needs no training: {scored}")
        default_out = target.parent / f"eval_{target.stem}_{method}_{cfg.split}"
    else:
        raise ConfigError(f"{target} is neither a run directory (config.json + best.pt) nor a cache (*.zarr)")
    shots = cfg.shots or ((trained_shot,) if trained_shot else (1, 3, 5))
    # 2. features; every shot checked against the split before anything is scored or written
    try:
        split = load_split_features(cache, cfg.split, device=str(device))
    except CacheError as e:
        if not full_mode:
            raise
        # the run's own eval cache, damaged in a way its extract rerun did not repair: made again from the videos
        log.warning("%s", e)
        cache = full_run_cache(target, run_cfg, cfg.split, str(device), None, progress, cfg.way, cfg.root,
                               cfg.eval_cache, rebuild=True)
        split = load_split_features(cache, cfg.split, device=str(device))
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    for shot in shots:
        sampler.check(cfg.way, shot, cfg.queries_per_class, split=cfg.split)
    out = Path(cfg.out) if cfg.out else default_out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e.strerror}): pass --out DIR on writable storage") from e
    atomic_write_json(out / "eval_config.json", asdict(cfg))
    # 3. episodes and scores
    results: dict[str, Any] = {"method": method, "split": cfg.split, "target": str(target), "cache": cache,
                               "way": cfg.way, "queries_per_class": cfg.queries_per_class, "seed": cfg.seed,
                               "trained_shot": trained_shot, "shots": {}}
    if model is not None and method == "mdmf":
        results["pps_test"] = model.cfg.pps_test
    bar = None
    if progress:
        from mdmf_cache.progress import make_progress

        bar = make_progress("episodes")
        bar.start()
    try:
        for shot in shots:
            eps = episode_list(split, cfg.way, shot, cfg.queries_per_class, cfg.episodes, cfg.seed)
            with writing(out / f"episodes_{cfg.way}way_{shot}shot.npz"):
                eps.save(out / f"episodes_{cfg.way}way_{shot}shot.npz")
            task = bar.add_task(f"{method} {shot}-shot", total=len(eps)) if bar else None
            res = score(method, split, eps, model, cfg.seed, cfg.batch_size,
                        (lambda k, t=task: bar.advance(t, k)) if bar else None, path=cfg.path)
            results["shots"][str(shot)] = res.summary(split.class_names)
            with writing(out / f"episode_acc_{shot}shot.npy"):
                np.save(out / f"episode_acc_{shot}shot.npy", res.episode_acc)
    finally:
        if bar:
            bar.stop()
    atomic_write_json(out / "results.json", results)
    from mdmf_cache.plots import eval_figures, plot_safely

    plot_safely(eval_figures, out)
    results["out"] = str(out)
    return results
