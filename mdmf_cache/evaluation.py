"""Episode evaluation on in-memory features: accuracy per episode and per class.

Two paths give the same logits:

* **direct** (:func:`evaluate_episodes`): gather each batch of episodes and run the method on it.
  Used for the training-free baselines, and kept as the reference for the trained heads.
* **per video** (:func:`evaluate_per_video`, the default for trained heads): in eval mode every
  per-video part of a head depends only on the video and the text token it is paired with (the
  extractors on the video alone, the fusion on (video, token)). So the expensive stages run once
  per distinct (video, token) pair that the episode list uses, and only prototypes, frame
  distances and OTAM run per episode. 10,000 episodes over a test split of a few thousand videos
  cost about as much as fusing those videos a few times, instead of 300,000 fusions.

The PPS draws of both paths use the same seeded uniforms, one per (episode, query), a function of the
seed and the episode list only, so both paths (and every batch size) make the same draws.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .backbone import heads_autocast
from .baselines import BASELINES, get_baseline
from .episodes import EpisodeSampler, Episodes, gather, mean_ci
from .configs import EvalConfig
from .errors import ConfigError
from .store import FeatureSplit

log = logging.getLogger(__name__)

# (support (E,S,T,D), query (E,Q,T,D), text (E,N,D), pps uniforms (E,Q)) -> logits (E,Q,N)
LogitsFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
TRAINED = ("mdmf", "clip-fsar")
METHODS = ("run", *TRAINED, *BASELINES)


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
    """Per-video path for a trained head in eval mode (see the module docstring); same logits as the direct path.

    Args:
        model: a :class:`~mdmf_cache.models.head.FewShotHead` in eval mode.
        split: features on the compute device.
        episodes: the fixed episode list (view 0 of every video: val/test caches hold one view).
        uniforms: ``(E, Q)`` PPS uniforms, as given to the direct path.
        batch_size: episodes (and, times 30, fused sequences) per batch.
        on_batch: called with the number of episodes just scored.
        keep_logits: also return every episode's logits.
    """
    if model.training:
        raise ValueError("the per-video path needs the model in eval mode (dropout off, running statistics)")
    dev = split.features.device
    feats = split.features  # (Nv, V, T, D)
    c, n, e_all = split.num_classes, episodes.way, len(episodes)
    k = episodes.shot
    zero_token = c  # token key of PPS-off queries (a zero token); keys 0..C-1 are class texts
    text_keys = torch.cat([split.text.float(), split.text.new_zeros(1, split.text.shape[1]).float()])  # (C+1, D)

    # 1. each query's token: the PPS draw on its own episode (cheap: cosines of mean frames)
    if model.query_has_token:
        query_key = np.empty(episodes.query.shape, dtype=np.int64)  # (E, Q) split class of the token
        for lo in range(0, e_all, batch_size):
            ep = episodes[lo : lo + batch_size]
            query = feats[torch.as_tensor(ep.query, device=dev), torch.as_tensor(ep.query_view, device=dev)].float()
            text = split.text[torch.as_tensor(ep.classes, device=dev)].float()  # (E, N, D)
            chosen, _ = model.query_choice(query, text, torch.as_tensor(uniforms[lo : lo + batch_size], device=dev))
            chosen = chosen.cpu().numpy()  # (E, Q) episode class, -1 = PPS off
            split_cls = np.take_along_axis(ep.classes, np.clip(chosen, 0, None), axis=1)
            query_key[lo : lo + len(ep)] = np.where(chosen >= 0, split_cls, zero_token)
    support_key = np.repeat(episodes.classes, k, axis=1)  # (E, S) each support's own class

    # 2. the distinct (video, token) pairs, and each episode slot's pair
    if model.query_has_token:
        rows = np.concatenate([episodes.support, episodes.query], axis=1)  # (E, S+Q)
        keys = np.concatenate([support_key, query_key], axis=1)
    else:  # queries are fused without a token: their pairs are the videos alone
        rows, keys = episodes.support, support_key
    pair_codes, slot_pair = np.unique(rows * (c + 1) + keys, return_inverse=True)
    slot_pair = slot_pair.reshape(rows.shape)
    pair_row, pair_key = pair_codes // (c + 1), pair_codes % (c + 1)
    video_rows, pair_video = np.unique(pair_row, return_inverse=True)
    if not model.query_has_token:
        query_videos, query_slot = np.unique(episodes.query, return_inverse=True)
        video_rows, inv = np.unique(np.concatenate([pair_row, query_videos]), return_inverse=True)
        pair_video, query_video = inv[: len(pair_row)], inv[len(pair_row) :]

    # 3. per view: context once per video, fusion once per pair
    seq = max(batch_size * 30, 1)  # sequences per forward
    vids = torch.as_tensor(video_rows, device=dev)
    tokened: dict[str, Tensor] = {}
    untokened: dict[str, Tensor] = {}
    frames_v = feats[vids, 0].float()  # (U, T, D)
    with heads_autocast(dev):
        for name in model.views:
            ctx = torch.cat([model.context(name, frames_v[i : i + seq]) for i in range(0, len(vids), seq)])  # (U, T, D)
            pv = torch.as_tensor(pair_video, device=dev)
            pk = torch.as_tensor(pair_key, device=dev)
            # frame positions only; position 0 (the token's output) feeds just the distillation
            # posteriors, which evaluation does not read: it stays zero, the logits do not see it
            fused = model.fuse_pairs(name, frames_v, ctx, text_keys, pv, pk, token_output=False)  # (P, T, D)
            tokened[name] = torch.nn.functional.pad(fused, (0, 0, 1, 0))  # (P, T+1, D)
            if not model.query_has_token:
                qv = torch.as_tensor(query_video, device=dev)
                untokened[name] = torch.cat([
                    model.fuse(name, frames_v[qv[i : i + seq]], ctx[qv[i : i + seq]], None)
                    for i in range(0, len(qv), seq)
                ])  # (U_q, T, D)
        del frames_v, ctx

        # 4. per episode: prototypes, distances, OTAM. The prototypes (class means of the supports' outputs)
        # are averaged straight from the pair table, without gathering every support's output first, and
        # reach the head as one "shot" per class (its mean over K = 1 shot is the identity).
        tally = _Tally(c, dev, keep_logits)
        s = episodes.support.shape[1]
        for lo in range(0, e_all, batch_size):
            ep = episodes[lo : lo + batch_size]
            sp = torch.as_tensor(slot_pair[lo : lo + len(ep)], device=dev)
            support_out = {name: _class_means(tokened[name], sp[:, :s], n) for name in model.views}  # (E, N, T+1, D)
            if model.query_has_token:
                query_out = {name: tokened[name][sp[:, s:]] for name in model.views}  # (E, Q, T+1, D)
            else:
                qs = torch.as_tensor(query_slot.reshape(episodes.query.shape)[lo : lo + len(ep)], device=dev)
                query_out = {name: untokened[name][qs] for name in model.views}  # (E, Q, T, D)
            tally.add(model.head(support_out, query_out, n)["logits"], ep)
            if on_batch:
                on_batch(len(ep))
    result = tally.result()
    result.fused = len(pair_codes) + (0 if model.query_has_token else len(query_videos))
    return result


def _class_means(table: Tensor, slots: Tensor, n: int) -> Tensor:
    """``table (P, L, D)`` fused pairs, ``slots (E, S)`` class-major support pairs -> ``(E, N, L, D)`` class means."""
    e, s = slots.shape
    p, length, d = table.shape
    means = torch.nn.functional.embedding_bag(slots.reshape(e * n, s // n), table.reshape(p, length * d), mode="mean")
    return means.reshape(e, n, length, d)


def method_logits(method: str, model=None) -> LogitsFn:
    """A trained head (``mdmf``, ``clip-fsar``: an eval-mode model's logits) or a baseline name, as a LogitsFn."""
    if method in TRAINED:
        if model is None:
            raise ValueError(f"method {method!r} needs a trained model")
        return lambda support, query, text, u: model(support, query, text, pps_noise=u)["logits"]
    baseline = get_baseline(method)
    return lambda support, query, text, u: baseline(support, query, text)


def score(method: str, split: FeatureSplit, episodes: Episodes, model=None, seed: int = 0, batch_size: int = 500,
          on_batch: Callable[[int], None] | None = None, path: str = "per-video",
          keep_logits: bool = False) -> EvalResult:
    """Score one method on one episode list.

    Trained heads take the per-video path unless ``path="direct"``; baselines always the direct
    one. The PPS draws use :func:`pps_uniforms` (seeded). torch's RNG is forked, so a caller's
    training RNG stream is untouched.
    """
    if path not in ("per-video", "direct"):
        raise ValueError(f"path {path!r}: choose 'per-video' or 'direct'")
    dev = split.features.device
    uniforms = pps_uniforms(episodes, seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if method in TRAINED and path == "per-video":
            return evaluate_per_video(model, split, episodes, uniforms, batch_size, on_batch, keep_logits)
        with heads_autocast(dev) if method in TRAINED else torch.autocast(dev.type, enabled=False):
            return evaluate_episodes(method_logits(method, model), split, episodes, batch_size, on_batch, uniforms,
                                     keep_logits)


# ----------------------------------------------------------------------- scoring a run or a baseline


def episode_list(split: FeatureSplit, way: int, shot: int, queries: int, n: int, seed: int) -> Episodes:
    """The seeded test episode list: a function of (split labels, way, shot, queries, n, seed) only."""
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    return sampler.sample(n, way, shot, queries, np.random.default_rng([seed, 2, shot]))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate; returns the results dict that is also written to ``results.json``."""
    from mdmf_cache.backbone import resolve_device
    from mdmf_cache.fileio import atomic_write_json
    from mdmf_cache.runs import check_identity, full_run_cache, load_run, run_cache
    from mdmf_cache.store import load_split_features

    cfg.validate()
    target = Path(cfg.target)
    device = resolve_device(cfg.device)
    model = None
    method, trained_shot = cfg.method, None
    # 1. what is scored
    if (target / "config.json").is_file() and (target / "best.pt").is_file():
        run_cfg = json.loads((target / "config.json").read_text())
        if run_cfg.get("mode") == "full":  # the fine-tuned backbone's features: extracted here once, then reused
            cache = full_run_cache(target, run_cfg, cfg.split, str(device), cfg.cache, progress, cfg.way, cfg.root)
        else:
            cache = run_cache(target, run_cfg, cfg.cache)
            check_identity(run_cfg.get("cache_identity"), cache, f"eval {target}")
        trained_shot = int(run_cfg.get("shot", 5))
        run_method = run_cfg.get("method", "mdmf")
        if method in ("run", *TRAINED):
            if method != "run" and method != run_method:
                raise ConfigError(f"--method {method}: {target} was trained as {run_method}; evaluate a "
                                  f"{method} run (mdmf-cache train CACHE --method {method}) on the same --seed "
                                  "for identical episodes, or compare both in one table with mdmf-cache ablate "
                                  "CACHE --method clip-fsar")
            method = run_method
            model, _ = load_run(target, str(device))
            if cfg.pps_test and method == "mdmf":  # the same trained heads under the other test rule
                model.cfg.pps_test = model.pps.test_rule = cfg.pps_test
        default_out = target / f"eval_{method}_{cfg.split}"
    elif (target / "zarr.json").is_file():
        cache = str(target)
        if method in ("run", *TRAINED):
            raise ConfigError(f"{target} is a cache: a trained head needs its run directory "
                              f"(mdmf-cache train {target} --out runs/NAME), or pick a baseline: {', '.join(BASELINES)}")
        default_out = target.parent / f"eval_{target.stem}_{method}_{cfg.split}"
    else:
        raise ConfigError(f"{target} is neither a run directory (config.json + best.pt) nor a cache (*.zarr)")
    shots = cfg.shots or ((trained_shot,) if trained_shot else (1, 3, 5))
    # 2. features; every shot checked against the split before anything is scored or written
    split = load_split_features(cache, cfg.split, device=str(device))
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    for shot in shots:
        sampler.check(cfg.way, shot, cfg.queries_per_class, split=cfg.split)
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
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
            eps.save(out / f"episodes_{cfg.way}way_{shot}shot.npz")
            task = bar.add_task(f"{method} {shot}-shot", total=len(eps)) if bar else None
            res = score(method, split, eps, model, cfg.seed, cfg.batch_size,
                        (lambda k, t=task: bar.advance(t, k)) if bar else None, path=cfg.path)
            results["shots"][str(shot)] = res.summary(split.class_names)
            np.save(out / f"episode_acc_{shot}shot.npy", res.episode_acc)
    finally:
        if bar:
            bar.stop()
    atomic_write_json(out / "results.json", results)
    from mdmf_cache.plots import eval_figures, plot_safely

    plot_safely(eval_figures, out)
    results["out"] = str(out)
    return results
