"""Train the CLIP-MDMF heads: fast mode (CLIP frozen, cached features) or full mode (CLIP fine-tuned).

Fast mode: frame and text embeddings come from the cache, loaded into memory once (on the GPU
when there is one). Episodes are sampled in memory, E at a time, with a random cached view per
train video, and the heads see E episodes per optimiser step.

Full mode (SPEC section 10, the paper's own training): the input is the dataset, not a cache. Each
training episode is decoded from the videos by DataLoader workers with fresh augmentation
(:mod:`mdmf_cache.video_episodes`), the CLIP visual encoder runs in front of the same heads
(:class:`~mdmf_cache.models.endtoend.EndToEnd`) and is fine-tuned with them; gradients are
accumulated over ``episodes_per_step`` episodes (the paper's 16 per update), split between the ranks
of a torchrun/SLURM job (DistributedDataParallel). Validation embeds the val split with the current
backbone in memory (the extraction path, no cache) and scores it with the per-video evaluation path.

Recipe, top to bottom (both modes: one config, one loop):
    1. resolve the config; check every input before anything is written;
    2. load the data (fast: the cache's train and val features; full: the splits, the backbone and
       the text embeddings), build the heads (and the backbone in front) and Adam, or restore
       ``last.pt`` (--resume);
    3. train; every ``val_every`` episodes score the fixed val episode list, keep ``best.pt`` by val
       accuracy (never by test; full mode also ``backbone.pt``), write ``metrics.jsonl`` and ``last.pt``;
    4. return the best val accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mdmf_cache.backbone import heads_autocast, resolve_device, weights_id
from mdmf_cache.distributed import (World, barrier, destroy_process_group, gather_shares, init_process_group,
                                    merge_running_stats, running_stats_snapshot, world_from_env)
from mdmf_cache.episodes import EpisodeSampler, Episodes, gather
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.evaluation import score
from mdmf_cache.fileio import atomic_torch_save, atomic_write_json, atomic_write_text
from mdmf_cache.losses import mean_parts, total_loss
from mdmf_cache.models.config import MDMFConfig, build_config
from mdmf_cache.models.head import FewShotHead
from mdmf_cache.models.mdmf import build_head
from mdmf_cache.store import CacheStore, FeatureSplit, fingerprint_diff, load_split_features

log = logging.getLogger(__name__)


@dataclass
class FullModeConfig:
    """Full mode's data and backbone (``TrainConfig.full``); the data options keep ``extract``'s names."""

    dataset: str = ""  # ucf101 | hmdb51 | kinetics100 | ssv2-small | ssv2-full | folder
    root: str | None = None  # video tree
    splits_dir: str | None = None  # split-file folder (../shared/splits)
    labels: str | None = None  # SSv2 labels.json
    model: str = "RN50"  # open_clip name
    pretrained: str | None = "openai"  # tag, checkpoint path, or None (seeded random init)
    num_frames: int = 8  # T
    sampler: str | None = None  # tsn | linspace; None: the preset's
    normalize: str | None = None  # clip | none; None: the preset's
    flip: bool = True
    prompt_template: str = "a photo of {}"
    clean_names: bool = False
    decoder: str = "auto"
    workers: int = 4  # decoder processes per rank
    backbone_lr: float | None = None  # None: TrainConfig.lr (the paper: 1e-5 for all)
    train_text: bool = False  # the released code never trains the text tower
    train_last_blocks: int | None = None  # None: the whole visual tower; 0: frozen; N: the last N blocks
    backbone_bn: str = "episode"  # RN BatchNorm: episode (per-episode batch statistics) | frozen
    grad_checkpointing: bool = False
    episodes_per_forward: int = 1  # episodes in one forward pass (the paper: 1)
    init_heads: str | None = None  # a run (fast or full) whose best.pt heads start this one (linear probe, then fine-tune)

    def validate(self) -> list[str]:
        from mdmf_cache.datasets import DATASET_NAMES
        from mdmf_cache.finetune import BN_MODES

        problems = []
        if self.dataset not in DATASET_NAMES:
            path = Path(self.dataset)
            if self.dataset.endswith(".zarr") or (path / "zarr.json").is_file():
                problems.append(f"{self.dataset} is a cache: full mode fine-tunes CLIP on the videos, so it takes a "
                                f"dataset ({', '.join(DATASET_NAMES)}) and --root; train on a cache with --mode fast")
            else:
                problems.append(f"full mode: unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
        if not self.root:
            problems.append("full mode needs --root DIR (the video tree)")
        if self.num_frames < 1 or self.workers < 0 or self.episodes_per_forward < 1:
            problems.append("--num-frames and --episodes-per-forward must be >= 1, --workers >= 0")
        if self.backbone_bn not in BN_MODES:
            problems.append(f"--backbone-bn {self.backbone_bn!r}: choose {' or '.join(BN_MODES)}")
        if self.backbone_lr is not None and not (math.isfinite(self.backbone_lr) and self.backbone_lr > 0):
            problems.append(f"--backbone-lr {self.backbone_lr}: must be a finite number > 0")
        if self.init_heads and not (Path(self.init_heads) / "best.pt").is_file():
            problems.append(f"--init-heads {self.init_heads}: no best.pt there (a run directory of mdmf-cache train)")
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            problems.append(f"--train-last-blocks {self.train_last_blocks}: must be >= 0 (0 freezes the backbone)")
        return problems

    def extract_config(self, preset: str, seed: int, device: str, **overrides: Any):
        """The :class:`~pipelines.extract.ExtractConfig` of these videos (decoding, sampling, pixels, prompts),
        with ``overrides`` (e.g. ``pretrained=run/backbone.pt``) applied."""
        from mdmf_cache.models.config import PRESET_DATA
        from pipelines.extract import ExtractConfig

        return dataclasses.replace(ExtractConfig(
            dataset=self.dataset, root=self.root, splits_dir=self.splits_dir, labels=self.labels, model=self.model,
            pretrained=self.pretrained, num_frames=self.num_frames,
            sampler=self.sampler or PRESET_DATA[preset]["sampler"],
            normalize=self.normalize or PRESET_DATA[preset]["normalize"], flip=self.flip, seed=seed,
            prompt_template=self.prompt_template, clean_names=self.clean_names, decoder=self.decoder,
            workers=self.workers, device=device), **overrides)


@dataclass
class TrainConfig:
    """Training, both modes; saved as ``config.json`` beside the checkpoints."""

    cache: str = ""  # fast mode's input
    out: str = "runs/fast"
    mode: str = "fast"  # fast (CLIP frozen, cache) | full (CLIP fine-tuned, videos: see ``full``)
    method: str = "mdmf"  # mdmf | clip-fsar (the paper's main rival, same trainer)
    preset: str = "paper"
    heads: dict[str, Any] = field(default_factory=dict)  # MDMFConfig overrides (ablation switches)
    way: int = 5
    shot: int = 5
    train_queries: int = 5  # per class
    episodes: int = 10000  # training episodes in total
    episodes_per_step: int = 16  # E per optimiser step (full mode: accumulated, split between ranks)
    lr: float = 1e-4  # Adam; measured for fast mode (README); full mode's CLI default is the paper's 1e-5
    weight_decay: float = 0.0
    val_every: int = 1000  # episodes
    val_episodes: int = 500
    val_queries: int = 1
    save_every: int = 0  # episodes between extra last.pt saves (0: at validations only; full mode's steps are slow)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    full: dict[str, Any] = field(default_factory=dict)  # FullModeConfig fields (mode=full)

    @property
    def full_mode(self) -> FullModeConfig:
        return FullModeConfig(**self.full)

    def validate(self) -> None:
        problems = []
        if self.method not in ("mdmf", "clip-fsar"):
            problems.append(f"--method {self.method!r}: choose mdmf or clip-fsar")
        if self.mode not in ("fast", "full"):
            problems.append(f"--mode {self.mode!r}: choose fast (heads on a cache) or full (CLIP fine-tuned)")
        for name in ("shot", "train_queries", "episodes", "episodes_per_step", "val_every", "val_episodes", "val_queries"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.save_every < 0:
            problems.append("--save-every must be >= 0 (0: save at validations only)")
        if self.way < 2:
            problems.append(f"--way {self.way}: an episode needs at least 2 classes")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr {self.lr}: must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay {self.weight_decay}: must be a finite number >= 0")
        if self.mode == "full":
            unknown = sorted(set(self.full) - {f.name for f in dataclasses.fields(FullModeConfig)})
            if unknown:
                problems.append(f"unknown full-mode field(s) {', '.join(unknown)}")
            else:
                problems += self.full_mode.validate()
        elif self.full:
            problems.append("video and backbone options (--root, --model, --backbone-lr, ...) are for --mode full; "
                            "fast mode reads a cache")
        if problems:
            raise ConfigError("; ".join(problems))
        # every head switch, before any work (an ablation arm's bad --view fails here, not after training);
        # the width is the cache's, unknown here: any multiple of the attention heads checks the rest
        heads = self.heads.get("heads", 8)
        build_config(self.preset, 8 * heads if isinstance(heads, int) and heads > 0 else 8,
                     **{**self.heads, "method": self.method})


def cache_identity(cache: Path | str) -> dict[str, Any]:
    """What binds a run to its cache: the extraction fingerprint and each split's class list (hashed).

    A run trained on one cache must not be resumed or evaluated on a cache with other settings or
    another class split (another ``--seed`` of a folder dataset gives other test classes).
    """
    store = CacheStore(cache)
    classes = {split: hashlib.sha1("\n".join(store.root[split].attrs.get("classes", [])).encode()).hexdigest()[:16]
               for split in store.splits}
    return {"fingerprint": store.fingerprint, "classes": classes}


def check_identity(recorded: dict[str, Any] | None, cache: Path | str, what: str) -> None:
    """Refuse a cache whose identity differs from the run's (fields named). Runs without a record pass."""
    if not recorded:
        return
    now = cache_identity(cache)
    diff = fingerprint_diff(recorded.get("fingerprint", {}), now["fingerprint"])
    diff = [d.replace("cache has", "run has").replace("asked", "cache has") for d in diff]
    diff += [f"{split} classes differ" for split in sorted(set(recorded.get("classes", {})) & set(now["classes"]))
             if recorded["classes"][split] != now["classes"][split]]
    if diff:
        raise CacheError(f"{what}: {cache} is not the cache this run was trained on ({'; '.join(diff)}); "
                         "point at the original cache, or train a new run on this one")


