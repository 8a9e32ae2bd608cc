"""Recipe ``mdmf-cache runs``: what exists under a folder, from the small files each command writes.

Top to bottom (:func:`run`):
    1. the config (:class:`RunsConfig`): the folder exists;
    2. find the runs, evaluations, comparisons, ablations and sweeps under it and sum each up
       (:func:`mdmf_cache.report.listing.find_entries`: kind, path, the recorded cache and whether it moved, method,
       shot, when, the best numbers, complete or what is missing); nothing is written;
    3. print them: a table, or one JSON object per line (``--json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdmf_cache.errors import ConfigError
from mdmf_cache.report.listing import find_entries
from mdmf_cache.report.tables import print_runs

__all__ = ["RunsConfig", "run"]


@dataclass
class RunsConfig:
    """One listing (nothing is saved)."""

    dir: str = "."
    nested: bool = False  # also the runs inside comparisons, ablations and sweeps (their trials)
    json: bool = False  # print JSON lines instead of the table

    def validate(self) -> None:
        if not Path(self.dir).is_dir():
            raise ConfigError(f"{self.dir} is not a folder: name the folder to search (default: the current one)")


def run(cfg: RunsConfig, progress: bool = True, show: bool = True) -> list[dict[str, Any]]:
    """The entries found (and, with ``show``, printed), one dict each: kind, path, cache, cache_moved, method, shot,
    when, best, scores, complete, status, mtime. ``progress`` is unused: a listing reads small files only."""
    # 1. the config
    cfg.validate()
    # 2. find and sum up
    entries = find_entries(cfg.dir, nested=cfg.nested)
    rows = [e.record() for e in entries]
    # 3. print
    if show:
        if cfg.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            print_runs(entries, cfg.dir)
    return rows
