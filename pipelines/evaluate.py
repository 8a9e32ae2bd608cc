"""Recipe ``mdmf-cache eval``: a trained run, a head without parameters or a training-free baseline on a fixed,
seeded, saved episode list.

Top to bottom:
    1. the config (:class:`~mdmf_cache.configs.EvalConfig`);
    2. score (:func:`mdmf_cache.evaluation.run_eval`): what is scored (a run's ``best.pt``, or a
       head without parameters or a baseline on a cache; a full-mode run's split extracted once with its ``backbone.pt``), its
       split's features in memory, per shot the seeded episode list saved beside the results, and
       ``results.json`` (mean +- 1.96 std / sqrt(n), per-class accuracy) with figures;
    3. print the table.
"""

from __future__ import annotations

from typing import Any

from mdmf_cache.configs import EvalConfig
from mdmf_cache.evaluation import run_eval
from mdmf_cache.report import print_eval


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and print the per-shot table; returns the results written to ``results.json``."""
    res = run_eval(cfg)
    print_eval(res)
    return res
