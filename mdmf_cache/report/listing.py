"""What exists under a folder: the runs, evaluations, comparisons, ablations and sweeps (``mdmf-cache runs``).

Each kind is known by the small file its command writes first, and summed up from the small JSON/CSV files it
writes (never a feature array, a checkpoint or a study database):

| kind | found by | read | complete when |
|---|---|---|---|
| run | ``config.json`` | ``metrics.jsonl`` | its last metrics line reached the run's episodes and ``best.pt`` exists |
| eval | ``eval_config.json`` | ``results.json`` | ``results.json`` exists |
| compare | ``compare_config.json`` | ``table.csv`` | ``table.csv`` exists |
| ablate | ``ablate_config.json`` | ``ablation.csv`` | ``ablation.csv`` exists |
| sweep | ``sweep.json`` | ``trials.csv`` | ``trials.csv`` holds the sweep's finished trials |

A recorded cache path that is relative is looked up from where the command that wrote it ran (found from its
recorded ``out``), then from the current folder; a fast run's resolved path (``cache_abs``) too. When none of
them holds a cache, the entry's cache is marked moved.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from mdmf_cache.configs import TrainConfig

__all__ = ["Entry", "KINDS", "find_entries", "read_entry"]

#: The kinds, each with the file that marks its folder.
KINDS = {"run": "config.json", "eval": "eval_config.json", "compare": "compare_config.json",
         "ablate": "ablate_config.json", "sweep": "sweep.json"}
#: The kinds whose folders hold runs of their own (not listed unless asked for).
EXPERIMENTS = ("compare", "ablate", "sweep")
#: Folders never searched: feature caches and what only holds them, TensorBoard's event files.
_SKIP = ("eval_cache", "predict_cache", "tensorboard", "__pycache__")


@dataclass
class Entry:
    """One thing found: what it is, where, on which cache, its method and shot, when, its best numbers and whether it
    is complete (``status`` says what is missing otherwise)."""

    kind: str
    path: str
    cache: str = ""  # as recorded (full mode: the video tree)
    cache_moved: bool = False
    method: str = ""
    shot: str = ""
    when: str = ""  # the newest file's mtime, local time, ISO 8601
    best: str = ""  # the best numbers, as text
    scores: dict[str, Any] = field(default_factory=dict)  # the same numbers, for scripts
    complete: bool = False
    status: str = ""
    mtime: float = 0.0

    def record(self) -> dict[str, Any]:
        return asdict(self)


def find_entries(root: Path | str, nested: bool = False) -> list[Entry]:
    """Every entry under ``root`` (``root`` itself included), in path order. Caches (``*.zarr``, any folder with a
    ``zarr.json``), hidden folders and ``tensorboard/`` are not searched; nor, unless ``nested``, the runs inside a
    comparison, an ablation or a sweep (their own entry sums them up)."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        names = set(filenames)
        if "zarr.json" in names:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".zarr") and d not in _SKIP)
        kinds = [k for k, marker in KINDS.items() if marker in names]
        found += [e for e in (read_entry(kind, here) for kind in kinds) if e is not None]
        if not nested and any(k in EXPERIMENTS for k in kinds):
            dirnames[:] = []
    return sorted(found, key=lambda e: (e.path, e.kind))


def read_entry(kind: str, folder: Path) -> Entry | None:
    """The entry of ``kind`` in ``folder`` (None: its marker file is not this project's); a file that cannot be read
    makes an incomplete entry naming it."""
    entry = Entry(kind=kind, path=os.path.normpath(folder))
    entry.mtime = _newest(folder)
    entry.when = datetime.fromtimestamp(entry.mtime).isoformat(timespec="seconds") if entry.mtime else ""
    try:
        _READERS[kind](folder, entry)
    except _Unreadable as e:
        entry.complete, entry.status = False, f"unreadable {e}"
    except _NotOne:
        return None
    return entry


class _Unreadable(Exception):
    """A file of the entry that is damaged (its name)."""


class _NotOne(Exception):
    """The marker file is another tool's (a ``config.json`` that is no run's)."""


