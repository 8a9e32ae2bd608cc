"""Train the CLIP-MDMF heads: fast mode (CLIP frozen, cached features) or full mode (CLIP fine-tuned).

Fast mode: frame and text embeddings come from the cache, loaded into memory once (on the GPU
when there is one). Episodes are sampled in memory, E at a time, with a random cached view per
train video, and the heads see E episodes per optimiser step.

Full mode (docs/method.md §10, the paper's own training): the input is the dataset, not a cache. Each
training episode is decoded from the videos by DataLoader workers with fresh augmentation
(:mod:`mdmf_cache.video_episodes`), the CLIP visual encoder runs in front of the same heads
(:class:`~mdmf_cache.models.endtoend.EndToEnd`) and is fine-tuned with them; gradients are
accumulated over ``episodes_per_step`` episodes (the paper's 16 per update), split between the ranks
of a torchrun/SLURM job (DistributedDataParallel). Validation embeds the val split with the current
backbone in memory (the extraction path, no cache) and scores it with the per-video evaluation path.

Steps, top to bottom (both modes: one config, one loop):
    1. resolve the config; check every input before anything is written;
    2. load the data (fast: the cache's train and val features; full: the splits, the backbone and
       the text embeddings), build the heads (and the backbone in front) and Adam, or restore
       ``last.pt`` (--resume);
    3. train; every ``val_every`` episodes score the fixed val episode list, keep ``best.pt`` by val
       accuracy (never by test; full mode also ``backbone.pt``), write ``metrics.jsonl`` and ``last.pt``;
    4. return the best val accuracy.

One ``train`` at a time writes a run directory: rank 0 holds ``OUT/.lock`` (:func:`mdmf_cache.runs.run_lock`).

A loss or weights that stop being finite (a learning rate that blows up, NaN/inf reaching the loss)
end the run with :class:`~mdmf_cache.errors.TrainingError`, naming the first update whose loss was
not finite and its loss parts. It is seen at the next validation or ``save_every`` point (fast mode:
no host sync per step; a single-process full-mode run checks every update), before anything of the
diverged part is written: ``last.pt``, ``best.pt`` and ``metrics.jsonl`` keep the run at its last
good validation.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mdmf_cache.backbone import heads_autocast, resolve_device, weights_id
from mdmf_cache.configs import TrainConfig
from mdmf_cache.distributed import (World, barrier, destroy_process_group, init_process_group, merge_running_stats,
                                    running_stats_snapshot, world_from_env)
from mdmf_cache.episodes import EpisodeSampler
from mdmf_cache.errors import ConfigError, TrainingError
from mdmf_cache.fileio import atomic_torch_save, atomic_write_json, atomic_write_text, writing
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.losses import mean_parts
from mdmf_cache.runs import (RunFileError, build_head, check_identity, head_record, history_upto, read_run_file, run_lock,
                             validate)
from mdmf_cache.train_data import FastData, FullData

log = logging.getLogger(__name__)

__all__ = ["run_train", "OOM_HINT"]


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
    cfg = cfg.resolved()  # the head's preset, training shot and queries, as config.json records them
    cfg.validate()
    world = world_from_env() if cfg.mode == "full" else World()
    if world.size > 1 and cfg.episodes_per_step % world.size:
        raise ConfigError(f"--episodes-per-step {cfg.episodes_per_step} is not divisible by the {world.size} "
                          "processes; each rank takes an equal share of an update")
    if world.size > 1 and cfg.episodes % cfg.episodes_per_step:
        raise ConfigError(f"--episodes {cfg.episodes} is not a multiple of --episodes-per-step "
                          f"{cfg.episodes_per_step}: with {world.size} processes every update must be whole")
    device = _device(cfg, world)
    # one train per run directory (rank 0 holds the lock; the other ranks of its job follow rank 0)
    with run_lock(cfg.out) if world.main else contextlib.nullcontext():
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
    if (out / "last.pt").is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    resuming = cfg.resume and (out / "last.pt").is_file()
    old = None
    if resuming:
        old = read_run_file(out / "config.json", fix="--resume compares the run's settings with it; restore it from a "
                                                      "copy, or train again into another --out")
        # paths may be written differently (relative, moved): the cache (fast mode) and the videos (full mode) are
        # compared by identity below; a run written before a field existed had its default (resolved for that
        # run's head and shot)
        defaults = asdict(TrainConfig(method=old.get("method", "mdmf"), shot=old.get("shot", 5),
                                      mode=old.get("mode", "fast")).resolved())
        free = ("resume", "device", "episodes", "cache", "out")
        diff = [k for k in cfg_dict if k not in free and k != "full" and old.get(k, defaults[k]) != cfg_dict[k]]
        if cfg.mode == "full" and old.get("mode", "fast") == "full":
            diff += _full_diff(old.get("full") or {}, cfg.full)
        if diff:
            raise ConfigError(f"--resume: {out} was trained with different {', '.join(diff)}; use another --out")
        if cfg.mode == "fast":
            check_identity(old.get("cache_identity"), cfg.cache, "--resume")
    # 1. data and model; nothing is written before every input is checked
    data = FastData(cfg, device) if cfg.mode == "fast" else FullData(cfg, device, world)
    if resuming and cfg.mode == "full":  # the videos by identity, wherever the tree is now
        data.check_identity(old.get("video_identity"), "--resume")
    val_sampler = EpisodeSampler(data.val_labels, data.val_classes)
    val_sampler.check(cfg.way, cfg.shot, cfg.val_queries, split="val")
    torch.manual_seed(cfg.seed)  # the heads' initialisation, then (fast mode) dropout and PPS draws
    head = build_head(cfg.method, cfg.preset, cfg.heads, DataInfo(dim=int(data.dim), num_frames=int(data.num_frames),
                                                                num_classes=data.num_classes, dataset=data.dataset,
                                                                shot=cfg.shot))
    core = data.wrap(head).to(device)  # the heads, or the backbone in front of them
    opt = _optimizer(cfg, core)
    val_eps = val_sampler.sample(cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng([cfg.seed, 1]))
    rng = np.random.default_rng([cfg.seed, 0])  # fast mode's episode stream (full mode's episodes are seeded by index)
    done, best, history, losses = 0, -1.0, [], []
    loss_at: list[int] = []  # the episode count after each update of ``losses``
    repair_best = False
    if resuming:
        ckpt = read_run_file(out / "last.pt", device)
        try:
            core.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(rng, ckpt["rng"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunFileError(out / "last.pt", f"does not fit this run's model ({str(e).splitlines()[0]})",
                               "train again into another --out") from e
        done, best = ckpt["episodes"], ckpt["best_val"]
        # the checkpoint carries the metrics up to itself: lines written after it belong to the lost part
        history = ckpt.get("history") or history_upto(out / "metrics.jsonl", done)
        # loss parts since the last validation (a save between validations): the next metrics line needs them
        losses = [{k: v.to(device) for k, v in p.items()} for p in ckpt.get("pending_losses", [])]
        loss_at = [done] * len(losses)  # checked finite before they were saved
        repair_best = _best_needs_repair(out, cfg, done, best, history)
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
        atomic_write_json(out / "config.json", {**cfg_dict, **data.record(), "resolved_heads": head_record(head)["options"]})
        with writing(out / "val_episodes.npz"):
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

    saved = [done]  # the episodes last.pt holds

    def save_last() -> None:  # the resumable state; rank 0
        saved[0] = done
        atomic_torch_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(rng, device),
                           "episodes": done, "best_val": best, "history": history,
                           "pending_losses": [{k: v.cpu() for k, v in p.items()} for p in losses]}, out / "last.pt")

    def save_best(acc: float) -> None:  # the heads at the best validation (full mode: backbone.pt first); rank 0
        extra = {}
        if cfg.mode == "full":  # the fine-tuned CLIP, loadable by extract --pretrained
            core.encoder.save_clip(out / "backbone.pt")
            extra = {"backbone": weights_id(str(out / "backbone.pt"))}
        atomic_torch_save({"model": head.state_dict(), **head_record(head), "preset": cfg.preset,
                           "shot": cfg.shot, "train_shot": cfg.train_shot, "episodes": done, "val_acc": acc,
                           **extra}, out / "best.pt")

    def diverged(mean: dict[str, float] | None) -> TrainingError | None:
        """None while the losses since the last check and the weights are finite; else the error that ends the run."""
        if mean is not None and all(math.isfinite(v) for v in mean.values()) and _finite(core):
            return None
        first = _first_non_finite(losses, loss_at)
        where = (f"the loss is not finite from episode {first[0]} on ({first[1]})" if first
                 else f"the weights are not finite after episode {done}")
        kept = (f"{out}/last.pt holds the run at episode {saved[0]}, best.pt its best validation ({best:.2f}%)"
                if saved[0] else "nothing was saved (no validation was reached)")
        return TrainingError(f"training diverged: {where}; stopped, {kept}; train again with a lower --lr into another "
                             "--out (if the input may hold NaN/inf: mdmf-cache verify CACHE)")

    if repair_best and world.main:  # best.pt (backbone.pt) damaged, and last.pt is the best validation: rebuilt from it
        save_best(best)
        log.warning("rebuilt %s/best.pt%s from last.pt (episode %d, val %.2f%%, the best validation)", out,
                    " and backbone.pt" if cfg.mode == "full" else "", done, best)
    check_each = cfg.mode == "full" and world.size == 1  # a full-mode update is slow: one host sync more is nothing
    try:
        while done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - done)
            t0 = time.perf_counter()
            before = running_stats_snapshot(core) if world.distributed else None
            opt.zero_grad(set_to_none=True)
            first_part = len(losses)
            try:
                for inputs, labels, classes, weight, last in data.update(done, e, rng):
                    # DDP all-reduces the gradients once, after the update's last micro-batch
                    with model.no_sync() if world.distributed and not last else contextlib.nullcontext():
                        with amp:  # bf16 on CUDA (OTAM and the losses stay float32), float32 on CPU
                            outd = model(**inputs)
                            loss, parts = head.loss(outd, labels, classes)
                        (loss * weight).backward()  # weight: this micro-batch's share of the update's mean
                    losses.append(parts)  # detached device tensors: no host sync per step
                    loss_at.append(done + e)
            except torch.cuda.OutOfMemoryError as err:
                raise ConfigError(f"{OOM_HINT} ({str(err).splitlines()[0]})") from err
            if check_each and _first_non_finite(losses[first_part:], loss_at[first_part:]):
                raise diverged(None)
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
                err = diverged(mean)  # the same on every rank (the means are all-reduced, the weights synchronised)
                if err is not None:
                    raise err
                losses, loss_at = [], []
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
                    **{k: v for k, v in mean.items() if k not in ("total", "main")},  # the head's own loss terms
                    "val_acc": acc,
                    "episodes_per_s": run_eps / max(train_s, 1e-9),  # training only, data wait included
                    **stats,
                }
                rec["best_val"] = max(best, acc)
                history.append(rec)
                # metrics line first, then best.pt (full mode: backbone.pt before it), then last.pt (each
                # atomic): a kill between them resumes from the previous last.pt, which drops and
                # recomputes the later line
                with writing(out / "metrics.jsonl"), (out / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if acc > best:
                    best = acc
                    save_best(acc)
                save_last()
                if bar:
                    bar.update(task, val=acc, loss=rec["loss"])
                else:
                    log.info("episodes %d loss %.3f val %.2f%%", done, rec["loss"], acc)
                barrier(world)
                if on_val is not None:
                    on_val(done, acc)
            elif cfg.save_every and done % cfg.save_every < e and world.main:  # crossed a save point
                err = diverged(mean_parts(losses) if losses else {})
                if err is None:
                    save_last()
                elif world.size == 1:
                    raise err
                else:  # the other ranks are not here: the next validation stops them all
                    log.warning("%s; last.pt not saved", err)
    finally:
        if bar:
            bar.stop()
        data.close()
    res = {"best_val": best, "run": str(out), "episodes": done,
           "episodes_per_s": run_eps / max(train_s, 1e-9), "rank": world.rank}
    if world.main:
        from mdmf_cache.plots import plot_safely, train_curves

        plot_safely(train_curves, out)  # curves.png; a figure that cannot be drawn is only a warning
    barrier(world)  # the ranks leave together (one rank tearing down gloo while another works aborts it)
    return res


#: Full-mode fields that may change on --resume: the decoder worker count, and where the videos are (the videos
#: themselves are compared by identity).
_FULL_FREE = ("workers", "root", "splits_dir", "labels")


def _full_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The full-mode fields (``full.NAME``) that differ between a run's record and this config, defaults filled in."""
    from mdmf_cache.configs import FullModeConfig

    defaults = asdict(FullModeConfig())
    return [f"full.{k}" for k in sorted(set(old) | set(new))
            if k not in _FULL_FREE and old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]


