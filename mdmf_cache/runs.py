"""Runs on disk: what binds a run to its cache, its checkpoints, and the caches its evaluation reads.

A run directory holds ``config.json`` (the resolved :class:`~mdmf_cache.configs.TrainConfig` and the
identity of its input), ``best.pt`` (the heads kept by val accuracy), ``last.pt`` (the resumable
state) and ``metrics.jsonl``; a full-mode run also ``backbone.pt`` (the fine-tuned CLIP) and, once
evaluated, ``eval_cache/`` (its test split extracted with that backbone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from mdmf_cache.backbone import resolve_device
from mdmf_cache.configs import FullModeConfig, TrainConfig
from mdmf_cache.episodes import Episodes
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache import heads as head_registry
from mdmf_cache.evaluation import score
from mdmf_cache.heads.base import FewShotHead
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.models.config import MDMFConfig
from mdmf_cache.store import CacheStore, FeatureSplit, fingerprint_diff

log = logging.getLogger(__name__)

__all__ = ["cache_identity", "check_identity", "build_head", "build_model", "head_record", "head_from_record", "validate",
           "load_config", "read_run_config", "load_run", "run_cache", "full_run_backbone", "full_run_cache"]


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


def build_head(method: str, preset: str | None, overrides: dict[str, Any], data: DataInfo) -> FewShotHead:
    """The registered head ``method`` with its preset (None: the head's default), overrides and the data's values."""
    spec = head_registry.get(method)
    return spec.build(spec.make_options(preset, overrides, data))


def build_model(preset: str | None, dim: int, num_frames: int, heads: dict[str, Any] | None = None,
                method: str = "mdmf", **data: Any) -> FewShotHead:
    """:func:`build_head` for a width and frame count (``data``: ``num_classes``, ``dataset``, ``shot``)."""
    return build_head(method, preset, heads or {}, DataInfo(dim=dim, num_frames=num_frames, **data))


def head_record(head: FewShotHead) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``head``: its registry name and resolved options."""
    return {"method": head.method, "options": dataclasses.asdict(head.options)}


def head_from_record(ckpt: dict[str, Any]) -> FewShotHead:
    """The head a checkpoint describes (:func:`head_record`), weights not loaded.

    Checkpoints of earlier versions stored MDMF's options under ``heads`` (with the method among them):
    MDMF ones load; their CLIP-FSAR head differed from the released one and is refused.
    """
    if "options" in ckpt:
        spec = head_registry.get(ckpt["method"])
        return spec.build(spec.load_options(ckpt["options"]))
    old = dict(ckpt["heads"])
    if old.pop("method", "mdmf") != "mdmf":
        raise ConfigError("this run's CLIP-FSAR head was trained by an earlier version of mdmf-cache, whose CLIP-FSAR "
                          "differed from the released one; train it again (mdmf-cache train ... --method clip-fsar)")
    return head_registry.get("mdmf").build(MDMFConfig(**old))


def validate(model: FewShotHead, split: FeatureSplit, episodes: Episodes, seed: int) -> float:
    """Mean val accuracy (%) on the fixed list, per-video path where the head has one (RNG forked: training
    draws are unaffected)."""
    was_training = model.training
    model.eval()
    acc = score(model.method, split, episodes, model, seed).mean * 100
    model.train(was_training)
    return acc


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


def history_upto(path: Path, done: int) -> list[dict[str, Any]]:
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


def read_run_config(run: Path | str) -> dict[str, Any]:
    """A run directory's ``config.json``.

    Raises:
        ConfigError: ``run`` is not a run directory of ``mdmf-cache train`` (a cache is named as one), or its
            ``config.json`` is unreadable.
    """
    run = Path(run)
    if not (run / "config.json").is_file():
        what = ("a cache, not a run: train one on it first (mdmf-cache train CACHE --out runs/NAME)"
                if (run / "zarr.json").is_file() else
                "not a run directory (config.json and best.pt, written by mdmf-cache train --out DIR)")
        raise ConfigError(f"{run} is {what}")
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run / 'config.json'} is unreadable ({e}); is this a run directory?") from e