def _newest(folder: Path) -> float:
    times = []
    with os.scandir(folder) as it:
        for d in it:
            try:
                if d.is_file():
                    times.append(d.stat().st_mtime)
            except OSError:
                continue
    return max(times, default=0.0)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _Unreadable(path.name) from e
    if not isinstance(value, dict):
        raise _Unreadable(path.name)
    return value


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise _Unreadable(path.name) from e


def _float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _cache(entry: Entry, folder: Path, recorded: str | None, out: str | None, *also: str | None) -> None:
    """``entry.cache`` and whether it moved: the recorded path, looked up as :mod:`this module <mdmf_cache.report.listing>`
    says (``out``: the command's recorded ``--out``, which tells from where it ran)."""
    if not recorded:
        return
    entry.cache = recorded
    candidates = [Path(p) for p in (recorded, *also) if p]
    base = _origin(folder, out)
    if base is not None and not Path(recorded).is_absolute():
        candidates.insert(0, base / recorded)
    entry.cache_moved = not any((p / "zarr.json").is_file() for p in candidates)


def _origin(folder: Path, out: str | None) -> Path | None:
    """The folder the command ran in: ``folder`` (absolute) without the trailing parts of a relative ``out``."""
    if not out or Path(out).is_absolute():
        return None
    parts = [p for p in Path(out).parts if p not in (".", "")]
    here = folder.resolve()
    if ".." in parts or not parts or list(here.parts[-len(parts):]) != parts:
        return None
    return Path(*here.parts[:-len(parts)]) if len(here.parts) > len(parts) else Path(here.anchor)


def _metrics(path: Path) -> list[dict[str, Any]]:
    """A run's metrics lines; a last line cut by a kill is dropped."""
    lines = []
    try:
        text = path.read_text()
    except OSError as e:
        raise _Unreadable(path.name) from e
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in lines if isinstance(r, dict)]


def _run(folder: Path, e: Entry) -> None:
    cfg = _json(folder / "config.json")
    if "episodes" not in cfg:
        raise _NotOne
    e.method = str(cfg.get("method", "mdmf"))
    e.shot = str(cfg.get("shot", ""))
    if cfg.get("mode") == "full":
        full = cfg.get("full") or {}
        root = full.get("root")
        e.cache = f"{full.get('dataset', '')} videos {root or ''}".strip()
        base = _origin(folder, cfg.get("out"))
        e.cache_moved = bool(root) and not any(p.is_dir() for p in
                                               [Path(root), *((base / root,) if base and not Path(root).is_absolute() else ())])
        e.method += " (full)"
    else:
        _cache(e, folder, cfg.get("cache"), cfg.get("out"), cfg.get("cache_abs"))
    lines = _metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    done = max((int(r.get("episodes", 0)) for r in lines), default=0)
    vals = [(v, int(r.get("episodes", 0))) for r in lines if (v := _float(r.get("val_acc"))) is not None]
    total = int(cfg["episodes"])
    e.scores = {"episodes": done, "of": total}
    if vals:
        best, at = max(vals, key=lambda x: x[0])
        e.scores.update(best_val=best, best_at=at)
        e.best = f"val {best:.2f}% at {at}"
    has_best = (folder / "best.pt").is_file()
    e.complete = done >= total and has_best
    e.status = ("complete" if e.complete else f"stopped at {done}/{total} episodes" if done < total
                else "no best.pt")


def _eval(folder: Path, e: Entry) -> None:
    cfg = _json(folder / "eval_config.json")
    e.method = str((cfg.get("resolved") or {}).get("method") or cfg.get("method", ""))
    e.shot = ",".join(map(str, cfg.get("shots") or ()))
    target = cfg.get("target") or ""
    if not (folder / "results.json").is_file():
        if target.endswith(".zarr"):
            _cache(e, folder, target, cfg.get("out"))
        e.status = "no results.json (rerun the eval command)"
        return
    res = _json(folder / "results.json")
    out = cfg.get("out") or (str(Path(target) / folder.name) if target else None)  # eval's default: in its target
    _cache(e, folder, res.get("cache") or target, out)
    e.method = str(res.get("method", e.method))
    shots = res.get("shots") or {}
    e.shot = ",".join(shots) or e.shot
    e.scores = {f"{k}shot": s.get("accuracy") for k, s in shots.items()}
    e.scores.update({f"{k}shot_ci95": s.get("ci95") for k, s in shots.items()})
    e.best = ", ".join(f"{k}-shot {s['accuracy']:.2f} ± {s['ci95']:.2f}" for k, s in shots.items()
                       if _float(s.get("accuracy")) is not None and _float(s.get("ci95")) is not None)
    e.complete, e.status = True, "complete"


