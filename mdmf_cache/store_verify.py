"""Damage checks and repair of a cache (:mod:`mdmf_cache.store`): what :meth:`CacheStore.verify`,
:meth:`~CacheStore.check`, :meth:`~CacheStore.verify_and_repair` and :meth:`~CacheStore.repair` run.

Damage (a chunk file deleted or truncated, a ``zarr.json`` corrupted) is found by :func:`verify`: every
``zarr.json`` readable, every chunk that must hold data present and readable, labels in range, no
all-zero finished row, text present. Readers run its cheap part (metadata, chunk files present, the
small arrays) before they load; ``extract`` runs all of it and re-extracts only the damaged rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError

log = logging.getLogger(__name__)


def meta_problem(node: Path) -> str | None:
    """What is wrong with ``node/zarr.json`` (None: a readable zarr v3 node)."""
    f = Path(node) / "zarr.json"
    if not f.is_file():
        return "zarr.json missing"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"unreadable zarr.json: {type(e).__name__}: {e}"
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or "node_type" not in meta:
        return "zarr.json is not zarr v3 metadata"
    return None


def _ranges(rows: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most 4 ranges shown)."""
    parts, start = [], None
    rows = sorted(set(int(r) for r in rows))
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts[:4]) + (f", ... ({len(rows)} rows)" if len(parts) > 4 else "")


@dataclass
class Damage:
    """One damaged part of a cache, and how an ``extract`` rerun repairs it.

    ``fix``: ``rows`` re-extract ``rows``; ``chunk`` delete the unreadable chunk ``file`` first (then as
    ``rows``, or rewritten by the rerun); ``labels`` rewritten from the split files; ``text`` prompts
    recomputed; ``sync`` present/order rewritten by the rerun; ``meta`` the array's ``zarr.json`` written
    again (chunks kept); ``split`` the split is rebuilt (its group metadata or video ids are lost).
    """

    split: str
    array: str
    file: str  # relative to the cache
    what: str
    rows: list[int] = field(default_factory=list)
    fix: str = "rows"

    def __str__(self) -> str:
        rows = f" rows {_ranges(self.rows)}" if self.rows else ""
        return f"{self.split}/{self.array}{rows}: {self.what} ({self.file})"


def damage_message(path: Path | str, damages: list[Damage]) -> str:
    more = f" (and {len(damages) - 1} more)" if len(damages) > 1 else ""
    return (f"{path} is damaged: {damages[0]}{more}; rerun the extract command that made it to repair it "
            f"(only damaged rows are extracted again); 'mdmf-cache verify {path}' lists everything")


ZERO = "finished rows whose features are all zero"
NONFINITE = "finished rows with NaN or inf in their features"


