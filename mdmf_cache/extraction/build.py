"""Build a feature cache: videos -> CLIP frame embeddings + label-prompt text embeddings in Zarr.

Steps, top to bottom (:func:`run_extract`):
    1. check the options (a ``tokens`` SPEC against the model's config and the cache's own SPEC, before any heavy
       work), resolve the splits and the video files;
    2. load the backbone, fingerprint the settings, open (or resume) the cache, under the cache's lock;
    3. rank 0 checks the cache (reading in full the feature chunks changed since its last clean verify, every
       one with ``verify_deep``), repairs damage, matches every split's rows to the tree, gives the splits their
       token arrays, writes the text embeddings;
    4. a pool of decoder processes feeds clips to the model; rows are written by whole chunks, then read
       back and recorded as verified (one process);
    5. with ``strict``, missing or failed videos are an error.

Tokens (``tokens``, :mod:`mdmf_cache.tokens`): a split with token arrays gets them for every row it extracts,
written with the row's features (before ``done``). A finished cache asked for tokens is extended in place: its
finished rows are decoded again and only their token arrays written (then ``tokens_done``); the features and
every other array stay as they are. Those rows go through the encoder in the batches a fresh extraction would
use (the same ``batch_videos``, and no failed row in the split: a failed row leaves the batch it was in), so the
tokens are the same bits as a cache extracted with them from the start. A rerun without ``tokens``
keeps a cache's tokens and gives new rows theirs; another SPEC is refused (``overwrite`` replaces the token
arrays, keeping the features).

Resumable: killed at any moment, the same call continues where the cache says it stopped, and the
final cache equals an uninterrupted run's (sampling and crops are seeded per video id and view).

Rows belong to video ids. Rerun after the tree changed, the same call extracts the videos that
appeared (new rows), reuses finished rows, and keeps the rows of videos that vanished (marked not
present, unused, reused if they come back). Each row records its file's size and mtime: a video replaced
by another file under the same name is extracted again, and a video that failed is decoded again only
when its file changed (or with ``retry_failed``). Prompts are cheap: a changed ``prompt_template``,
``clean_names`` or SSv2 names file only recomputes the text embeddings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.configs import ExtractConfig
from mdmf_cache.data.datasets import SPLITS, Split, load_splits
from mdmf_cache.errors import CacheError, MdmfError
from mdmf_cache.extraction.embed import (ClipSource, clip_loader, distributed_env, encode_clips, encode_clips_tokens,
                                         find_videos, fingerprint, prompts_for)
from mdmf_cache.fileio import process_lock, raise_if_disk_full
from mdmf_cache.store.cache import CacheStore, tokens_refusal
from mdmf_cache.store.layout import group_name
from mdmf_cache.store.verify import meta_problem
from mdmf_cache.tokens import TokenSpec

log = logging.getLogger(__name__)

__all__ = ["SplitResult", "run_extract", "extract_lock", "split_changes"]

# ---- the writing side -----------------------------------------------------------------------------

class ChunkWriter:
    """Buffers finished rows and writes them one chunk at a time (this rank owns the chunk's unit).

    ``stats``: row -> (size, mtime ns) of the file it is extracted from, recorded with the row.
    """

    def __init__(self, store: CacheStore, split: str, flush_seconds: float,
                 stats: dict[int, tuple[int, int]] | None = None):
        self.store = store
        self.split = split
        # a cache made before file stats were recorded gets the arrays from rank 0's sync; a rank that
        # started before that leaves its rows' files unknown
        self.stats = stats if stats is not None and (store.path / split / "file_size").is_dir() else None
        self.cr = store.chunk_rows(split)
        self.flush_seconds = flush_seconds
        self.buf: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        if self.buf and self.buf[0]["row"] // self.cr != row["row"] // self.cr:
            self.flush()
        self.buf.append(row)
        if len(self.buf) == self.cr or time.monotonic() - self.last > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            rows = np.array([r["row"] for r in self.buf])
            try:
                self._write(rows)
            except (OSError, RuntimeError) as err:  # a full disk: say where and how much is free
                raise_if_disk_full(self.store.path / self.split, err)
                raise
            self.buf = []
        self.last = time.monotonic()

    def _write(self, rows: np.ndarray) -> None:
        # rows of a cache extended with tokens: their token arrays alone (the features stay as they are)
        extend = [r for r in self.buf if r.get("tokens_only")]
        if extend:
            self.store.write_token_rows(self.split, np.array([r["row"] for r in extend]), _stack_tokens(extend),
                                        {r["row"]: r["error"] for r in extend if r["error"]})
        full = [r for r in self.buf if not r.get("tokens_only")]
        if not full:
            return
        rows = np.array([r["row"] for r in full])
        values = {
            "features": np.stack([r["features"] for r in full]),
            "frame_indices": np.stack([r["indices"] for r in full]),
            "num_frames": np.array([r["num_frames"] for r in full], dtype=np.int32),
            "failed": np.array([r["error"] != "" for r in full]),
            "errors": np.array([r["error"] for r in full], dtype=object).astype(str),
        }
        if self.stats is not None:
            st = [self.stats.get(int(r), (-1, -1)) for r in rows]
            values["file_size"] = np.array([a for a, _ in st], dtype=np.int64)
            values["file_mtime"] = np.array([b for _, b in st], dtype=np.int64)
        self.store.write_rows(self.split, rows, values, _stack_tokens(full) if "tokens" in full[0] else None)


def _stack_tokens(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Token array name -> (R, V, T, P, Dt) of buffered rows."""
    return {name: np.stack([r["tokens"][name] for r in rows]) for name in rows[0]["tokens"]}


@dataclass
class SplitResult:
    split: str
    videos: int = 0  # listed videos found on disk
    reused: int = 0  # of them, finished by an earlier run (in this rank's chunks)
    added: int = 0  # rows appended to an existing split this run (videos new since the last run)
    extracted: int = 0  # this run
    failed: int = 0  # this run
    short: int = 0  # videos with fewer than T decodable frames (indices repeated)
    missing: int = 0  # listed videos not on disk
    vanished: list[str] = field(default_factory=list)  # finished rows whose video is gone (kept, unused)
    text: str = ""  # why the text embeddings were (re)computed this run, '' if they were reused
    retried: int = 0  # rows that had failed before, decoded again (their files changed, or --retry-failed)
    still_failing: int = 0  # of them, failed again
    changed: int = 0  # finished rows whose video file changed since (size or mtime): extracted again
    kept_failed: int = 0  # failed rows whose files did not change: not decoded again (--retry-failed does)
    repaired: int = 0  # damaged rows marked to be extracted again (verify_and_repair)
    tokens: int = 0  # finished rows given their token arrays alone this run (a cache extended with tokens)
    token_spec: str = ""  # the split's token SPEC ('' without tokens)
    damage: list[str] = field(default_factory=list)  # what was damaged
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)


