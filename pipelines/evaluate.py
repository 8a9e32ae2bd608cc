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
from mdmf_cache.evaluation import score
from mdmf_cache.store import FeatureSplit, load_split_features

log = logging.getLogger(__name__)
METHODS = ("mdmf", *BASELINES)


@dataclass
class EvalConfig:
    """Evaluation settings; saved as ``eval_config.json`` beside the results."""

    target: str = ""  # a run directory (mdmf) or a cache group (baselines)
    method: str = "mdmf"
    split: str = "test"
    way: int = 5
    shots: tuple[int, ...] = (1, 3, 5)
    episodes: int = 10000
    queries_per_class: int = 1
    seed: int = 0
    batch_size: int = 500
    out: str | None = None  # default: <run>/eval_<split> or <cache-parent>/eval_<method>_<split>
    device: str = "auto"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"--split {self.split!r}: choose train, val or test")
        if not self.shots or min(self.shots) < 1 or self.episodes < 1 or self.way < 2 or self.queries_per_class < 1:
            raise ConfigError("--shot values, --episodes and --queries-per-class must be >= 1 and --way >= 2")


def episode_list(split: FeatureSplit, way: int, shot: int, queries: int, n: int, seed: int) -> Episodes:
    """The seeded test episode list: a function of (split labels, way, shot, queries, n, seed) only."""
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    return sampler.sample(n, way, shot, queries, np.random.default_rng([seed, 2, shot]))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate; returns the results dict that is also written to ``results.json``."""
    from pipelines.train import load_run, resolve_device

    cfg.validate()
    target = Path(cfg.target)
    device = resolve_device(cfg.device)
    model = None
    # 1. what is scored
    if (target / "config.json").is_file() and (target / "best.pt").is_file():
        run_cfg = json.loads((target / "config.json").read_text())
        cache = run_cfg["cache"]
        if cfg.method == "mdmf":
            model, _ = load_run(target, str(device))
        default_out = target / f"eval_{cfg.method}_{cfg.split}"
    elif (target / "zarr.json").is_file():
        cache = str(target)
        if cfg.method == "mdmf":
            raise ConfigError(f"{target} is a cache: --method mdmf needs a trained run directory "
                              f"(mdmf-cache train {target} --out runs/NAME), or pick a baseline: {', '.join(BASELINES)}")
        default_out = target.parent / f"eval_{target.stem}_{cfg.method}_{cfg.split}"
    else:
        raise ConfigError(f"{target} is neither a run directory (config.json + best.pt) nor a cache (*.zarr)")
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # 2. features
    split = load_split_features(cache, cfg.split, device=str(device))
    # 3. episodes and scores
    results: dict[str, Any] = {"method": cfg.method, "split": cfg.split, "target": str(target), "cache": cache,
                               "way": cfg.way, "queries_per_class": cfg.queries_per_class, "seed": cfg.seed, "shots": {}}
    bar = None
    if progress:
        from pipelines.progress import make_progress

        bar = make_progress("episodes")
        bar.start()
    try:
        for shot in cfg.shots:
            eps = episode_list(split, cfg.way, shot, cfg.queries_per_class, cfg.episodes, cfg.seed)
            eps.save(out / f"episodes_{cfg.way}way_{shot}shot.npz")
            task = bar.add_task(f"{cfg.method} {shot}-shot", total=len(eps)) if bar else None
            res = score(cfg.method, split, eps, model, cfg.seed, cfg.batch_size,
                        (lambda k, t=task: bar.advance(t, k)) if bar else None)
            results["shots"][str(shot)] = res.summary(split.class_names)
            np.save(out / f"episode_acc_{shot}shot.npy", res.episode_acc)
    finally:
        if bar:
            bar.stop()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from pipelines.plots import eval_figures, plot_safely

    plot_safely(eval_figures, out)
    results["out"] = str(out)
    return results
