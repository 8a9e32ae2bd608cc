"""Extract: videos -> CLIP frame embeddings + label-prompt text embeddings in a Zarr cache.

Recipe, top to bottom:
    1. resolve the config (dataset defaults, preset), the splits and the video files;
    2. load the backbone, fingerprint the settings, open (or resume) the cache;
    3. rank 0 writes the text embeddings of every split;
    4. a pool of decoder processes feeds clips to the model; rows are written by whole chunks;
    5. print a summary; with --strict, missing or failed videos are an error.

Resumable: killed at any moment, the same command continues where the cache says it stopped, and
the final cache equals an uninterrupted run's (sampling and crops are seeded per video id and view).

Rows belong to video ids. Rerun after the tree changed, the same command extracts the videos that
appeared (new rows), reuses finished rows, and keeps the rows of videos that vanished (marked not
present, unused, reused if they come back). Prompts are cheap: a changed ``--prompt``,
``--clean-names`` or SSv2 names file only recomputes the text embeddings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.datasets import (DATASETS, SPLITS, Split, VideoIndex, clean_class_name, diagnose_missing,
                                 load_splits, resolve_paths)
from mdmf_cache.errors import CacheError, ConfigError, DatasetError, MdmfError, VideoReadError
from mdmf_cache.fileio import raise_if_disk_full
from mdmf_cache.store import CacheStore, FeatureSplit, group_name

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Everything that decides what ``extract`` computes (saved in the cache attributes)."""

    dataset: str = "ucf101"
    root: str | None = None  # video tree
    splits_dir: str | None = None  # split-file folder (../shared/splits)
    labels: str | None = None  # SSv2 labels.json (default: looked for beside root)
    cache_dir: str = "cache"
    name: str | None = None  # cache group dataset name (default: dataset, or the folder's name)
    model: str = "RN50"
    pretrained: str | None = "openai"  # tag, checkpoint path, or None (seeded random init)
    num_frames: int = 8  # T
    sampler: str = "tsn"  # tsn | linspace
    normalize: str = "clip"  # clip | none
    train_views: int = 1  # V for the train split
    flip: bool = True  # train views: every dataset, SSv2 included, as the paper and the released code (SPEC 4)
    seed: int = 0
    prompt_template: str = "a photo of {}"
    clean_names: bool = False
    decoder: str = "auto"
    workers: int = 2
    batch_videos: int = 8
    chunk_rows: int = 64
    flush_seconds: float = 30.0
    device: str = "auto"
    splits: tuple[str, ...] = SPLITS
    overwrite: bool = False
    strict: bool = False
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    way: int = 5  # a folder split with fewer val/test classes than this is warned about

    def validate(self) -> None:
        from mdmf_cache.preprocess import NORMALIZATIONS
        from mdmf_cache.sampling import SAMPLERS
        from mdmf_cache.video import BACKENDS

        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"--sampler {self.sampler!r} (choose {', '.join(SAMPLERS)})")
        if self.normalize not in NORMALIZATIONS:
            problems.append(f"--normalize {self.normalize!r} (choose {', '.join(NORMALIZATIONS)})")
        if self.decoder not in BACKENDS:
            problems.append(f"--decoder {self.decoder!r} (choose {', '.join(BACKENDS)})")
        if self.num_frames < 1 or self.train_views < 1 or self.batch_videos < 1 or self.chunk_rows < 1:
            problems.append("--num-frames, --train-views, --batch-videos and --chunk-rows must be >= 1")
        if "{}" not in self.prompt_template:
            problems.append(f"--prompt {self.prompt_template!r} needs a '{{}}' for the class name")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            problems.append(f"--split {bad[0]!r} (choose {', '.join(SPLITS)})")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank {self.rank} outside world size {self.world_size}")
        if self.root is None:
            problems.append("--root DIR (the video tree) is required")
        if self.labels and not (DATASETS.get(self.dataset) and DATASETS[self.dataset].numeric_labels):
            problems.append("--labels names SSv2-Full's label ids; other datasets take names from the split files")
        if problems:
            raise ConfigError("bad options: " + "; ".join(problems))

    @property
    def cache_name(self) -> str:
        if self.name:
            return self.name
        if self.dataset == "folder" and self.root:
            return Path(self.root).resolve().name
        return self.dataset


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    from mdmf_cache.distributed import world_from_env

    w = world_from_env()
    return w.rank, w.size, w.local_rank


