"""The training engine shared by fast and full mode: resuming, checkpoints, divergence checks, the optimiser.

The training flow itself, top to bottom, is the ``train`` recipe (``pipelines/train.py``); this module holds the
parts it is built from:

* :func:`check_resume`: a ``--resume`` compared with the run's recorded settings (and its cache's identity);
* :func:`make_optimizer`, :func:`train_device`, :func:`rng_state` / :func:`set_rng_state`;
* :class:`RunState` (episodes done, best val, the metrics history, loss parts since the last validation) and
  :class:`Checkpoints`, which writes ``last.pt`` and ``best.pt`` (full mode: ``backbone.pt`` first; with
  ``keep_checkpoints`` also every validation's heads in ``checkpoints/``) and turns a
  loss or weights that stopped being finite into a :class:`~mdmf_cache.errors.TrainingError` naming the first
  update whose loss was not finite and what was kept;
* :func:`best_needs_repair` (a damaged ``best.pt`` rebuilt from ``last.pt`` on ``--resume``), :func:`mean_over_ranks`
  and the training progress bar.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdmf_cache.device import resolve_device
from mdmf_cache.clip.backbone import weights_id
from mdmf_cache.configs import FullModeConfig, TrainConfig
from mdmf_cache.distributed import World
from mdmf_cache.errors import ConfigError, TrainingError
from mdmf_cache.progress import FieldColumn, make_progress
from mdmf_cache.fileio import atomic_torch_save
from mdmf_cache.store.runs import RunFileError, check_identity, history_upto, read_run_file
from mdmf_cache.heads.factory import head_record

log = logging.getLogger(__name__)

#: The folder of a run that ``keep_checkpoints`` keeps every validation's heads in.
CHECKPOINTS = "checkpoints"

__all__ = ["CHECKPOINTS", "OOM_HINT", "check_resume", "make_optimizer", "train_device", "rng_state", "set_rng_state",
           "RunState", "Checkpoints", "first_non_finite", "best_needs_repair", "mean_over_ranks", "train_progress",
           "train_bar_fields", "MetricsBoard"]


def rng_state(rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(rng: np.random.Generator, state: dict[str, Any], device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam; full mode gives the backbone its own learning rate (``backbone_lr``, default ``lr``)."""
    if cfg.mode == "fast":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.lr}]
    backbone = [p for p in model.encoder.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.full_mode.backbone_lr or cfg.lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def train_device(cfg: TrainConfig, world: World) -> torch.device:
    """The compute device; under torchrun with ``--device auto`` each rank takes its local GPU."""
    if world.distributed and cfg.device == "auto" and torch.cuda.is_available():
        return torch.device(f"cuda:{world.local_rank % torch.cuda.device_count()}")
    return resolve_device(cfg.device)


OOM_HINT = ("out of GPU memory; add --grad-checkpointing, lower --episodes-per-forward (1 is the paper's), "
            "--train-queries or --shot, or fine-tune fewer blocks (--train-last-blocks N)")


#: Full-mode fields that may change on --resume: the decoder worker count, and where the videos are (the videos
#: themselves are compared by identity).
_FULL_FREE = ("workers", "root", "splits_dir", "labels")


def full_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The full-mode fields (``full.NAME``) that differ between a run's record and this config, defaults filled in."""
    defaults = asdict(FullModeConfig())
    return [f"full.{k}" for k in sorted(set(old) | set(new))
            if k not in _FULL_FREE and old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]


def finite_weights(model: nn.Module) -> bool:
    """Every floating-point parameter and normalisation statistic finite (one host sync); other buffers may hold
    inf on purpose (CLIP's causal attention mask)."""
    stats = [b for name, b in model.named_buffers() if "running_" in name]
    ts = [t for t in (*model.parameters(), *stats) if t.is_floating_point()]
    return not ts or bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def first_non_finite(losses: list[dict[str, torch.Tensor]], loss_at: list[int]) -> tuple[int, str] | None:
    """(episodes after the update, its loss parts as text) of the first update whose loss parts are not all finite."""
    for parts, at in zip(losses, loss_at):
        if not all(bool(torch.isfinite(v).all()) for v in parts.values()):
            return at, ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
    return None


def best_needs_repair(out: Path, cfg: TrainConfig, done: int, best: float, history: list[dict[str, Any]]) -> bool:
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


def mean_over_ranks(mean: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """Loss parts averaged over the ranks (equal episode counts), so rank 0 logs the whole update's loss."""
    if not world.distributed or not mean:
        return mean
    import torch.distributed as dist

    keys = sorted(mean)
    t = torch.tensor([mean[k] for k in keys], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}


def train_progress():
    """The training bar: episodes, the loss (refreshed every 10 updates) and the last val accuracy; ``-`` for each
    until it has a value (:func:`train_bar_fields`)."""
    return make_progress("episodes", FieldColumn("loss", "loss {:.3f}", "loss -"),
                         FieldColumn("val", "val {:.1f}%", "val -"))


class MetricsBoard:
    """``--tensorboard``: every metrics line's numbers (the loss parts, ``val_acc``, ``episodes_per_s``, ...) as
    TensorBoard scalars at step = episodes, in ``OUT/tensorboard/`` beside ``metrics.jsonl`` (rank 0 only).

    A resumed run appends: the events after its ``last.pt`` (of an interrupted part that is trained again) are
    purged, and a run that had no event files yet gets its earlier metrics lines first."""

    def __init__(self, out: Path, state: "RunState") -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = out / "tensorboard"
        new = not folder.is_dir()
        self.writer = SummaryWriter(str(folder), purge_step=state.done + 1 if state.done else None)
        for rec in state.history if new else ():
            self.add(rec)

    def add(self, rec: dict[str, Any]) -> None:
        step = int(rec["episodes"])
        for key, value in rec.items():
            if key != "episodes" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def train_bar_fields(state: "RunState") -> dict[str, float | None]:
    """The training bar's fields at the start: no loss yet, and the best val accuracy of a resumed run (None before
    its first validation)."""
    return {"loss": None, "val": state.best if state.best >= 0 else None}


def check_resume(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    """The recorded ``config.json`` of the run that ``--resume`` continues (None: a new run).

    Raises:
        ConfigError: ``out`` holds a run and ``--resume`` was not given, or the run was trained with other settings
            (named), or (fast mode) on another cache.
    """
    cfg_dict = asdict(cfg)
    if (out / "last.pt").is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not (cfg.resume and (out / "last.pt").is_file()):
        return None
    old = read_run_file(out / "config.json", fix="--resume compares the run's settings with it; restore it from a "
                                                  "copy, or train again into another --out")
    # paths may be written differently (relative, moved): the cache (fast mode) and the videos (full mode) are
    # compared by identity; a run written before a field existed had its default (resolved for its head and shot)
    defaults = asdict(TrainConfig(method=old.get("method", "mdmf"), shot=old.get("shot", 5),
                                  mode=old.get("mode", "fast")).resolved())
    free = ("resume", "device", "episodes", "cache", "out", "tensorboard", "token_cache_mb")  # token_cache_mb: memory only
    diff = [k for k in cfg_dict if k not in free and k != "full" and old.get(k, defaults[k]) != cfg_dict[k]]
    if cfg.mode == "full" and old.get("mode", "fast") == "full":
        diff += full_diff(old.get("full") or {}, cfg.full)
    if diff:
        raise ConfigError(f"--resume: {out} was trained with different {', '.join(diff)}; use another --out")
    if cfg.mode == "fast":
        check_identity(old.get("cache_identity"), cfg.cache, "--resume")
    return old


@dataclass
class RunState:
    """Where a run stands: episodes done, the best val accuracy, the metrics lines, and the loss parts of the updates
    since the last validation (detached device tensors: no host sync per step) with the episode count after each."""

    done: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss_at: list[int] = field(default_factory=list)
    saved: int = 0  # the episodes last.pt holds

    def restore(self, ckpt: dict[str, Any], out: Path, device: torch.device) -> None:
        """The state of ``last.pt``; its metrics lines (or, for runs saved before checkpoints carried them,
        ``metrics.jsonl`` up to it) and the loss parts saved between validations."""
        self.done, self.best = ckpt["episodes"], ckpt["best_val"]
        self.history = ckpt.get("history") or history_upto(out / "metrics.jsonl", self.done)
        self.losses = [{k: v.to(device) for k, v in p.items()} for p in ckpt.get("pending_losses", [])]
        self.loss_at = [self.done] * len(self.losses)  # checked finite before they were saved
        self.saved = self.done


class Checkpoints:
    """The run's checkpoints (rank 0 writes them) and its divergence check.

    Args:
        core: the trained module (the heads, or the backbone in front of them).
        head: the heads (``best.pt`` holds them alone).
    """

    def __init__(self, cfg: TrainConfig, out: Path, core: nn.Module, head, opt: torch.optim.Optimizer,
                 rng: np.random.Generator, device: torch.device, state: RunState) -> None:
        self.cfg, self.out, self.core, self.head, self.opt, self.rng = cfg, out, core, head, opt, rng
        self.device, self.state = device, state

    def save_last(self) -> None:
        """``last.pt``: everything a ``--resume`` needs to go on as if never stopped."""
        st = self.state
        st.saved = st.done
        atomic_torch_save({"model": self.core.state_dict(), "optimizer": self.opt.state_dict(),
                           "rng": rng_state(self.rng, self.device), "episodes": st.done, "best_val": st.best,
                           "history": st.history, "pending_losses": [{k: v.cpu() for k, v in p.items()} for p in st.losses]},
                          self.out / "last.pt")

    def heads_checkpoint(self, acc: float) -> dict[str, Any]:
        """What ``best.pt`` holds: the heads now, how to rebuild them, the episodes done and the val accuracy."""
        cfg = self.cfg
        return {"model": self.head.state_dict(), **head_record(self.head), "preset": cfg.preset, "shot": cfg.shot,
                "train_shot": cfg.train_shot, "episodes": self.state.done, "val_acc": acc}

    def save_best(self, acc: float) -> None:
        """``best.pt``: the heads at the best validation (full mode: the fine-tuned CLIP in ``backbone.pt`` first,
        loadable by ``extract --pretrained``)."""
        extra = {}
        if self.cfg.mode == "full":
            self.core.encoder.save_clip(self.out / "backbone.pt")
            extra = {"backbone": weights_id(str(self.out / "backbone.pt"))}
        atomic_torch_save({**self.heads_checkpoint(acc), **extra}, self.out / "best.pt")

    def save_validation(self, acc: float) -> Path:
        """``checkpoints/ep{episodes:07d}.pt`` (``keep_checkpoints``): the heads at this validation, in ``best.pt``'s
        format, whatever their val accuracy (``compare --test-selected`` scores every one on test)."""
        path = self.out / CHECKPOINTS / f"ep{self.state.done:07d}.pt"
        path.parent.mkdir(exist_ok=True)
        return atomic_torch_save(self.heads_checkpoint(acc), path)

    def diverged(self, mean: dict[str, float] | None) -> TrainingError | None:
        """None while the losses since the last check and the weights are finite; else the error that ends the run."""
        st = self.state
        if mean is not None and all(math.isfinite(v) for v in mean.values()) and finite_weights(self.core):
            return None
        first = first_non_finite(st.losses, st.loss_at)
        where = (f"the loss is not finite from episode {first[0]} on ({first[1]})" if first
                 else f"the weights are not finite after episode {st.done}")
        kept = (f"{self.out}/last.pt holds the run at episode {st.saved}, best.pt its best validation ({st.best:.2f}%)"
                if st.saved else "nothing was saved (no validation was reached)")
        return TrainingError(f"training diverged: {where}; stopped, {kept}; train again with a lower --lr into another "
                             "--out (if the input may hold NaN/inf: mdmf-cache verify CACHE)")
