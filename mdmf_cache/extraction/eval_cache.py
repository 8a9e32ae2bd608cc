"""The cache a full-mode run is evaluated on: its split extracted with the run's fine-tuned backbone."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mdmf_cache.clip.backbone import pretrained_slug
from mdmf_cache.configs import FullModeConfig
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.extraction.build import extract_lock, run_extract
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.layout import group_name
from mdmf_cache.store.runs import RUN_FILE_FIX, full_run_backbone, why

log = logging.getLogger(__name__)

__all__ = ["full_run_cache"]


def full_run_cache(run: Path, run_cfg: dict[str, Any], split: str, device: str, override: str | None = None,
                   progress: bool = True, way: int = 5, root: str | None = None, eval_cache: str | None = None,
                   rebuild: bool = False) -> str:
    """The cache of a full-mode run's split, extracted with the run's fine-tuned backbone (``backbone.pt``).

    Extracted into ``eval_cache`` (default ``RUN/eval_cache``) and treated as any cache: every call
    compares it with the video tree (the run's ``root``, or ``root``) through :func:`run_extract`, which
    extends it to videos that appeared, leaves out those that vanished and repairs damage; finished rows
    are reused. Its name carries the checkpoint's sha256, and so does its fingerprint, so a backbone trained
    further gets a new cache. The cache belongs to the run: one made with other settings, or damaged
    beyond repair, is replaced (``rebuild``: replaced whatever it holds).

    Raises:
        ConfigError: ``backbone.pt`` is missing, damaged or not the backbone of ``best.pt``; ``--cache`` holds
            other weights; ``eval_cache`` cannot be written.
    """

    backbone, wid = full_run_backbone(run)
    if override:
        have = (CacheStore(override).fingerprint.get("video") or {}).get("weights")
        if have != wid:
            raise ConfigError(f"--cache {override} was extracted with weights {have}, not this run's {backbone} ({wid})")
        return override
    changes = {k: v for k, v in (("root", root),) if v}
    try:
        full = FullModeConfig(**{**run_cfg["full"], **changes})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{run / 'config.json'} is damaged (no usable 'full' record: {why(e)}); "
                          f"{RUN_FILE_FIX['config.json']}") from e
    cache_dir = Path(eval_cache) if eval_cache else run / "eval_cache"
    ecfg = full.extract_config(run_cfg.get("preset", "paper"), run_cfg.get("seed", 0), device, pretrained=str(backbone),
                               cache_dir=str(cache_dir), name=f"{full.dataset}-{wid.split(':')[-1][:12]}",
                               splits=(split,), progress=progress, way=way, overwrite=True)
    path = cache_dir / group_name(ecfg.cache_name, ecfg.model, pretrained_slug(ecfg.pretrained))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {cache_dir} ({e.strerror}): eval extracts the run's {split} split with its "
                          "backbone there; pass --eval-cache DIR on writable storage (and --out DIR for the results)") from e
    if rebuild and path.exists():
        log.warning("%s cannot be read; extracting the %s split again", path, split)
        shutil.rmtree(path)
    log.info("%s split of %s with its fine-tuned backbone: cache %s", split, run, path)
    try:
        path, _ = run_extract(ecfg)
    except CacheError as e:
        with extract_lock(path):  # another eval extracting it now: its error stands (raised here)
            pass
        if rebuild or not path.exists():
            raise
        log.warning("%s; extracting the %s split again", e, split)  # damage its extract could not repair
        shutil.rmtree(path)
        path, _ = run_extract(ecfg)
    return str(path)
