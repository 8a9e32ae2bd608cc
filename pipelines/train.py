"""Recipe ``mdmf-cache train``: the heads on a cache (fast mode) or CLIP fine-tuned with them (full mode).

Fast mode: frame and text embeddings come from the cache, loaded into memory once (on the GPU when there is one).
Episodes are sampled in memory, E at a time, with a random cached view per train video, and the heads see E
episodes per optimiser step.

Full mode (docs/method.md §10, the paper's own training): the input is the dataset, not a cache. Each training
episode is decoded from the videos by DataLoader workers with fresh augmentation, the CLIP visual encoder runs in
front of the same heads and is fine-tuned with them; gradients are accumulated over ``episodes_per_step`` episodes
(the paper's 16 per update), split between the ranks of a torchrun/SLURM job (DistributedDataParallel). Validation
embeds the val split with the current backbone in memory and scores it with the per-video evaluation path.

Top to bottom (:func:`run`; one config and one loop for both modes):
    1. the config (:class:`~mdmf_cache.configs.TrainConfig`, the head's released choices filled in) checked, the
       process world, the device and the run directory's lock;
    2. set-up: a ``--resume`` compared with the run's record, the data (fast: the cache's train and val features;
       full: the splits, the backbone and the text embeddings), the heads (and the backbone in front), Adam, the
       fixed seeded val episode list, or ``last.pt``'s state; nothing is written before every input is checked;
    3. the run's files: ``config.json`` (with the input's identity), ``val_episodes.npz``, ``metrics.jsonl``
       (with ``--tensorboard``, ``tensorboard/``: its scalars as TensorBoard events);
    4. train; every ``val_every`` episodes score the val list, keep ``best.pt`` by val accuracy (never by test;
       full mode also ``backbone.pt``; with ``keep_checkpoints`` every validation's heads in
       ``checkpoints/ep{episodes:07d}.pt``), append to ``metrics.jsonl`` (and the event files) and save ``last.pt``;
    5. clean up: ``curves.png``; print the best val accuracy and where the checkpoint is.

A loss or weights that stop being finite end the run with a TrainingError naming the first update whose loss was
not finite (:class:`~mdmf_cache.training.loop.Checkpoints`), seen at the next validation or ``save_every`` point
before anything of the diverged part is written.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mdmf_cache.configs import TrainConfig
from mdmf_cache.data.episodes import EpisodeSampler
from mdmf_cache.device import heads_autocast
from mdmf_cache.distributed import (World, barrier, destroy_process_group, init_process_group, merge_running_stats,
                                    running_stats_snapshot, world_from_env)
from mdmf_cache.errors import ConfigError
from mdmf_cache.evaluation.scoring import validate
from mdmf_cache.fileio import atomic_write_json, atomic_write_text, writing
from mdmf_cache.heads.factory import build_head, head_record
from mdmf_cache.heads.mdmf_losses import mean_parts
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.report.plots import plot_safely, train_curves
from mdmf_cache.report.tables import console
from mdmf_cache.store.runs import RunFileError, read_run_file, run_lock
from mdmf_cache.training.data import FastData, FullData
from mdmf_cache.training.loop import (OOM_HINT, Checkpoints, MetricsBoard, RunState, best_needs_repair, check_resume,
                                      first_non_finite, make_optimizer, mean_over_ranks, set_rng_state, train_bar_fields,
                                      train_device, train_progress)

log = logging.getLogger(__name__)

__all__ = ["run"]


def run(cfg: TrainConfig, progress: bool = True, show: bool = True,
        on_val: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train; returns ``{"best_val": %, "run": path, "episodes": n, "episodes_per_s": ..., "rank": r}``.

    Args:
        show: print the outcome (rank 0).
        on_val: called with (episodes done, val accuracy %) after each validation, once ``last.pt`` and
            ``metrics.jsonl`` hold it; an exception it raises (a sweep's pruning) ends the run there.

    Raises:
        ConfigError: bad options, --resume with a different config, or (full mode) out of GPU memory.
        CacheError: the cache is missing or incomplete.
        TrainingError: the loss or the weights stopped being finite.
    """
    # 1. the config, the world, the device, the run directory
    cfg = cfg.resolved()  # the head's preset, training shot and queries, as config.json records them
    cfg.validate()
    world = world_from_env() if cfg.mode == "full" else World()
    if world.size > 1 and cfg.episodes_per_step % world.size:
        raise ConfigError(f"--episodes-per-step {cfg.episodes_per_step} is not divisible by the {world.size} "
                          "processes; each rank takes an equal share of an update")
    if world.size > 1 and cfg.episodes % cfg.episodes_per_step:
        raise ConfigError(f"--episodes {cfg.episodes} is not a multiple of --episodes-per-step "
                          f"{cfg.episodes_per_step}: with {world.size} processes every update must be whole")
    device = train_device(cfg, world)
    # one train per run directory (rank 0 holds the lock; the other ranks of its job follow rank 0)
    with run_lock(cfg.out) if world.main else contextlib.nullcontext():
        init_process_group(world, device)
        try:
            res = _train(cfg, world, device, progress, on_val)
        finally:
            destroy_process_group()
    if show and res["rank"] == 0:
        console.print(f"best val accuracy {res['best_val']:.2f}% after {res['episodes']} episodes "
                      f"({res['episodes_per_s']:.1f} episodes/s); checkpoint {cfg.out}/best.pt")
    return res


