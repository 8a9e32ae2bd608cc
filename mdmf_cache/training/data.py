"""Where training episodes come from: the cache (fast mode) or the videos themselves (full mode).

Both give the trainer (:mod:`mdmf_cache.training.loop`) the same things: what the head's options take
from the data (D, T, the train classes, the dataset), the val split to score, the model to train (the
heads, or the backbone in front of them) and each update's micro-batches as keyword arguments of the
head's ``forward`` (:mod:`mdmf_cache.heads.base`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdmf_cache.configs import TrainConfig
from mdmf_cache.distributed import World, gather_shares
from mdmf_cache.data.episodes import EpisodeSampler, gather
from mdmf_cache.errors import ConfigError, DatasetError
from mdmf_cache.extraction.embed import embed_split, find_videos, prompts_for, worker_init
from mdmf_cache import heads as head_registry
from mdmf_cache.heads.base import FewShotHead
from mdmf_cache.store.runs import cache_identity, read_run_file
from mdmf_cache.heads.factory import head_from_record, head_record
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import FeatureSplit, load_split_features
from mdmf_cache.store.tokens import TokenReader, episode_rows, episode_tokens

log = logging.getLogger(__name__)

__all__ = ["FastData", "FullData"]


class FastData:
    """Fast mode's episodes: E at a time from the cache's features in memory (a random cached view per video).

    A token head (``SPEC.tokens`` set) also gets the tokens of the same videos and views, read through a
    :class:`~mdmf_cache.store.tokens.TokenReader` per split (``token_cache_mb`` each); each update tells the train
    reader the next update's rows, sampled ahead from a copy of the episode stream's generator (the stream itself,
    and so ``--resume``, is untouched), so they are read while the head computes.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg = cfg.resolved()  # the head's training shot and queries
        self.device = device
        self.train = load_split_features(cfg.cache, "train", device=str(device))
        self.val = load_split_features(cfg.cache, "val", device=str(device))
        views, self.num_frames, self.dim = self.train.features.shape[1:]
        self.num_classes = self.train.num_classes
        self.dataset = (CacheStore(cfg.cache).fingerprint.get("video") or {}).get("dataset", "")
        self.sampler = EpisodeSampler(self.train.labels.cpu().numpy(), self.train.num_classes, views=views)
        self.sampler.check(cfg.way, cfg.train_shot, cfg.train_queries, split="train")
        self.val_labels, self.val_classes = self.val.labels.cpu().numpy(), self.val.num_classes
        self.readers: list[TokenReader] = []
        self.token_info = None  # what the cache's token arrays hold (a token head's DataInfo.tokens)
        spec = head_registry.get(cfg.method).tokens
        if spec:
            budget = cfg.token_cache_mb << 20
            self.readers.append(TokenReader(cfg.cache, "train", budget, spec))
            try:
                self.readers.append(TokenReader(cfg.cache, "val", budget, spec))
            except BaseException:
                self.close()
                raise
            self.token_info = self.readers[0].info
            # a copy: the split may be shared by the trainings of a sweep (keep_loaded)
            self.val = dataclasses.replace(self.val, tokens=self.readers[1])

    def record(self) -> dict[str, Any]:
        """What config.json records of the input (the cache's identity)."""
        rec = {"cache_abs": str(Path(self.cfg.cache).resolve()), "cache_identity": cache_identity(self.cfg.cache)}
        if self.token_info is not None:  # predict extracts new videos' tokens with the same SPEC
            rec["tokens"] = self.token_info.to_attrs()
        return rec

    def wrap(self, head: FewShotHead) -> nn.Module:
        return head

    def _sample(self, e: int, rng: np.random.Generator):
        return self.sampler.sample(e, self.cfg.way, self.cfg.train_shot, self.cfg.train_queries, rng, random_view=True)

    def update(self, done: int, e: int, rng: np.random.Generator):
        """One update's micro-batches: ``(forward kwargs, query labels, episode classes, loss weight, last)``;
        fast mode: all E episodes at once."""
        ep = self._sample(e, rng)
        support, query, text, labels = gather(self.train.features, self.train.text, ep)  # (E,S,T,D) (E,Q,T,D) (E,N,D) (E,Q)
        classes = torch.as_tensor(ep.classes, device=labels.device)  # (E, N) train-split classes
        kwargs = {"support": support, "query": query, "text": text, "classes": classes,
                  "class_text": self.train.text.float()}
        if self.readers:
            reader = self.readers[0]
            kwargs["support_tokens"], kwargs["query_tokens"] = episode_tokens(reader, ep, self.device)  # (E,S|Q,T,L,P,Dt)
            after = done + e
            if after < self.cfg.episodes:  # the next update's episodes, drawn from a copy: the stream stays as it is
                nxt = self._sample(min(self.cfg.episodes_per_step, self.cfg.episodes - after), copy.deepcopy(rng))
                reader.prefetch(episode_rows(nxt))
        yield (kwargs, labels, classes, 1.0, True)

    def val_split(self, model: nn.Module, progress=None) -> FeatureSplit:
        return self.val

    def stats(self) -> dict[str, float]:
        if not self.readers:
            return {}
        r = self.readers[0]
        out = {"token_hits": r.hits, "token_misses": r.misses, "token_wait_s": round(r.wait_s, 3)}
        r.hits = r.misses = 0
        r.wait_s = 0.0
        return out

    def close(self) -> None:
        """Stops the token readers' prefetch threads (on an exception or Ctrl-C too: train calls it in a finally; the
        threads start at the first update's prefetch, inside that block)."""
        for r in self.readers:
            r.close()


