"""Damage checks and repair of a cache (:mod:`mdmf_cache.store.cache`): what :meth:`CacheStore.verify`,
:meth:`~CacheStore.check`, :meth:`~CacheStore.verify_and_repair` and :meth:`~CacheStore.repair` run.

Damage (a chunk file deleted or truncated, a ``zarr.json`` corrupted, NaN or inf in the features) is found
by :func:`verify`: every ``zarr.json`` readable, every chunk that must hold data present and readable,
labels in range, no all-zero or non-finite finished row, text present. A split with token arrays gets the same
checks of them (each finished row marked ``tokens_done`` has its chunk file in every ``tokens_<layer>``, readable,
finite and not all zero); their repair marks the rows not ``tokens_done``, so the rerun redoes those rows' tokens
alone. Readers run its cheap part
(metadata, chunk files present, the small arrays) before they load, and check the features they read;
``extract`` runs all of it, reading in full only the feature chunks that changed since the last clean
verify (``NAME.zarr.verified.json``; ``--verify-deep`` reads them all, as ``mdmf-cache verify`` does),
and re-extracts only the damaged rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdmf_cache.errors import CacheError
from mdmf_cache.fileio import atomic_write_json
from mdmf_cache.store.layout import META_ARRAYS, ROW_ARRAYS, STAT_ARRAYS, TOKENS_DONE
from mdmf_cache.tokens import ARRAY_PREFIX

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


def _chunk_key(arr, row: int) -> str:
    """The chunk file (relative to the array's folder) holding ``row`` of an array chunked one row per chunk."""
    return arr.metadata.chunk_key_encoding.encode_chunk_key((row,) + (0,) * (len(arr.shape) - 1))


def chunk_files(store, split: str, name: str, n: int, stats: bool = False):
    """(lo, hi, file relative to the cache, exists) of each chunk holding rows [0, n) of an array; with
    ``stats`` the last item is the file's ``os.stat`` result (None: no file) instead of ``exists``."""
    arr = store.root[split][name]
    step, ndim = arr.chunks[0], len(arr.shape)
    for c in range(-(-n // step)):
        rel = f"{split}/{name}/c/" + "/".join([str(c)] + ["0"] * (ndim - 1))
        if stats:
            try:
                st = os.stat(store.path / rel)
            except FileNotFoundError:
                st = None
            yield c * step, min(n, (c + 1) * step), rel, st
        else:
            yield c * step, min(n, (c + 1) * step), rel, (store.path / rel).is_file()


def read_checked(store, split: str, name: str, n: int, damages: list[Damage], fix: str = "chunk",
                 on_chunk=None, only=None) -> np.ndarray | None:
    """Rows [0, n) of an array: one read, or chunk by chunk if that fails, recording each unreadable
    chunk (its rows read as the fill value). With ``on_chunk(lo, hi, rel, exists, block)`` every chunk
    is read on its own and handed to it, and nothing is kept (``features``: memory stays one chunk);
    ``only(lo, rel)`` then says which chunks to read (default: all)."""
    arr = store.root[split][name]
    if on_chunk is None:  # the fast path: one read; chunk by chunk only to find an unreadable one
        try:
            whole = store._read(split, name, n, lambda: np.asarray(arr[:n]))
            return whole.astype(object) if whole.dtype.kind in "OUT" else whole
        except Exception:
            pass
    parts = []
    for lo, hi, rel, exists in chunk_files(store, split, name, n):
        if on_chunk is not None and only is not None and not only(lo, rel):
            continue
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


# ---- what was verified: a rerun reads in full only what changed since ----------------------------
#: The arrays whose chunk files the record holds: ``features`` (what the deep part reads) and what decides
#: which of its rows must hold features (``done``, ``failed``).
RECORDED = ("features", "done", "failed")


def record_path(path: Path) -> Path:
    """``NAME.zarr.verified.json`` beside the cache ``path`` (inside it, zarr would warn about a foreign file)."""
    return path.with_name(path.name + ".verified.json")


def _stamp(st) -> list[int] | None:
    return None if st is None else [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_record(store) -> dict:
    """``{split: {"rows": N, "files": {file: [size, mtime_ns, ctime_ns, inode]}}}`` of the last clean verify of
    each split ({} when none, or unreadable: then everything counts as changed)."""
    try:
        rec = json.loads(record_path(store.path).read_text(encoding="utf-8"))
        return rec["splits"] if rec.get("format") == 1 and isinstance(rec.get("splits"), dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_record(store, entries: dict[str, dict | None]) -> None:
    """Record (or, for None, forget) splits' verified chunk files; a read-only place is not an error."""
    splits = read_record(store)
    for split, entry in entries.items():
        if entry is None:
            splits.pop(split, None)
        else:
            splits[split] = entry
    try:
        atomic_write_json(record_path(store.path), {"format": 1, "splits": splits})
    except OSError as e:
        log.debug("cannot record the verified chunks of %s: %s", store.path, e)


def verify(store, deep: bool | str = True, splits: list[str] | None = None) -> list[Damage]:
    """Every damaged part of the cache (all splits, or ``splits``), each naming split, array, rows and file.

    ``deep=False`` (what readers run before loading): metadata, the chunk files that must hold data,
    and the small per-row arrays. ``deep=True`` (``verify``, ``extract --verify-deep``) also reads every
    chunk of ``features`` and ``text_features``. ``deep="changed"`` (an ``extract`` rerun) reads in full
    only the ``features`` chunks that changed since the last clean deep verify of their split: a chunk file
    whose size, mtime, ctime or inode differs from the record (``NAME.zarr.verified.json``), one missing
    from it, or one whose rows' ``done``/``failed`` chunk changed; the rest of the checks run in full.

    What the cheap ``"changed"`` check cannot see: a chunk whose bytes changed while its size, times and
    inode stayed (bit rot on the disk, a write to the block device, a file system that keeps no ctime, or
    one whose times are too coarse to tell two writes in the same tick apart). ``os.utime`` cannot hide an
    edit: it sets mtime, and the kernel moves ctime. ``deep=True`` reads every chunk and finds such damage.

    After a deep verify every split found clean is recorded, with the chunk files' state taken before they
    were read (a chunk written meanwhile counts as changed next time); a damaged split is forgotten.
    """
    damages: list[Damage] = []
    record = read_record(store) if deep == "changed" else {}
    entries: dict[str, dict | None] = {}
    for split in splits or [s for s in ("train", "val", "test") if (store.path / s).is_dir()]:
        found, entry = _verify_split(store, split, deep, record.get(split))
        damages += found
        if deep:
            entries[split] = None if found else entry
    if entries:
        write_record(store, entries)
    return damages


def _verify_split(store, split: str, deep: bool | str, recorded: dict | None) -> tuple[list[Damage], dict | None]:
    """The damages of one split and, with ``deep``, its new record of verified chunk files."""
    gpath = store.path / split
    why = meta_problem(gpath)
    if why:
        return [Damage(split, "", f"{split}/zarr.json", why, fix="split")], None
    g = store.root[split]
    if "num_videos" not in g.attrs:
        return [], None  # a split a killed run was creating: the rerun makes it again
    names = [*ROW_ARRAYS, *META_ARRAYS] if "present" in g else [*ROW_ARRAYS, "video_ids", "labels"]
    names += [a for a in STAT_ARRAYS if (gpath / a).is_dir()]  # caches made before them lack them
    tokens = store.token_arrays(split)  # [] without tokens
    names += tokens
    has_text = g.attrs.get("prompts") is not None
    out = [Damage(split, name, f"{split}/{name}/zarr.json", why,
                  fix="text" if name == "text_features" else "split" if name == "video_ids" else "meta")
           for name in (*names, *(("text_features",) if has_text else ()))
           if (why := meta_problem(gpath / name))]
    if out:
        return out, None
    c = _SplitCheck(store, split, int(g.attrs["num_videos"]), list(g.attrs["classes"]))
    ids, order = c.ids_and_labels("present" in g)
    ok = c.rows(names)
    if "present" in g:
        c.presence(ids, order, set(g.attrs.get("missing") or []))
    for name in ("features", "frame_indices", "num_frames"):
        c.missing(name, ok, "finished rows lost their data", "rows")
    entry = c.features(ok, deep, recorded) if deep else None
    if tokens:
        c.tokens(tokens[:-1], ok, deep, recorded, entry)
    if has_text:
        c.text()
    return c.unique(), entry


class _SplitCheck:
    """The checks of one split's arrays (:func:`_verify_split`), collecting :class:`Damage` in ``out``; every chunk
    file is looked at once (``files``: array -> [(lo, hi, file, stat or None)])."""

    def __init__(self, store, split: str, n: int, classes: list[str]) -> None:
        self.store, self.split, self.n, self.classes = store, split, n, classes
        self.out: list[Damage] = []
        self.files: dict[str, list] = {}

    def chunks(self, name: str, rows: int | None = None) -> list:
        if name not in self.files:
            self.files[name] = list(chunk_files(self.store, self.split, name, self.n if rows is None else rows, stats=True))
        return self.files[name]

    def read(self, name: str, rows: int | None = None, **kw) -> np.ndarray:
        return read_checked(self.store, self.split, name, self.n if rows is None else rows, self.out, **kw)

    def missing(self, name: str, need: np.ndarray, what: str, fix: str, rows: int | None = None) -> None:
        """Chunk files of ``name`` that are gone although rows ``need`` them."""
        for lo, hi, rel, st in self.chunks(name, rows):
            lost = lo + np.flatnonzero(need[lo:hi])
            if st is None and len(lost):
                self.out.append(Damage(self.split, name, rel, f"chunk file missing ({what})", lost.tolist(), fix))

    def bad(self, name: str, rows: np.ndarray, what: str, fix: str = "rows") -> None:
        rows = np.flatnonzero(rows)
        if len(rows):
            self.out.append(Damage(self.split, name, f"{self.split}/{name}", what, rows.tolist(), fix))

    def ids_and_labels(self, has_presence: bool) -> tuple[np.ndarray, np.ndarray]:
        """Video ids (present, unique) and labels (in range where a split file lists the video); (ids, order)."""
        n = self.n
        ids = self.read("video_ids", fix="split")
        self.missing("video_ids", np.ones(n, dtype=bool), "the rows lost their video ids", "split")
        if not any(d.array == "video_ids" for d in self.out):
            self.bad("video_ids", np.array([not v for v in ids], dtype=bool), "empty video ids", "split")
            counts = Counter(ids.tolist())
            self.bad("video_ids", np.array([counts[v] > 1 for v in ids], dtype=bool), "repeated video ids", "split")
        labels = self.read("labels")
        order = self.read("order") if has_presence else np.zeros(n, dtype=np.int64)
        listed = order >= 0  # a row no split file lists now keeps whatever label; it is unused
        self.missing("labels", listed, "labels of listed videos", "labels")
        lost = np.zeros(n, dtype=bool)
        for lo, hi, _, st in self.chunks("labels"):
            lost[lo:hi] = st is None
        self.bad("labels", listed & ~lost & ((labels < 0) | (labels >= len(self.classes))),
                 f"labels outside 0..{len(self.classes) - 1}", "labels")
        return ids, order

    def rows(self, names: list[str]) -> np.ndarray:
        """The per-row bookkeeping (done, failed and its message, frame counts and indices, file stats); returns the
        finished rows that hold features."""
        n = self.n
        for name in RECORDED:  # the state of the recorded chunk files, taken before they are read
            self.chunks(name)
        done = self.read("done").astype(bool)
        failed = self.read("failed").astype(bool)
        has_error = np.array([bool(e) for e in self.read("errors")], dtype=bool)
        self.bad("failed", done & ~failed & has_error, "rows with an error message are not marked failed")
        self.bad("errors", done & failed & ~has_error, "failed rows without their error message")
        ok = done & ~failed
        self.bad("num_frames", ok & (self.read("num_frames") <= 0), "finished rows with no frame count")
        fi = self.read("frame_indices")
        self.bad("frame_indices", ok & (fi.reshape(n, -1) < 0).any(1) if n else ok, "finished rows without frame indices")
        for name in STAT_ARRAYS:  # bookkeeping only: an unreadable chunk is removed (its rows' files: unknown)
            if name in names:
                self.read(name)
        return ok

    def presence(self, ids: np.ndarray, order: np.ndarray, gone: set) -> None:
        present = self.read("present").astype(bool)
        self.bad("present", ~present & (order >= 0) & np.array([v not in gone for v in ids], dtype=bool),
                 "listed videos on disk marked absent", "sync")
        self.bad("order", present & (order < 0), "videos on disk without a listing position", "sync")

    def features(self, ok: np.ndarray, deep: bool | str, recorded: dict | None) -> dict:
        """Every feature chunk read (``deep == "changed"``: those whose file or rows' done/failed chunk changed since
        ``recorded``) for all-zero and non-finite finished rows; returns the split's new record."""
        n = self.n
        entry = {"rows": n, "files": {rel: _stamp(st) for name in RECORDED for _, _, rel, st in self.chunks(name)
                                      if st is not None}}
        only = None
        if deep == "changed" and recorded and recorded.get("rows") == n:
            seen = recorded.get("files") or {}
            stale = np.zeros(n, dtype=bool)  # rows whose done/failed chunk changed: their meaning may have
            for name in ("done", "failed"):
                for lo, hi, rel, st in self.chunks(name):
                    stale[lo:hi] |= seen.get(rel) != _stamp(st)
            changed = {lo for lo, hi, rel, st in self.chunks("features")
                       if seen.get(rel) != _stamp(st) or stale[lo:hi].any()}

            def only(lo, rel):
                return lo in changed

        zero, nonfinite = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)

        def check(lo, hi, rel, exists, block):
            if exists:  # a missing chunk is reported above
                zero[lo:hi], nonfinite[lo:hi] = row_problems(block)

        self.read("features", on_chunk=check, only=only)
        self.bad("features", ok & nonfinite, NONFINITE)
        self.bad("features", ok & zero & ~nonfinite, ZERO)
        return entry

    def tokens(self, arrays: list[str], ok: np.ndarray, deep: bool | str, recorded: dict | None,
               entry: dict | None) -> None:
        """The token arrays of the finished rows marked ``tokens_done``: every chunk file there (one per row, found by
        listing the array's folder), and with ``deep`` each read (``"changed"``: rows of the units whose files, or
        ``tokens_done`` chunk, changed since ``recorded``) for unreadable, all-zero and non-finite rows. A unit's files
        are recorded in ``entry`` as one digest per array (``{split}/{array}/@{unit}``), not a stamp per row."""
        need = ok & self.read(TOKENS_DONE).astype(bool)
        unit = self.store.unit_rows(self.split)
        seen = (recorded or {}).get("files") or {}
        stale = np.ones(self.n, dtype=bool)
        if deep == "changed" and recorded and recorded.get("rows") == self.n:
            stale[:] = False
            for lo, hi, rel, st in self.chunks(TOKENS_DONE):
                stale[lo:hi] |= seen.get(rel) != _stamp(st)
        if entry is not None:
            entry["files"].update({rel: _stamp(st) for _, _, rel, st in self.chunks(TOKENS_DONE) if st is not None})
        for name in arrays:
            arr = self.store.root[self.split][name]
            folder = self.store.path / self.split / name
            with os.scandir(folder) as it:
                files = {e.name: e for e in it if e.name != "zarr.json"}
            key = [_chunk_key(arr, r) for r in range(self.n)]
            lost = [r for r in np.flatnonzero(need) if key[r] not in files]
            if lost:
                more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
                self.out.append(Damage(self.split, name, f"{self.split}/{name}/{key[lost[0]]}{more}",
                                       "chunk file missing (finished rows lost their tokens)", [int(r) for r in lost]))
            if not deep:
                continue
            read = need.copy()
            read[lost] = False
            for u in range(-(-self.n // unit)):
                lo, hi = u * unit, min(self.n, (u + 1) * unit)
                stamps = [[key[r], *(_stamp(files[key[r]].stat()) or [])] for r in range(lo, hi) if key[r] in files]
                digest = hashlib.sha1(json.dumps(stamps).encode()).hexdigest()
                rel = f"{self.split}/{name}/@{u}"
                if entry is not None:
                    entry["files"][rel] = digest
                if deep == "changed" and not stale[lo:hi].any() and seen.get(rel) == digest:
                    read[lo:hi] = False
            zero, nonfinite = np.zeros(self.n, dtype=bool), np.zeros(self.n, dtype=bool)
            for r in np.flatnonzero(read):
                try:
                    block = np.asarray(arr[int(r): int(r) + 1])
                except Exception as e:  # a truncated or garbled chunk
                    self.out.append(Damage(self.split, name, f"{self.split}/{name}/{key[r]}",
                                           f"unreadable chunk ({type(e).__name__}: {e})", [int(r)], "chunk"))
                    continue
                zero[r], nonfinite[r] = (v[0] for v in row_problems(block))
            self.bad(name, nonfinite, NONFINITE.replace("features", "tokens"))
            self.bad(name, zero & ~nonfinite, ZERO.replace("features", "tokens"))

    def text(self) -> None:
        c = len(self.classes)
        text = self.read("text_features", rows=c, fix="text")
        self.missing("text_features", np.ones(c, dtype=bool), "the prompt embeddings", "text", rows=c)
        said = any(d.array == "text_features" for d in self.out)
        if not said and (text.shape[0] != c or (c and (text.reshape(c, -1) == 0).all(1).any())):
            self.out.append(Damage(self.split, "text_features", f"{self.split}/text_features",
                                   "prompt embeddings missing or all zero", fix="text"))

    def unique(self) -> list[Damage]:
        """The damages, a chunk reported twice (unreadable, then its rows as wrong values) kept with its first word."""
        seen_keys, unique = set(), []
        for d in self.out:
            key = (d.array, d.file if d.fix == "chunk" else d.what, tuple(d.rows))
            if key not in seen_keys and not (d.fix != "chunk" and any(
                    u.fix == "chunk" and u.array == d.array and set(d.rows) <= set(u.rows) for u in unique)):
                seen_keys.add(key)
                unique.append(d)
        return unique


def check(store, splits: list[str] | None = None) -> None:
    """The cheap part of :meth:`verify`; raises CacheError naming the first damage."""
    damages = verify(store, deep=False, splits=splits)
    if damages:
        raise CacheError(damage_message(store.path, damages))


def verify_and_repair(store, num_frames: int, dim: int, deep: bool | str = "changed"
                      ) -> tuple[list[Damage], dict[str, np.ndarray]]:
    """:func:`verify` (by default reading in full only what changed since the last clean verify) then
    :func:`repair` (rank 0 of ``extract``): array metadata is written again first, then what it hid is
    verified. Returns (damage found, rows to extract again per split)."""
    damages = verify(store, deep)
    meta = [d for d in damages if d.fix == "meta"]
    for d in meta:
        log.warning("%s: %s; writing it again (its chunks are kept)", store.path, d)
        store.rewrite_array_meta(d.split, d.array, num_frames, dim)
    if meta:
        damages = meta + verify(store, deep)
    return damages, repair(store, damages)


def repair(store, damages: list[Damage]) -> dict[str, np.ndarray]:
    """Undo damage so that the next sync and extraction redo it (rank 0, before any rank extracts).

    Returns per split the rows marked to be extracted again (wholly, or their tokens alone). Splits whose
    metadata or ids are lost are deleted (rebuilt by ``sync_rows``); unreadable chunk files are deleted (of
    ``file_size`` or ``file_mtime``: their rows' files become unknown, nothing is extracted again); damaged rows
    are marked not done; rows with damaged tokens not ``tokens_done``; damaged text is marked stale.
    """
    rebuild = {d.split for d in damages if d.fix == "split"}
    for split in sorted(rebuild):
        log.warning("%s split %s: %s; rebuilding the split", store.path, split,
                    next(str(d) for d in damages if d.split == split and d.fix == "split"))
        shutil.rmtree(store.path / split)
    redo: dict[str, set[int]] = {}
    redo_tokens: dict[str, set[int]] = {}  # rows whose token arrays alone are redone
    for d in damages:
        if d.split in rebuild:
            continue
        if d.fix == "chunk":
            (store.path / d.file).unlink(missing_ok=True)
        if d.fix in ("chunk", "rows") and d.array in ROW_ARRAYS:
            redo.setdefault(d.split, set()).update(d.rows)
        if d.fix in ("chunk", "rows") and d.array.startswith(ARRAY_PREFIX):
            redo_tokens.setdefault(d.split, set()).update(d.rows)
        if d.fix == "text":
            if d.file.endswith("zarr.json"):
                shutil.rmtree(store.path / d.split / "text_features")
            store.root[d.split].attrs["prompts"] = None
    out = {}
    for flag, marked in (("done", redo), (TOKENS_DONE, redo_tokens)):
        for split, rows in marked.items():
            n = store.num_rows(split)
            rows = np.array(sorted(r for r in rows if r < n), dtype=np.int64)
            arr = store.root[split][flag]
            cr = store.unit_rows(split)  # the flag's chunks
            for c in np.unique(rows // cr):
                lo, hi = int(c * cr), int(min(n, (c + 1) * cr))
                block = np.asarray(arr[lo:hi]).astype(bool)
                block[rows[(rows >= lo) & (rows < hi)] - lo] = False
                arr[lo:hi] = block
            out[split] = np.union1d(out.get(split, np.zeros(0, dtype=np.int64)), rows)
    return out

