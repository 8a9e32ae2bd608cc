"""The Zarr v3 feature cache.

Layout (one group per dataset x backbone x weights under ``--cache-dir``)::

    cache/ucf101__RN50__openai.zarr/
        zarr.json                attrs: format, fingerprint {video, text}, ready, config
        train/                   attrs: classes, class_names, prompts, views V, chunk_rows, unit_rows,
                                        num_videos, missing (listed ids not on disk at the last run)
            features       (N, V, T, D) float16   CLIP frame embeddings (encode_image, not normalised)
            frame_indices  (N, V, T)    int32     frames actually decoded (after clamping)
            num_frames     (N,)         int32     decodable frames of the video
            done           (N,)         bool      row finished (features valid, or failure recorded)
            failed         (N,)         bool      video could not be decoded
            errors         (N,)         str       why it failed ('' otherwise)
            file_size      (N,)         int64     size of the video file when it was extracted (-1: unknown)
            file_mtime     (N,)         int64     its modification time, ns (-1: unknown)
            video_ids      (N,)         str       ``class/video``: what identifies a row
            labels         (N,)         int32     index into attrs.classes
            present        (N,)         bool      the video was on disk at the last run
            order          (N,)         int64     position in the split listing (-1: not listed now)
            text_features  (C, D)       float32   prompt embeddings, in attrs.classes order
            tokens_<layer> (N, V, T, P, Dt) float16  with ``extract --tokens``: one array per layer, a row per chunk
            tokens_done    (N,)         bool      the row's token arrays are written (attrs.tokens: TokenInfo)
        val/ ...  test/ ...              V = 1

A row belongs to its video id, for good. A rerun after the video tree changed appends rows for
videos that appeared (the arrays grow; ``num_videos``, written last, says how many rows are real)
and marks rows whose video vanished as not ``present``: their features are kept, unused, until
the video is back. Readers take ``done & ~failed & present`` rows, sorted by ``order``, which is
exactly what a fresh extraction of the current tree holds.

``features`` is chunked by ``chunk_rows``; the small per-row arrays the writers fill with it (frame
indices to done, file size and mtime) by ``unit_rows``, a multiple of ``chunk_rows`` chosen when the split
is made (at least ~256 units per split, at most 4,096 rows: fewer files to read for ``info`` and every
check, while ranks still share a split evenly); caches made before record no ``unit_rows`` and use
``chunk_rows`` for both. A writer only ever writes rows of the units it owns (rank r owns units u with
u % world_size == r): two processes writing rows that share a chunk silently lose rows. Within a chunk
the data arrays are written before ``done``, and zarr writes each chunk file atomically, so a SIGKILL at
any moment leaves either finished rows or rows that the next run redoes. Rows are appended and re-marked
by rank 0 alone, before the ranks start; the per-row arrays only rank 0 writes (ids to order) are chunked
by ``META_CHUNK``.

``file_size`` and ``file_mtime`` say which file a row was extracted from: a rerun extracts a row again
when its video's size or mtime changed (a replaced file), and decodes a failed row again only then (or
with ``--retry-failed``). Caches made before these arrays get them at the next rerun, filled with -1
(unknown: the row is kept as it is).

Damage (a chunk file deleted or truncated, a ``zarr.json`` corrupted) is found by :meth:`CacheStore.verify`
(:mod:`mdmf_cache.store.verify`); readers are in :mod:`mdmf_cache.store.read`, the names and chunking rules in
:mod:`mdmf_cache.store.layout`. This module holds creating and reopening a cache, matching rows to the tree,
and writing.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mdmf_cache.store.verify as store_verify
from mdmf_cache.errors import CacheError
from mdmf_cache.fileio import atomic_write_text
from mdmf_cache.store.layout import (FORMAT_VERSION, META_ARRAYS, META_CHUNK, ROW_ARRAYS, STAT_ARRAYS,
                                     TOKEN_CHUNK_KEYS, TOKENS_DONE, fingerprint_diff, unit_rows_for)
from mdmf_cache.store.verify import Damage, meta_problem
from mdmf_cache.tokens import ARRAY_PREFIX, TokenInfo, array_name

log = logging.getLogger(__name__)


def _zarr():
    import zarr

    return zarr


def _remove(path: Path) -> None:
    """Delete a cache and what was recorded of its verification."""
    shutil.rmtree(path)
    store_verify.record_path(path).unlink(missing_ok=True)


@dataclass
class RowSync:
    """What :meth:`CacheStore.sync_rows` found: rows are counted, vanished ids listed."""

    rows: int = 0  # rows of the split after the sync
    added: int = 0  # rows appended this run (videos new on disk)
    created: bool = False  # the split was made this run (its rows are all new)
    vanished: list[str] = field(default_factory=list)  # finished rows whose video is gone (kept, unused)


class CacheStore:
    """Read and write one cache group (``*.zarr``).

    Opened for reading (``mode="r"``) it reads each small per-row array once and keeps it: open a new one
    to see what a writer changed since."""

    def __init__(self, path: Path | str, mode: str = "r"):
        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise CacheError(f"no cache at {self.path}; run 'mdmf-cache extract' first or check the path")
        if mode != "w" and (self.path / "zarr.json").is_file():
            why = meta_problem(self.path)
            if why:
                raise CacheError(f"{self.path / 'zarr.json'} is damaged ({why}): the cache's settings are lost; "
                                 "extract again with --overwrite")
        self.root = _zarr().open_group(store=str(self.path), mode=mode)
        # a reader reads each small per-row array once (info, checks, summaries); a writer always reads afresh
        self._memo: dict[tuple, np.ndarray] | None = {} if mode == "r" else None

    # ---- creation and fingerprint -------------------------------------------------------------
    @classmethod
    def open_for_writing(
        cls, path: Path, fingerprint: dict[str, Any], overwrite: bool = False, rank: int = 0, wait_s: float = 600.0,
        split_note: str | None = None,
    ) -> "CacheStore":
        """Create the group (rank 0) or reopen it, refusing different video settings.

        ``fingerprint`` is ``{"video": {...}, "text": {...}}``. The video part decides the frame
        features: a cache with another one is refused. The text part (prompt template, name
        cleaning) only decides the text embeddings, which the caller recomputes: rank 0 records the
        new text part and marks the cache not ready until the caller calls :meth:`mark_ready`.

        Args:
            split_note: what changed in the split files, said instead of their hashes when they differ.

        Raises:
            CacheError: the existing cache was made with other video settings (fields named) or by
                an older format, unless ``overwrite``; or rank > 0 waited ``wait_s`` for rank 0.
        """
        path = Path(path)
        video = fingerprint["video"]
        if rank != 0:
            deadline = time.monotonic() + wait_s
            while True:
                old = None
                if (path / "zarr.json").is_file():
                    store = cls(path, mode="a")
                    old = store.root.attrs.get("fingerprint")
                    if old == fingerprint and store.root.attrs.get("ready"):
                        return store
                    old_video = old.get("video") if isinstance(old, dict) else None
                    if old_video is not None and old_video != video and not overwrite:  # rank 0 refuses it too
                        raise CacheError(f"{path} was extracted with different settings "
                                         f"({'; '.join(fingerprint_diff(old_video, video))}); use the same options "
                                         "on every rank, or --overwrite")
                if time.monotonic() > deadline:
                    why = ""
                    if isinstance(old, dict):
                        diff = fingerprint_diff(old.get("video") or {}, video) + fingerprint_diff(old.get("text") or {},
                                                                                                  fingerprint["text"])
                        why = f" (it holds other settings: {'; '.join(diff)})" if diff else " (not ready)"
                    raise CacheError(f"rank {rank}: rank 0 did not prepare {path} within {wait_s:.0f} s{why}")
                time.sleep(0.5)
        if (path / "zarr.json").is_file() and overwrite and meta_problem(path):
            log.warning("overwriting %s (its zarr.json is damaged)", path)
            _remove(path)
        if (path / "zarr.json").is_file():
            store = cls(path, mode="a")
            old = store.root.attrs.get("fingerprint")
            if old is None:  # a run killed right after creating the group: finish creating it
                store.root.attrs.update({"format": FORMAT_VERSION, "fingerprint": fingerprint, "ready": False})
                return store
            fmt = store.root.attrs.get("format", 1)
            if fmt != FORMAT_VERSION or "video" not in old:
                if not overwrite:
                    raise CacheError(
                        f"{path} has cache format {fmt}, this mdmf-cache writes format {FORMAT_VERSION} (rows keyed "
                        "by video id); it can still be read for training, but to extend it extract again with "
                        "--overwrite (or another --cache-dir)"
                    )
            elif old["video"] == video:
                if old != fingerprint or not store.root.attrs.get("ready"):
                    store.root.attrs.update({"fingerprint": fingerprint, "ready": False})
                return store
            elif not overwrite:
                # split files: what changed in them (videos, classes), not two hashes
                diff = "; ".join(split_note if split_note and d.startswith("split_hashes:") else d
                                 for d in fingerprint_diff(old["video"], video))
                raise CacheError(
                    f"{path} was extracted with different settings ({diff}). "
                    "Use the same options, another --cache-dir, or --overwrite to replace it."
                )
            log.warning("overwriting %s (settings changed)", path)
            _remove(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, mode="w")
        store.root.attrs.update({"format": FORMAT_VERSION, "fingerprint": fingerprint, "ready": False})
        return store

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.root.attrs.get("fingerprint", {}))

    @property
    def splits(self) -> list[str]:
        """The splits with rows. Raises CacheError naming a split whose metadata is damaged."""
        out = []
        for s in ("train", "val", "test"):
            if not (self.path / s / "zarr.json").is_file():
                continue
            why = meta_problem(self.path / s)
            if why:
                raise CacheError(f"{self.path / s / 'zarr.json'} is damaged ({why}); rerun the extract command to "
                                 f"rebuild split {s} ('mdmf-cache verify {self.path}' lists all damage)")
            if "num_videos" in self.root[s].attrs:
                out.append(s)
        return out

    def sync_rows(
        self,
        name: str,
        listed: list[str],
        labels: np.ndarray,
        present: np.ndarray,
        classes: list[str],
        class_names: list[str],
        views: int,
        num_frames: int,
        dim: int,
        chunk_rows: int,
    ) -> RowSync:
        """Make the split's rows match the tree (rank 0 only, before any rank extracts).

        A new split gets one row per present video, in listing order. An existing one keeps every
        row, appends rows for present videos it lacks, and re-marks ``present`` and ``order``.

        Args:
            listed: the split's ``class/video`` ids in listing order (L,).
            labels: (L,) class index of each listed id.
            present: (L,) bool, the id was found on disk.
        """
        listed = list(listed)
        present = np.asarray(present, dtype=bool)
        labels = np.asarray(labels, dtype=np.int32)
        if name in self.root and "num_videos" not in self.root[name].attrs:
            del self.root[name]  # a run killed while creating it: create it again
        created = name not in self.root
        if created:
            rows = len({v for v, p in zip(listed, present) if p})
            self._create_split(name, views, num_frames, dim, chunk_rows, classes, unit_rows_for(rows, chunk_rows))
        g = self.root[name]
        if list(g.attrs["classes"]) != list(classes):
            raise CacheError(f"{self.path} split {name}: the cache has classes other than the split files name; "
                             "extract with --overwrite")
        n_old = int(g.attrs["num_videos"])
        specs = self.array_specs(int(g.attrs["views"]), num_frames, dim, self.chunk_rows(name), self.unit_rows(name))
        for arr in STAT_ARRAYS:  # a cache made before them: every row's file unknown
            if not (self.path / name / arr).is_dir():
                tail, rows, dtype, fill = specs[arr]
                g.create_array(arr, shape=(g["done"].shape[0], *tail), chunks=(rows, *tail), dtype=dtype,
                               fill_value=fill)
        stored = [str(v) for v in np.asarray(g["video_ids"][:n_old])] if n_old else []
        have = set(stored)
        new = []
        for i, v in enumerate(listed):
            if present[i] and v not in have:  # an id listed twice gets one row
                have.add(v)
                new.append(i)
        n = n_old + len(new)
        tokens = self.token_arrays(name)  # a split with tokens: new rows get them too (arrays stay row-aligned)
        if n != g["done"].shape[0]:  # also undoes the growth of a run killed before it set num_videos
            for arr in (*ROW_ARRAYS, *STAT_ARRAYS, *META_ARRAYS, *tokens):
                g[arr].resize((n, *g[arr].shape[1:]))
        if new:
            g["video_ids"][n_old:n] = np.array([listed[i] for i in new], dtype=object).astype(str)
            g["labels"][n_old:n] = labels[new]
            g["done"][n_old:n] = False  # explicit: a shrunk-then-grown chunk may hold stale values
            if tokens:
                g[TOKENS_DONE][n_old:n] = False
        ids = stored + [listed[i] for i in new]
        pos = {v: i for i, v in enumerate(listed)}
        on_disk = {v for v, p in zip(listed, present) if p}
        if n:  # written only when they changed: a rerun with nothing to do leaves the files as they are
            for arr, val in (("present", np.array([v in on_disk for v in ids], dtype=bool)),
                             ("order", np.array([pos.get(v, -1) for v in ids], dtype=np.int64))):
                if not np.array_equal(np.asarray(g[arr][:n]), val):
                    g[arr][:n] = val
            # labels of listed rows from the split files: repairs a lost labels chunk; others are unused
            old = np.asarray(g["labels"][:n])
            new_labels = np.array([labels[pos[v]] if v in pos else old[i] for i, v in enumerate(ids)], dtype=np.int32)
            if not np.array_equal(old, new_labels):
                g["labels"][:n] = new_labels
        done = np.asarray(g["done"][:n], dtype=bool)
        vanished = [v for v, d in zip(ids, done) if d and v not in on_disk]
        g.attrs.update({"class_names": list(class_names), "num_videos": n,
                        "missing": [v for v, p in zip(listed, present) if not p]})
        return RowSync(rows=n, added=len(new), created=created, vanished=vanished)

    @staticmethod
    def array_specs(views: int, num_frames: int, dim: int, chunk_rows: int, unit_rows: int | None = None
                    ) -> dict[str, tuple]:
        """name -> (shape after the row axis, rows per chunk, dtype, fill value) of a split's per-row arrays."""
        cr = max(1, chunk_rows)
        unit = unit_rows or cr
        return {
            "features": ((views, num_frames, dim), cr, "float16", 0),
            "frame_indices": ((views, num_frames), unit, "int32", -1),
            "num_frames": ((), unit, "int32", 0),
            "failed": ((), unit, bool, False),
            "errors": ((), unit, str, ""),
            "done": ((), unit, bool, False),
            "file_size": ((), unit, "int64", -1),
            "file_mtime": ((), unit, "int64", -1),
            "video_ids": ((), META_CHUNK, str, ""),
            "labels": ((), META_CHUNK, "int32", -1),
            "present": ((), META_CHUNK, bool, False),
            "order": ((), META_CHUNK, "int64", -1),
        }

    @staticmethod
    def token_specs(views: int, num_frames: int, info: TokenInfo, unit_rows: int) -> dict[str, tuple]:
        """name -> (shape after the row axis, rows per chunk, dtype, fill value) of a split's token arrays."""
        out = {array_name(layer): ((views, num_frames, info.patches, info.dim), 1, "float16", 0) for layer in info.layers}
        out[TOKENS_DONE] = ((), unit_rows, bool, False)
        return out

    def tokens_info(self, split: str) -> TokenInfo | None:
        """What the split's token arrays hold (None: it has none)."""
        attrs = self.root[split].attrs.get("tokens")
        return TokenInfo.from_attrs(attrs) if attrs else None

    def token_arrays(self, split: str) -> list[str]:
        """The split's token arrays (``tokens_<layer>`` of its SPEC, then ``tokens_done``); [] without tokens."""
        info = self.tokens_info(split)
        return [*(array_name(layer) for layer in info.layers), TOKENS_DONE] if info else []

    def tokens_done_mask(self, split: str) -> np.ndarray:
        """(N,) the row's token arrays are written; all False for a split without tokens."""
        if self.tokens_info(split) is None:
            return np.zeros(self.num_rows(split), dtype=bool)
        return self._rows(split, TOKENS_DONE).astype(bool)

    def ensure_tokens(self, split: str, info: TokenInfo, num_frames: int, replace: bool = False) -> bool:
        """Give a split token arrays of ``info`` (rank 0, after :meth:`sync_rows`, before any rank extracts): every
        row not ``tokens_done``. The ``tokens`` attribute is written last, so a run killed while creating the arrays
        leaves a split without tokens that the next run gives them again. Returns whether they were made now.

        Raises:
            CacheError: the split has tokens of another SPEC (unless ``replace``: they are deleted first; the
                features are kept).
        """
        g = self.root[split]
        old = self.tokens_info(split)
        if old is not None and old == info:
            return False
        if old is not None and not replace:
            raise CacheError(tokens_refusal(self.path, old.spec, info.spec))
        g.attrs["tokens"] = None
        for name in list(g.array_keys()):  # also half-made arrays of a killed run
            if name.startswith(ARRAY_PREFIX) or name == TOKENS_DONE:
                del g[name]
        n = self.num_rows(split)
        for arr, (tail, rows, dtype, fill) in self.token_specs(int(g.attrs["views"]), num_frames, info,
                                                               self.unit_rows(split)).items():
            g.create_array(arr, shape=(n, *tail), chunks=(rows, *tail), dtype=dtype, fill_value=fill,
                           **({"chunk_key_encoding": TOKEN_CHUNK_KEYS} if arr != TOKENS_DONE else {}))
        g.attrs["tokens"] = info.to_attrs()
        return True

    def _create_split(self, name: str, views: int, num_frames: int, dim: int, chunk_rows: int,
                      classes: list[str], unit_rows: int) -> None:
        g = self.root.create_group(name)
        for arr, (tail, rows, dtype, fill) in self.array_specs(views, num_frames, dim, chunk_rows, unit_rows).items():
            g.create_array(arr, shape=(0, *tail), chunks=(rows, *tail), dtype=dtype, fill_value=fill)
        g.attrs.update({"classes": list(classes), "views": views, "chunk_rows": max(1, chunk_rows),
                        "unit_rows": unit_rows, "num_videos": 0})

    def rewrite_array_meta(self, split: str, name: str, num_frames: int, dim: int) -> None:
        """Write a damaged ``zarr.json`` of a per-row array again (its chunk files are kept)."""
        import tempfile

        g = self.root[split]
        specs = self.array_specs(int(g.attrs["views"]), num_frames, dim, self.chunk_rows(split), self.unit_rows(split))
        info = self.tokens_info(split)
        if info is not None:
            specs.update(self.token_specs(int(g.attrs["views"]), num_frames, info, self.unit_rows(split)))
        tail, rows, dtype, fill = specs[name]
        keys = {"chunk_key_encoding": TOKEN_CHUNK_KEYS} if name.startswith(ARRAY_PREFIX) else {}
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            fresh = _zarr().open_group(store=tmp, mode="w")
            fresh.create_array(name, shape=(int(g.attrs["num_videos"]), *tail), chunks=(rows, *tail), dtype=dtype,
                               fill_value=fill, **keys)
            atomic_write_text(self.path / split / name / "zarr.json", (Path(tmp) / name / "zarr.json").read_text())

    def mark_ready(self) -> None:
        self.root.attrs["ready"] = True

    # ---- rows -----------------------------------------------------------------------------------
    def num_rows(self, split: str) -> int:
        return int(self.root[split].attrs["num_videos"])

    def chunk_rows(self, split: str) -> int:
        return int(self.root[split].attrs["chunk_rows"])

    def unit_rows(self, split: str) -> int:
        """Rows per chunk of the small per-row arrays, the unit a writer owns (``chunk_rows`` in older caches)."""
        attrs = self.root[split].attrs
        return int(attrs.get("unit_rows") or attrs["chunk_rows"])

    def owner(self, split: str, world_size: int) -> np.ndarray:
        """(N,) the rank that writes each row: whole units, dealt round robin."""
        return (np.arange(self.num_rows(split)) // self.unit_rows(split)) % world_size

    def video_ids(self, split: str) -> list[str]:
        return [str(v) for v in self._rows(split, "video_ids")]

    def _rows(self, split: str, name: str) -> np.ndarray:
        """Rows [0, num_videos) of a small per-row array (read once per reader: see ``_memo``)."""
        return self._read(split, name, self.num_rows(split), lambda: np.asarray(self.root[split][name][: self.num_rows(split)]))

    def _read(self, split: str, name: str, n: int, read) -> np.ndarray:
        if self._memo is None or name == "features":
            return read()
        key = (split, name, n)
        if key not in self._memo:
            self._memo[key] = read()
        return self._memo[key]

    def file_stats(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(N,) size and (N,) mtime in ns of each row's video when it was extracted; -1 where unknown."""
        if not (self.path / split / "file_size").is_dir():
            unknown = np.full(self.num_rows(split), -1, dtype=np.int64)
            return unknown, unknown
        return self._rows(split, "file_size").astype(np.int64), self._rows(split, "file_mtime").astype(np.int64)

    def done_mask(self, split: str) -> np.ndarray:
        return self._rows(split, "done").astype(bool)

    def present_mask(self, split: str) -> np.ndarray:
        """Rows whose video was on disk at the last run (all rows in a format-1 cache)."""
        if "present" not in self.root[split]:
            return np.ones(self.num_rows(split), dtype=bool)
        return self._rows(split, "present").astype(bool)

    def pending_rows(self, split: str, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Rows of this rank's units that are not done yet and whose video is there, ascending."""
        done = self.done_mask(split)
        present = self.present_mask(split)
        return np.flatnonzero(~done & present & (self.owner(split, world_size) == rank))

    def write_rows(self, split: str, rows: np.ndarray, values: dict[str, np.ndarray],
                   tokens: dict[str, np.ndarray] | None = None) -> None:
        """Write finished rows, all inside one chunk of ``features``, data first and ``done`` last (then
        ``tokens_done``).

        Args:
            rows: ascending row indices, all in the same chunk.
            values: array name -> values for those rows (``features``, ``frame_indices``,
                ``num_frames``, ``failed``, ``errors``, and ``file_size``/``file_mtime`` when recorded).
            tokens: token array name -> (R, V, T, P, Dt) values of the same rows (a split with tokens).
        """
        g = self.root[split]
        cr = self.chunk_rows(split)
        rows = np.asarray(rows)
        if len(rows) == 0:
            return
        if rows[0] // cr != rows[-1] // cr:
            raise ValueError("write_rows takes rows of one chunk")
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        contiguous = hi - lo == len(rows)
        self._write_tokens(split, rows, tokens or {})
        for name, val in values.items():
            arr = g[name]
            if contiguous:
                arr[lo:hi] = val
            else:  # read-modify-write of this writer's own chunk
                block = arr[lo:hi]
                block[rows - lo] = val
                arr[lo:hi] = block
        self._set_flag(split, "done", rows)
        if tokens:
            self._set_flag(split, TOKENS_DONE, rows)

    def write_token_rows(self, split: str, rows: np.ndarray, tokens: dict[str, np.ndarray],
                         failures: dict[int, str] | None = None) -> None:
        """Write the token arrays of finished rows (a cache extended with tokens), then ``tokens_done``; the features
        and every other per-row array are left as they are. The rows are one writer's, inside one chunk of
        ``features``. ``failures``: rows whose tokens came out NaN or inf, recorded as failed (with the message)
        instead; their features stay, unused."""
        rows = np.asarray(rows)
        if len(rows) == 0:
            return
        self._write_tokens(split, rows, tokens)
        if failures:  # the message first, then the flag (verify names a flag-less message as damage)
            g = self.root[split]
            bad = np.array(sorted(failures), dtype=np.int64)
            lo, hi = int(bad[0]), int(bad[-1]) + 1
            errors = np.asarray(g["errors"][lo:hi]).astype(object)
            errors[bad - lo] = [failures[int(r)] for r in bad]
            g["errors"][lo:hi] = errors.astype(str)
            self._set_flag(split, "failed", bad)
        self._set_flag(split, TOKENS_DONE, rows)

    def _write_tokens(self, split: str, rows: np.ndarray, tokens: dict[str, np.ndarray]) -> None:
        """One chunk file per row and array: each row written on its own, nothing read back."""
        g = self.root[split]
        for name, val in tokens.items():
            arr = g[name]
            for i, r in enumerate(rows):
                arr[int(r)] = val[i]

    def _set_flag(self, split: str, name: str, rows: np.ndarray) -> None:
        """Set a per-row flag (``done``, ``tokens_done``) of rows inside one of this writer's units."""
        arr = self.root[split][name]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        block = np.asarray(arr[lo:hi])
        block[rows - lo] = True
        arr[lo:hi] = block

    def write_text(self, split: str, embeddings: np.ndarray, prompts: list[str], template: str,
                   class_names: list[str] | None = None) -> None:
        """Replace a split's prompt embeddings; ``prompts`` is cleared first and set last, so a
        killed write leaves a split whose text the next run recomputes."""
        g = self.root[split]
        g.attrs["prompts"] = None
        c, d = embeddings.shape
        arr = g.create_array("text_features", shape=(c, d), chunks=(max(c, 1), d), dtype="float32",
                             fill_value=0, overwrite=True)
        arr[:] = embeddings.astype(np.float32)
        extra = {"class_names": list(class_names)} if class_names is not None else {}
        g.attrs.update({**extra, "prompts": list(prompts), "prompt_template": template})

    def prompts(self, split: str) -> list[str] | None:
        """The prompts the split's text embeddings were computed from (None: none, or unfinished)."""
        g = self.root[split]
        p = g.attrs.get("prompts")
        return list(p) if p is not None and "text_features" in g else None

    # ---- reading --------------------------------------------------------------------------------
    def split_summary(self, split: str) -> dict[str, Any]:
        g = self.root[split]
        done = self.done_mask(split)
        present = self.present_mask(split)
        failed = self._rows(split, "failed").astype(bool)
        errors = self._rows(split, "errors")
        ids = self._rows(split, "video_ids")
        use = done & present
        return {
            "videos": int(present.sum()),  # rows whose video is on disk
            "done": int(use.sum()),
            "failed": int((failed & use).sum()),
            # fewer decodable frames than T: indices were repeated (recorded, never dropped)
            "short": int((use & ~failed & (self._rows(split, "num_frames") < g["features"].shape[2])).sum()),
            "missing": len(g.attrs.get("missing") or []),  # listed, not on disk at the last run
            "kept": int((done & ~present).sum()),  # finished rows whose video vanished (unused)
            "classes": len(g.attrs["classes"]),
            "views": int(g.attrs["views"]),
            "shape": [self.num_rows(split), *g["features"].shape[1:]],
            "has_text": self.prompts(split) is not None,
            "tokens": self._tokens_summary(split, use & ~failed),
            "failures": [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(failed & use)],
        }

    def _tokens_summary(self, split: str, ok: np.ndarray) -> dict[str, Any] | None:
        """A split's token arrays: what they hold, and how many of the ``ok`` rows have them (None: no tokens)."""
        info = self.tokens_info(split)
        if info is None:
            return None
        return {**info.to_attrs(), "patches": info.patches, "done": int((ok & self.tokens_done_mask(split)).sum()),
                "of": int(ok.sum())}

    def tokens_pending(self, split: str) -> np.ndarray:
        """Rows whose token arrays are still to be written: finished, not failed, on disk, not ``tokens_done``
        (none in a split without tokens)."""
        if self.tokens_info(split) is None:
            return np.zeros(0, dtype=np.int64)
        failed = self._rows(split, "failed").astype(bool)
        return np.flatnonzero(self.done_mask(split) & ~failed & self.present_mask(split) & ~self.tokens_done_mask(split))

    def is_complete(self) -> bool:
        """Every video on disk at the last run is finished and every split has its text."""
        return bool(self.root.attrs.get("ready")) and all(
            (self.done_mask(s) | ~self.present_mask(s)).all() and self.prompts(s) is not None for s in self.splits
        )


    # ---- damage (mdmf_cache.store_verify) -------------------------------------------------------
    def verify(self, deep: bool | str = True, splits: list[str] | None = None) -> list[Damage]:
        """Every damaged part of the cache (all splits, or ``splits``); ``deep``: True reads every feature chunk,
        ``"changed"`` those changed since the last clean verify, False none (:func:`mdmf_cache.store.verify.verify`)."""
        return store_verify.verify(self, deep, splits)

    def check(self, splits: list[str] | None = None) -> None:
        """The cheap part of :meth:`verify`; raises CacheError naming the first damage."""
        store_verify.check(self, splits)

    def verify_and_repair(self, num_frames: int, dim: int, deep: bool | str = "changed"
                          ) -> tuple[list[Damage], dict[str, np.ndarray]]:
        """:meth:`verify`, then :meth:`repair` (rank 0 of ``extract``): :func:`mdmf_cache.store.verify.verify_and_repair`."""
        return store_verify.verify_and_repair(self, num_frames, dim, deep)

    def repair(self, damages: list[Damage]) -> dict[str, np.ndarray]:
        """Undo damage so that the next sync and extraction redo it: :func:`mdmf_cache.store.verify.repair`."""
        return store_verify.repair(self, damages)


def tokens_refusal(path: Path | str, have: str, asked: str) -> str:
    """The one line that refuses token arrays of another SPEC than a cache holds."""
    return (f"{path} holds tokens {have}, asked for tokens {asked}: a cache holds one --tokens SPEC; rerun with "
            f"--tokens {have} (or without --tokens), or add --overwrite to replace its token arrays by {asked} "
            "(the features are kept)")


__all__ = ["CacheStore", "RowSync", "tokens_refusal"]
