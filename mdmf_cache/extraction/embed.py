"""Extraction pieces that every path from videos to frame embeddings shares.

``extract`` (:mod:`mdmf_cache.extraction.build`), full mode's training and validation, ``eval`` of a
full-mode run and ``predict`` all decode and encode videos through these: the fingerprint of a
cache's settings, the class prompts, the decoding dataset (:class:`ClipSource`, run by DataLoader
worker processes), batched encoding, and embedding a split in memory without a cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.configs import ExtractConfig
from mdmf_cache.data.datasets import Split, VideoIndex, clean_class_name, diagnose_missing, resolve_paths
from mdmf_cache.errors import DatasetError, VideoReadError
from mdmf_cache.store.read import FeatureSplit

log = logging.getLogger(__name__)

__all__ = ["distributed_env", "fingerprint", "prompts_for", "ClipSource", "worker_init", "clip_loader", "encode_clips",
           "encode_clips_tokens", "embed_split", "find_videos"]

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
    """One prompt per class of the split (docs/method.md §5), in class order."""
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

        from mdmf_cache.data.preprocess import Crop
        from mdmf_cache.data.sampling import sample_indices, video_rng
        from mdmf_cache.data.video import decode_clip

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

def worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # one decoder thread per worker; the pool gives the parallelism

def collate(items: list) -> list:
    return items

def clip_loader(source: "ClipSource", cfg: ExtractConfig, device):
    """Batches of decoded clips from ``cfg.workers`` decoder processes (pinned for a GPU)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        source, batch_size=cfg.batch_videos, num_workers=cfg.workers, collate_fn=collate,
        worker_init_fn=worker_init if cfg.workers else None, prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False, pin_memory=device.type == "cuda",
    )

def _pixels(ok: list[dict[str, Any]], backbone, cfg: ExtractConfig, views: int):
    """``(B*V*T, 3, 224, 224)`` normalised pixels of decoded clips, video-major, then view, then frame."""
    from mdmf_cache.data.preprocess import preprocess_clips

    clips = [b["frames"][v] for b in ok for v in range(views)]
    crops = [b["crops"][v] for b in ok for v in range(views)]
    return preprocess_clips(clips, crops, backbone.device, normalize=cfg.normalize).flatten(0, 1)


def encode_clips(ok: list[dict[str, Any]], backbone, cfg: ExtractConfig, views: int) -> np.ndarray:
    """Decoded clips (``ClipSource`` items without an error) -> ``(B, V, T, D)`` float16 frame embeddings."""
    import torch

    T, D = cfg.num_frames, backbone.dim
    emb = backbone.encode_images(_pixels(ok, backbone, cfg, views))  # (B*V*T, D)
    return emb.view(len(ok), views, T, D).to(torch.float16).cpu().numpy()


def encode_clips_tokens(ok: list[dict[str, Any]], backbone, cfg: ExtractConfig, views: int, spec
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decoded clips -> the ``(B, V, T, D)`` float16 frame embeddings of :func:`encode_clips` (the same bits on the
    same batch) and, per layer of the TokenSpec ``spec``, its array name -> ``(B, V, T, P, Dt)`` float16 tokens."""
    import torch

    T, D = cfg.num_frames, backbone.dim
    emb, tokens = backbone.encode_with_tokens(_pixels(ok, backbone, cfg, views), spec)  # (B*V*T, D), L x (B*V*T, P, Dt)
    out = {name: t.view(len(ok), views, T, *t.shape[1:]).to(torch.float16).cpu().numpy()
           for name, t in zip(spec.arrays, tokens)}
    return emb.view(len(ok), views, T, D).to(torch.float16).cpu().numpy(), out

def embed_split(split: Split, cfg: ExtractConfig, backbone, text, progress=None, keep_failed: bool = False,
                share: tuple[int, int] = (0, 1), counts: dict[str, int] | None = None) -> FeatureSplit:
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
        counts: filled with ``short`` (videos of this share with fewer than T decodable frames) and ``failed``.
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
        if counts is not None:
            counts["short"] = counts.get("short", 0) + sum(b["num_frames"] < T for b in ok)
            counts["failed"] = counts.get("failed", 0) + len(batch) - len(ok)
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
