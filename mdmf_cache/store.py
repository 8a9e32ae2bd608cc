"""The Zarr v3 feature cache.

Layout (one group per dataset x backbone x weights under ``--cache-dir``)::

    cache/ucf101__RN50__openai.zarr/
        zarr.json                attrs: format, fingerprint, status, missing videos per split
        train/                   attrs: classes, class_names, prompts, views V, chunk_rows
            features       (N, V, T, D) float16   CLIP frame embeddings (encode_image, not normalised)
            frame_indices  (N, V, T)    int32     frames actually decoded (after clamping)
            num_frames     (N,)         int32     decodable frames of the video
            labels         (N,)         int32     index into attrs.classes
            video_ids      (N,)         str       ``class/video``
            done           (N,)         bool      row finished (features valid, or failure recorded)
            failed         (N,)         bool      video could not be decoded
            errors         (N,)         str       why it failed ('' otherwise)
            text_features  (C, D)       float32   prompt embeddings, in attrs.classes order
        val/ ...  test/ ...              V = 1

Every per-row array is chunked by the same ``chunk_rows``, and a writer only ever writes rows of the
chunks it owns (rank r owns chunks c with c % world_size == r): two processes writing rows that share
a chunk silently lose rows. Within a chunk the data arrays are written before ``done``, and zarr
writes each chunk file atomically, so a SIGKILL at any moment leaves either finished rows or rows
that the next run redoes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_ARRAYS = ("features", "frame_indices", "num_frames", "failed", "errors", "done")


def group_name(dataset: str, model: str, weights_slug: str) -> str:
    return f"{dataset}__{model}__{weights_slug}.zarr"


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names (with both values) of the fingerprint fields that differ."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: cache has {old.get(k)!r}, asked {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _zarr():
    import zarr

    return zarr


def owned_chunks(num_chunks: int, rank: int, world_size: int) -> list[int]:
    return [c for c in range(num_chunks) if c % world_size == rank]


class CacheStore:
    """Read and write one cache group (``*.zarr``)."""

    def __init__(self, path: Path | str, mode: str = "r"):
        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").is_file():
            raise CacheError(f"no cache at {self.path}; run 'mdmf-cache extract' first or check the path")
        self.root = _zarr().open_group(store=str(self.path), mode=mode)

    # ---- creation and fingerprint -------------------------------------------------------------
    @classmethod
    def open_for_writing(
        cls, path: Path, fingerprint: dict[str, Any], overwrite: bool = False, rank: int = 0, wait_s: float = 600.0
    ) -> "CacheStore":
        """Create the group (rank 0) or reopen it, refusing a different fingerprint.

        Raises:
            CacheError: the existing cache was made with other settings (fields named), unless
                ``overwrite``; or rank > 0 waited ``wait_s`` for rank 0 to create it.
        """
        path = Path(path)
        if rank != 0:
            deadline = time.monotonic() + wait_s
            while True:
                old = None
                if (path / "zarr.json").is_file():
                    store = cls(path, mode="a")
                    old = store.root.attrs.get("fingerprint")
                    if old == fingerprint and store.root.attrs.get("ready"):
                        return store
                    if old is not None and old != fingerprint and not overwrite:  # rank 0 refuses it too
                        raise CacheError(f"{path} was extracted with different settings "
                                         f"({'; '.join(fingerprint_diff(old, fingerprint))}); use the same options "
                                         "on every rank, or --overwrite")
                if time.monotonic() > deadline:
                    why = f" (it holds other settings: {'; '.join(fingerprint_diff(old, fingerprint))})" if old else ""
                    raise CacheError(f"rank {rank}: rank 0 did not prepare {path} within {wait_s:.0f} s{why}")
                time.sleep(0.5)
        if (path / "zarr.json").is_file():
            store = cls(path, mode="a")
            old = store.root.attrs.get("fingerprint")
            if old is None:  # a run killed right after creating the group: finish creating it
                store.root.attrs.update({"format": FORMAT_VERSION, "fingerprint": fingerprint, "ready": False})
                return store
            if old != fingerprint:
                if not overwrite:
                    diff = "; ".join(fingerprint_diff(old, fingerprint))
                    raise CacheError(
                        f"{path} was extracted with different settings ({diff}). "
                        "Use the same options, another --cache-dir, or --overwrite to replace it."
                    )
                log.warning("overwriting %s (settings changed)", path)
                shutil.rmtree(path)
            else:
                return store
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, mode="w")
        store.root.attrs.update({"format": FORMAT_VERSION, "fingerprint": fingerprint, "ready": False})
        return store

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.root.attrs.get("fingerprint", {}))

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if s in self.root]

    def init_split(
        self,
        name: str,
        video_ids: list[str],
        labels: np.ndarray,
        classes: list[str],
        class_names: list[str],
        views: int,
        num_frames: int,
        dim: int,
        chunk_rows: int,
        missing: list[str],
    ) -> None:
        """Create a split's arrays if absent (rank 0 only; reopening keeps what is there)."""
        if name in self.root:
            if "num_videos" in self.root[name].attrs:  # written last: the split was fully created
                return
            del self.root[name]  # a run killed while creating it: create it again
        n = len(video_ids)
        g = self.root.create_group(name)
        rows = (max(1, chunk_rows),)
        g.create_array("features", shape=(n, views, num_frames, dim), chunks=(rows[0], views, num_frames, dim),
                       dtype="float16", fill_value=0)
        g.create_array("frame_indices", shape=(n, views, num_frames), chunks=(rows[0], views, num_frames),
                       dtype="int32", fill_value=-1)
        g.create_array("num_frames", shape=(n,), chunks=rows, dtype="int32", fill_value=0)
        g.create_array("failed", shape=(n,), chunks=rows, dtype=bool, fill_value=False)
        g.create_array("errors", shape=(n,), chunks=rows, dtype=str, fill_value="")
        g.create_array("done", shape=(n,), chunks=rows, dtype=bool, fill_value=False)
        lab = g.create_array("labels", shape=(n,), chunks=(max(n, 1),), dtype="int32", fill_value=-1)
        ids = g.create_array("video_ids", shape=(n,), chunks=(max(n, 1),), dtype=str, fill_value="")
        if n:
            lab[:] = np.asarray(labels, dtype=np.int32)
            ids[:] = np.array(video_ids, dtype=object).astype(str)
        g.attrs.update({
            "classes": list(classes), "class_names": list(class_names), "views": views,
            "chunk_rows": rows[0], "missing": list(missing), "num_videos": n,
        })

    def mark_ready(self) -> None:
        self.root.attrs["ready"] = True

    # ---- rows -----------------------------------------------------------------------------------
    def chunk_rows(self, split: str) -> int:
        return int(self.root[split].attrs["chunk_rows"])

    def num_chunks(self, split: str) -> int:
        n = int(self.root[split].attrs["num_videos"])
        return -(-n // self.chunk_rows(split))

    def done_mask(self, split: str) -> np.ndarray:
        return np.asarray(self.root[split]["done"][:], dtype=bool)

    def pending_rows(self, split: str, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Rows of this rank's chunks that are not done yet, ascending."""
        done = self.done_mask(split)
        cr = self.chunk_rows(split)
        owner = (np.arange(len(done)) // cr) % world_size
        return np.flatnonzero(~done & (owner == rank))

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

    def write_text(self, split: str, embeddings: np.ndarray, prompts: list[str], template: str) -> None:
        g = self.root[split]
        c, d = embeddings.shape
        arr = g.create_array("text_features", shape=(c, d), chunks=(max(c, 1), d), dtype="float32",
                             fill_value=0, overwrite=True)
        arr[:] = embeddings.astype(np.float32)
        g.attrs.update({"prompts": list(prompts), "prompt_template": template})

    # ---- reading --------------------------------------------------------------------------------
    def split_summary(self, split: str) -> dict[str, Any]:
        g = self.root[split]
        done = np.asarray(g["done"][:], dtype=bool)
        failed = np.asarray(g["failed"][:], dtype=bool)
        errors = np.asarray(g["errors"][:])
        ids = np.asarray(g["video_ids"][:])
        return {
            "videos": len(done),
            "done": int(done.sum()),
            "failed": int((failed & done).sum()),
            # fewer decodable frames than T: indices were repeated (recorded, never dropped)
            "short": int((done & ~failed & (np.asarray(g["num_frames"][:]) < g["features"].shape[2])).sum()),
            "missing": len(g.attrs.get("missing", [])),
            "classes": len(g.attrs["classes"]),
            "views": int(g.attrs["views"]),
            "shape": list(g["features"].shape),
            "has_text": "text_features" in g,
            "failures": [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(failed & done)],
        }

    def is_complete(self) -> bool:
        return bool(self.root.attrs.get("ready")) and all(
            self.done_mask(s).all() and "text_features" in self.root[s] for s in self.splits
        )


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

    Raises:
        CacheError: the split is absent, has no text, or is unfinished (unless ``allow_incomplete``).
    """
    key = (str(Path(path).resolve()), split, str(device), allow_incomplete)
    if _KEPT is not None and key in _KEPT:
        return _KEPT[key]
    import torch

    store = CacheStore(path)
    if split not in store.root:
        raise CacheError(f"{path} has no split {split!r} (has: {', '.join(store.splits) or 'none'})")
    g = store.root[split]
    done = np.asarray(g["done"][:], dtype=bool)
    if not done.all() and not allow_incomplete:
        raise CacheError(
            f"{path} split {split}: {int((~done).sum())} of {len(done)} videos not extracted yet; "
            "rerun the same 'mdmf-cache extract' command to finish it"
        )
    if "text_features" not in g:
        raise CacheError(f"{path} split {split} has no text embeddings; rerun 'mdmf-cache extract'")
    keep = done & ~np.asarray(g["failed"][:], dtype=bool)
    feats = np.asarray(g["features"][:])[keep]
    ids = np.asarray(g["video_ids"][:])[keep]
    loaded = FeatureSplit(
        features=torch.from_numpy(feats).to(device),
        labels=torch.from_numpy(np.asarray(g["labels"][:])[keep].astype(np.int64)).to(device),
        video_ids=[str(v) for v in ids],
        classes=list(g.attrs["classes"]),
        class_names=list(g.attrs["class_names"]),
        text=torch.from_numpy(np.asarray(g["text_features"][:])).to(device),
    )
    if _KEPT is not None:
        _KEPT[key] = loaded
    return loaded


def export_h5(path: Path | str, out: Path | str) -> Path:
    """Write every split's arrays and attributes to one HDF5 file with h5py."""
    import h5py

    store = CacheStore(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        f.attrs["fingerprint"] = json.dumps(store.fingerprint)
        f.attrs["format"] = FORMAT_VERSION
        for split in store.splits:
            g = store.root[split]
            hg = f.create_group(split)
            for name in g.array_keys():
                data = np.asarray(g[name][:])
                if data.dtype.kind in "OUT":
                    data = data.astype(object)
                    hg.create_dataset(name, data=data, dtype=h5py.string_dtype())
                else:
                    hg.create_dataset(name, data=data)
            for key, val in g.attrs.items():
                hg.attrs[key] = json.dumps(val)
    return out
