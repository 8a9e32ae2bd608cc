"""Runs on disk: what binds a run to its cache, its checkpoints, and the caches its evaluation reads.

A run directory holds ``config.json`` (the resolved :class:`~mdmf_cache.configs.TrainConfig` and the
identity of its input), ``best.pt`` (the heads kept by val accuracy), ``last.pt`` (the resumable
state) and ``metrics.jsonl``; a full-mode run also ``backbone.pt`` (the fine-tuned CLIP) and, once
evaluated, ``eval_cache/`` (its test split extracted with that backbone).

Every reader of these files goes through :func:`read_run_file`: a missing or damaged file is a
:class:`~mdmf_cache.errors.ConfigError` naming the file and what to do, never a library error.
While ``train`` writes a run it holds ``RUN/.lock`` (:func:`run_lock`): a second ``train`` on the
same directory is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.clip.backbone import weights_id
from mdmf_cache.fileio import process_lock
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.layout import fingerprint_diff

log = logging.getLogger(__name__)

__all__ = ["cache_identity", "check_identity", "read_run_config", "run_cache", "full_run_backbone", "check_backbone",
           "read_run_file", "RunFileError", "run_lock", "history_upto", "why", "RUN_FILE_FIX"]

#: What to do about a damaged run file, by name (a reader may say something more precise).
RUN_FILE_FIX = {
    "config.json": "it records the run's settings and cannot be rebuilt from the other files: restore it from a copy, "
                   "or train again into another --out",
    "metrics.jsonl": "rerun the run's train command with --resume: it rewrites metrics.jsonl from last.pt",
    "best.pt": "rerun the run's train command with --resume: it rebuilds best.pt from last.pt when the run's last "
               "validation was its best; otherwise train again into another --out",
    "backbone.pt": "rerun the run's train command with --resume: it rebuilds backbone.pt and best.pt from last.pt when "
                   "the run's last validation was its best; otherwise train again into another --out",
    "checkpoints": "a validation's heads kept by --keep-checkpoints cannot be rebuilt from the other files: train "
                   "again into another --out (best.pt, if intact, can still be evaluated)",
    "last.pt": "the run cannot be continued (its best.pt, if intact, can still be evaluated); train again into "
               "another --out, or delete the run directory and rerun the same command",
}
#: The keys a checkpoint of each kind must hold.
_CKPT_KEYS = {"best.pt": ("model",), "last.pt": ("model", "optimizer", "rng", "episodes", "best_val")}


def why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _non_finite(state: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors of a state dict holding NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


class RunFileError(ConfigError):
    """A run file that is missing or damaged: ``path``, ``problem`` (what is wrong) and ``fix`` (what to do)."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path} {problem}; {fix}")


def read_run_file(path: Path | str, device: Any = "cpu", fix: str | None = None) -> Any:
    """One file of a run directory, read and checked; the readers of run files all come here.

    ``config.json``: a dict. ``metrics.jsonl``: its records (a last line cut by a kill is dropped).
    ``best.pt``, ``last.pt``: the checkpoint dict (on ``device``), with the keys a checkpoint holds;
    ``best.pt``'s weights must be finite, and so must those of a validation's heads kept in
    ``checkpoints/ep*.pt`` (``keep_checkpoints``; best.pt's format). ``backbone.pt``: the fine-tuned CLIP's state
    dict (finite).

    Args:
        fix: what to do, said after the damage (default: :data:`RUN_FILE_FIX` for the file's name).

    Raises:
        RunFileError: the file is missing or damaged (a ConfigError naming it, what is wrong and ``fix``).
    """
    path = Path(path)
    kept = path.parent.name == "checkpoints" and path.suffix == ".pt"  # a validation's heads: best.pt's format
    kind = "best.pt" if kept else path.name
    fix = fix or RUN_FILE_FIX.get("checkpoints" if kept else path.name, "restore it, or train again into another --out")
    if not path.is_file():
        raise RunFileError(path, "is missing", fix)
    try:
        if path.suffix == ".json":
            value = json.loads(path.read_text())
            if not isinstance(value, dict):
                raise ValueError(f"a JSON {type(value).__name__}, not an object")
            return value
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            recs = []
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # a line cut by a kill (appended, not atomic): the checkpoint has it
                        continue
                    raise ValueError(f"line {i + 1} is not JSON") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("episodes"), int):
                    raise ValueError(f"line {i + 1} is not a metrics record")
                recs.append(rec)
            return recs
        if path.name == "backbone.pt":
            value = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(value, dict) or not value:
                raise ValueError("not a state dict")
            state = value
        else:
            value = torch.load(path, map_location=device, weights_only=False)
            missing = [k for k in _CKPT_KEYS.get(kind, ()) if not (isinstance(value, dict) and k in value)]
            if missing:
                raise ValueError(f"not a checkpoint of mdmf-cache (no {', '.join(missing)})")
            state = value["model"] if kind == "best.pt" else {}
    except Exception as e:  # noqa: BLE001 - unpickling a garbled file raises anything (zipfile, pickle, struct errors)
        raise RunFileError(path, f"is damaged ({why(e)})", fix) from e
    bad = _non_finite(state)
    if bad:
        raise RunFileError(path, f"holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run diverged",
                           "train again with a lower --lr into another --out")
    return value