def fingerprint(cfg: ExtractConfig, weights: str, split_hashes: dict[str, str]) -> dict[str, Any]:
    """The settings a cache holds, in two parts.

    ``video`` decides the frame features: a rerun with any of them changed is refused.
    ``text`` only decides the prompts: a rerun with it changed recomputes the text embeddings.
    """
    import open_clip

    return {
        "video": {
            "dataset": cfg.dataset,
            "model": cfg.model,
            "weights": weights,
            "open_clip": open_clip.__version__,
            "num_frames": cfg.num_frames,
            "sampler": cfg.sampler,
            "crop": "short256-crop224",
            "normalize": cfg.normalize,
            "train_views": cfg.train_views,
            "flip": cfg.flip,
            "seed": cfg.seed,
            "split_hashes": dict(sorted(split_hashes.items())),
        },
        "text": {"prompt_template": cfg.prompt_template, "clean_names": cfg.clean_names},
    }


def prompts_for(split: Split, cfg: ExtractConfig) -> list[str]:
    """One prompt per class of the split (SPEC section 5), in class order."""
    names = [clean_class_name(n) if cfg.clean_names else n for n in split.class_names]
    return [cfg.prompt_template.format(n) for n in names]


# ---- the decoding side (runs in worker processes) -----------------------------------------------
class ClipSource:
    """A map-style dataset: row -> decoded clips of all views, or the error that stopped it.

    Everything drawn for a video (frame indices, crops) is seeded by its id, never by its row.
    """

    def __init__(self, rows: np.ndarray, ids: list[str], paths: list[Path], split_is_train: bool, views: int,
                 cfg: ExtractConfig):
        self.rows = rows  # (R,) cache rows to fill
        self.ids = ids  # (R,) their video ids
        self.paths = paths  # (R,) their files
        self.train = split_is_train
        self.views = views
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from mdmf_cache.preprocess import Crop
        from mdmf_cache.sampling import sample_indices, video_rng
        from mdmf_cache.video import decode_clip

        row, path = int(self.rows[i]), self.paths[i]
        cfg = self.cfg
        T, V = cfg.num_frames, self.views
        rngs = [video_rng(cfg.seed, self.ids[i], v) for v in range(V)] if self.train else [None] * V

        def sample_all(n: int) -> np.ndarray:  # (V*T,) one decode pass serves every view
            return np.concatenate(
                [sample_indices(n, T, cfg.sampler, train=self.train, rng=rngs[v]) for v in range(V)]
            )

        try:
            clip = decode_clip(path, sample_all, backend=cfg.decoder)
        except VideoReadError as e:
            return {"row": row, "error": str(e)}
        except Exception as e:  # a decoder library error we did not anticipate: record, go on
            return {"row": row, "error": f"{type(e).__name__}: {e} ({path})"}
        crops = [Crop.random(rngs[v], cfg.flip) if self.train else Crop.centre() for v in range(V)]
        # a tensor, not numpy: the DataLoader pins tensors (pin_memory on CUDA), so the copy to the GPU overlaps
        frames = torch.from_numpy(clip.frames.reshape(V, T, *clip.frames.shape[1:]))  # (V, T, H, W, 3) uint8
        return {
            "row": row,
            "frames": frames,
            "indices": clip.indices.reshape(V, T).astype(np.int32),
            "num_frames": clip.num_frames,
            "crops": crops,
        }


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # one decoder thread per worker; the pool gives the parallelism


def _collate(items: list) -> list:
    return items


# ---- the writing side -----------------------------------------------------------------------------
class ChunkWriter:
    """Buffers finished rows and writes them one chunk at a time (this rank owns the chunk)."""

    def __init__(self, store: CacheStore, split: str, flush_seconds: float):
        self.store = store
        self.split = split
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
        self.store.write_rows(self.split, rows, {
            "features": np.stack([r["features"] for r in self.buf]),
            "frame_indices": np.stack([r["indices"] for r in self.buf]),
            "num_frames": np.array([r["num_frames"] for r in self.buf], dtype=np.int32),
            "failed": np.array([r["error"] != "" for r in self.buf]),
            "errors": np.array([r["error"] for r in self.buf], dtype=object).astype(str),
        })


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
    retried: int = 0  # rows that had failed before, decoded again (their files may have changed)
    still_failing: int = 0  # of them, failed again
    repaired: int = 0  # damaged rows marked to be extracted again (verify_and_repair)
    damage: list[str] = field(default_factory=list)  # what was damaged
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)


