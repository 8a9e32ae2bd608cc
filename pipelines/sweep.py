"""Recipe ``mdmf-cache sweep``: tune fast-mode training on a cache with Optuna; ``sweep show``: what a study holds.

Top to bottom:
    1. the config (:class:`~mdmf_cache.sweeps.SweepConfig`: the space, the fixed ``train`` options, the study's
       storage, ``jobs`` worker processes sharing one copy of the features);
    2. run, join or resume the sweep (:func:`mdmf_cache.sweeps.run_sweep`: everything checked before the study is
       written; each trial a fast-mode training run scored on val, never test), or, for ``show``, read a sweep
       directory's ``sweep.json`` (:func:`mdmf_cache.sweeps.load_sweep`);
    3. ``trials.csv``, ``trials.md``, ``best.json`` and the figures (:func:`mdmf_cache.sweep_summary.summarize`),
       then print the best trials and where those files are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdmf_cache.report import print_sweep
from mdmf_cache.sweep_summary import summarize
from mdmf_cache.sweeps import SweepConfig, load_sweep, run_sweep


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or join, or resume) the sweep and print its best trials; returns :func:`run_sweep`'s result."""
    res = run_sweep(cfg)
    print_sweep(res)
    return res


def show(path: Path | str, storage: str | None = None) -> dict[str, Any]:
    """Rewrite a sweep directory's tables, ``best.json`` and figures from its study, and print its best trials."""
    res = summarize(load_sweep(path, storage))
    print_sweep(res)
    return res
