"""What a sweep's study holds, written out: ``trials.csv``, ``trials.md``, ``best.json`` (for ``mdmf-cache train
--config``) and the figures. :func:`summarize` runs at the end of :func:`pipelines.sweep.run_sweep` and on
``mdmf-cache sweep show``; it reads the study alone, so any worker's machine can write them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mdmf_cache.fileio import atomic_write_csv, atomic_write_text
from mdmf_cache.sweeps.space import Dim
from mdmf_cache.sweeps.study import SweepConfig, open_storage

__all__ = ["trial_rows", "write_tables", "summarize", "sweep_figures"]


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value (best val %; a pruned trial's last), params, timing."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({
            "number": t.number, "state": t.state.name, "value": value, "params": dict(t.params),
            "episodes": max(t.intermediate_values) if t.intermediate_values else None,
            "seconds": seconds, "train_s": t.user_attrs.get("train_s"), "worker": t.user_attrs.get("worker"),
            "run": (t.user_attrs.get("config") or {}).get("out"), "note": t.user_attrs.get("skipped", ""),
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "" if v is None else str(v)


def write_tables(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``trials.csv`` and ``trials.md``: every trial, best first among the complete ones."""
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    cols = ["number", "state", "value", *params, "episodes", "seconds", "worker", "run", "note"]
    order = sorted(rows, key=lambda r: (r["state"] != "COMPLETE", -(r["value"] if r["value"] is not None else -1e9), r["number"]))
    flat = [{**{k: r.get(k) for k in cols if k not in params}, **{k: r["params"].get(k) for k in params}} for r in order]

    atomic_write_csv(out / "trials.csv", flat, cols)
    head = ["trial", "state", "val %", *params, "episodes", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in flat:
        vals = [r["number"], r["state"], r["value"], *(r[k] for k in params), r["episodes"], r["seconds"]]
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")
    return out / "trials.csv", out / "trials.md"


def summarize(cfg: SweepConfig, figures: bool = True) -> dict[str, Any]:
    """Tables, ``best.json`` and figures of the study; returns the rows and the best trial."""
    import optuna

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg, create=False))
    rows = trial_rows(study)
    write_tables(rows, out)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    result: dict[str, Any] = {"rows": rows, "out": str(out), "best": None, "figures": []}
    if best is not None:
        train_cfg = dict(best.user_attrs["config"])
        train_cfg.update(out=f"runs/{cfg.study_name}_best", resume=False)
        train_cfg["sweep"] = {"study": cfg.study_name, "trial": best.number, "val_acc": best.value,
                              "params": dict(best.params), "run": best.user_attrs["config"]["out"]}
        atomic_write_text(out / "best.json", json.dumps(train_cfg, indent=2) + "\n")
        result["best"] = train_cfg["sweep"]
    if figures:
        result["figures"] = sweep_figures(study, rows, out)
    return result


def sweep_figures(study, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``history.png``, ``importances.png`` (>= 3 complete trials) and ``params.png``."""
    from mdmf_cache.report.plots import plot_history, plot_importances, plot_params, plot_safely

    settings = study.user_attrs.get("mdmf_sweep", {})
    scales = {name: Dim(**d).scale for name, d in settings.get("space", {}).items()}
    name = study.study_name
    paths = [plot_safely(plot_history, rows, out / "history.png", f"sweep {name}: val accuracy per trial")]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if len(complete) >= 3 and scales:
        importances = plot_safely(_importances, study)
        if importances:
            paths.append(plot_safely(plot_importances, importances, out / "importances.png",
                                     f"sweep {name}: what drives val accuracy ({len(complete)} complete trials)"))
    if scales:
        paths.append(plot_safely(plot_params, rows, scales, out / "params.png", f"sweep {name}: val accuracy per parameter"))
    return [p for p in paths if p]


def _importances(study) -> dict[str, float]:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = optuna.importance.get_param_importances(study)
    return {k: float(v) for k, v in imp.items() if not math.isnan(v)}