def extract_split(
    store: CacheStore, split: Split, cfg: ExtractConfig, backbone, progress=None, res: SplitResult | None = None
) -> SplitResult:
    """Decode and encode the pending rows of this rank's chunks of one split.

    The cache's rows are matched to this process's files by video id (``split.paths``).
    """
    name = split.name
    views = cfg.train_views if name == "train" else 1
    found = {v: p for v, p in zip(split.video_ids, split.paths) if p is not None}
    row_ids = store.video_ids(name)
    present = np.array([v in found for v in row_ids], dtype=bool)
    owned = (np.arange(len(row_ids)) // store.chunk_rows(name)) % cfg.world_size == cfg.rank
    done = store.done_mask(name)
    # a failure is not final: the file may have been replaced since, so failed rows are decoded again
    retry = done & store._rows(name, "failed").astype(bool) & present & owned
    rows = np.flatnonzero((~done | retry) & present & owned)
    res = res or SplitResult(name)
    res.videos, res.missing = len(found), len(split.video_ids) - len(found)
    res.reused = int((done & ~retry & present & owned).sum())  # only this rank writes these rows
    res.retried = int(retry.sum())
    if len(rows) == 0:
        return res
    retried = set(np.flatnonzero(retry).tolist())
    ids = {int(r): row_ids[r] for r in rows}
    source = ClipSource(rows, [row_ids[r] for r in rows], [found[row_ids[r]] for r in rows], name == "train", views, cfg)
    loader = clip_loader(source, cfg, backbone.device)
    writer = ChunkWriter(store, name, cfg.flush_seconds)
    task = progress.add_task(f"{name}", total=len(rows)) if progress else None
    t0 = time.perf_counter()
    try:
        for batch in loader:
            _encode_batch(batch, backbone, cfg, views, ids, retried, writer, res)
            if progress:
                progress.advance(task, len(batch))
    finally:  # Ctrl-C or an error: the finished rows buffered so far are kept
        writer.flush()
    res.seconds = time.perf_counter() - t0
    return res


def clip_loader(source: "ClipSource", cfg: ExtractConfig, device):
    """Batches of decoded clips from ``cfg.workers`` decoder processes (pinned for a GPU)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        source, batch_size=cfg.batch_videos, num_workers=cfg.workers, collate_fn=_collate,
        worker_init_fn=_worker_init if cfg.workers else None, prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False, pin_memory=device.type == "cuda",
    )


def encode_clips(ok: list[dict[str, Any]], backbone, cfg: ExtractConfig, views: int) -> np.ndarray:
    """Decoded clips (``ClipSource`` items without an error) -> ``(B, V, T, D)`` float16 frame embeddings."""
    import torch

    from mdmf_cache.preprocess import preprocess_clips

    T, D = cfg.num_frames, backbone.dim
    clips = [b["frames"][v] for b in ok for v in range(views)]
    crops = [b["crops"][v] for b in ok for v in range(views)]
    pix = preprocess_clips(clips, crops, backbone.device, normalize=cfg.normalize)  # (B*V, T, 3, 224, 224)
    emb = backbone.encode_images(pix.flatten(0, 1))  # (B*V*T, D)
    return emb.view(len(ok), views, T, D).to(torch.float16).cpu().numpy()


def _encode_batch(batch: list, backbone, cfg: ExtractConfig, views: int, ids: dict, retried: set,
                  writer: "ChunkWriter", res: SplitResult) -> None:
    """Encode one batch of decoded clips and hand its rows (failures recorded) to the writer."""
    T, D = cfg.num_frames, backbone.dim
    ok = [b for b in batch if "error" not in b]
    feats: dict[int, np.ndarray] = {}
    if ok:
        emb = encode_clips(ok, backbone, cfg, views)
        feats = {b["row"]: emb[j] for j, b in enumerate(ok)}
    for b in batch:
        if "error" in b:
            res.failed += 1
            res.still_failing += int(b["row"] in retried)
            res.failures.append((ids[b["row"]], b["error"]))
            log.debug("failed %s: %s", ids[b["row"]], b["error"])
            writer.add({"row": b["row"], "features": np.zeros((views, T, D), np.float16),
                        "indices": np.full((views, T), -1, np.int32), "num_frames": 0, "error": b["error"]})
        else:
            res.extracted += 1
            res.short += int(b["num_frames"] < T)
            writer.add({"row": b["row"], "features": feats[b["row"]], "indices": b["indices"],
                        "num_frames": b["num_frames"], "error": ""})


def _progress():
    from pipelines.progress import make_progress

    return make_progress("videos")


def embed_split(split: Split, cfg: ExtractConfig, backbone, text, progress=None, keep_failed: bool = False,
                share: tuple[int, int] = (0, 1)) -> FeatureSplit:
    """A split's found videos embedded in memory (test sampling, centre crop): the extraction path without a cache.

    Full mode validates the backbone it is fine-tuning with this, so validation sees exactly the features
    that ``extract --pretrained backbone.pt`` would store (float16 included). Videos that fail to decode
    are logged and left out, or kept as all-zero rows with ``keep_failed`` (so that the rows stay those of
    ``split.found()``, which a fixed episode list indexes).

    Args:
        text: ``(C, D)`` prompt embeddings of the split's classes.
        progress: an optional rich Progress to add a task to.
        share: (rank, world): embed only rows ``rank::world`` (the others stay zero; several processes
            each take a share and gather them, see :func:`mdmf_cache.distributed.gather_shares`).
    """
    import torch

    ids, paths, labels = split.found()
    T, D = cfg.num_frames, backbone.dim
    feats = np.zeros((len(ids), 1, T, D), dtype=np.float16)  # (Nv, 1, T, D)
    ok_rows = np.zeros(len(ids), dtype=bool)
    mine = np.arange(share[0], len(ids), share[1])
    source = ClipSource(mine, [ids[i] for i in mine], [paths[i] for i in mine], False, 1, cfg)
    task = progress.add_task(f"embed {split.name}", total=len(mine)) if progress else None
    for batch in clip_loader(source, cfg, backbone.device):
        ok = [b for b in batch if "error" not in b]
        for b in batch:
            if "error" in b:
                log.warning("%s: %s", ids[b["row"]], b["error"])  # "row" is the index into split.found()
        if ok:
            rows = [b["row"] for b in ok]
            feats[rows] = encode_clips(ok, backbone, cfg, 1)
            ok_rows[rows] = True
        if progress:
            progress.advance(task, len(batch))
    if progress:
        progress.remove_task(task)
    keep = np.arange(len(ids)) if keep_failed else np.flatnonzero(ok_rows)
    dev = backbone.device
    return FeatureSplit(features=torch.from_numpy(feats[keep]).to(dev),
                        labels=torch.from_numpy(labels[keep].astype(np.int64)).to(dev),
                        video_ids=[ids[i] for i in keep], classes=list(split.classes),
                        class_names=list(split.class_names), text=text.to(dev))


def find_videos(cfg: ExtractConfig, splits: dict[str, Split]) -> dict[str, list[str]]:
    """Resolve every split's ids to files under ``cfg.root``; returns the missing ids per split.

    Raises:
        DatasetError: no listed video is there (with the likely cause), or some are and ``--strict``.
    """
    root = Path(cfg.root)
    index = VideoIndex(root)
    missing = {name: resolve_paths(split, root, index) for name, split in splits.items()}
    listed = sum(len(split) for split in splits.values())
    n_missing = sum(len(m) for m in missing.values())
    if listed and n_missing == listed:
        ids = [v for split in splits.values() for v in split.video_ids]
        raise DatasetError(f"none of the {listed} videos of the split files is under {root}: "
                           f"{diagnose_missing(ids, root, cfg.dataset)}")
    for name, split in splits.items():
        if len(missing[name]) * 2 > len(split):  # most of a split is not there: say why if it can be seen
            log.warning("%s: %d of %d listed videos are not under %s: %s", name, len(missing[name]), len(split),
                        root, diagnose_missing(missing[name], root, cfg.dataset))
    if n_missing:
        first = [v for m in missing.values() for v in m][:3]
        msg = f"{n_missing} videos listed in the split files are not under {cfg.root} (first: {', '.join(first)})"
        if cfg.strict:
            raise DatasetError(msg + "; drop --strict to extract the rest")
        log.warning("%s; extracting the rest", msg)
    if cfg.dataset == "folder":
        for name in ("val", "test"):
            if name in splits and len(splits[name].classes) < cfg.way:
                log.warning("folder: %s has %d classes, fewer than a %d-way episode needs; add classes, pass "
                            "--splits with your own lists, or train and evaluate with --way %d",
                            name, len(splits[name].classes), cfg.way, len(splits[name].classes))
    return missing


def prepare_cache(store: CacheStore, splits: dict[str, Split], cfg: ExtractConfig, backbone) -> dict[str, SplitResult]:
    """Rank 0: match every split's rows to the tree and (re)compute stale text embeddings."""
    store.root.attrs["ready"] = False  # until rows and text match this run (info: not complete if killed here)
    # damage (a deleted or garbled chunk, a corrupt zarr.json): undone here, redone by this run
    t0 = time.perf_counter()
    damages, redo = store.verify_and_repair(cfg.num_frames, backbone.dim)
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
    store.root.attrs["config"] = json.loads(json.dumps(asdict(cfg), default=str))
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


def split_changes(path: Path, splits: dict[str, Split]) -> str | None:
    """What changed between the split files a cache was made from and ``splits``: the first classes and
    videos added or removed per split (None: no cache, or nothing to compare)."""
    from mdmf_cache.store import meta_problem

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
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:
        f = open(lock, "a+")
    except OSError as e:
        raise CacheError(f"cannot write {lock} ({e.strerror}): extract needs write access to {path.parent}; "
                         "a read-only cache can still be read by train, eval and export") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its pid right after it takes the lock
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            holder = holder or "another process"
            raise CacheError(f"another extract ({holder}) is writing {path}; wait for it to finish, then rerun this "
                             "command (it reuses everything finished)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_extract(cfg: ExtractConfig) -> tuple[Path, list[SplitResult]]:
    """Run the whole extraction; returns the cache path and per-split results.

    Raises:
        ConfigError, DatasetError: bad options, split files or video root (no video found included).
        CacheError: an existing cache made with other settings (without --overwrite).
        MdmfError: with --strict, when videos were missing or failed.
    """
    from mdmf_cache.backbone import load_backbone, pretrained_slug

    cfg.validate()
    # 1. splits and files
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
    backbone = load_backbone(cfg.model, cfg.pretrained, device)
    fp = fingerprint(cfg, backbone.weights, split_hashes)
    path = Path(cfg.cache_dir) / group_name(cfg.cache_name, cfg.model, pretrained_slug(cfg.pretrained))
    # rank 0 holds the cache's lock (other ranks of the same job follow rank 0)
    with extract_lock(path) if cfg.rank == 0 else contextlib.nullcontext():
        return _extract_into(path, fp, cfg, splits, every_split, backbone)


def _extract_into(path: Path, fp: dict, cfg: ExtractConfig, splits: dict[str, Split], every_split: dict[str, Split],
                  backbone) -> tuple[Path, list[SplitResult]]:
    """Steps 2 (the cache) to 5 of :func:`run_extract`."""
    note = None
    if (path / "zarr.json").is_file() and not cfg.overwrite and cfg.rank == 0:
        with contextlib.suppress(CacheError):  # a damaged cache: refused or repaired below
            note = split_changes(path, every_split)
    store = CacheStore.open_for_writing(path, fp, overwrite=cfg.overwrite, rank=cfg.rank, split_note=note)
    # 3. rows matched to the tree, text (rank 0); the other ranks wait for the rows they need
    if cfg.rank == 0:
        results = prepare_cache(store, splits, cfg, backbone)
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
    # 5. strictness: failures recorded in the cache count too (a --strict rerun of a finished cache)
    failed = sum(store.split_summary(name)["failed"] for name in splits) if cfg.strict else 0
    if cfg.strict and failed:
        raise MdmfError(f"{failed} videos could not be decoded (see 'mdmf-cache info {path}'); drop --strict to accept")
    return path, list(results.values())