@dataclass
class _Run:
    """What step 2 sets up: the data, the heads (``core``: with the backbone in front in full mode; ``model``: that,
    or its DistributedDataParallel wrapper), the optimiser, the val episodes, the episode stream, the run's state and
    its checkpoints."""

    data: Any
    head: torch.nn.Module
    core: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    val_eps: Any
    rng: np.random.Generator
    state: RunState
    ckpts: Checkpoints
    repair_best: bool


def _set_up(cfg: TrainConfig, world: World, device: torch.device, out: Path) -> _Run:
    """Step 2; nothing is written, and every input is checked, before it returns."""
    old = check_resume(cfg, out)  # the run's record when --resume continues one
    data = FastData(cfg, device) if cfg.mode == "fast" else FullData(cfg, device, world)
    if old is not None and cfg.mode == "full":  # the videos by identity, wherever the tree is now
        data.check_identity(old.get("video_identity"), "--resume")
    val_sampler = EpisodeSampler(data.val_labels, data.val_classes)
    val_sampler.check(cfg.way, cfg.shot, cfg.val_queries, split="val")
    torch.manual_seed(cfg.seed)  # the heads' initialisation, then (fast mode) dropout and PPS draws
    head = build_head(cfg.method, cfg.preset, cfg.heads, DataInfo(dim=int(data.dim), num_frames=int(data.num_frames),
                                                                num_classes=data.num_classes, dataset=data.dataset,
                                                                shot=cfg.shot, tokens=data.token_info))
    core = data.wrap(head).to(device)  # the heads, or the backbone in front of them
    opt = make_optimizer(cfg, core)
    val_eps = val_sampler.sample(cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng([cfg.seed, 1]))
    rng = np.random.default_rng([cfg.seed, 0])  # fast mode's episode stream (full mode's episodes are seeded by index)
    state = RunState()
    repair_best = False
    if old is not None:
        ckpt = read_run_file(out / "last.pt", device)
        try:
            core.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            set_rng_state(rng, ckpt["rng"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunFileError(out / "last.pt", f"does not fit this run's model ({str(e).splitlines()[0]})",
                               "train again into another --out") from e
        state.restore(ckpt, out, device)
        repair_best = best_needs_repair(out, cfg, state.done, state.best, state.history)
        log.info("resumed %s at %d episodes (best val %.2f%%)", out, state.done, state.best)
    return _Run(data, head, core, _distributed(core, world, device), opt, val_eps, rng, state,
                Checkpoints(cfg, out, core, head, opt, rng, device, state), repair_best)


def _train(cfg: TrainConfig, world: World, device: torch.device, progress: bool,
           on_val: Callable[[int, float], None] | None) -> dict[str, Any]:
    """Steps 2-5 in this process (one rank)."""
    out = Path(cfg.out)
    # 2. set-up; nothing is written before every input is checked
    r = _set_up(cfg, world, device, out)
    data, head, core, model, opt, rng, state, ckpts = r.data, r.head, r.core, r.model, r.opt, r.rng, r.state, r.ckpts
    # 3. the run's files (rank 0)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**asdict(cfg), **data.record(), "resolved_heads": head_record(head)["options"]})
        with writing(out / "val_episodes.npz"):
            r.val_eps.save(out / "val_episodes.npz")
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
    if r.repair_best and world.main:  # best.pt (backbone.pt) damaged, and last.pt is the best validation: rebuilt from it
        ckpts.save_best(state.best)
        log.warning("rebuilt %s/best.pt%s from last.pt (episode %d, val %.2f%%, the best validation)", out,
                    " and backbone.pt" if cfg.mode == "full" else "", state.done, state.best)

    board = MetricsBoard(out, state) if cfg.tensorboard and world.main else None  # OUT/tensorboard/, appended

    # 4. train
    bar = train_progress() if progress and world.main else None
    task = (bar.add_task(f"train ({cfg.mode})", total=cfg.episodes, completed=state.done, **train_bar_fields(state))
            if bar else None)
    if bar:
        bar.start()
    core.train()
    amp = heads_autocast(device)
    train_s, run_eps = 0.0, 0  # training time excludes validation
    check_each = cfg.mode == "full" and world.size == 1  # a full-mode update is slow: one host sync more is nothing
    try:
        while state.done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - state.done)
            t0 = time.perf_counter()
            before = running_stats_snapshot(core) if world.distributed else None
            opt.zero_grad(set_to_none=True)
            first_part = len(state.losses)
            try:
                for inputs, labels, classes, weight, last in data.update(state.done, e, rng):
                    # DDP all-reduces the gradients once, after the update's last micro-batch
                    with model.no_sync() if world.distributed and not last else contextlib.nullcontext():
                        with amp:  # bf16 on CUDA (OTAM and the losses stay float32), float32 on CPU
                            outd = model(**inputs)
                            loss, parts = head.loss(outd, labels, classes)
                        (loss * weight).backward()  # weight: this micro-batch's share of the update's mean
                    state.losses.append(parts)  # detached device tensors: no host sync per step
                    state.loss_at.append(state.done + e)
            except torch.cuda.OutOfMemoryError as err:
                raise ConfigError(f"{OOM_HINT} ({str(err).splitlines()[0]})") from err
            if check_each and first_non_finite(state.losses[first_part:], state.loss_at[first_part:]):
                raise ckpts.diverged(None)
            opt.step()
            if world.distributed:  # as if one process had run the update's episodes in rank order
                merge_running_stats(core, before)
            state.done += e
            run_eps += e
            train_s += time.perf_counter() - t0
            if bar:  # the loss shown costs a host sync: refresh it every 10 steps only
                bar.update(task, completed=state.done,
                           **({"loss": float(parts["total"])} if len(state.losses) % 10 == 1 else {}))
            if state.done % cfg.val_every < e or state.done == cfg.episodes:  # crossed a validation point
                mean = mean_over_ranks(mean_parts(state.losses), world, device)  # one device-to-host copy since the last
                err = ckpts.diverged(mean)  # the same on every rank (the means are all-reduced, the weights synchronised)
                if err is not None:
                    raise err
                state.losses, state.loss_at = [], []
                stats = data.stats()
                val_split = data.val_split(core, bar)  # full mode: every rank embeds a share of the videos
                if not world.main:
                    barrier(world)  # rank 0 scores and writes
                    continue
                acc = validate(head, val_split, r.val_eps, cfg.seed)
                rec = {
                    "episodes": state.done,
                    "loss": mean["total"],
                    "main": mean["main"],
                    **{k: v for k, v in mean.items() if k not in ("total", "main")},  # the head's own loss terms
                    "val_acc": acc,
                    "episodes_per_s": run_eps / max(train_s, 1e-9),  # training only, data wait included
                    **stats,
                    "best_val": max(state.best, acc),
                }
                state.history.append(rec)
                # metrics line first, then best.pt (full mode: backbone.pt before it), then last.pt (each atomic):
                # a kill between them resumes from the previous last.pt, which drops and recomputes the later line
                with writing(out / "metrics.jsonl"), (out / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if board:
                    board.add(rec)
                if acc > state.best:
                    state.best = acc
                    ckpts.save_best(acc)
                if cfg.keep_checkpoints:  # before last.pt: a kill in between replays this validation on --resume
                    ckpts.save_validation(acc)
                ckpts.save_last()
                if bar:
                    bar.update(task, val=acc, loss=rec["loss"])
                else:
                    log.info("episodes %d loss %.3f val %.2f%%", state.done, rec["loss"], acc)
                barrier(world)
                if on_val is not None:
                    on_val(state.done, acc)
            elif cfg.save_every and state.done % cfg.save_every < e and world.main:  # crossed a save point
                err = ckpts.diverged(mean_parts(state.losses) if state.losses else {})
                if err is None:
                    ckpts.save_last()
                elif world.size == 1:
                    raise err
                else:  # the other ranks are not here: the next validation stops them all
                    log.warning("%s; last.pt not saved", err)
    finally:
        if bar:
            bar.stop()
        if board:
            board.close()
        data.close()

    # 5. clean up
    if world.main:
        plot_safely(train_curves, out)  # curves.png; a figure that cannot be drawn is only a warning
    barrier(world)  # the ranks leave together (one rank tearing down gloo while another works aborts it)
    return {"best_val": state.best, "run": str(out), "episodes": state.done,
            "episodes_per_s": run_eps / max(train_s, 1e-9), "rank": world.rank}


def _distributed(core: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``core`` itself, or wrapped in DistributedDataParallel under torchrun (gradients all-reduced; BatchNorm
    statistics merged by ``merge_running_stats``, so forward must not overwrite the other ranks' updates)."""
    if not world.distributed:
        return core
    from torch.nn.parallel import DistributedDataParallel

    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False})
    return DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None, **sync)