def build_model(preset: str, dim: int, num_frames: int, heads: dict[str, Any], method: str = "mdmf") -> FewShotHead:
    """The head of a preset with overrides: MDMF or CLIP-FSAR (``method``)."""
    return build_head(build_config(preset, dim, num_frames=num_frames, **{**heads, "method": method}))


def validate(model: FewShotHead, split: FeatureSplit, episodes: Episodes, seed: int) -> float:
    """Mean val accuracy (%) on the fixed list, per-video path (RNG forked: training draws are unaffected)."""
    was_training = model.training
    model.eval()
    acc = score(model.cfg.method, split, episodes, model, seed).mean * 100
    model.train(was_training)
    return acc


def _rng_state(rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any], device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class FastData:
    """Fast mode's episodes: E at a time from the cache's features in memory (a random cached view per video)."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.train = load_split_features(cfg.cache, "train", device=str(device))
        self.val = load_split_features(cfg.cache, "val", device=str(device))
        views, self.num_frames, self.dim = self.train.features.shape[1:]
        self.sampler = EpisodeSampler(self.train.labels.cpu().numpy(), self.train.num_classes, views=views)
        self.sampler.check(cfg.way, cfg.shot, cfg.train_queries, split="train")
        self.val_labels, self.val_classes = self.val.labels.cpu().numpy(), self.val.num_classes

    def record(self) -> dict[str, Any]:
        """What config.json records of the input (the cache's identity)."""
        return {"cache_abs": str(Path(self.cfg.cache).resolve()), "cache_identity": cache_identity(self.cfg.cache)}

    def wrap(self, head: FewShotHead) -> nn.Module:
        return head

    def update(self, done: int, e: int, rng: np.random.Generator):
        """One update's micro-batches: ``(model inputs, query labels, loss weight, last)``; fast mode: all E
        episodes at once."""
        ep = self.sampler.sample(e, self.cfg.way, self.cfg.shot, self.cfg.train_queries, rng, random_view=True)
        support, query, text, labels = gather(self.train.features, self.train.text, ep)  # (E,S,T,D) (E,Q,T,D) (E,N,D) (E,Q)
        yield (support, query, text), labels, 1.0, True

    def val_split(self, model: nn.Module, progress=None) -> FeatureSplit:
        return self.val

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class FullData:
    """Full mode's episodes: decoded from the videos by DataLoader workers; the backbone goes in front of the heads."""

    def __init__(self, cfg: TrainConfig, device: torch.device, world: World) -> None:
        from mdmf_cache.backbone import load_backbone
        from mdmf_cache.datasets import load_splits
        from mdmf_cache.video_episodes import EpisodeVideos, check_class_sizes
        from pipelines.extract import find_videos, prompts_for

        self.cfg, self.device, self.world = cfg, device, world
        f = self.f = cfg.full_mode
        self.ecfg = f.extract_config(cfg.preset, cfg.seed, str(device), splits=("train", "val"), way=cfg.way)
        self.ecfg.validate()
        splits = load_splits(f.dataset, Path(f.splits_dir) if f.splits_dir else None, Path(f.root), cfg.seed,
                             labels_file=Path(f.labels) if f.labels else None)
        self.splits = {name: splits[name] for name in ("train", "val")}
        find_videos(self.ecfg, self.splits)  # paths resolved; a tree with none of the videos is an error
        train, val = self.splits["train"], self.splits["val"]
        _, paths, labels = train.found()
        self.val_labels, self.val_classes = val.found()[2].astype(np.int64), len(val.classes)
        what = f"{cfg.way}-way {cfg.shot}-shot training"
        check_class_sizes(labels, train.classes, cfg.shot + cfg.train_queries, "train", f"{what} with {cfg.train_queries} queries")
        check_class_sizes(self.val_labels, val.classes, cfg.shot + cfg.val_queries, "val", f"validation with {cfg.val_queries} queries")
        self.backbone = load_backbone(f.model, f.pretrained, str(device))
        self.dim, self.num_frames = self.backbone.dim, f.num_frames
        self.prompts = {name: prompts_for(split, self.ecfg) for name, split in self.splits.items()}
        # the frozen text tower's embeddings, once; a trained text tower encodes the prompts' tokens per episode
        self.text = {name: self.backbone.encode_texts(p).to(device) for name, p in self.prompts.items()}  # (C, D)
        self.tokens = self.backbone.tokenizer(self.prompts["train"]).to(device) if f.train_text else None  # (C, L)
        self.episodes = EpisodeVideos(paths, labels, len(train.classes), cfg.way, cfg.shot, cfg.train_queries,
                                      f.num_frames, self.ecfg.sampler, f.flip, cfg.seed, f.decoder,
                                      normalize=self.ecfg.normalize if device.type == "cpu" else None)
        self.loader_it = None
        self.wait_s, self.decode_s, self.decoded, self.substituted, self.updates = 0.0, 0.0, 0, 0, 0

    def record(self) -> dict[str, Any]:
        return {"backbone_weights": self.backbone.weights, "resolved_data": asdict(self.ecfg)}

    def wrap(self, head: FewShotHead) -> nn.Module:
        from mdmf_cache.finetune import FrameEncoder
        from mdmf_cache.models.endtoend import EndToEnd

        f = self.f
        if f.init_heads:  # e.g. a fast-mode run on this backbone's cache: its heads, then fine-tuning
            ckpt = torch.load(Path(f.init_heads) / "best.pt", map_location="cpu", weights_only=False)
            if ckpt["heads"] != head.cfg.to_dict():
                diff = sorted(k for k in ckpt["heads"] if ckpt["heads"][k] != head.cfg.to_dict().get(k))
                raise ConfigError(f"--init-heads {f.init_heads}: its heads differ from this run's in {', '.join(diff)}; "
                                  "use the same --method, --preset, head switches and backbone (width D, frames T)")
            head.load_state_dict(ckpt["model"])
            log.info("heads initialised from %s/best.pt (val %.2f%%)", f.init_heads, ckpt.get("val_acc", float("nan")))
        encoder = FrameEncoder(self.backbone.model, bn=f.backbone_bn, train_last_blocks=f.train_last_blocks,
                               train_text=f.train_text, grad_checkpointing=f.grad_checkpointing)
        return EndToEnd(encoder, head)

    def _indices(self, done: int) -> list[int]:
        """This rank's episodes from ``done`` to the end, in order: rank r takes share r of each update."""
        out, cfg = [], self.cfg
        while done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - done)
            n = e // self.world.size
            out += range(done + self.world.rank * n, done + (self.world.rank + 1) * n)
            done += e
        return out

    def start(self, done: int) -> None:
        """Start the decoder workers on this rank's episodes from ``done`` (after a resume too)."""
        from torch.utils.data import DataLoader

        from mdmf_cache.video_episodes import collate_episodes
        from pipelines.extract import _worker_init

        w = self.f.workers
        loader = DataLoader(self.episodes, batch_size=1, sampler=self._indices(done), num_workers=w,
                            collate_fn=collate_episodes, worker_init_fn=_worker_init if w else None,
                            prefetch_factor=max(2, 2 * self.f.episodes_per_forward) if w else None,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.loader_it = iter(loader)

    def update(self, done: int, e: int, rng: np.random.Generator):
        """One update's micro-batches of ``episodes_per_forward`` episodes; the weights make the accumulated
        gradient, averaged over the ranks by DDP, the mean over all ``e`` episodes of the update."""
        from mdmf_cache.video_episodes import episode_pixels

        if self.loader_it is None:
            self.start(done)
        n = e // self.world.size
        m = self.f.episodes_per_forward
        for lo in range(0, n, m):
            t0 = time.perf_counter()
            items = [next(self.loader_it)[0] for _ in range(min(m, n - lo))]
            self.wait_s += time.perf_counter() - t0
            self.decode_s += sum(it["decode_s"] for it in items)
            self.decoded += len(items)
            for it in items:
                for err in it["errors"]:
                    self.substituted += 1
                    log.warning("episode %d: %s; another video of its class was used", it["index"], err)
            support, query, classes, labels, noise = episode_pixels(items, self.device, self.ecfg.normalize)
            text = self.tokens[classes] if self.tokens is not None else self.text["train"][classes]  # (E, N, L|D)
            # dropout and anything else drawn from torch's RNG: seeded by the micro-batch's first episode
            torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, 9, items[0]["index"]]).generate_state(1)[0]))
            yield (support, query, text, None, noise), labels, len(items) * self.world.size / e, lo + m >= n
        self.updates += 1

    def val_split(self, model: nn.Module, progress=None) -> FeatureSplit:
        """The val split embedded with the backbone as it is now (eval mode), as ``extract`` would store it
        (a task on ``progress``, the training bar, while it runs). With several ranks each embeds a share of
        the videos and every rank gets them all (a collective: every rank calls this)."""
        from mdmf_cache.backbone import Backbone
        from pipelines.extract import embed_split

        encoder = model.encoder
        was = encoder.training
        encoder.eval()
        bb = Backbone(model=encoder.clip, tokenizer=self.backbone.tokenizer, dim=self.dim, device=self.device,
                      name=self.f.model, weights="in-training")
        try:
            text = bb.encode_texts(self.prompts["val"]) if self.f.train_text else self.text["val"]
            # keep_failed: the rows stay val_eps' rows
            split = embed_split(self.splits["val"], self.ecfg, bb, text, progress, keep_failed=True,
                                share=(self.world.rank, self.world.size))
            split.features = gather_shares(split.features, self.world)  # (Nv, 1, T, D)
            return split
        finally:
            encoder.train(was)

    def stats(self) -> dict[str, float]:
        """Data-pipeline figures since the last call: decoder wait per update (0 = the GPU never waited)."""
        out = {"loader_wait_s": self.wait_s / max(self.updates, 1), "decode_s_per_episode": self.decode_s / max(self.decoded, 1),
               "substituted_videos": self.substituted}
        self.wait_s, self.decode_s, self.decoded, self.substituted, self.updates = 0.0, 0.0, 0, 0, 0
        return out

    def close(self) -> None:
        self.loader_it = None  # ends the worker processes


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam; full mode gives the backbone its own learning rate (``backbone_lr``, default ``lr``)."""
    if cfg.mode == "fast":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.lr}]
    backbone = [p for p in model.encoder.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.full_mode.backbone_lr or cfg.lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def _device(cfg: TrainConfig, world: World) -> torch.device:
    """The compute device; under torchrun with ``--device auto`` each rank takes its local GPU."""
    if world.distributed and cfg.device == "auto" and torch.cuda.is_available():
        return torch.device(f"cuda:{world.local_rank % torch.cuda.device_count()}")
    return resolve_device(cfg.device)


OOM_HINT = ("out of GPU memory; add --grad-checkpointing, lower --episodes-per-forward (1 is the paper's), "
            "--train-queries or --shot, or fine-tune fewer blocks (--train-last-blocks N)")


def run_train(cfg: TrainConfig, progress: bool = True,
              on_val: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train; returns ``{"best_val": %, "run": path, "episodes": n, "episodes_per_s": ...}``.

    Args:
        on_val: called with (episodes done, val accuracy %) after each validation, once ``last.pt``
            and ``metrics.jsonl`` hold it; an exception it raises (a sweep's pruning) ends the run there.

    Raises:
        ConfigError: bad options, --resume with a different config, or (full mode) out of GPU memory.
        CacheError: the cache is missing or incomplete.
    """
    cfg.validate()
    world = world_from_env() if cfg.mode == "full" else World()
    if world.size > 1 and cfg.episodes_per_step % world.size:
        raise ConfigError(f"--episodes-per-step {cfg.episodes_per_step} is not divisible by the {world.size} "
                          "processes; each rank takes an equal share of an update")
    if world.size > 1 and cfg.episodes % cfg.episodes_per_step:
        raise ConfigError(f"--episodes {cfg.episodes} is not a multiple of --episodes-per-step "
                          f"{cfg.episodes_per_step}: with {world.size} processes every update must be whole")
    device = _device(cfg, world)
    init_process_group(world, device)
    try:
        return _train(cfg, world, device, progress, on_val)
    finally:
        destroy_process_group()


