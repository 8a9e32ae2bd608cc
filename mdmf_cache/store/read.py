"""Reading a cache (:mod:`mdmf_cache.store.cache`) into memory or out to HDF5: :func:`load_split_features` (the input of
fast-mode training and evaluation, with :func:`keep_loaded` for many trainings in one process), :func:`read_split`
(the same as numpy arrays, the features read into an array the caller may provide: shared memory) and
:func:`export_h5`."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mdmf_cache.errors import CacheError
from mdmf_cache.fileio import atomic_write_file
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.verify import NONFINITE, ZERO, Damage, damage_message, row_problems

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 << 20  # read and copied at a time: what loading or exporting holds beyond its result


@dataclass
class FeatureSplit:
    """One split of a cache in memory, the input of fast-mode training and evaluation.

    Attributes:
        features: (N, V, T, D) float16 frame embeddings of the usable videos (done, not failed).
        labels: (N,) int64 class index into ``classes``.
        video_ids: (N,) ids.
        classes: (C,) class keys; class_names: (C,) prompt names.
        text: (C, D) float32 prompt embeddings.
        tokens: the split's :class:`~mdmf_cache.store.tokens.TokenReader` where a token head reads them (set by
            whoever opens it, on a copy of the split; None: not opened).
    """

    features: Any
    labels: Any
    video_ids: list[str]
    classes: list[str]
    class_names: list[str]
    text: Any
    tokens: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_KEPT: dict[tuple, FeatureSplit] | None = None  # set inside keep_loaded()


def _kept_key(path: Path | str, split: str, device: str, allow_incomplete: bool = False) -> tuple:
    return (str(Path(path).resolve()), split, str(device), allow_incomplete)


@contextmanager
def keep_loaded(splits: dict[tuple[str, str], FeatureSplit] | None = None):
    """Inside this block, loading the same split again returns the split already in memory.

    A sweep runs many trainings in one process; each calls :func:`load_split_features`, and the
    cache is read once. Callers must not modify the returned tensors in place.

    Args:
        splits: splits already in memory as ``{(cache path, split name): FeatureSplit}`` with CPU tensors (a sweep
            worker's, mapped from the shared copy): loading one of them returns it, and loading it onto another
            device moves it there from memory instead of reading the cache.
    """
    global _KEPT
    outer = _KEPT
    _KEPT = {} if outer is None else outer
    if splits:
        _KEPT = {**_KEPT, **{_kept_key(path, name, "cpu"): fs for (path, name), fs in splits.items()}}
    try:
        yield
    finally:
        _KEPT = outer


def blocks(arr, n: int, max_bytes: int | None = None):
    """(lo, hi) ranges covering rows [0, n) of a zarr array in whole chunks, about ``max_bytes`` each
    (default :data:`BLOCK_BYTES`), at least one chunk."""
    max_bytes = max_bytes or BLOCK_BYTES
    step = arr.chunks[0]
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    rows = max(step, max_bytes // row_bytes // step * step)
    for lo in range(0, n, rows):
        yield lo, min(n, lo + rows)


Allocate = Callable[[tuple, np.dtype], np.ndarray]  # (shape, dtype) -> the array rows are read into


def read_rows(store, split: str, name: str, rows: np.ndarray, allocate: Allocate | None = None) -> np.ndarray:
    """``array[rows]`` of a split's per-row array (``features``), read block by block into one array.

    Memory: the result plus one block; blocks holding none of ``rows`` are not read. Finished rows
    that are all zero or hold NaN or inf are refused (checked per block, as read).

    Args:
        allocate: ``(shape, dtype) -> array`` that the rows are read into (default ``np.empty``).

    Raises:
        CacheError: a chunk is unreadable, or rows are damaged (named, with what to do).
    """
    arr = store.root[split][name]
    n = store.num_rows(split)
    rows = np.asarray(rows, dtype=np.int64)
    shape = (len(rows), *arr.shape[1:])
    out = (allocate or np.empty)(shape, arr.dtype)
    if out.shape != shape or out.dtype != arr.dtype:
        raise ValueError(f"allocate gave a {out.dtype} array of shape {out.shape}, not {arr.dtype} {shape}")
    dest = np.full(n, -1, dtype=np.int64)  # cache row -> position in ``out``
    dest[rows] = np.arange(len(rows))
    zero, nonfinite = [], []
    for lo, hi in blocks(arr, n):
        sel = np.flatnonzero(dest[lo:hi] >= 0)
        if not len(sel):
            continue
        try:
            block = np.asarray(arr[lo:hi])
        except Exception as e:  # a garbled chunk: name it
            damages = store.verify(splits=[split])
            raise CacheError(damage_message(store.path, damages) if damages else
                             f"{store.path} split {split}: {e}") from e
        if len(sel) < hi - lo:
            block = block[sel]
        z, bad = row_problems(block)
        zero += (lo + sel[z]).tolist()
        nonfinite += (lo + sel[bad]).tolist()
        pos = dest[lo + sel]
        if pos[-1] - pos[0] == len(pos) - 1 and (len(pos) == 1 or (np.diff(pos) == 1).all()):
            out[pos[0]:pos[-1] + 1] = block  # rows in split-file order (a fresh cache): one copy
        else:
            out[pos] = block
        del block
    damages = [Damage(split, name, f"{split}/{name}", what, bad)
               for what, bad in ((NONFINITE, nonfinite), (ZERO, zero)) if bad]
    if damages:
        raise CacheError(damage_message(store.path, damages))
    return out


def load_split_features(path: Path | str, split: str, device: str = "cpu", allow_incomplete: bool = False) -> FeatureSplit:
    """Load a split's usable rows and text into memory (torch tensors on ``device``).

    Usable rows are finished, decodable, and on disk at the last extract run, in split-file
    order (``order``): what a fresh extraction of the current tree holds, row for row.

    Raises:
        CacheError: the split is absent, has no text, or is unfinished (unless ``allow_incomplete``).
    """
    import torch

    key = _kept_key(path, split, device, allow_incomplete)
    if _KEPT is not None:
        if key in _KEPT:
            return _KEPT[key]
        host = _KEPT.get(_kept_key(path, split, "cpu", allow_incomplete))
        if host is not None:  # in memory already (a sweep worker's shared copy): moved, not read again
            _KEPT[key] = moved = FeatureSplit(host.features.to(device), host.labels.to(device), host.video_ids,
                                              host.classes, host.class_names, host.text.to(device))
            return moved
    arrays = read_split(path, split, allow_incomplete)
    loaded = FeatureSplit(
        features=torch.from_numpy(arrays.features).to(device),
        labels=torch.from_numpy(arrays.labels).to(device),
        video_ids=arrays.video_ids,
        classes=arrays.classes,
        class_names=arrays.class_names,
        text=torch.from_numpy(arrays.text).to(device),
    )
    if _KEPT is not None:
        _KEPT[key] = loaded
    return loaded


def split_labels(path: Path | str, split: str) -> tuple[np.ndarray, int]:
    """The labels of the rows :func:`read_split` would load, and the split's class count, without reading a feature
    (for checking episodes before any work).

    Raises:
        CacheError: the split is absent.
    """
    store = CacheStore(path)
    if split not in store.splits:
        raise CacheError(f"{path} has no split {split!r} (has: {', '.join(store.splits) or 'none'})")
    keep = store.done_mask(split) & store.present_mask(split) & ~store._rows(split, "failed").astype(bool)
    return store._rows(split, "labels")[np.flatnonzero(keep)].astype(np.int64), len(store.root[split].attrs["classes"])


def usable_rows(store: CacheStore, split: str) -> np.ndarray:
    """The array rows of a split's usable rows (finished, decodable, on disk at the last extract run), in
    split-file order: row ``i`` of :func:`read_split`'s result is array row ``usable_rows(...)[i]`` (the token
    reader maps episodes' rows through it)."""
    keep = np.flatnonzero(store.done_mask(split) & store.present_mask(split) & ~store._rows(split, "failed").astype(bool))
    if "order" in store.root[split]:  # format 1 caches: rows are already in split-file order
        keep = keep[np.argsort(store._rows(split, "order")[keep], kind="stable")]
    return keep


def read_split(path: Path | str, split: str, allow_incomplete: bool = False,
               allocate: Allocate | None = None) -> FeatureSplit:
    """:func:`load_split_features`'s rows as numpy arrays (features float16, labels int64, text float32).

    Args:
        allocate: ``(shape, dtype) -> array`` that the features are read into, block by block (default
            ``np.empty``): e.g. a file in shared memory that several processes map.

    Raises:
        CacheError: the split is absent, has no text, or is unfinished (unless ``allow_incomplete``).
    """
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
    keep = usable_rows(store, split)
    feats = read_rows(store, split, "features", keep, allocate)
    ids = store._rows(split, "video_ids")[keep]
    return FeatureSplit(
        features=feats,
        labels=store._rows(split, "labels")[keep].astype(np.int64),
        video_ids=[str(v) for v in ids],
        classes=list(g.attrs["classes"]),
        class_names=list(g.attrs["class_names"]),
        text=np.asarray(g["text_features"][:]),
    )


def export_h5(path: Path | str, out: Path | str, overwrite: bool = False) -> Path:
    """Write every split's arrays and every attribute (root and splits, JSON-encoded) to one HDF5 file.

    The file is written beside ``out`` and renamed once complete: a failed or killed export leaves no
    half-written file (and an older ``out`` untouched).

    Raises:
        CacheError: the cache is missing or damaged, ``out`` is inside a cache, or exists (unless ``overwrite``).
    """
    import h5py

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

    def read(split: str, arr, lo: int, hi: int) -> np.ndarray:
        try:
            return np.asarray(arr[lo:hi])
        except Exception as e:  # a garbled chunk: name it
            damages = store.verify(splits=[split])
            raise CacheError(damage_message(path, damages) if damages else f"{split}/{arr.basename}: {e}") from e

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for key, val in store.root.attrs.items():
                f.attrs[key] = json.dumps(val)
            for split in store.splits:
                g = store.root[split]
                n = store.num_rows(split)
                hg = f.create_group(split)
                for name in g.array_keys():
                    arr = g[name]
                    rows = arr.shape[0] if name == "text_features" else n
                    if arr.dtype.kind in "OUT" or str(arr.dtype).startswith("<U"):  # ids, errors: small
                        hg.create_dataset(name, data=read(split, arr, 0, rows).astype(object),
                                          dtype=h5py.string_dtype())
                        continue
                    ds = hg.create_dataset(name, shape=(rows, *arr.shape[1:]), dtype=arr.dtype)
                    for lo, hi in blocks(arr, rows):  # memory: one block, not the array
                        ds[lo:hi] = read(split, arr, lo, hi)
                for key, val in g.attrs.items():
                    hg.attrs[key] = json.dumps(val)

    return atomic_write_file(out, write)
