"""Recipe ``mdmf-cache sweep``: tune fast-mode training on a cache with Optuna; ``sweep show``: what a study holds.

Top to bottom (:func:`run`):
    1. the config (:class:`~mdmf_cache.sweeps.study.SweepConfig`: the space, the fixed ``train`` options, the study's
       storage, ``jobs`` worker processes sharing one copy of the features) and the study: everything checked before
       the study is written, then the study created or joined and its settings recorded
       (:func:`~mdmf_cache.sweeps.study.prepare`);
    2. trials until the study holds ``trials`` finished ones, whoever ran them: each a run of the ``train`` recipe
       (:func:`pipelines.train.run`) scored on val, never test, in this process or in ``jobs`` worker processes
       (:mod:`mdmf_cache.sweeps.workers`);
    3. ``trials.csv``, ``trials.md``, ``best.json`` and the figures (:func:`~mdmf_cache.sweeps.summary.summarize`),
       then print the best trials and where those files are.

:func:`show` rewrites those files from a sweep directory's study (``sweep.json``) and prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdmf_cache.report.tables import print_sweep
from mdmf_cache.sweeps.study import SweepBar, SweepConfig, load_sweep, prepare
from mdmf_cache.sweeps.summary import summarize
from mdmf_cache.sweeps.workers import run_processes, run_worker
from pipelines import train

__all__ = ["run", "show"]


def run(cfg: SweepConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Run (or join, or resume) a sweep; returns :func:`~mdmf_cache.sweeps.summary.summarize`'s result.

    Raises:
        ConfigError: bad options or space, an unreachable storage, a study started with other settings.
        CacheError: the cache is missing or incomplete.
    """
    # 1. everything checked; the study created or joined
    prepare(cfg)
    # 2. the trials
    bar = SweepBar(cfg.trials) if progress else None
    try:
        if cfg.jobs == 1:
            run_worker(cfg, 0, train.run, on_trial=(lambda study, trial: bar.refresh_from(study)) if bar else None)
        else:
            run_processes(cfg, train.run, bar)
    finally:
        if bar:
            bar.stop()
    # 3. what the study holds, written out
    res = summarize(cfg)
    if show:
        print_sweep(res)
    return res


def show(path: Path | str, storage: str | None = None) -> dict[str, Any]:
    """Rewrite a sweep directory's tables, ``best.json`` and figures from its study, and print its best trials."""
    res = summarize(load_sweep(path, storage))
    print_sweep(res)
    return res