def _finite(model: nn.Module) -> bool:
    """Every floating-point parameter and normalisation statistic finite (one host sync); other buffers may hold
    inf on purpose (CLIP's causal attention mask)."""
    stats = [b for name, b in model.named_buffers() if "running_" in name]
    ts = [t for t in (*model.parameters(), *stats) if t.is_floating_point()]
    return not ts or bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def _first_non_finite(losses: list[dict[str, torch.Tensor]], loss_at: list[int]) -> tuple[int, str] | None:
    """(episodes after the update, its loss parts as text) of the first update whose loss parts are not all finite."""
    for parts, at in zip(losses, loss_at):
        if not all(bool(torch.isfinite(v).all()) for v in parts.values()):
            return at, ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
    return None


def _best_needs_repair(out: Path, cfg: TrainConfig, done: int, best: float, history: list[dict[str, Any]]) -> bool:
    """On --resume: whether best.pt (and backbone.pt) must be rebuilt from last.pt. False when they are sound, or when
    the run was stopped between writing backbone.pt and best.pt and is not finished (the replay rewrites both).

    Raises:
        ConfigError: one is missing or damaged and last.pt is not the best validation (nothing to rebuild it from).
    """
    if not history:  # saved between validations before the first one: there is no best.pt yet
        return False
    problem = None
    try:
        ckpt = read_run_file(out / "best.pt")
        if cfg.mode == "full":
            read_run_file(out / "backbone.pt")
            if ckpt.get("backbone") != weights_id(str(out / "backbone.pt")):
                if done < cfg.episodes:
                    return False
                problem = f"{out}/backbone.pt is not the backbone of {out}/best.pt"
    except RunFileError as e:
        problem = f"{e.path} {e.problem}"
    if problem is None:
        return False
    at = next((h["episodes"] for h in history if h["val_acc"] == best), None)  # best.pt's: the first to reach it
    if at == done:
        return True
    raise ConfigError(f"{problem}, and last.pt (episode {done}) is not the best validation"
                      f"{f' (episode {at})' if at is not None else ''}, so it cannot be rebuilt; train again into "
                      "another --out (metrics.jsonl and last.pt are intact)")


def _mean_over_ranks(mean: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """Loss parts averaged over the ranks (equal episode counts), so rank 0 logs the whole update's loss."""
    if not world.distributed or not mean:
        return mean
    import torch.distributed as dist

    keys = sorted(mean)
    t = torch.tensor([mean[k] for k in keys], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}


def _progress():
    from mdmf_cache.progress import FieldColumn, make_progress

    return make_progress("episodes", FieldColumn("loss", "loss {:.3f}"), FieldColumn("val", "val {:.1f}%"))