def row_problems(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(all zero in some view, holds NaN or inf) per row of a (rows, V, ...) block of features.

    float16 is checked on its bits (exponent all ones: inf or NaN; all bits but the sign clear: zero),
    which costs one pass without converting to float32."""
    k = len(block)
    if k == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    if block.dtype == np.float16:
        bits = block.view(np.uint16).reshape(k, block.shape[1] if block.ndim > 1 else 1, -1)
        zero = ((bits & 0x7FFF) == 0).all(-1).any(-1)
        nonfinite = ((bits & 0x7C00) == 0x7C00).reshape(k, -1).any(-1)
    else:
        flat = block.reshape(k, block.shape[1] if block.ndim > 1 else 1, -1)
        zero = (flat == 0).all(-1).any(-1)
        nonfinite = ~np.isfinite(flat).reshape(k, -1).all(-1)
    return zero, nonfinite


def chunk_files(store, split: str, name: str, n: int):
    """(lo, hi, file relative to the cache, exists) of each chunk holding rows [0, n) of an array."""
    arr = store.root[split][name]
    step, ndim = arr.chunks[0], len(arr.shape)
    for c in range(-(-n // step)):
        rel = f"{split}/{name}/c/" + "/".join([str(c)] + ["0"] * (ndim - 1))
        yield c * step, min(n, (c + 1) * step), rel, (store.path / rel).is_file()


def read_checked(store, split: str, name: str, n: int, damages: list[Damage], fix: str = "chunk",
                  on_chunk=None) -> np.ndarray | None:
    """Rows [0, n) of an array: one read, or chunk by chunk if that fails, recording each unreadable
    chunk (its rows read as the fill value). With ``on_chunk(lo, hi, rel, exists, block)`` every chunk
    is read on its own and handed to it, and nothing is kept (``features``: memory stays one chunk)."""
    arr = store.root[split][name]
    if on_chunk is None:  # the fast path: one read; chunk by chunk only to find an unreadable one
        try:
            whole = np.asarray(arr[:n])
            return whole.astype(object) if whole.dtype.kind in "OUT" else whole
        except Exception:
            pass
    parts = []
    for lo, hi, rel, exists in chunk_files(store, split, name, n):
        block = None
        if exists:
            try:
                block = np.asarray(arr[lo:hi])
            except Exception as e:  # a truncated or garbled chunk: zstd, blosc or shape errors
                damages.append(Damage(split, name, rel, f"unreadable chunk ({type(e).__name__}: {e})",
                                      list(range(lo, hi)), fix))
        if block is None:
            block = np.full((hi - lo, *arr.shape[1:]), arr.fill_value,
                            dtype=object if arr.dtype.kind in "OUT" or str(arr.dtype).startswith("<U") else None)
        if block.dtype.kind in "OUT":
            block = block.astype(object)
        if on_chunk is not None:
            on_chunk(lo, hi, rel, exists, block)
        else:
            parts.append(block)
    if on_chunk is not None:
        return None
    if not parts:
        return np.zeros((0, *arr.shape[1:]), dtype=object if arr.dtype.kind in "OUT" else None)
    return np.concatenate(parts)


def verify(store, deep: bool = True, splits: list[str] | None = None) -> list[Damage]:
    """Every damaged part of the cache (all splits, or ``splits``), each naming split, array, rows and file.

    ``deep=False`` (what readers run before loading): metadata, the chunk files that must hold data,
    and the small per-row arrays. ``deep=True`` (``verify``, ``extract``) also reads every chunk of
    ``features`` and ``text_features``.
    """
    damages: list[Damage] = []
    for split in splits or [s for s in ("train", "val", "test") if (store.path / s).is_dir()]:
        damages += _verify_split(store, split, deep)
    return damages


def _verify_split(store, split: str, deep: bool) -> list[Damage]:
    from .store import META_ARRAYS, ROW_ARRAYS  # the layout (store imports this module)

    gpath = store.path / split
    why = meta_problem(gpath)
    if why:
        return [Damage(split, "", f"{split}/zarr.json", why, fix="split")]
    g = store.root[split]
    if "num_videos" not in g.attrs:
        return []  # a split a killed run was creating: the rerun makes it again
    names = [*ROW_ARRAYS, *META_ARRAYS] if "present" in g else [*ROW_ARRAYS, "video_ids", "labels"]
    has_text = g.attrs.get("prompts") is not None
    out = [Damage(split, name, f"{split}/{name}/zarr.json", why,
                  fix="text" if name == "text_features" else "split" if name == "video_ids" else "meta")
           for name in (*names, *(("text_features",) if has_text else ()))
           if (why := meta_problem(gpath / name))]
    if out:
        return out
    n, classes = int(g.attrs["num_videos"]), list(g.attrs["classes"])

    def missing(name: str, need: np.ndarray, what: str, fix: str) -> None:
        for lo, hi, rel, exists in chunk_files(store, split, name, n):
            rows = lo + np.flatnonzero(need[lo:hi])
            if not exists and len(rows):
                out.append(Damage(split, name, rel, f"chunk file missing ({what})", rows.tolist(), fix))

    def bad(name: str, rows: np.ndarray, what: str, fix: str = "rows") -> None:
        rows = np.flatnonzero(rows)
        if len(rows):
            out.append(Damage(split, name, f"{split}/{name}", what, rows.tolist(), fix))

    ids = read_checked(store, split, "video_ids", n, out, fix="split")
    every = np.ones(n, dtype=bool)
    missing("video_ids", every, "the rows lost their video ids", "split")
    if not any(d.array == "video_ids" for d in out):
        bad("video_ids", np.array([not v for v in ids], dtype=bool), "empty video ids", "split")
        counts = Counter(ids.tolist())
        bad("video_ids", np.array([counts[v] > 1 for v in ids], dtype=bool), "repeated video ids", "split")
    labels = read_checked(store, split, "labels", n, out)
    order = read_checked(store, split, "order", n, out) if "present" in g else np.zeros(n, dtype=np.int64)
    listed = order >= 0  # a row no split file lists now keeps whatever label; it is unused
    missing("labels", listed, "labels of listed videos", "labels")
    lost = np.zeros(n, dtype=bool)
    for lo, hi, _, exists in chunk_files(store, split, "labels", n):
        lost[lo:hi] = not exists
    bad("labels", listed & ~lost & ((labels < 0) | (labels >= len(classes))),
        f"labels outside 0..{len(classes) - 1}", "labels")
    done = read_checked(store, split, "done", n, out).astype(bool)
    failed = read_checked(store, split, "failed", n, out).astype(bool)
    errors = read_checked(store, split, "errors", n, out)
    has_error = np.array([bool(e) for e in errors], dtype=bool)
    bad("failed", done & ~failed & has_error, "rows with an error message are not marked failed")
    bad("errors", done & failed & ~has_error, "failed rows without their error message")
    ok = done & ~failed  # finished rows that hold features
    num_frames = read_checked(store, split, "num_frames", n, out)
    bad("num_frames", ok & (num_frames <= 0), "finished rows with no frame count")
    fi = read_checked(store, split, "frame_indices", n, out)
    bad("frame_indices", ok & (fi.reshape(n, -1) < 0).any(1) if n else ok, "finished rows without frame indices")
    if "present" in g:
        present = read_checked(store, split, "present", n, out).astype(bool)
        gone = set(g.attrs.get("missing") or [])
        bad("present", ~present & (order >= 0) & np.array([v not in gone for v in ids], dtype=bool),
            "listed videos on disk marked absent", "sync")
        bad("order", present & (order < 0), "videos on disk without a listing position", "sync")
    for name in ("features", "frame_indices", "num_frames"):
        missing(name, ok, "finished rows lost their data", "rows")
    if deep:
        zero, nonfinite = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)

        def check(lo, hi, rel, exists, block):
            if exists:  # a missing chunk is reported above
                zero[lo:hi], nonfinite[lo:hi] = row_problems(block)

        read_checked(store, split, "features", n, out, on_chunk=check)
        bad("features", ok & nonfinite, NONFINITE)
        bad("features", ok & zero & ~nonfinite, ZERO)
    if has_text:
        c = len(classes)
        text = read_checked(store, split, "text_features", c, out, fix="text")
        missing("text_features", np.ones(c, dtype=bool), "the prompt embeddings", "text")
        said = any(d.array == "text_features" for d in out)
        if not said and (text.shape[0] != c or (c and (text.reshape(c, -1) == 0).all(1).any())):
            out.append(Damage(split, "text_features", f"{split}/text_features",
                              "prompt embeddings missing or all zero", fix="text"))
    # a chunk reported twice (unreadable, then its rows as wrong values): keep the first word on it
    seen, unique = set(), []
    for d in out:
        key = (d.array, d.file if d.fix == "chunk" else d.what, tuple(d.rows))
        if key not in seen and not (d.fix != "chunk" and any(
                u.fix == "chunk" and u.array == d.array and set(d.rows) <= set(u.rows) for u in unique)):
            seen.add(key)
            unique.append(d)
    return unique


def check(store, splits: list[str] | None = None) -> None:
    """The cheap part of :meth:`verify`; raises CacheError naming the first damage."""
    damages = verify(store, deep=False, splits=splits)
    if damages:
        raise CacheError(damage_message(store.path, damages))


def verify_and_repair(store, num_frames: int, dim: int) -> tuple[list[Damage], dict[str, np.ndarray]]:
    """:meth:`verify` then :meth:`repair` (rank 0 of ``extract``): array metadata is written again
    first, then what it hid is verified. Returns (damage found, rows to extract again per split)."""
    damages = verify(store)
    meta = [d for d in damages if d.fix == "meta"]
    for d in meta:
        log.warning("%s: %s; writing it again (its chunks are kept)", store.path, d)
        store.rewrite_array_meta(d.split, d.array, num_frames, dim)
    if meta:
        damages = meta + verify(store)
    return damages, repair(store, damages)


def repair(store, damages: list[Damage]) -> dict[str, np.ndarray]:
    """Undo damage so that the next sync and extraction redo it (rank 0, before any rank extracts).

    Returns per split the rows marked to be extracted again. Splits whose metadata or ids are
    lost are deleted (rebuilt by ``sync_rows``); unreadable chunk files are deleted; damaged
    rows are marked not done; damaged text is marked stale.
    """
    from .store import ROW_ARRAYS

    rebuild = {d.split for d in damages if d.fix == "split"}
    for split in sorted(rebuild):
        log.warning("%s split %s: %s; rebuilding the split", store.path, split,
                    next(str(d) for d in damages if d.split == split and d.fix == "split"))
        shutil.rmtree(store.path / split)
    redo: dict[str, set[int]] = {}
    for d in damages:
        if d.split in rebuild:
            continue
        if d.fix == "chunk":
            (store.path / d.file).unlink(missing_ok=True)
        if d.fix in ("chunk", "rows") and d.array in ROW_ARRAYS:
            redo.setdefault(d.split, set()).update(d.rows)
        if d.fix == "text":
            if d.file.endswith("zarr.json"):
                shutil.rmtree(store.path / d.split / "text_features")
            store.root[d.split].attrs["prompts"] = None
    out = {}
    for split, rows in redo.items():
        n = store.num_rows(split)
        rows = np.array(sorted(r for r in rows if r < n), dtype=np.int64)
        done = store.root[split]["done"]
        cr = store.chunk_rows(split)
        for c in np.unique(rows // cr):
            lo, hi = int(c * cr), int(min(n, (c + 1) * cr))
            block = np.asarray(done[lo:hi]).astype(bool)
            block[rows[(rows >= lo) & (rows < hi)] - lo] = False
            done[lo:hi] = block
        out[split] = rows
    return out

