"""Train the CLIP-MDMF heads.

Fast mode (this recipe): CLIP is frozen; frame and text embeddings come from the cache, loaded
into memory once (on the GPU when there is one). Episodes are sampled in memory, E at a time, with a
random cached view per train video, and the heads see E episodes per optimiser step.

Recipe, top to bottom:
    1. resolve the config, save ``config.json`` in the run directory;
    2. load train and val features, build the heads and Adam, or restore ``last.pt`` (--resume);
    3. train; every ``val_every`` episodes score the fixed val episode list, keep ``best.pt`` by val
       accuracy (never by test), write ``metrics.jsonl`` and ``last.pt``;
    4. return the best val accuracy.

Full mode (fine-tuning CLIP end to end, SPEC section 10) needs the video loader and lives in a later
issue; ``--mode full`` says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mdmf_cache.backbone import heads_autocast, resolve_device
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
class TrainConfig:
    """Fast-mode training; saved as ``config.json`` beside the checkpoints."""

    cache: str = ""
    out: str = "runs/fast"
    mode: str = "fast"
    method: str = "mdmf"  # mdmf | clip-fsar (the paper's main rival, same trainer)
    preset: str = "paper"
    heads: dict[str, Any] = field(default_factory=dict)  # MDMFConfig overrides (ablation switches)
    way: int = 5
    shot: int = 5
    train_queries: int = 5  # per class
    episodes: int = 10000  # training episodes in total
    episodes_per_step: int = 16  # E per optimiser step
    lr: float = 1e-4  # Adam; measured for fast mode (README), the paper's 1e-5 is for all of CLIP
    weight_decay: float = 0.0
    val_every: int = 1000  # episodes
    val_episodes: int = 500
    val_queries: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = False

    def validate(self) -> None:
        problems = []
        if self.method not in ("mdmf", "clip-fsar"):
            problems.append(f"--method {self.method!r}: choose mdmf or clip-fsar")
        if self.mode != "fast":
            problems.append(
                f"--mode {self.mode}: only 'fast' is available so far (full fine-tuning of CLIP needs the "
                "video loader and is tracked in its own issue)"
            )
        for name in ("shot", "train_queries", "episodes", "episodes_per_step", "val_every", "val_episodes", "val_queries"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.way < 2:
            problems.append(f"--way {self.way}: an episode needs at least 2 classes")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr {self.lr}: must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay {self.weight_decay}: must be a finite number >= 0")
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


def run_train(cfg: TrainConfig, progress: bool = True,
              on_val: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the heads; returns ``{"best_val": %, "run": path, "episodes": n}``.

    Args:
        on_val: called with (episodes done, val accuracy %) after each validation, once ``last.pt``
            and ``metrics.jsonl`` hold it; an exception it raises (a sweep's pruning) ends the run there.

    Raises:
        ConfigError: bad options, or --resume with a different config.
        CacheError: the cache is missing or incomplete.
    """
    cfg.validate()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    cfg_dict = asdict(cfg)
    old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else None
    if (out / "last.pt").is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.resume and old is not None and (out / "last.pt").is_file():
        # paths may be written differently (relative, moved): the cache is compared by identity below
        defaults = asdict(TrainConfig())  # a run written before a field existed had its default
        diff = [k for k in cfg_dict if k not in ("resume", "device", "episodes", "cache", "out")
                and old.get(k, defaults[k]) != cfg_dict[k]]
        if diff:
            raise ConfigError(f"--resume: {out} was trained with different {', '.join(diff)}; use another --out")
        check_identity(old.get("cache_identity"), cfg.cache, "--resume")
    # 1. data and model; nothing is written before every input is checked
    train = load_split_features(cfg.cache, "train", device=str(device))
    val = load_split_features(cfg.cache, "val", device=str(device))
    views, num_frames, dim = train.features.shape[1:]
    sampler = EpisodeSampler(train.labels.cpu().numpy(), train.num_classes, views=views)
    sampler.check(cfg.way, cfg.shot, cfg.train_queries, split="train")
    val_sampler = EpisodeSampler(val.labels.cpu().numpy(), val.num_classes)
    val_sampler.check(cfg.way, cfg.shot, cfg.val_queries, split="val")
    torch.manual_seed(cfg.seed)  # the heads' initialisation, then dropout and PPS draws
    model = build_model(cfg.preset, dim, num_frames, cfg.heads, cfg.method).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    val_eps = val_sampler.sample(cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng([cfg.seed, 1]))
    rng = np.random.default_rng([cfg.seed, 0])
    done, best, history = 0, -1.0, []
    if cfg.resume and (out / "last.pt").is_file():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(rng, ckpt["rng"], device)
        done, best = ckpt["episodes"], ckpt["best_val"]
        # the checkpoint carries the metrics up to itself: lines written after it belong to the lost part
        history = ckpt.get("history") or _history_upto(out / "metrics.jsonl", done)
        log.info("resumed %s at %d episodes (best val %.2f%%)", out, done, best)
    # 2. the run's files
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**cfg_dict, "cache_abs": str(Path(cfg.cache).resolve()),
                                            "cache_identity": cache_identity(cfg.cache),
                                            "resolved_heads": model.cfg.to_dict()})
    val_eps.save(out / "val_episodes.npz")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    # 3. train
    bar = _progress() if progress else None
    task = bar.add_task("train", total=cfg.episodes, completed=done, loss=float("nan"), val=best) if bar else None
    if bar:
        bar.start()
    model.train()
    amp = heads_autocast(device)
    t0, run_eps, losses = time.perf_counter(), 0, []
    try:
        while done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - done)
            ep = sampler.sample(e, cfg.way, cfg.shot, cfg.train_queries, rng, random_view=True)
            support, query, text, labels = gather(train.features, train.text, ep)  # (E,S,T,D) (E,Q,T,D) (E,N,D) (E,Q)
            with amp:  # bf16 on CUDA (OTAM and the losses stay float32), float32 on CPU
                outd = model(support, query, text)
                loss, parts = total_loss(outd, labels, model.cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(parts)  # detached device tensors: no host sync per step
            done += e
            run_eps += e
            if bar:  # the loss shown costs a host sync: refresh it every 10 steps only
                bar.update(task, completed=done, **({"loss": float(parts["total"])} if len(losses) % 10 == 1 else {}))
            if done % cfg.val_every < e or done == cfg.episodes:  # crossed a validation point
                acc = validate(model, val, val_eps, cfg.seed)
                mean = mean_parts(losses)  # one device-to-host copy for all steps since the last one
                rec = {
                    "episodes": done,
                    "loss": mean["total"],
                    "main": mean["main"],
                    "distill": mean["distill"],
                    "val_acc": acc,
                    "episodes_per_s": run_eps / (time.perf_counter() - t0),
                }
                losses = []
                rec["best_val"] = max(best, acc)
                history.append(rec)
                # metrics line first, then best.pt, then last.pt (each atomic): a kill between them
                # resumes from the previous last.pt, which drops and recomputes the later line
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if acc > best:
                    best = acc
                    atomic_torch_save({"model": model.state_dict(), "heads": model.cfg.to_dict(), "preset": cfg.preset,
                                       "shot": cfg.shot, "episodes": done, "val_acc": acc}, out / "best.pt")
                atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "rng": _rng_state(rng, device), "episodes": done, "best_val": best,
                                   "history": history}, out / "last.pt")
                if bar:
                    bar.update(task, val=acc, loss=rec["loss"])
                else:
                    log.info("episodes %d loss %.3f val %.2f%%", done, rec["loss"], acc)
                if on_val is not None:
                    on_val(done, acc)
    finally:
        if bar:
            bar.stop()
    res = {"best_val": best, "run": str(out), "episodes": done,
           "episodes_per_s": run_eps / max(time.perf_counter() - t0, 1e-9)}
    from pipelines.plots import plot_safely, train_curves

    plot_safely(train_curves, out)  # curves.png; a figure that cannot be drawn is only a warning
    return res


def load_config(path: Path | str) -> TrainConfig:
    """A TrainConfig from a run's ``config.json`` or a sweep's ``best.json`` (``mdmf-cache train --config``)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: cannot read a JSON config ({e})") from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known - {"resolved_heads", "sweep", "cache_abs", "cache_identity"})  # notes
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
    from rich.progress import TextColumn

    from pipelines.progress import make_progress

    return make_progress("episodes", TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("val {task.fields[val]:.1f}%"))
