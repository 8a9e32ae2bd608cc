"""Recipe ``mdmf-cache extract``: videos -> a resumable Zarr cache of CLIP frame and prompt embeddings.

Top to bottom:
    1. the config (:class:`~mdmf_cache.configs.ExtractConfig`; the preset's sampler and pixel
       normalisation unless given);
    2. build or extend the cache (:func:`mdmf_cache.extraction.build.run_extract`, in its own numbered steps: splits,
       files, backbone, fingerprint, damage repair, text embeddings, decoder processes, rows by whole chunks). It is
       an engine, not this recipe's body, because evaluating a full-mode run and ``predict`` extract too;
    3. print what this run did per split (videos, reused, extracted, failed, missing), and warn once per
       split this run extracted videos of that holds videos shorter than T frames (their indices repeat).

Killed at any moment, the same command continues where the cache says it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mdmf_cache.extraction.build import SplitResult, run_extract
from mdmf_cache.configs import ExtractConfig
from mdmf_cache.report.tables import print_extract_summary
from mdmf_cache.store.cache import CacheStore

log = logging.getLogger(__name__)


def run(cfg: ExtractConfig, show: bool = True) -> tuple[Path, list[SplitResult]]:
    """Extract (progress bars: ``cfg.progress``) and, with ``show``, print the per-split summary; returns the cache
    path and the per-split results."""
    path, results = run_extract(cfg)
    if show:
        print_extract_summary(path, results)
    if cfg.rank == 0:
        warn_short(path, results, cfg.num_frames)
    return path, results


def warn_short(path: Path, results: list[SplitResult], num_frames: int) -> None:
    """One warning per split this run extracted videos of, when the split holds videos with fewer than T decodable
    frames: their count (what ``mdmf-cache info`` reports as short)."""
    store = CacheStore(path)
    for r in results:
        s = store.split_summary(r.split) if r.extracted else {"short": 0}
        if not s["short"]:
            continue
        log.warning("%s: %d of %d videos have fewer than --num-frames %d decodable frames: their frame indices "
                    "repeat (mdmf-cache info %s counts them)", r.split, s["short"], s["videos"], num_frames, path)