def _compare(folder: Path, e: Entry) -> None:
    cfg = _json(folder / "compare_config.json")
    methods, shots, ref = list(cfg.get("methods") or ()), list(cfg.get("shots") or ()), cfg.get("reference", "")
    _cache(e, folder, cfg.get("cache"), cfg.get("out"))
    e.method = ",".join(methods)
    e.shot = ",".join(map(str, shots))
    if not (folder / "table.csv").is_file():
        scored = sum((folder / "scores" / f"{m}_{k}shot.npy").is_file() for m in methods for k in shots)
        e.status = f"no table.csv ({scored}/{len(methods) * len(shots)} scored; rerun the compare command)"
        return
    rows = _csv(folder / "table.csv")
    row = next((r for r in rows if r.get("method") == ref), None)
    if row is not None:
        e.scores = {"reference": ref, **{f"{k}shot": _float(row.get(f"{k}shot")) for k in shots},
                    **{f"{k}shot_ci95": _float(row.get(f"{k}shot_ci95")) for k in shots}}
        cells = [f"{k}-shot {e.scores[f'{k}shot']:.2f}" + (f" ± {ci:.2f}" if (ci := e.scores[f"{k}shot_ci95"]) is not None
                                                           else "")
                 for k in shots if e.scores[f"{k}shot"] is not None]
        e.best = f"{ref}: " + ", ".join(cells)
    e.complete, e.status = True, "complete"


def _ablate(folder: Path, e: Entry) -> None:
    cfg = _json(folder / "ablate_config.json")
    _cache(e, folder, cfg.get("cache"), cfg.get("out"))
    table = cfg.get("table")
    e.method = f"mdmf {cfg.get('preset', '')}".strip() + (f", table {table}" if table is not None else "")
    e.shot = str(cfg.get("shot", ""))
    if not (folder / "ablation.csv").is_file():
        e.status = "no ablation.csv (rerun the ablate command)"
        return
    rows = [(r.get("arm", ""), _float(r.get("accuracy"))) for r in _csv(folder / "ablation.csv")]
    rows = [(arm, acc) for arm, acc in rows if acc is not None]
    if rows:
        e.scores = {arm: acc for arm, acc in rows}
        arm, acc = max(rows, key=lambda x: x[1])
        full = e.scores.get("full")
        e.best = (f"full {full:.2f}, " if full is not None and arm != "full" else "") + f"best {arm} {acc:.2f}"
    e.complete, e.status = True, "complete"


def _sweep(folder: Path, e: Entry) -> None:
    cfg = _json(folder / "sweep.json")
    fixed = cfg.get("fixed") or {}
    _cache(e, folder, cfg.get("cache"), cfg.get("out"))
    e.method = str(fixed.get("method", "mdmf"))
    e.shot = str(fixed.get("shot", TrainConfig.shot))
    want = int(cfg.get("trials", 0))
    if not (folder / "trials.csv").is_file():
        e.status = f"no trials.csv (rerun the sweep with --resume, or mdmf-cache sweep show {folder})"
        return
    rows = _csv(folder / "trials.csv")
    finished = sum(r.get("state") in ("COMPLETE", "PRUNED") for r in rows)
    done = [(v, r.get("number", "")) for r in rows if r.get("state") == "COMPLETE" and (v := _float(r.get("value"))) is not None]
    e.scores = {"trials": finished, "of": want}
    if done:
        best, number = max(done, key=lambda x: x[0])
        e.scores.update(best_val=best, best_trial=int(number) if str(number).isdigit() else number)
        e.best = f"trial {number}: val {best:.2f}%"
    e.complete = finished >= want
    e.status = "complete" if e.complete else f"{finished}/{want} trials (rerun the sweep with --resume)"


_READERS: dict[str, Callable[[Path, Entry], None]] = {"run": _run, "eval": _eval, "compare": _compare,
                                                       "ablate": _ablate, "sweep": _sweep}
