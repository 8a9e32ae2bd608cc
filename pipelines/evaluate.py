"""Evaluate a trained run or a training-free baseline on a fixed, seeded, saved episode list.

Recipe, top to bottom:
    1. resolve what is scored: ``mdmf`` (a run's ``best.pt``) or a baseline on a cache;
    2. load the split's features into memory (GPU when there is one);
    3. for each shot: sample (or reload) the seeded episode list, save it beside the results,
       score it in batches;
    4. write ``results.json`` (mean +- 1.96 std / sqrt(n), per-class accuracy) and print a table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.baselines import BASELINES
from mdmf_cache.episodes import EpisodeSampler, Episodes
from mdmf_cache.errors import ConfigError
from mdmf_cache.evaluation import TRAINED, score
from mdmf_cache.store import FeatureSplit, load_split_features

log = logging.getLogger(__name__)
METHODS = ("run", *TRAINED, *BASELINES)


@dataclass
class EvalConfig:
    """Evaluation settings; saved as ``eval_config.json`` beside the results."""

    target: str = ""  # a run directory (its trained head) or a cache group (baselines)
    method: str = "run"  # run = the head the run was trained with (mdmf or clip-fsar); or a baseline
    split: str = "test"
    way: int = 5
    shots: tuple[int, ...] | None = None  # default: the run's training shot; baselines 1, 3, 5
    episodes: int = 10000
    queries_per_class: int = 1
    seed: int = 0
    batch_size: int = 500
    out: str | None = None  # default: <run>/eval_<split> or <cache-parent>/eval_<method>_<split>
    device: str = "auto"
    path: str = "per-video"  # trained heads: per-video (fast) or direct (the reference path)
    pps_test: str | None = None  # MDMF: override the run's PPS rule at test (sample | argmax)
    cache: str | None = None  # a run's cache at another path (moved); checked against the run's record
    root: str | None = None  # a full-mode run's video tree at another path (moved)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"--split {self.split!r}: choose train, val or test")
        if (self.shots is not None and (not self.shots or min(self.shots) < 1)) or self.episodes < 1 \
                or self.way < 2 or self.queries_per_class < 1:
            raise ConfigError("--shot values, --episodes and --queries-per-class must be >= 1 and --way >= 2")
        if self.path not in ("per-video", "direct"):
            raise ConfigError(f"--path {self.path!r}: choose per-video or direct")
        if self.pps_test not in (None, "sample", "argmax"):
            raise ConfigError(f"--pps-test {self.pps_test!r}: choose sample or argmax")


def episode_list(split: FeatureSplit, way: int, shot: int, queries: int, n: int, seed: int) -> Episodes:
    """The seeded test episode list: a function of (split labels, way, shot, queries, n, seed) only."""
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    return sampler.sample(n, way, shot, queries, np.random.default_rng([seed, 2, shot]))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate; returns the results dict that is also written to ``results.json``."""
    from mdmf_cache.fileio import atomic_write_json
    from pipelines.train import check_identity, load_run, resolve_device

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
            cache = _run_cache(target, run_cfg, cfg.cache)
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
        from pipelines.progress import make_progress

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
    from pipelines.plots import eval_figures, plot_safely

    plot_safely(eval_figures, out)
    results["out"] = str(out)
    return results


def full_run_cache(run: Path, run_cfg: dict[str, Any], split: str, device: str, override: str | None = None,
                   progress: bool = True, way: int = 5, root: str | None = None) -> str:
    """The cache of a full-mode run's split, extracted with the run's fine-tuned backbone (``backbone.pt``).

    Extracted into ``RUN/eval_cache`` the first time (a progress bar), reused afterwards: its name carries
    the checkpoint's sha256, and so does its fingerprint, so a backbone trained further gets a new cache.

    Raises:
        ConfigError: ``backbone.pt`` is missing or is not the backbone of ``best.pt`` (a run killed between the
            two writes: ``train --resume`` rewrites both), or ``--cache`` holds other weights.
    """
    import torch

    from mdmf_cache.backbone import pretrained_slug, weights_id
    from mdmf_cache.store import CacheStore, group_name, meta_problem
    from pipelines.extract import run_extract
    from pipelines.train import FullModeConfig

    backbone = run / "backbone.pt"
    if not backbone.is_file():
        raise ConfigError(f"{run} is a full-mode run without backbone.pt; train it first (or --resume it)")
    wid = weights_id(str(backbone))
    recorded = torch.load(run / "best.pt", map_location="cpu", weights_only=False).get("backbone")
    if recorded != wid:
        raise ConfigError(f"{backbone} is not the backbone of {run}/best.pt (the run was stopped between writing "
                          "them); rerun its train command with --resume, which rewrites both")
    if override:
        have = (CacheStore(override).fingerprint.get("video") or {}).get("weights")
        if have != wid:
            raise ConfigError(f"--cache {override} was extracted with weights {have}, not this run's {backbone} ({wid})")
        return override
    full = FullModeConfig(**{**run_cfg["full"], **({"root": root} if root else {})})
    ecfg = full.extract_config(run_cfg.get("preset", "paper"), run_cfg.get("seed", 0), device, pretrained=str(backbone),
                               cache_dir=str(run / "eval_cache"), name=f"{full.dataset}-{wid.split(':')[-1][:12]}",
                               splits=(split,), progress=progress, way=way)
    path = Path(ecfg.cache_dir) / group_name(ecfg.cache_name, ecfg.model, pretrained_slug(ecfg.pretrained))
    if (path / "zarr.json").is_file() and not meta_problem(path):
        store = CacheStore(path)
        if split in store.splits and store.is_complete():  # extracted before: no backbone to load
            return str(path)
    log.info("%s split of %s with its fine-tuned backbone: cache %s", split, run, path)
    path, _ = run_extract(ecfg)
    return str(path)


def _run_cache(run: Path, run_cfg: dict[str, Any], override: str | None) -> str:
    """The cache a run was trained on: ``--cache`` if given, else the recorded path as written, then as resolved
    at training time; a clear error when neither exists (a moved cache)."""
    if override:
        return override
    recorded = run_cfg["cache"]
    for cand in (Path(recorded), Path(run_cfg.get("cache_abs", recorded))):
        if (cand / "zarr.json").is_file():
            return str(cand)
    raise ConfigError(f"{run} was trained on {recorded}, which is not there any more; pass its new location "
                      "with --cache PATH (it is checked against the run's record)")