def load_run(run: Path | str, device: str = "auto") -> tuple[FewShotHead, dict[str, Any]]:
    """The best checkpoint of a run as an eval-mode head, and the run's config."""
    run = Path(run)
    cfg = read_run_config(run)
    if not (run / "best.pt").is_file():
        raise ConfigError(f"{run} has no best.pt; train first (mdmf-cache train --out {run})")
    dev = resolve_device(device)
    ckpt = torch.load(run / "best.pt", map_location=dev, weights_only=False)
    model = head_from_record(ckpt).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def run_cache(run: Path, run_cfg: dict[str, Any], override: str | None) -> str:
    """The cache a run was trained on: ``--cache`` if given, else the recorded path as written, then as resolved
    at training time; a clear error when neither exists (a moved cache)."""
    if override:
        return override
    recorded = run_cfg["cache"]
    for cand in (Path(recorded), Path(run_cfg.get("cache_abs", recorded))):
        if (cand / "zarr.json").is_file():
            return str(cand)
    raise ConfigError(f"{run} was trained on {recorded}, which is not there any more; pass its new location "
                      "with --cache PATH (it is checked against the run's record)")


def full_run_backbone(run: Path) -> tuple[Path, str]:
    """A full-mode run's fine-tuned CLIP, ``RUN/backbone.pt``, and its weights id (``sha256:...``).

    Raises:
        ConfigError: ``backbone.pt`` is missing or is not the backbone of ``best.pt`` (a run killed between the
            two writes: ``train --resume`` rewrites both).
    """
    from mdmf_cache.backbone import weights_id

    backbone = Path(run) / "backbone.pt"
    if not backbone.is_file():
        raise ConfigError(f"{run} is a full-mode run without backbone.pt; train it first (or --resume it)")
    wid = weights_id(str(backbone))
    recorded = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False).get("backbone")
    if recorded != wid:
        raise ConfigError(f"{backbone} is not the backbone of {run}/best.pt (the run was stopped between writing "
                          "them); rerun its train command with --resume, which rewrites both")
    return backbone, wid


def full_run_cache(run: Path, run_cfg: dict[str, Any], split: str, device: str, override: str | None = None,
                   progress: bool = True, way: int = 5, root: str | None = None) -> str:
    """The cache of a full-mode run's split, extracted with the run's fine-tuned backbone (``backbone.pt``).

    Extracted into ``RUN/eval_cache`` the first time (a progress bar), reused afterwards: its name carries
    the checkpoint's sha256, and so does its fingerprint, so a backbone trained further gets a new cache.

    Raises:
        ConfigError: ``backbone.pt`` is missing or is not the backbone of ``best.pt`` (a run killed between the
            two writes: ``train --resume`` rewrites both), or ``--cache`` holds other weights.
    """
    from mdmf_cache.backbone import pretrained_slug
    from mdmf_cache.cache_build import run_extract
    from mdmf_cache.store import group_name, meta_problem

    backbone, wid = full_run_backbone(run)
    if override:
        have = (CacheStore(override).fingerprint.get("video") or {}).get("weights")
        if have != wid:
            raise ConfigError(f"--cache {override} was extracted with weights {have}, not this run's {backbone} ({wid})")
        return override
    full = FullModeConfig(**{**run_cfg["full"], **({"root": root} if root else {})})
    ecfg = full.extract_config(run_cfg.get("preset", "paper"), run_cfg.get("seed", 0), device, pretrained=str(backbone),
                               cache_dir=str(run / "eval_cache"), name=f"{full.dataset}-{wid.split(':')[-1][:12]}",
                               splits=(split,), progress=progress, way=way)
    path = Path(ecfg.cache_dir) / group_name(ecfg.cache_name, ecfg.model, pretrained_slug(ecfg.pretrained))
    if (path / "zarr.json").is_file() and not meta_problem(path):
        store = CacheStore(path)
        if split in store.splits and store.is_complete():  # extracted before: no backbone to load
            return str(path)
    log.info("%s split of %s with its fine-tuned backbone: cache %s", split, run, path)
    path, _ = run_extract(ecfg)
    return str(path)