def extract_split(
    store: CacheStore, split: Split, cfg: ExtractConfig, backbone, progress=None, res: SplitResult | None = None
) -> SplitResult:
    """Decode and encode the pending rows of this rank's units of one split.

    The cache's rows are matched to this process's files by video id (``split.paths``). Pending: rows not
    done, finished rows whose file changed since (size or mtime: a replaced video), and failed rows whose
    file changed (or every failed row with ``cfg.retry_failed``). A row whose file was never recorded
    (a cache made before) counts as unchanged.
    """
    name = split.name
    views = cfg.train_views if name == "train" else 1
    found = {v: p for v, p in zip(split.video_ids, split.paths) if p is not None}
    row_ids = store.video_ids(name)
    present = np.array([v in found for v in row_ids], dtype=bool)
    owned = store.owner(name, cfg.world_size) == cfg.rank
    done = store.done_mask(name)
    failed = store._rows(name, "failed").astype(bool)
    mine = np.flatnonzero(present & owned)
    stats = {int(r): file_stat(found[row_ids[r]]) for r in mine}  # what the file is now
    size, mtime = store.file_stats(name)
    changed = np.zeros(len(row_ids), dtype=bool)
    for r, (now_size, now_mtime) in stats.items():
        changed[r] = size[r] != -1 and (size[r] != now_size or mtime[r] != now_mtime)
    changed &= done
    retry = done & failed & present & owned & (changed | cfg.retry_failed)
    redo = changed & ~failed & present & owned
    full = (~done | retry | redo) & present & owned
    info = store.tokens_info(name)  # the split's own SPEC: rank 0 made its arrays before any rank started
    spec = TokenSpec.parse(info.spec) if info else None
    # finished rows without tokens (a cache extended with them): decoded again, their token arrays written alone
    extend = done & ~failed & ~store.tokens_done_mask(name) & present & owned & ~full if spec else np.zeros_like(done)
    rows = np.flatnonzero(full | extend)  # ascending: the batches a fresh extraction of these rows would have
    res = res or SplitResult(name)
    res.token_spec = info.spec if info else ""
    res.videos, res.missing = len(found), len(split.video_ids) - len(found)
    res.reused = int((done & ~retry & ~redo & present & owned).sum())  # only this rank writes these rows
    res.retried, res.changed = int(retry.sum()), int(redo.sum())
    res.kept_failed = int((done & failed & present & owned & ~retry).sum())
    if redo.any():
        log.info("%s: %d videos changed on disk since they were extracted (first: %s); extracting them again",
                 name, int(redo.sum()), row_ids[int(np.flatnonzero(redo)[0])])
    if len(rows) == 0:
        return res
    if extend.any():
        log.info("%s: adding tokens %s to %d finished videos (their features are kept)", name, spec.text,
                 int(extend.sum()))
    retried = set(np.flatnonzero(retry).tolist())
    tokens_only = set(np.flatnonzero(extend).tolist())
    ids = {int(r): row_ids[r] for r in rows}
    source = ClipSource(rows, [row_ids[r] for r in rows], [found[row_ids[r]] for r in rows], name == "train", views, cfg)
    loader = clip_loader(source, cfg, backbone.device)
    writer = ChunkWriter(store, name, cfg.flush_seconds, stats)
    task = progress.add_task(f"{name}", total=len(rows)) if progress else None
    t0 = time.perf_counter()
    try:
        for batch in loader:
            _encode_batch(batch, backbone, cfg, views, ids, retried, writer, res, spec, tokens_only)
            if progress:
                progress.advance(task, len(batch))
    finally:  # Ctrl-C or an error: the finished rows buffered so far are kept
        writer.flush()
    res.seconds = time.perf_counter() - t0
    return res