def _train(cfg: TrainConfig, world: World, device: torch.device, progress: bool,
           on_val: Callable[[int, float], None] | None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring, in this process (one rank)."""
    out = Path(cfg.out)
    cfg_dict = asdict(cfg)
    old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else None
    if (out / "last.pt").is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.resume and old is not None and (out / "last.pt").is_file():
        # paths may be written differently (relative, moved): the cache is compared by identity below
        defaults = asdict(TrainConfig())  # a run written before a field existed had its default
        free = ("resume", "device", "episodes", "cache", "out")
        diff = [k for k in cfg_dict if k not in free and _resumable(k, old.get(k, defaults[k])) != _resumable(k, cfg_dict[k])]
        if diff:
            raise ConfigError(f"--resume: {out} was trained with different {', '.join(diff)}; use another --out")
        if cfg.mode == "fast":
            check_identity(old.get("cache_identity"), cfg.cache, "--resume")
    # 1. data and model; nothing is written before every input is checked
    data = FastData(cfg, device) if cfg.mode == "fast" else FullData(cfg, device, world)
    val_sampler = EpisodeSampler(data.val_labels, data.val_classes)
    val_sampler.check(cfg.way, cfg.shot, cfg.val_queries, split="val")
    torch.manual_seed(cfg.seed)  # the heads' initialisation, then (fast mode) dropout and PPS draws
    head = build_model(cfg.preset, data.dim, data.num_frames, cfg.heads, cfg.method)
    core = data.wrap(head).to(device)  # the heads, or the backbone in front of them
    opt = _optimizer(cfg, core)
    val_eps = val_sampler.sample(cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng([cfg.seed, 1]))
    rng = np.random.default_rng([cfg.seed, 0])  # fast mode's episode stream (full mode's episodes are seeded by index)
    done, best, history, losses = 0, -1.0, [], []
    if cfg.resume and (out / "last.pt").is_file():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(rng, ckpt["rng"], device)
        done, best = ckpt["episodes"], ckpt["best_val"]
        # the checkpoint carries the metrics up to itself: lines written after it belong to the lost part
        history = ckpt.get("history") or _history_upto(out / "metrics.jsonl", done)
        # loss parts since the last validation (a save between validations): the next metrics line needs them
        losses = [{k: v.to(device) for k, v in p.items()} for p in ckpt.get("pending_losses", [])]
        log.info("resumed %s at %d episodes (best val %.2f%%)", out, done, best)
    model = core
    if world.distributed:  # gradients all-reduced; BatchNorm statistics merged by merge_running_stats
        from torch.nn.parallel import DistributedDataParallel

        # buffers are equal at the start on every rank; forward must not overwrite the others' BatchNorm updates
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False})
        model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None, **sync)
    # 2. the run's files (rank 0)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**cfg_dict, **data.record(), "resolved_heads": head.cfg.to_dict()})
        val_eps.save(out / "val_episodes.npz")
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    # 3. train
    bar = _progress() if progress and world.main else None
    task = bar.add_task(f"train ({cfg.mode})", total=cfg.episodes, completed=done, loss=float("nan"), val=best) if bar else None
    if bar:
        bar.start()
    core.train()
    amp = heads_autocast(device)
    train_s, run_eps = 0.0, 0  # training time excludes validation

    def save_last() -> None:  # the resumable state; rank 0
        atomic_torch_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(rng, device),
                           "episodes": done, "best_val": best, "history": history,
                           "pending_losses": [{k: v.cpu() for k, v in p.items()} for p in losses]}, out / "last.pt")

    try:
        while done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - done)
            t0 = time.perf_counter()
            before = running_stats_snapshot(core) if world.distributed else None
            opt.zero_grad(set_to_none=True)
            try:
                for inputs, labels, weight, last in data.update(done, e, rng):
                    # DDP all-reduces the gradients once, after the update's last micro-batch
                    with model.no_sync() if world.distributed and not last else contextlib.nullcontext():
                        with amp:  # bf16 on CUDA (OTAM and the losses stay float32), float32 on CPU
                            outd = model(*inputs)
                            loss, parts = total_loss(outd, labels, head.cfg)
                        (loss * weight).backward()  # weight: this micro-batch's share of the update's mean
                    losses.append(parts)  # detached device tensors: no host sync per step
            except torch.cuda.OutOfMemoryError as err:
                raise ConfigError(f"{OOM_HINT} ({str(err).splitlines()[0]})") from err
            opt.step()
            if world.distributed:  # as if one process had run the update's episodes in rank order
                merge_running_stats(core, before)
            done += e
            run_eps += e
            train_s += time.perf_counter() - t0
            if bar:  # the loss shown costs a host sync: refresh it every 10 steps only
                bar.update(task, completed=done, **({"loss": float(parts["total"])} if len(losses) % 10 == 1 else {}))
            if done % cfg.val_every < e or done == cfg.episodes:  # crossed a validation point
                mean = _mean_over_ranks(mean_parts(losses), world, device)  # one device-to-host copy since the last one
                losses = []
                stats = data.stats()
                val_split = data.val_split(core, bar)  # full mode: every rank embeds a share of the videos
                if not world.main:
                    barrier(world)  # rank 0 scores and writes
                    continue
                acc = validate(head, val_split, val_eps, cfg.seed)
                rec = {
                    "episodes": done,
                    "loss": mean["total"],
                    "main": mean["main"],
                    "distill": mean["distill"],
                    "val_acc": acc,
                    "episodes_per_s": run_eps / max(train_s, 1e-9),  # training only, data wait included
                    **stats,
                }
                rec["best_val"] = max(best, acc)
                history.append(rec)
                # metrics line first, then best.pt (full mode: backbone.pt before it), then last.pt (each
                # atomic): a kill between them resumes from the previous last.pt, which drops and
                # recomputes the later line
                with (out / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if acc > best:
                    best = acc
                    extra = {}
                    if cfg.mode == "full":  # the fine-tuned CLIP, loadable by extract --pretrained
                        core.encoder.save_clip(out / "backbone.pt")
                        extra = {"backbone": weights_id(str(out / "backbone.pt"))}
                    atomic_torch_save({"model": head.state_dict(), "heads": head.cfg.to_dict(), "preset": cfg.preset,
                                       "shot": cfg.shot, "episodes": done, "val_acc": acc, **extra}, out / "best.pt")
                save_last()
                if bar:
                    bar.update(task, val=acc, loss=rec["loss"])
                else:
                    log.info("episodes %d loss %.3f val %.2f%%", done, rec["loss"], acc)
                barrier(world)
                if on_val is not None:
                    on_val(done, acc)
            elif cfg.save_every and done % cfg.save_every < e and world.main:  # crossed a save point
                save_last()
    finally:
        if bar:
            bar.stop()
        data.close()
    res = {"best_val": best, "run": str(out), "episodes": done,
           "episodes_per_s": run_eps / max(train_s, 1e-9), "rank": world.rank}
    if world.main:
        from pipelines.plots import plot_safely, train_curves

        plot_safely(train_curves, out)  # curves.png; a figure that cannot be drawn is only a warning
    barrier(world)  # the ranks leave together (one rank tearing down gloo while another works aborts it)
    return res


def _resumable(key: str, value: Any) -> Any:
    """A config value as --resume compares it: full mode's decoder worker count may change between runs."""
    return {k: v for k, v in value.items() if k != "workers"} if key == "full" else value


def _mean_over_ranks(mean: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """Loss parts averaged over the ranks (equal episode counts), so rank 0 logs the whole update's loss."""
    if not world.distributed or not mean:
        return mean
    import torch.distributed as dist

    keys = sorted(mean)
    t = torch.tensor([mean[k] for k in keys], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}


def load_config(path: Path | str) -> TrainConfig:
    """A TrainConfig from a run's ``config.json`` or a sweep's ``best.json`` (``mdmf-cache train --config``)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: cannot read a JSON config ({e})") from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known - {"resolved_heads", "sweep", "cache_abs", "cache_identity", "backbone_weights",
                                           "resolved_data"})  # notes
    if unknown:
        raise ConfigError(f"--config {path}: unknown TrainConfig field(s) {', '.join(unknown)}")
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def _history_upto(path: Path, done: int) -> list[dict[str, Any]]:
    """Metrics lines of a run written before checkpoints carried them, up to ``done`` episodes."""
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return [r for r in recs if r.get("episodes", 0) <= done]


def load_run(run: Path | str, device: str = "auto") -> tuple[FewShotHead, dict[str, Any]]:
    """The best checkpoint of a run as an eval-mode head (MDMF or CLIP-FSAR), and the run's config."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    if not (run / "best.pt").is_file():
        raise ConfigError(f"{run} has no best.pt; train first (mdmf-cache train --out {run})")
    dev = resolve_device(device)
    ckpt = torch.load(run / "best.pt", map_location=dev, weights_only=False)
    model = build_head(MDMFConfig(**ckpt["heads"])).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def _progress():
    from pipelines.progress import FieldColumn, make_progress

    return make_progress("episodes", FieldColumn("loss", "loss {:.3f}"), FieldColumn("val", "val {:.1f}%"))
