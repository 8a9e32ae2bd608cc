"""Building heads by name, recording them in checkpoints, and restoring a run's best head.

Every command builds its head here: :func:`build_head` (the registry's spec, a preset, overrides and the data's
values), :func:`head_record` / :func:`head_from_record` (what a checkpoint stores to rebuild it), and
:func:`load_head` (a run's ``best.pt`` as an eval-mode head).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mdmf_cache import heads as head_registry
from mdmf_cache.device import resolve_device
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.base import FewShotHead
from mdmf_cache.heads.mdmf_config import MDMFConfig
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.store.runs import RUN_FILE_FIX, read_run_config, read_run_file, why

__all__ = ["build_head", "build_model", "head_record", "head_from_record", "load_head"]


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


def load_head(run: Path | str, device: str = "auto", checkpoint: str = "best.pt") -> tuple[FewShotHead, dict[str, Any]]:
    """The best checkpoint of a run as an eval-mode head, and the run's config (both files checked).

    Args:
        checkpoint: the heads file inside the run: ``best.pt`` (chosen on val), or a validation's kept by
            ``--keep-checkpoints``, e.g. ``checkpoints/ep0001000.pt`` (the same format).
    """
    run = Path(run)
    cfg = read_run_config(run)
    path = run / checkpoint
    if not path.is_file():
        raise ConfigError(f"{run} has no {checkpoint}; train first (mdmf-cache train --out {run})")
    dev = resolve_device(device)
    ckpt = read_run_file(path, dev)
    try:
        model = head_from_record(ckpt).to(dev)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:  # weights that do not fit the recorded head
        fix = RUN_FILE_FIX["best.pt" if checkpoint == "best.pt" else "checkpoints"]
        raise ConfigError(f"{path} is damaged ({why(e)}); {fix}") from e
    model.eval()
    return model, cfg