def _encode_batch(batch: list, backbone, cfg: ExtractConfig, views: int, ids: dict, retried: set,
                  writer: "ChunkWriter", res: SplitResult, spec: TokenSpec | None = None,
                  tokens_only: set | None = None) -> None:
    """Encode one batch of decoded clips and hand its rows (failures recorded) to the writer.

    With ``spec`` every row gets its token arrays too; rows in ``tokens_only`` (finished before, extended with
    tokens) are handed over with their tokens alone."""
    T, D = cfg.num_frames, backbone.dim
    tokens_only = tokens_only or set()
    ok = [b for b in batch if "error" not in b]
    feats: dict[int, np.ndarray] = {}
    toks: dict[int, dict[str, np.ndarray]] = {}
    if ok and spec is not None:
        emb, arrays = encode_clips_tokens(ok, backbone, cfg, views, spec)
        feats = {b["row"]: emb[j] for j, b in enumerate(ok)}
        toks = {b["row"]: {name: a[j] for name, a in arrays.items()} for j, b in enumerate(ok)}
    elif ok:
        emb = encode_clips(ok, backbone, cfg, views)
        feats = {b["row"]: emb[j] for j, b in enumerate(ok)}
    for b in ok:  # NaN or inf from the encoder (or float16 overflow): recorded as a failure, never as features
        if not np.isfinite(feats[b["row"]]).all():
            b["error"] = "the encoder gave NaN or inf for this video's frames"
        elif not all(np.isfinite(t).all() for t in toks.get(b["row"], {}).values()):
            b["error"] = "the encoder gave NaN or inf for this video's tokens"
    for b in batch:
        row = b["row"]
        if row in tokens_only and "error" in b and row not in toks:
            # a video that decoded before (its file unchanged) and does not now: its features are kept, its tokens
            # left for the next run
            res.failures.append((ids[row], f"tokens not added: {b['error']}"))
            log.warning("%s: tokens not added (%s); the next run tries again", ids[row], b["error"])
            continue
        if "error" in b:
            res.failed += 1
            res.still_failing += int(row in retried)
            res.failures.append((ids[row], b["error"]))
            log.debug("failed %s: %s", ids[row], b["error"])
        if row in tokens_only:  # a finished row: its tokens, or (NaN or inf in them) its failure, recorded
            res.tokens += int("error" not in b)
            writer.add({"row": row, "tokens_only": True, "error": b.get("error", ""),
                        "tokens": toks[row] if "error" not in b else _zero_tokens(writer, views, T)})
            continue
        if "error" in b:
            zero = {"tokens": _zero_tokens(writer, views, T)} if spec is not None else {}
            writer.add({"row": row, "features": np.zeros((views, T, D), np.float16),
                        "indices": np.full((views, T), -1, np.int32), "num_frames": 0, "error": b["error"], **zero})
        else:
            res.extracted += 1
            res.short += int(b["num_frames"] < T)
            writer.add({"row": row, "features": feats[row], "indices": b["indices"], "num_frames": b["num_frames"],
                        "error": "", **({"tokens": toks[row]} if spec is not None else {})})


