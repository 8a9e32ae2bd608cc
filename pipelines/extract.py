"""Recipe ``mdmf-cache extract``: videos -> a resumable Zarr cache of CLIP frame and prompt embeddings.

Top to bottom:
    1. the config (:class:`~mdmf_cache.configs.ExtractConfig`; the preset's sampler and pixel
       normalisation unless given);
    2. build or extend the cache (:func:`mdmf_cache.cache_build.run_extract`: splits, files, backbone,
       fingerprint, damage repair, text embeddings, decoder processes, rows by whole chunks);
    3. print what this run did per split (videos, reused, extracted, failed, missing).

Killed at any moment, the same command continues where the cache says it stopped.
"""

from __future__ import annotations

from pathlib import Path

from mdmf_cache.cache_build import SplitResult, run_extract
from mdmf_cache.configs import ExtractConfig
from mdmf_cache.report import print_extract_summary


def run(cfg: ExtractConfig) -> tuple[Path, list[SplitResult]]:
    """Extract and print the per-split summary; returns the cache path and the per-split results."""
    path, results = run_extract(cfg)
    print_extract_summary(path, results)
    return path, results
