"""The Zarr v3 feature cache.

Layout (one group per dataset x backbone x weights under ``--cache-dir``)::

    cache/ucf101__RN50__openai.zarr/
        zarr.json                attrs: format, fingerprint {video, text}, ready, config
        train/                   attrs: classes, class_names, prompts, views V, chunk_rows, num_videos,
                                        missing (listed ids not on disk at the last run)
            features       (N, V, T, D) float16   CLIP frame embeddings (encode_image, not normalised)
            frame_indices  (N, V, T)    int32     frames actually decoded (after clamping)
            num_frames     (N,)         int32     decodable frames of the video
            done           (N,)         bool      row finished (features valid, or failure recorded)
            failed         (N,)         bool      video could not be decoded
            errors         (N,)         str       why it failed ('' otherwise)
            video_ids      (N,)         str       ``class/video``: what identifies a row
            labels         (N,)         int32     index into attrs.classes
            present        (N,)         bool      the video was on disk at the last run
            order          (N,)         int64     position in the split listing (-1: not listed now)
            text_features  (C, D)       float32   prompt embeddings, in attrs.classes order
        val/ ...  test/ ...              V = 1

A row belongs to its video id, for good. A rerun after the video tree changed appends rows for
videos that appeared (the arrays grow; ``num_videos``, written last, says how many rows are real)
and marks rows whose video vanished as not ``present``: their features are kept, unused, until
the video is back. Readers take ``done & ~failed & present`` rows, sorted by ``order``, which is
exactly what a fresh extraction of the current tree holds.

Every per-row array is chunked by the same ``chunk_rows``, and a writer only ever writes rows of the
chunks it owns (rank r owns chunks c with c % world_size == r): two processes writing rows that share
a chunk silently lose rows. Within a chunk the data arrays are written before ``done``, and zarr
writes each chunk file atomically, so a SIGKILL at any moment leaves either finished rows or rows
that the next run redoes. Rows are appended and re-marked by rank 0 alone, before the ranks start.

Damage (a chunk file deleted or truncated, a ``zarr.json`` corrupted) is found by :meth:`CacheStore.verify`:
every ``zarr.json`` readable, every chunk that must hold data present and readable, labels in range, no
all-zero finished row, text present. Readers run its cheap part (metadata, chunk files present, the
small arrays) before they load; ``extract`` runs all of it and re-extracts only the damaged rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError

log = logging.getLogger(__name__)

#: 2: rows keyed by video id (present, order), train views seeded by the id, fingerprint {video, text}.
FORMAT_VERSION = 2
ROW_ARRAYS = ("features", "frame_indices", "num_frames", "failed", "errors", "done")
META_ARRAYS = ("video_ids", "labels", "present", "order")
META_CHUNK = 1 << 16  # rows per chunk of the small per-row arrays only rank 0 writes


def group_name(dataset: str, model: str, weights_slug: str) -> str:
    return f"{dataset}__{model}__{weights_slug}.zarr"


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names (with both values) of the fingerprint fields that differ."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: cache has {old.get(k)!r}, asked {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _zarr():
    import zarr

    return zarr


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


def owned_chunks(num_chunks: int, rank: int, world_size: int) -> list[int]:
    return [c for c in range(num_chunks) if c % world_size == rank]


@dataclass
class RowSync:
    """What :meth:`CacheStore.sync_rows` found: rows are counted, vanished ids listed."""

    rows: int = 0  # rows of the split after the sync
    added: int = 0  # rows appended this run (videos new on disk)
    created: bool = False  # the split was made this run (its rows are all new)
    vanished: list[str] = field(default_factory=list)  # finished rows whose video is gone (kept, unused)


class CacheStore:
    """Read and write one cache group (``*.zarr``)."""

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
            shutil.rmtree(path)
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
            shutil.rmtree(path)
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
            self._create_split(name, views, num_frames, dim, chunk_rows, classes)
        g = self.root[name]
        if list(g.attrs["classes"]) != list(classes):
            raise CacheError(f"{self.path} split {name}: the cache has classes other than the split files name; "
                             "extract with --overwrite")
        n_old = int(g.attrs["num_videos"])
        stored = [str(v) for v in np.asarray(g["video_ids"][:n_old])] if n_old else []
        have = set(stored)
        new = []
        for i, v in enumerate(listed):
            if present[i] and v not in have:  # an id listed twice gets one row
                have.add(v)
                new.append(i)
        n = n_old + len(new)
        if n != g["done"].shape[0]:  # also undoes the growth of a run killed before it set num_videos
            for arr in (*ROW_ARRAYS, *META_ARRAYS):
                g[arr].resize((n, *g[arr].shape[1:]))
        if new:
            g["video_ids"][n_old:n] = np.array([listed[i] for i in new], dtype=object).astype(str)
            g["labels"][n_old:n] = labels[new]
            g["done"][n_old:n] = False  # explicit: a shrunk-then-grown chunk may hold stale values
        ids = stored + [listed[i] for i in new]
        pos = {v: i for i, v in enumerate(listed)}
        on_disk = {v for v, p in zip(listed, present) if p}
        if n:
            g["present"][:n] = np.array([v in on_disk for v in ids], dtype=bool)
            g["order"][:n] = np.array([pos.get(v, -1) for v in ids], dtype=np.int64)
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
    def array_specs(views: int, num_frames: int, dim: int, chunk_rows: int) -> dict[str, tuple]:
        """name -> (shape after the row axis, rows per chunk, dtype, fill value) of a split's per-row arrays."""
        cr = max(1, chunk_rows)
        return {
            "features": ((views, num_frames, dim), cr, "float16", 0),
            "frame_indices": ((views, num_frames), cr, "int32", -1),
            "num_frames": ((), cr, "int32", 0),
            "failed": ((), cr, bool, False),
            "errors": ((), cr, str, ""),
            "done": ((), cr, bool, False),
            "video_ids": ((), META_CHUNK, str, ""),
            "labels": ((), META_CHUNK, "int32", -1),
            "present": ((), META_CHUNK, bool, False),
            "order": ((), META_CHUNK, "int64", -1),
        }

    def _create_split(self, name: str, views: int, num_frames: int, dim: int, chunk_rows: int,
                      classes: list[str]) -> None:
        g = self.root.create_group(name)
        for arr, (tail, rows, dtype, fill) in self.array_specs(views, num_frames, dim, chunk_rows).items():
            g.create_array(arr, shape=(0, *tail), chunks=(rows, *tail), dtype=dtype, fill_value=fill)
        g.attrs.update({"classes": list(classes), "views": views, "chunk_rows": max(1, chunk_rows), "num_videos": 0})

    def rewrite_array_meta(self, split: str, name: str, num_frames: int, dim: int) -> None:
        """Write a damaged ``zarr.json`` of a per-row array again (its chunk files are kept)."""
        import tempfile

        from .fileio import atomic_write_text

        g = self.root[split]
        tail, rows, dtype, fill = self.array_specs(int(g.attrs["views"]), num_frames, dim,
                                                   int(g.attrs["chunk_rows"]))[name]
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            fresh = _zarr().open_group(store=tmp, mode="w")
            fresh.create_array(name, shape=(int(g.attrs["num_videos"]), *tail), chunks=(rows, *tail), dtype=dtype,
                               fill_value=fill)
            atomic_write_text(self.path / split / name / "zarr.json", (Path(tmp) / name / "zarr.json").read_text())

    def mark_ready(self) -> None:
        self.root.attrs["ready"] = True

    # ---- rows -----------------------------------------------------------------------------------
    def num_rows(self, split: str) -> int:
        return int(self.root[split].attrs["num_videos"])

    def chunk_rows(self, split: str) -> int:
        return int(self.root[split].attrs["chunk_rows"])

    def num_chunks(self, split: str) -> int:
        return -(-self.num_rows(split) // self.chunk_rows(split))

    def video_ids(self, split: str) -> list[str]:
        return [str(v) for v in np.asarray(self.root[split]["video_ids"][: self.num_rows(split)])]

    def _rows(self, split: str, name: str) -> np.ndarray:
        return np.asarray(self.root[split][name][: self.num_rows(split)])

    def done_mask(self, split: str) -> np.ndarray:
        return self._rows(split, "done").astype(bool)

    def present_mask(self, split: str) -> np.ndarray:
        """Rows whose video was on disk at the last run (all rows in a format-1 cache)."""
        if "present" not in self.root[split]:
            return np.ones(self.num_rows(split), dtype=bool)
        return self._rows(split, "present").astype(bool)

    def pending_rows(self, split: str, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Rows of this rank's chunks that are not done yet and whose video is there, ascending."""
        done = self.done_mask(split)
        present = self.present_mask(split)
        cr = self.chunk_rows(split)
        owner = (np.arange(len(done)) // cr) % world_size
        return np.flatnonzero(~done & present & (owner == rank))
    def write_rows(self, split: str, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Write finished rows, all inside one chunk, data first and ``done`` last.

        Args:
            rows: ascending row indices, all in the same chunk.
            values: array name -> values for those rows (``features``, ``frame_indices``,
                ``num_frames``, ``failed``, ``errors``).
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
        for name, val in values.items():
            arr = g[name]
            if contiguous:
                arr[lo:hi] = val
            else:  # read-modify-write of this writer's own chunk
                block = arr[lo:hi]
                block[rows - lo] = val
                arr[lo:hi] = block
        done = g["done"]
        block = np.asarray(done[lo:hi])
        block[rows - lo] = True
        done[lo:hi] = block

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
            "failures": [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(failed & use)],
        }

    def is_complete(self) -> bool:
        """Every video on disk at the last run is finished and every split has its text."""
        return bool(self.root.attrs.get("ready")) and all(
            (self.done_mask(s) | ~self.present_mask(s)).all() and self.prompts(s) is not None for s in self.splits
        )

    # ---- damage ---------------------------------------------------------------------------------
    def _chunk_files(self, split: str, name: str, n: int):
        """(lo, hi, file relative to the cache, exists) of each chunk holding rows [0, n) of an array."""
        arr = self.root[split][name]
        step, ndim = arr.chunks[0], len(arr.shape)
        for c in range(-(-n // step)):
            rel = f"{split}/{name}/c/" + "/".join([str(c)] + ["0"] * (ndim - 1))
            yield c * step, min(n, (c + 1) * step), rel, (self.path / rel).is_file()

    def _read_checked(self, split: str, name: str, n: int, damages: list[Damage], fix: str = "chunk",
                      on_chunk=None) -> np.ndarray | None:
        """Rows [0, n) of an array: one read, or chunk by chunk if that fails, recording each unreadable
        chunk (its rows read as the fill value). With ``on_chunk(lo, hi, rel, exists, block)`` every chunk
        is read on its own and handed to it, and nothing is kept (``features``: memory stays one chunk)."""
        arr = self.root[split][name]
        if on_chunk is None:  # the fast path: one read; chunk by chunk only to find an unreadable one
            try:
                whole = np.asarray(arr[:n])
                return whole.astype(object) if whole.dtype.kind in "OUT" else whole
            except Exception:
                pass
        parts = []
        for lo, hi, rel, exists in self._chunk_files(split, name, n):
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

    def verify(self, deep: bool = True, splits: list[str] | None = None) -> list[Damage]:
        """Every damaged part of the cache (all splits, or ``splits``), each naming split, array, rows and file.

        ``deep=False`` (what readers run before loading): metadata, the chunk files that must hold data,
        and the small per-row arrays. ``deep=True`` (``verify``, ``extract``) also reads every chunk of
        ``features`` and ``text_features``.
        """
        damages: list[Damage] = []
        for split in splits or [s for s in ("train", "val", "test") if (self.path / s).is_dir()]:
            damages += self._verify_split(split, deep)
        return damages

    def _verify_split(self, split: str, deep: bool) -> list[Damage]:
        gpath = self.path / split
        why = meta_problem(gpath)
        if why:
            return [Damage(split, "", f"{split}/zarr.json", why, fix="split")]
        g = self.root[split]
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
            for lo, hi, rel, exists in self._chunk_files(split, name, n):
                rows = lo + np.flatnonzero(need[lo:hi])
                if not exists and len(rows):
                    out.append(Damage(split, name, rel, f"chunk file missing ({what})", rows.tolist(), fix))

        def bad(name: str, rows: np.ndarray, what: str, fix: str = "rows") -> None:
            rows = np.flatnonzero(rows)
            if len(rows):
                out.append(Damage(split, name, f"{split}/{name}", what, rows.tolist(), fix))

        ids = self._read_checked(split, "video_ids", n, out, fix="split")
        every = np.ones(n, dtype=bool)
        missing("video_ids", every, "the rows lost their video ids", "split")
        if not any(d.array == "video_ids" for d in out):
            bad("video_ids", np.array([not v for v in ids], dtype=bool), "empty video ids", "split")
            counts = Counter(ids.tolist())
            bad("video_ids", np.array([counts[v] > 1 for v in ids], dtype=bool), "repeated video ids", "split")
        labels = self._read_checked(split, "labels", n, out)
        order = self._read_checked(split, "order", n, out) if "present" in g else np.zeros(n, dtype=np.int64)
        listed = order >= 0  # a row no split file lists now keeps whatever label; it is unused
        missing("labels", listed, "labels of listed videos", "labels")
        lost = np.zeros(n, dtype=bool)
        for lo, hi, _, exists in self._chunk_files(split, "labels", n):
            lost[lo:hi] = not exists
        bad("labels", listed & ~lost & ((labels < 0) | (labels >= len(classes))),
            f"labels outside 0..{len(classes) - 1}", "labels")
        done = self._read_checked(split, "done", n, out).astype(bool)
        failed = self._read_checked(split, "failed", n, out).astype(bool)
        errors = self._read_checked(split, "errors", n, out)
        has_error = np.array([bool(e) for e in errors], dtype=bool)
        bad("failed", done & ~failed & has_error, "rows with an error message are not marked failed")
        bad("errors", done & failed & ~has_error, "failed rows without their error message")
        ok = done & ~failed  # finished rows that hold features
        num_frames = self._read_checked(split, "num_frames", n, out)
        bad("num_frames", ok & (num_frames <= 0), "finished rows with no frame count")
        fi = self._read_checked(split, "frame_indices", n, out)
        bad("frame_indices", ok & (fi.reshape(n, -1) < 0).any(1) if n else ok, "finished rows without frame indices")
        if "present" in g:
            present = self._read_checked(split, "present", n, out).astype(bool)
            gone = set(g.attrs.get("missing") or [])
            bad("present", ~present & (order >= 0) & np.array([v not in gone for v in ids], dtype=bool),
                "listed videos on disk marked absent", "sync")
            bad("order", present & (order < 0), "videos on disk without a listing position", "sync")
        for name in ("features", "frame_indices", "num_frames"):
            missing(name, ok, "finished rows lost their data", "rows")
        if deep:
            zero = np.zeros(n, dtype=bool)

            def check(lo, hi, rel, exists, block):
                if exists:  # a missing chunk is reported above
                    zero[lo:hi] = (block.reshape(hi - lo, block.shape[1], -1) == 0).all(-1).any(-1)

            self._read_checked(split, "features", n, out, on_chunk=check)
            bad("features", ok & zero, "finished rows whose features are all zero")
        if has_text:
            c = len(classes)
            text = self._read_checked(split, "text_features", c, out, fix="text")
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

    def check(self, splits: list[str] | None = None) -> None:
        """The cheap part of :meth:`verify`; raises CacheError naming the first damage."""
        damages = self.verify(deep=False, splits=splits)
        if damages:
            raise CacheError(damage_message(self.path, damages))

    def verify_and_repair(self, num_frames: int, dim: int) -> tuple[list[Damage], dict[str, np.ndarray]]:
        """:meth:`verify` then :meth:`repair` (rank 0 of ``extract``): array metadata is written again
        first, then what it hid is verified. Returns (damage found, rows to extract again per split)."""
        damages = self.verify()
        meta = [d for d in damages if d.fix == "meta"]
        for d in meta:
            log.warning("%s: %s; writing it again (its chunks are kept)", self.path, d)
            self.rewrite_array_meta(d.split, d.array, num_frames, dim)
        if meta:
            damages = meta + self.verify()
        return damages, self.repair(damages)

    def repair(self, damages: list[Damage]) -> dict[str, np.ndarray]:
        """Undo damage so that the next sync and extraction redo it (rank 0, before any rank extracts).

        Returns per split the rows marked to be extracted again. Splits whose metadata or ids are
        lost are deleted (rebuilt by ``sync_rows``); unreadable chunk files are deleted; damaged
        rows are marked not done; damaged text is marked stale.
        """
        rebuild = {d.split for d in damages if d.fix == "split"}
        for split in sorted(rebuild):
            log.warning("%s split %s: %s; rebuilding the split", self.path, split,
                        next(str(d) for d in damages if d.split == split and d.fix == "split"))
            shutil.rmtree(self.path / split)
        redo: dict[str, set[int]] = {}
        for d in damages:
            if d.split in rebuild:
                continue
            if d.fix == "chunk":
                (self.path / d.file).unlink(missing_ok=True)
            if d.fix in ("chunk", "rows") and d.array in ROW_ARRAYS:
                redo.setdefault(d.split, set()).update(d.rows)
            if d.fix == "text":
                if d.file.endswith("zarr.json"):
                    shutil.rmtree(self.path / d.split / "text_features")
                self.root[d.split].attrs["prompts"] = None
        out = {}
        for split, rows in redo.items():
            n = self.num_rows(split)
            rows = np.array(sorted(r for r in rows if r < n), dtype=np.int64)
            done = self.root[split]["done"]
            cr = self.chunk_rows(split)
            for c in np.unique(rows // cr):
                lo, hi = int(c * cr), int(min(n, (c + 1) * cr))
                block = np.asarray(done[lo:hi]).astype(bool)
                block[rows[(rows >= lo) & (rows < hi)] - lo] = False
                done[lo:hi] = block
            out[split] = rows
        return out


@dataclass
class FeatureSplit:
    """One split of a cache in memory, the input of fast-mode training and evaluation.

    Attributes:
        features: (N, V, T, D) float16 frame embeddings of the usable videos (done, not failed).
        labels: (N,) int64 class index into ``classes``.
        video_ids: (N,) ids.
        classes: (C,) class keys; class_names: (C,) prompt names.
        text: (C, D) float32 prompt embeddings.
    """

    features: Any
    labels: Any
    video_ids: list[str]
    classes: list[str]
    class_names: list[str]
    text: Any

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_KEPT: dict[tuple, FeatureSplit] | None = None  # set inside keep_loaded()


@contextmanager
def keep_loaded():
    """Inside this block, loading the same split again returns the split already in memory.

    A sweep runs many trainings in one process; each calls :func:`load_split_features`, and the
    cache is read once. Callers must not modify the returned tensors in place.
    """
    global _KEPT
    outer = _KEPT
    _KEPT = {} if outer is None else outer
    try:
        yield
    finally:
        _KEPT = outer


def load_split_features(path: Path | str, split: str, device: str = "cpu", allow_incomplete: bool = False) -> FeatureSplit:
    """Load a split's usable rows and text into memory (torch tensors on ``device``).

    Usable rows are finished, decodable, and on disk at the last extract run, in split-file
    order (``order``): what a fresh extraction of the current tree holds, row for row.

    Raises:
        CacheError: the split is absent, has no text, or is unfinished (unless ``allow_incomplete``).
    """
    key = (str(Path(path).resolve()), split, str(device), allow_incomplete)
    if _KEPT is not None and key in _KEPT:
        return _KEPT[key]
    import torch

    store = CacheStore(path)
    if split not in store.splits:
        raise CacheError(f"{path} has no split {split!r} (has: {', '.join(store.splits) or 'none'})")
    store.check([split])
    g = store.root[split]
    done, present = store.done_mask(split), store.present_mask(split)
    pending = present & ~done
    if pending.any() and not allow_incomplete:
        raise CacheError(
            f"{path} split {split}: {int(pending.sum())} of {int(present.sum())} videos not extracted yet; "
            "rerun the same 'mdmf-cache extract' command to finish it"
        )
    if store.prompts(split) is None:
        raise CacheError(f"{path} split {split} has no text embeddings; rerun 'mdmf-cache extract'")
    keep = np.flatnonzero(done & present & ~store._rows(split, "failed").astype(bool))
    if "order" in g:  # format 1 caches: rows are already in split-file order
        keep = keep[np.argsort(store._rows(split, "order")[keep], kind="stable")]
    try:
        feats = np.asarray(g["features"][: store.num_rows(split)])[keep]
    except Exception as e:  # a garbled chunk: name it
        damages = store.verify(splits=[split])
        raise CacheError(damage_message(path, damages) if damages else f"{path} split {split}: {e}") from e
    zero = (feats.reshape(*feats.shape[:2], -1) == 0).all(-1).any(-1)
    if zero.any():
        raise CacheError(damage_message(path, [Damage(split, "features", f"{split}/features",
                                                      "finished rows whose features are all zero",
                                                      keep[zero].tolist())]))
    ids = store._rows(split, "video_ids")[keep]
    loaded = FeatureSplit(
        features=torch.from_numpy(feats).to(device),
        labels=torch.from_numpy(store._rows(split, "labels")[keep].astype(np.int64)).to(device),
        video_ids=[str(v) for v in ids],
        classes=list(g.attrs["classes"]),
        class_names=list(g.attrs["class_names"]),
        text=torch.from_numpy(np.asarray(g["text_features"][:])).to(device),
    )
    if _KEPT is not None:
        _KEPT[key] = loaded
    return loaded


def export_h5(path: Path | str, out: Path | str, overwrite: bool = False) -> Path:
    """Write every split's arrays and every attribute (root and splits, JSON-encoded) to one HDF5 file.

    The file is written beside ``out`` and renamed once complete: a failed or killed export leaves no
    half-written file (and an older ``out`` untouched).

    Raises:
        CacheError: the cache is missing or damaged, ``out`` is inside a cache, or exists (unless ``overwrite``).
    """
    import h5py

    from .fileio import atomic_write_file

    store = CacheStore(path)
    out = Path(out)
    inside = next((p for p in (out.resolve(), *out.resolve().parents) if p.suffix == ".zarr" and (p / "zarr.json").is_file()), None)
    if inside is not None:
        raise CacheError(f"{out} is inside the cache {inside}; write the export outside any *.zarr folder")
    if out.is_dir():
        raise CacheError(f"{out} is a directory; give a file name such as {out / (store.path.stem + '.h5')}")
    if out.exists() and not overwrite:
        raise CacheError(f"{out} exists; pass --overwrite to replace it, or choose another file")
    store.check(store.splits)
    if not store.is_complete():
        pending = {s: int((~store.done_mask(s) & store.present_mask(s)).sum()) for s in store.splits}
        log.warning("%s is not complete (%s); exporting it as it is: rows with done=False hold no features. "
                    "Rerun the extract command first for a complete export", path,
                    ", ".join(f"{s}: {k} videos not extracted" for s, k in pending.items() if k) or "not ready")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for key, val in store.root.attrs.items():
                f.attrs[key] = json.dumps(val)
            for split in store.splits:
                g = store.root[split]
                n = store.num_rows(split)
                hg = f.create_group(split)
                for name in g.array_keys():
                    try:
                        data = np.asarray(g[name][:] if name == "text_features" else g[name][:n])
                    except Exception as e:  # a garbled chunk: name it
                        damages = store.verify(splits=[split])
                        raise CacheError(damage_message(path, damages) if damages else f"{split}/{name}: {e}") from e
                    if data.dtype.kind in "OUT":
                        data = data.astype(object)
                        hg.create_dataset(name, data=data, dtype=h5py.string_dtype())
                    else:
                        hg.create_dataset(name, data=data)
                for key, val in g.attrs.items():
                    hg.attrs[key] = json.dumps(val)

    return atomic_write_file(out, write)
