"""The cache's layout: format version, array names, chunking rules and group names (the bottom of ``store/``).

The layout itself (groups, arrays, shapes and attributes) is drawn in :mod:`mdmf_cache.store.cache` and
docs/cache-format.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FORMAT_VERSION", "ROW_ARRAYS", "STAT_ARRAYS", "META_ARRAYS", "TOKENS_DONE", "TOKEN_CHUNK_KEYS",
           "UNITS_PER_SPLIT", "MAX_UNIT_ROWS", "META_CHUNK", "group_name", "fingerprint_diff", "unit_rows_for"]


#: 2: rows keyed by video id (present, order), train views seeded by the id, fingerprint {video, text}.
FORMAT_VERSION = 2
ROW_ARRAYS = ("features", "frame_indices", "num_frames", "failed", "errors", "done")
STAT_ARRAYS = ("file_size", "file_mtime")  # written with the rows; absent from caches made before them
META_ARRAYS = ("video_ids", "labels", "present", "order")
#: A split with token arrays (``tokens_<layer>``, :mod:`mdmf_cache.tokens`) also has this per-row flag, chunked by
#: ``unit_rows`` like ``done``: the row's token arrays are written (a cache extended with tokens fills them later).
TOKENS_DONE = "tokens_done"
#: Token arrays have one row per chunk (a reader takes a video's tokens with one file read); ``.`` keeps their
#: chunk files side by side in the array's folder (one file per row, not four nested folders each).
TOKEN_CHUNK_KEYS = {"name": "default", "separator": "."}
UNITS_PER_SPLIT = 256  # a new split's unit_rows aims at this many units (ranks share them evenly)
MAX_UNIT_ROWS = 4096
META_CHUNK = 1 << 16  # rows per chunk of the small per-row arrays only rank 0 writes


def group_name(dataset: str, model: str, weights_slug: str) -> str:
    return f"{dataset}__{model}__{weights_slug}.zarr"


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names (with both values) of the fingerprint fields that differ."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: cache has {old.get(k)!r}, asked {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def unit_rows_for(rows: int, chunk_rows: int) -> int:
    """``unit_rows`` of a new split of ``rows`` videos: a multiple of ``chunk_rows``, ~UNITS_PER_SPLIT units."""
    cr = max(1, chunk_rows)
    k = max(1, min(rows // (cr * UNITS_PER_SPLIT), MAX_UNIT_ROWS // cr))
    return cr * k