class FullData:
    """Full mode's episodes: decoded from the videos by DataLoader workers; the backbone goes in front of the heads."""

    def __init__(self, cfg: TrainConfig, device: torch.device, world: World) -> None:
        from mdmf_cache.clip.backbone import load_backbone
        from mdmf_cache.data.datasets import load_splits
        from mdmf_cache.data.video_episodes import EpisodeVideos, check_class_sizes

        cfg = cfg.resolved()  # the head's training shot and queries
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
        what = f"{cfg.way}-way {cfg.train_shot}-shot training"
        check_class_sizes(labels, train.classes, cfg.train_shot + cfg.train_queries, "train",
                          f"{what} with {cfg.train_queries} queries")
        check_class_sizes(self.val_labels, val.classes, cfg.shot + cfg.val_queries, "val", f"validation with {cfg.val_queries} queries")
        self.token_info = None  # a token head is refused in full mode (TrainConfig.validate)
        self.backbone = load_backbone(f.model, f.pretrained, str(device))
        self.dim, self.num_frames = self.backbone.dim, f.num_frames
        self.num_classes, self.dataset = len(train.classes), f.dataset
        self.prompts = {name: prompts_for(split, self.ecfg) for name, split in self.splits.items()}
        # the frozen text tower's embeddings, once; a trained text tower encodes the prompts' tokens per episode
        self.text = {name: self.backbone.encode_texts(p).to(device) for name, p in self.prompts.items()}  # (C, D)
        self.tokens = self.backbone.tokenizer(self.prompts["train"]).to(device) if f.train_text else None  # (C, L)
        self.episodes = EpisodeVideos(paths, labels, len(train.classes), cfg.way, cfg.train_shot, cfg.train_queries,
                                      f.num_frames, self.ecfg.sampler, f.flip, cfg.seed, f.decoder,
                                      normalize=self.ecfg.normalize if device.type == "cpu" else None)
        self.loader_it = None
        self.wait_s, self.decode_s, self.decoded, self.substituted, self.updates = 0.0, 0.0, 0, 0, 0
        self.short: dict[str, set[int] | None] = {"train": set(), "val": set()}  # videos with < T frames (None: warned)
        self.seen_train: set[int] = set()

    def video_identity(self) -> dict[str, Any]:
        """What binds a full-mode run to its videos wherever the tree is: per split, the classes and the ids of
        the videos found (hashed), and their count."""
        def sha(items) -> str:
            return hashlib.sha1("\n".join(items).encode()).hexdigest()[:16]

        return {name: {"classes": sha(split.classes), "videos": sha(split.found()[0]), "count": len(split.found()[0])}
                for name, split in self.splits.items()}

    def check_identity(self, recorded: dict[str, Any] | None, what: str) -> None:
        """Refuse videos other than those a run was trained on (runs recorded before identities were kept pass)."""
        if not recorded:
            return
        now = self.video_identity()
        diff = []
        for name in sorted(set(recorded) & set(now)):
            old, new = recorded[name], now[name]
            if old.get("classes") != new["classes"]:
                diff.append(f"{name}: other classes")
            elif old.get("videos") != new["videos"]:
                diff.append(f"{name}: other videos ({new['count']} found now, {old.get('count')} at training)")
        if diff:
            raise DatasetError(f"{what}: the videos under {self.f.root} are not those this run was trained on "
                               f"({'; '.join(diff)}); point --root (and --splits/--labels) at the run's videos, or "
                               "train a new run")

    def record(self) -> dict[str, Any]:
        return {"backbone_weights": self.backbone.weights, "resolved_data": asdict(self.ecfg),
                "video_identity": self.video_identity()}

    def wrap(self, head: FewShotHead) -> nn.Module:
        from mdmf_cache.clip.finetune import FrameEncoder
        from mdmf_cache.clip.endtoend import EndToEnd

        f = self.f
        if f.init_heads:  # e.g. a fast-mode run on this backbone's cache: its heads, then fine-tuning
            ckpt = read_run_file(Path(f.init_heads) / "best.pt",
                                 fix="--init-heads needs that run's heads; repair that run or pick another")
            theirs, ours = head_record(head_from_record(ckpt)), head_record(head)
            if theirs != ours:
                diff = ["method"] if theirs["method"] != ours["method"] else sorted(
                    k for k in ours["options"] if theirs["options"].get(k) != ours["options"][k])
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

        from mdmf_cache.data.video_episodes import collate_episodes

        w = self.f.workers
        loader = DataLoader(self.episodes, batch_size=1, sampler=self._indices(done), num_workers=w,
                            collate_fn=collate_episodes, worker_init_fn=worker_init if w else None,
                            prefetch_factor=max(2, 2 * self.f.episodes_per_forward) if w else None,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.loader_it = iter(loader)

    def update(self, done: int, e: int, rng: np.random.Generator):
        """One update's micro-batches of ``episodes_per_forward`` episodes; the weights make the accumulated
        gradient, averaged over the ranks by DDP, the mean over all ``e`` episodes of the update."""
        from mdmf_cache.data.video_episodes import episode_pixels

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
                self.seen_train.update(it.get("videos", ()))
                if self.short["train"] is not None:
                    self.short["train"].update(it.get("short", ()))
            support, query, classes, labels, noise = episode_pixels(items, self.device, self.ecfg.normalize)
            text = self.tokens[classes] if self.tokens is not None else self.text["train"][classes]  # (E, N, L|D)
            # dropout and anything else drawn from torch's RNG: seeded by the micro-batch's first episode
            torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, 9, items[0]["index"]]).generate_state(1)[0]))
            kwargs = {"support": support, "query": query, "text": text, "pps_noise": noise, "classes": classes,
                      "class_text": self.text["train"]}
            yield kwargs, labels, classes, len(items) * self.world.size / e, lo + m >= n
        self.updates += 1

    def val_split(self, model: nn.Module, progress=None) -> FeatureSplit:
        """The val split embedded with the backbone as it is now (eval mode), as ``extract`` would store it
        (a task on ``progress``, the training bar, while it runs). With several ranks each embeds a share of
        the videos and every rank gets them all (a collective: every rank calls this)."""
        from mdmf_cache.clip.backbone import Backbone

        encoder = model.encoder
        was = encoder.training
        encoder.eval()
        bb = Backbone(model=encoder.clip, tokenizer=self.backbone.tokenizer, dim=self.dim, device=self.device,
                      name=self.f.model, weights="in-training")
        try:
            text = bb.encode_texts(self.prompts["val"]) if self.f.train_text else self.text["val"]
            # keep_failed: the rows stay val_eps' rows
            counts: dict[str, int] = {}
            split = embed_split(self.splits["val"], self.ecfg, bb, text, progress, keep_failed=True,
                                share=(self.world.rank, self.world.size), counts=counts)
            split.features = gather_shares(split.features, self.world)  # (Nv, 1, T, D)
            if self.short["val"] is not None:  # once: every validation embeds the same videos
                short = self._sum_over_ranks(counts.get("short", 0))
                if short:
                    log.warning("val: %d of %d videos have fewer than --num-frames %d decodable frames: their frames "
                                "repeat", short, len(split.video_ids), self.num_frames)
                self.short["val"] = None
            return split
        finally:
            encoder.train(was)

    def _sum_over_ranks(self, n: int) -> int:
        if not self.world.distributed:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(t)
        return int(t.item())

    def stats(self) -> dict[str, float]:
        """Data-pipeline figures since the last call: decoder wait per update (0 = the GPU never waited).

        The first call after train videos shorter than T were decoded warns once with their count so far."""
        short = self.short["train"]
        if short:
            log.warning("train: %d of the %d videos decoded so far have fewer than --num-frames %d decodable frames: "
                        "their frames repeat (said once)", len(short), len(self.seen_train), self.num_frames)
            self.short["train"] = None
        out = {"loader_wait_s": self.wait_s / max(self.updates, 1), "decode_s_per_episode": self.decode_s / max(self.decoded, 1),
               "substituted_videos": self.substituted}
        self.wait_s, self.decode_s, self.decoded, self.substituted, self.updates = 0.0, 0.0, 0, 0, 0
        return out

    def close(self) -> None:
        self.loader_it = None  # ends the worker processes
