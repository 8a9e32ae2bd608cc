"""Recipe ``mdmf-cache eval``: a trained run, a head without parameters or a training-free baseline on a fixed,
seeded, saved episode list.

Top to bottom (:func:`run`):
    1. what is scored: a run's ``best.pt`` (its cache checked against the run's record; a full-mode run's split
       extracted once with its ``backbone.pt``), or a head without parameters or a baseline on a cache;
    2. the queries per class of each shot (:meth:`EvalConfig.queries_for`: a transductive head's released test
       queries unless ``--queries-per-class`` is given); the split's features in memory, every shot checked against
       it before anything is written; a token head's tokens through a bounded reader (``--token-cache-mb``);
    3. per shot the seeded episode list, saved beside the results, and its scores: ``results.json`` (mean +-
       1.96 std / sqrt(n), per-class accuracy, the queries per class, whether the head is transductive) with figures;
    4. print the table.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache import heads as head_registry
from mdmf_cache.configs import EvalConfig
from mdmf_cache.data.episodes import EpisodeSampler
from mdmf_cache.device import resolve_device
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.evaluation.baselines import BASELINES
from mdmf_cache.evaluation.scoring import TokenSplits, episode_list, score
from mdmf_cache.extraction.eval_cache import full_run_cache
from mdmf_cache.fileio import atomic_write_json, writing
from mdmf_cache.heads.factory import load_head
from mdmf_cache.progress import make_progress
from mdmf_cache.report.plots import eval_figures, plot_safely
from mdmf_cache.report.tables import print_eval
from mdmf_cache.store.read import load_split_features
from mdmf_cache.store.runs import check_identity, read_run_file, run_cache

log = logging.getLogger(__name__)

__all__ = ["run"]


def run(cfg: EvalConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Evaluate (and print the per-shot table with ``show``); returns the results also written to ``results.json``."""
    cfg.validate()
    target = Path(cfg.target)
    device = resolve_device(cfg.device)
    # 1. what is scored
    method, model, cache, trained_shot, run_cfg, full_mode, default_out = _what_is_scored(cfg, target, device, progress)
    shots = cfg.shots or ((trained_shot,) if trained_shot else (1, 3, 5))
    # 2. queries per class per shot, resolved here once; features; every shot checked before anything is scored or written
    queries = {shot: cfg.queries_for(method, shot) for shot in shots}
    transductive = method in head_registry.METHODS and head_registry.get(method).transductive
    if transductive and cfg.queries_per_class is not None:
        released = head_registry.get(method).test_queries
        log.warning("%s is transductive (a query's logits depend on the episode's other queries): scored with %d "
                    "queries per class by --queries-per-class%s", method, cfg.queries_per_class,
                    f"; its released test episodes have {', '.join(f'{released(k)} at K={k}' for k in shots)}"
                    if released else "")
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
        sampler.check(cfg.way, shot, queries[shot], split=cfg.split)
    # a token head: the split's tokens through a bounded reader (its thread stopped in step 3's finally)
    token_splits = TokenSplits(split, cache, cfg.split, cfg.token_cache_mb << 20)
    split = token_splits(method)
    out = Path(cfg.out) if cfg.out else default_out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e.strerror}): pass --out DIR on writable storage") from e
    per_shot = {str(shot): q for shot, q in queries.items()}
    atomic_write_json(out / "eval_config.json", {**asdict(cfg), "resolved": {"method": method,
                                                                              "queries_per_class": per_shot}})
    # 3. episodes and scores
    results: dict[str, Any] = {"method": method, "split": cfg.split, "target": str(target), "cache": cache,
                               "way": cfg.way, "queries_per_class": per_shot, "transductive": transductive,
                               "seed": cfg.seed, "trained_shot": trained_shot, "shots": {}}
    if model is not None and method == "mdmf":
        results["pps_test"] = model.cfg.pps_test
    bar = make_progress("episodes") if progress else None
    if bar:
        bar.start()
    try:
        for shot in shots:
            eps = episode_list(split, cfg.way, shot, queries[shot], cfg.episodes, cfg.seed)
            with writing(out / f"episodes_{cfg.way}way_{shot}shot.npz"):
                eps.save(out / f"episodes_{cfg.way}way_{shot}shot.npz")
            task = bar.add_task(f"{method} {shot}-shot", total=len(eps)) if bar else None
            res = score(method, split, eps, model, cfg.seed, cfg.batch_size,
                        (lambda k, t=task: bar.advance(t, k)) if bar else None, path=cfg.path)
            results["shots"][str(shot)] = {**res.summary(split.class_names), "queries_per_class": queries[shot]}
            with writing(out / f"episode_acc_{shot}shot.npy"):
                np.save(out / f"episode_acc_{shot}shot.npy", res.episode_acc)
    finally:
        if bar:
            bar.stop()
        token_splits.close()
    atomic_write_json(out / "results.json", results)
    plot_safely(eval_figures, out)
    results["out"] = str(out)
    # 4. the table
    if show:
        print_eval(results)
    return results


def _what_is_scored(cfg: EvalConfig, target: Path, device, progress: bool) -> tuple:
    """Step 1: (method, model or None, cache, trained shot or None, the run's config or None, whether the cache is a
    full-mode run's own eval cache, the default output directory)."""
    model, run_cfg = None, None
    method, trained_shot = cfg.method, None
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
            model, _ = load_head(target, str(device))
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
    return method, model, cache, trained_shot, run_cfg, full_mode, default_out