def _zero_tokens(writer: "ChunkWriter", views: int, T: int) -> dict[str, np.ndarray]:
    """The token arrays of a failed row: zeros (no chunk file is kept for them)."""
    info = writer.store.tokens_info(writer.split)
    return {name: np.zeros((views, T, info.patches, info.dim), np.float16) for name in TokenSpec.parse(info.spec).arrays}


def file_stat(path) -> tuple[int, int]:
    """(size, mtime in ns) of a video file or frame folder (a folder: its own entry, which changes when frames
    are added or removed, not when one is rewritten in place); (-2, -2) if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -2, -2
    return int(st.st_size), int(st.st_mtime_ns)


def _progress():
    from mdmf_cache.progress import make_progress

    return make_progress("videos")

def prepare_cache(store: CacheStore, splits: dict[str, Split], cfg: ExtractConfig, backbone, tokens=None
                  ) -> dict[str, SplitResult]:
    """Rank 0: match every split's rows to the tree, give the splits the token arrays of ``tokens`` (a TokenInfo;
    None: no tokens) and (re)compute stale text embeddings."""
    store.root.attrs["ready"] = False  # until rows and text match this run (info: not complete if killed here)
    # damage (a deleted or garbled chunk, a corrupt zarr.json): undone here, redone by this run
    t0 = time.perf_counter()
    # every feature chunk with --verify-deep; otherwise those changed since the last clean verify
    damages, redo = store.verify_and_repair(cfg.num_frames, backbone.dim, deep=True if cfg.verify_deep else "changed")
    for d in damages:
        log.warning("%s is damaged: %s; repairing it", store.path, d)
    log.debug("verified %s in %.1f s", store.path, time.perf_counter() - t0)
    rebuilt = {d.split for d in damages if d.fix == "split"}
    results = {}
    for name, split in splits.items():
        present = np.array([p is not None for p in split.paths], dtype=bool)
        sync = store.sync_rows(
            name, split.video_ids, split.labels, present, split.classes, split.class_names,
            views=cfg.train_views if name == "train" else 1, num_frames=cfg.num_frames, dim=backbone.dim,
            chunk_rows=cfg.chunk_rows,
        )
        if tokens is not None and store.ensure_tokens(name, tokens, cfg.num_frames, replace=cfg.overwrite):
            log.info("%s: token arrays %s made (%s)", name, tokens.spec, ", ".join(store.token_arrays(name)))
        res = results[name] = SplitResult(name, added=0 if sync.created else sync.added, vanished=sync.vanished,
                                          repaired=sync.rows if name in rebuilt else len(redo.get(name, ())),
                                          damage=[str(d) for d in damages if d.split == name])
        if sync.vanished:
            log.warning("%s: %d extracted videos are no longer under %s (first: %s); their rows are kept but "
                        "not used until the videos are back", name, len(sync.vanished), cfg.root,
                        ", ".join(sync.vanished[:3]))
        # text: prompts are cheap, recomputed whenever they differ from the stored ones
        prompts, old = prompts_for(split, cfg), store.prompts(name)
        if old != prompts:
            if old is None:
                res.text = "new"
            else:
                changed = sum(a != b for a, b in zip(old, prompts)) + abs(len(old) - len(prompts))
                res.text = f"{changed} of {len(prompts)} prompts changed (e.g. {old[0]!r} -> {prompts[0]!r})"
                log.info("%s: %s: recomputing the text embeddings only; frame features unchanged", name, res.text)
            store.write_text(name, backbone.encode_texts(prompts).numpy(), prompts, cfg.prompt_template,
                             class_names=split.class_names)
    if tokens is not None and cfg.overwrite:  # a SPEC replaced: the splits this run leaves get the new arrays too
        for name in store.splits:
            if name not in splits and store.tokens_info(name) not in (None, tokens):
                store.ensure_tokens(name, tokens, cfg.num_frames, replace=True)
    # the config records the SPEC the cache holds, also when this run was not given one (it kept the cache's)
    saved = asdict(cfg) | {"tokens": tokens.spec if tokens is not None else None}
    store.root.attrs["config"] = json.loads(json.dumps(saved, default=str))
    store.mark_ready()
    return results

def wait_for_rows(store: CacheStore, splits: dict[str, Split], rank: int, wait_s: float = 600.0) -> None:
    """Rank > 0: wait until rank 0 has made a row for every video this rank found."""
    deadline = time.monotonic() + wait_s
    while True:
        lacking = 0
        for name, split in splits.items():
            if name not in store.splits:  # rank 0 creates every split it extracts, even an empty one
                lacking += 1
                continue
            have = set(store.video_ids(name))
            lacking += sum(p is not None and v not in have for v, p in zip(split.video_ids, split.paths))
        if not lacking:
            return
        if time.monotonic() > deadline:
            raise CacheError(f"rank {rank}: {lacking} videos this rank found have no row in {store.path} after "
                             f"{wait_s:.0f} s; do all ranks see the same --root?")
        time.sleep(0.5)

def cache_tokens(path: Path) -> str | None:
    """The token SPEC an existing cache holds (a split's ``tokens`` attribute, else its recorded config's); None: no
    cache, none, or metadata too damaged to say (the run's repair then decides)."""
    if meta_problem(path):
        return None
    try:
        store = CacheStore(path)
        for split in ("train", "val", "test"):
            if not meta_problem(path / split):
                info = store.tokens_info(split) if split in store.root else None
                if info is not None:
                    return info.spec
        return (store.root.attrs.get("config") or {}).get("tokens") or None
    except (CacheError, OSError, ValueError, KeyError):
        return None


def split_changes(path: Path, splits: dict[str, Split]) -> str | None:
    """What changed between the split files a cache was made from and ``splits``: the first classes and
    videos added or removed per split (None: no cache, or nothing to compare)."""
    from mdmf_cache.store.verify import meta_problem

    if meta_problem(path):
        return None
    store = CacheStore(path)
    old_hashes = (store.fingerprint.get("video") or {}).get("split_hashes") or {}
    parts = []
    for name, split in splits.items():
        if name not in old_hashes or old_hashes[name] == split.source_hash:
            continue
        if name not in store.splits:
            parts.append(f"the {name} split file changed")
            continue
        g = store.root[name]
        order = store._rows(name, "order") if "order" in g else np.zeros(store.num_rows(name), dtype=np.int64)
        before = {v for v, o in zip(store.video_ids(name), order) if o >= 0} | set(g.attrs.get("missing") or [])
        bits = []
        for what, old, new in (("classes", set(g.attrs["classes"]), set(split.classes)),
                               ("videos", before, set(split.video_ids))):
            for verb, diff in (("added", sorted(new - old)), ("removed", sorted(old - new))):
                if diff:
                    bits.append(f"{len(diff)} {what} {verb} ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})")
        parts.append(f"{name} split changed: {'; '.join(bits) or 'the same videos in another order'}")
    return "; ".join(parts) or None


@contextlib.contextmanager
def extract_lock(path: Path):
    """Hold ``PATH.lock`` (an OS file lock, released when the process ends, a kill included) while one
    extract writes the cache; a second extract of the same cache is refused, naming the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with process_lock(
        lock,
        busy=lambda holder: CacheError(f"another extract ({holder}) is writing {path}; wait for it to finish, then "
                                       "rerun this command (it reuses everything finished)"),
        unwritable=lambda e: CacheError(f"cannot write {lock} ({e.strerror}): extract needs write access to "
                                        f"{path.parent}; a read-only cache can still be read by train, eval and export"),
    ):
        yield


def run_extract(cfg: ExtractConfig) -> tuple[Path, list[SplitResult]]:
    """Run the whole extraction; returns the cache path and per-split results.

    Raises:
        ConfigError, DatasetError: bad options, split files or video root (no video found included).
        CacheError: an existing cache made with other settings (without --overwrite).
        MdmfError: with --strict, when videos were missing or failed.
    """
    from mdmf_cache.clip.backbone import load_backbone, pretrained_slug, token_info

    cfg.validate()
    # 1. the token SPEC, checked against the model's config and the cache's own SPEC before any heavy work
    spec = TokenSpec.parse(cfg.tokens) if cfg.tokens else None
    if spec is not None:
        token_info(cfg.model, spec)
    path = Path(cfg.cache_dir) / group_name(cfg.cache_name, cfg.model, pretrained_slug(cfg.pretrained))
    have = cache_tokens(path)
    if spec is not None and have is not None and have != spec.text and not cfg.overwrite:
        raise CacheError(tokens_refusal(path, have, spec.text))
    # splits and files
    splits = load_splits(cfg.dataset, Path(cfg.splits_dir) if cfg.splits_dir else None, Path(cfg.root), cfg.seed,
                         labels_file=Path(cfg.labels) if cfg.labels else None)
    # the fingerprint covers every split file, so extracting --split test now and train later shares one cache
    split_hashes = {name: split.source_hash for name, split in splits.items()}
    every_split = dict(splits)
    for name in SPLITS:
        if name not in cfg.splits:
            splits.pop(name, None)
    find_videos(cfg, splits)
    # 2. backbone and cache
    device = cfg.device
    if device == "auto" and cfg.world_size > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{distributed_env()[2] % torch.cuda.device_count()}"
    # rank 0 holds the cache's lock (other ranks of the same job follow rank 0), taken before the weights load: a
    # second extract of the cache is refused at once
    with extract_lock(path) if cfg.rank == 0 else contextlib.nullcontext():
        backbone = load_backbone(cfg.model, cfg.pretrained, device)
        # the cache keeps the tokens it has when none are asked for (new rows get them too: arrays stay complete)
        wanted = spec.text if spec is not None else have
        tokens = backbone.token_info(wanted) if wanted else None
        fp = fingerprint(cfg, backbone.weights, split_hashes)
        return _extract_into(path, fp, cfg, splits, every_split, backbone, tokens)

def _extract_into(path: Path, fp: dict, cfg: ExtractConfig, splits: dict[str, Split], every_split: dict[str, Split],
                  backbone, tokens=None) -> tuple[Path, list[SplitResult]]:
    """Steps 2 (the cache) to 5 of :func:`run_extract`."""
    note = None
    if (path / "zarr.json").is_file() and not cfg.overwrite and cfg.rank == 0:
        with contextlib.suppress(CacheError):  # a damaged cache: refused or repaired below
            note = split_changes(path, every_split)
    store = CacheStore.open_for_writing(path, fp, overwrite=cfg.overwrite, rank=cfg.rank, split_note=note)
    # 3. rows matched to the tree, text (rank 0); the other ranks wait for the rows they need
    if cfg.rank == 0:
        results = prepare_cache(store, splits, cfg, backbone, tokens)
    else:
        wait_for_rows(store, splits, cfg.rank)
        results = {name: SplitResult(name) for name in splits}
    # 4. frames
    if cfg.progress:
        with _progress() as progress:
            for split in splits.values():
                extract_split(store, split, cfg, backbone, progress, results[split.name])
    else:
        for split in splits.values():
            extract_split(store, split, cfg, backbone, res=results[split.name])
    # what this run wrote is read back (likely still in the page cache) and recorded as verified, so the next
    # rerun starts at once; with several ranks the others may still be writing: their chunks wait for that rerun
    if cfg.rank == 0 and cfg.world_size == 1 and any(r.extracted or r.failed or r.tokens for r in results.values()):
        damages = store.verify(deep="changed")
        if damages:
            log.warning("%s: %s right after writing it; the next extract run repairs it", path, damages[0])
    # 5. strictness: failures recorded in the cache count too (a --strict rerun of a finished cache)
    failed = sum(store.split_summary(name)["failed"] for name in splits) if cfg.strict else 0
    if cfg.strict and failed:
        raise MdmfError(f"{failed} videos could not be decoded (see 'mdmf-cache info {path}'); drop --strict to accept")
    return path, list(results.values())