@contextlib.contextmanager
def run_lock(out: Path | str) -> Iterator[None]:
    """Hold ``OUT/.lock`` while one ``train`` writes the run directory ``out``.

    A second ``train`` on the same directory is refused at once, naming the first (its pid and host);
    the lock is released when the process ends, a kill included. A directory this call created and that
    holds nothing but the lock when it ends (the run stopped on a bad input) is removed again.

    Raises:
        ConfigError: the directory is locked, or cannot be created or written.
    """
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e.strerror}): choose an --out on writable storage") from e
    lock = out / ".lock"
    try:
        with process_lock(
            lock,
            busy=lambda holder: ConfigError(f"another train ({holder}) is writing {out}; wait for it to finish (then "
                                            "--resume continues it), or choose another --out"),
            unwritable=lambda e: ConfigError(f"cannot write {lock} ({e.strerror}): choose an --out on writable storage"),
        ):
            try:
                yield
            finally:
                if created and [p.name for p in out.iterdir()] == [".lock"]:
                    lock.unlink(missing_ok=True)
    finally:
        for p in created:  # the directories this call made, if they are empty (nothing of a run was written)
            with contextlib.suppress(OSError):
                p.rmdir()


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


def history_upto(path: Path, done: int) -> list[dict[str, Any]]:
    """Metrics lines of a run written before checkpoints carried them, up to ``done`` episodes."""
    if not path.is_file():
        return []
    return [r for r in read_run_file(path) if r.get("episodes", 0) <= done]


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
    return read_run_file(run / "config.json")


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


def check_backbone(run: Path) -> str:
    """The ``weights_id`` of a full-mode run's ``backbone.pt``, checked against ``best.pt``'s record.

    Raises:
        ConfigError: ``backbone.pt`` is missing or damaged, or is not the backbone of ``best.pt`` (a run
            killed between the two writes: ``train --resume`` rewrites both).
    """
    backbone = run / "backbone.pt"
    if not backbone.is_file():
        raise ConfigError(f"{run} is a full-mode run without backbone.pt; train it first (or --resume it)")
    wid = weights_id(str(backbone))
    recorded = read_run_file(run / "best.pt").get("backbone")
    if recorded != wid:
        read_run_file(backbone)  # a damaged file is named as such, not blamed on a kill
        raise ConfigError(f"{backbone} is not the backbone of {run}/best.pt (the run was stopped between writing "
                          "them); rerun its train command with --resume, which rewrites both")
    return wid


def full_run_backbone(run: Path) -> tuple[Path, str]:
    """A full-mode run's fine-tuned CLIP, ``RUN/backbone.pt``, and its weights id (:func:`check_backbone`)."""
    return Path(run) / "backbone.pt", check_backbone(Path(run))


