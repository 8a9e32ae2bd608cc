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
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mdmf_cache.backbone import resolve_device
from mdmf_cache.episodes import EpisodeSampler, Episodes, gather
from mdmf_cache.errors import ConfigError
from mdmf_cache.evaluation import score
from mdmf_cache.losses import mean_parts, total_loss
from mdmf_cache.models.config import build_config
from mdmf_cache.models.mdmf import MDMF
from mdmf_cache.store import FeatureSplit, load_split_features

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Fast-mode training; saved as ``config.json`` beside the checkpoints."""

    cache: str = ""
    out: str = "runs/fast"
    mode: str = "fast"
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
        if self.mode != "fast":
            problems.append(
                f"--mode {self.mode}: only 'fast' is available so far (full fine-tuning of CLIP needs the "
                "video loader and is tracked in its own issue)"
            )
        for name in ("way", "shot", "train_queries", "episodes", "episodes_per_step", "val_every", "val_episodes", "val_queries"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            problems.append("--lr must be > 0")
        if problems:
            raise ConfigError("; ".join(problems))


def build_model(preset: str, dim: int, num_frames: int, heads: dict[str, Any]) -> MDMF:
    return MDMF(build_config(preset, dim, num_frames=num_frames, **heads))


def validate(model: MDMF, split: FeatureSplit, episodes: Episodes, seed: int) -> float:
    """Mean val accuracy (%) on the fixed list (RNG forked: training draws are unaffected)."""
    was_training = model.training
    model.eval()
    acc = score("mdmf", split, episodes, model, seed).mean * 100
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
    # 1. config
    cfg_dict = asdict(cfg)
    if cfg.resume and (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        diff = [k for k in cfg_dict if k not in ("resume", "device", "episodes") and old.get(k) != cfg_dict[k]]
        if diff:
            raise ConfigError(f"--resume: {out} was trained with different {', '.join(diff)}; use another --out")
    elif (out / "last.pt").is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    # 2. data and model
    train = load_split_features(cfg.cache, "train", device=str(device))
    val = load_split_features(cfg.cache, "val", device=str(device))
    views, num_frames, dim = train.features.shape[1:]
    torch.manual_seed(cfg.seed)  # the heads' initialisation, then dropout and PPS draws
    model = build_model(cfg.preset, dim, num_frames, cfg.heads).to(device)
    (out / "config.json").write_text(json.dumps({**cfg_dict, "resolved_heads": model.cfg.to_dict()}, indent=2))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = EpisodeSampler(train.labels.cpu().numpy(), train.num_classes, views=views)
    sampler.check(cfg.way, cfg.shot, cfg.train_queries)
    val_sampler = EpisodeSampler(val.labels.cpu().numpy(), val.num_classes)
    val_eps = val_sampler.sample(cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng([cfg.seed, 1]))
    val_eps.save(out / "val_episodes.npz")
    rng = np.random.default_rng([cfg.seed, 0])
    done, best, history = 0, -1.0, []
    if cfg.resume and (out / "last.pt").is_file():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(rng, ckpt["rng"], device)
        done, best = ckpt["episodes"], ckpt["best_val"]
        # metrics written after the checkpoint belong to the lost part of the run
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        history = [json.loads(ln) for ln in lines if json.loads(ln)["episodes"] <= done]
        log.info("resumed %s at %d episodes (best val %.2f%%)", out, done, best)
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    # 3. train
    bar = _progress() if progress else None
    task = bar.add_task("train", total=cfg.episodes, completed=done, loss=float("nan"), val=best) if bar else None
    if bar:
        bar.start()
    model.train()
    t0, run_eps, losses = time.perf_counter(), 0, []
    try:
        while done < cfg.episodes:
            e = min(cfg.episodes_per_step, cfg.episodes - done)
            ep = sampler.sample(e, cfg.way, cfg.shot, cfg.train_queries, rng, random_view=True)
            support, query, text, labels = gather(train.features, train.text, ep)  # (E,S,T,D) (E,Q,T,D) (E,N,D) (E,Q)
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
                if acc > best:
                    best = acc
                    torch.save({"model": model.state_dict(), "heads": model.cfg.to_dict(), "preset": cfg.preset,
                                "episodes": done, "val_acc": acc}, out / "best.pt")
                rec["best_val"] = best
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(rng, device),
                            "episodes": done, "best_val": best}, out / "last.tmp")
                (out / "last.tmp").replace(out / "last.pt")  # atomic: a crash keeps the previous one
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
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
    unknown = sorted(set(saved) - known - {"resolved_heads", "sweep"})  # notes written beside the settings
    if unknown:
        raise ConfigError(f"--config {path}: unknown TrainConfig field(s) {', '.join(unknown)}")
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def load_run(run: Path | str, device: str = "auto") -> tuple[MDMF, dict[str, Any]]:
    """The best checkpoint of a run as an eval-mode model, and the run's config."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    if not (run / "best.pt").is_file():
        raise ConfigError(f"{run} has no best.pt; train first (mdmf-cache train --out {run})")
    dev = resolve_device(device)
    ckpt = torch.load(run / "best.pt", map_location=dev, weights_only=False)
    heads = {k: v for k, v in ckpt["heads"].items() if k not in ("dim",)}
    from mdmf_cache.models.config import MDMFConfig

    model = MDMF(MDMFConfig(dim=ckpt["heads"]["dim"], **heads)).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def _progress():
    from rich.progress import TextColumn

    from pipelines.progress import make_progress

    return make_progress("episodes", TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("val {task.fields[val]:.1f}%"))
