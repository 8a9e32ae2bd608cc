"""Figures written next to the results (matplotlib PNG, Agg backend, imported lazily).

Each ``plot_*`` function takes plain data and an output path, draws one figure of a fixed size
(``FIG_DPI`` dots per inch) and returns the path. The ``*_figures`` functions read what a recipe
wrote (``metrics.jsonl``, ``results.json``, ``ablation.csv``) and draw all of its figures;
``mdmf-cache plot`` calls them. :func:`plot_safely` is how recipes call them at the end of a run:
a failure to plot is logged and never fails the run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FIG_DPI = 100
WIDE = (9.0, 4.0)  # inches: two panels side by side
SINGLE = (6.4, 4.0)


def _figure(size: tuple[float, float]):
    """A pyplot-free Figure on the Agg canvas (thread safe, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=FIG_DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=FIG_DPI)  # a fixed canvas: no bbox_inches="tight", so the size is known
    tmp.replace(path)
    return path


def _label(ax, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    """Axis labels (with units), a light grid, the legend and a title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)


def plot_safely(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a figure function; log a warning instead of raising (figures are never worth a failed run)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any plotting problem (missing matplotlib, odd data) is only a warning
        log.warning("could not draw %s: %s: %s", getattr(fn, "__name__", fn), type(e).__name__, e)
        return None


# ---------------------------------------------------------------------------------------------- train


def plot_train_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Loss (total, main, distillation) and val accuracy against training episodes."""
    fig = _figure(WIDE)
    ax_loss, ax_acc = fig.subplots(1, 2)
    eps = [m["episodes"] for m in metrics]
    for key, style in (("loss", "-o"), ("main", "--"), ("distill", ":")):
        if any(key in m for m in metrics):
            ax_loss.plot(eps, [m.get(key, math.nan) for m in metrics], style, ms=3,
                         label={"loss": "total", "main": "classification", "distill": "distillation"}[key])
    _label(ax_loss, "training episodes", "loss (mean since last validation)")
    acc = [m["val_acc"] for m in metrics]
    ax_acc.plot(eps, acc, "-o", ms=3, color="C2", label="val accuracy")
    if acc:
        i = max(range(len(acc)), key=acc.__getitem__)
        ax_acc.plot([eps[i]], [acc[i]], "*", ms=12, color="C3", label=f"best {acc[i]:.1f}% (best.pt)")
    _label(ax_acc, "training episodes", "val accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def train_curves(run: Path | str) -> Path | None:
    """``RUN/curves.png`` from ``RUN/metrics.jsonl`` (fast or full mode); None when nothing was logged."""
    from mdmf_cache.store.runs import read_run_file

    run = Path(run)
    metrics = read_run_file(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    if not metrics:
        return None
    cfg = read_run_file(run / "config.json") if (run / "config.json").is_file() else {}
    lr = f"{cfg['lr']:.3g}" if isinstance(cfg.get("lr"), (int, float)) else "?"
    title = f"{run.name}: {cfg.get('way', '?')}-way {cfg.get('shot', '?')}-shot, lr {lr}" if cfg else run.name
    return plot_train_curves(metrics, run / "curves.png", title)


# ----------------------------------------------------------------------------------------------- eval


def per_class_size(num_classes: int) -> tuple[float, float]:
    """Figure size (inches) of the per-class chart: one 0.22-inch row per class."""
    return (8.0, max(3.0, 0.22 * num_classes + 1.2))


def plot_per_class(per_class: dict[str, float | None], path: Path, title: str = "") -> Path:
    """Horizontal bars, one per class, sorted by accuracy (classes no query landed on are left out)."""
    items = sorted(((c, a) for c, a in per_class.items() if a is not None), key=lambda x: x[1])
    fig = _figure(per_class_size(len(per_class)))
    ax = fig.subplots()
    ax.barh(range(len(items)), [a for _, a in items], color="C0")
    ax.set_yticks(range(len(items)), [c for c, _ in items], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%) over the queries of that class")
    ax.grid(axis="x", alpha=0.3)
    if items:
        mean = sum(a for _, a in items) / len(items)
        ax.axvline(mean, color="C3", ls="--", lw=1, label=f"mean of classes {mean:.1f}%")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_accuracy_vs_shot(shots: list[int], acc: list[float], ci: list[float], path: Path, title: str = "") -> Path:
    """Accuracy against K with 95% CI bars."""
    fig = _figure(SINGLE)
    ax = fig.subplots()
    ax.errorbar(shots, acc, yerr=ci, fmt="-o", capsize=4)
    ax.set_xticks(shots)
    _label(ax, "shots K (support videos per class)", "accuracy (%), 95% CI", title, legend=False)
    return _save(fig, path)


def eval_figures(out: Path | str) -> list[Path]:
    """``per_class_{K}shot.png`` for every shot and ``accuracy_vs_shot.png`` when several shots ran."""
    out = Path(out)
    res = json.loads((out / "results.json").read_text())
    what = f"{res.get('method', '')} on {res.get('split', '')}, {res.get('way', '?')}-way"
    paths = []
    for shot, r in res["shots"].items():
        if r.get("per_class"):
            paths.append(plot_per_class(r["per_class"], out / f"per_class_{shot}shot.png",
                                        f"{what} {shot}-shot: {r['accuracy']:.1f} ± {r['ci95']:.1f}% "
                                        f"({r['episodes']} episodes)"))
    if len(res["shots"]) > 1:
        shots = sorted(res["shots"], key=int)
        paths.append(plot_accuracy_vs_shot([int(s) for s in shots], [res["shots"][s]["accuracy"] for s in shots],
                                           [res["shots"][s]["ci95"] for s in shots], out / "accuracy_vs_shot.png", what))
    return paths


# --------------------------------------------------------------------------------------------- ablate


def plot_ablation(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Each arm's accuracy with its CI; beside it, each arm's paired difference to ``full`` with its CI."""
    paired = [r for r in rows if r.get("diff_vs_full") not in (None, "")]
    fig = _figure((9.0, max(3.0, 0.35 * len(rows) + 1.5)))
    axes = fig.subplots(1, 2 if paired else 1, squeeze=False)[0]
    names = [r["arm"] for r in rows]
    ax = axes[0]
    # points with CI bars, not bars: the axis does not start at 0, and a truncated bar would mislead
    ax.errorbar([float(r["accuracy"]) for r in rows], range(len(rows)), xerr=[float(r["ci95"]) for r in rows],
                fmt="o", capsize=3, color="C0")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.margins(x=0.1)
    ax.set_xlabel("test accuracy (%), 95% CI")
    ax.grid(axis="x", alpha=0.3)
    if paired:
        ax2 = axes[1]
        idx = [names.index(r["arm"]) for r in paired]
        diffs = [float(r["diff_vs_full"]) for r in paired]
        ax2.barh(idx, diffs, xerr=[float(r["diff_ci95"]) for r in paired], capsize=3,
                 color=["C2" if d >= 0 else "C3" for d in diffs])
        ax2.set_yticks(range(len(rows)), names, fontsize=8)
        ax2.set_ylim(axes[0].get_ylim())
        ax2.axvline(0, color="k", lw=0.8)
        lim = max(abs(d) + float(r["diff_ci95"]) for d, r in zip(diffs, paired)) * 1.15 or 1.0
        ax2.set_xlim(-lim, lim)
        ax2.set_xlabel("arm - full (points), paired 95% CI")
        ax2.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_lambda(lams: list[float], acc: list[float], ci: list[float], path: Path, title: str = "") -> Path:
    """Accuracy against the distillation weight lambda with 95% CI bars (the paper's Fig. 4)."""
    fig = _figure(SINGLE)
    ax = fig.subplots()
    order = sorted(range(len(lams)), key=lams.__getitem__)
    ax.errorbar([lams[i] for i in order], [acc[i] for i in order], yerr=[ci[i] for i in order], fmt="-o", capsize=4)
    best = max(order, key=acc.__getitem__)
    ax.plot([lams[best]], [acc[best]], "*", ms=12, color="C3", label=f"best: lambda = {lams[best]:g}")
    _label(ax, "distillation weight lambda", "test accuracy (%), 95% CI", title)
    return _save(fig, path)


def lambda_of_arm(name: str) -> float | None:
    """The lambda of an arm named ``lambda=0.5`` (``ablate --lambda``), else None."""
    if name.startswith("lambda="):
        try:
            return float(name.split("=", 1)[1])
        except ValueError:
            return None
    return None


def ablate_figures(out: Path | str) -> list[Path]:
    """``ablation.png`` from ``ablation.csv``, and ``lambda.png`` when the arms are a lambda grid."""
    out = Path(out)
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    title = f"ablation on {rows[0].get('episodes', '?')} identical test episodes"
    paths = [plot_ablation(rows, out / "ablation.png", title)]
    lam = [(lambda_of_arm(r["arm"]), r) for r in rows]
    lam = [(v, r) for v, r in lam if v is not None]
    if len(lam) >= 2:
        paths.append(plot_lambda([v for v, _ in lam], [float(r["accuracy"]) for _, r in lam],
                                 [float(r["ci95"]) for _, r in lam], out / "lambda.png", title))
    return paths


# ---------------------------------------------------------------------------------------------- sweep


def plot_history(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Each trial's val accuracy in trial order, pruned trials marked, and the best so far."""
    fig = _figure(SINGLE)
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get("value") is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r.get("value") is not None]
    ax.plot([r["number"] for r in done], [r["value"] for r in done], "o", color="C0", label="complete (its best val)")
    ax.plot([r["number"] for r in pruned], [r["value"] for r in pruned], "x", color="C7",
            label="pruned (last val before stopping)")
    best, xs, ys = -math.inf, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        best = max(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="C3", label="best so far")
    _label(ax, "trial number", "val accuracy of the trial (%)", title)
    return _save(fig, path)


def plot_importances(importances: dict[str, float], path: Path, title: str = "") -> Path:
    """Horizontal bars of the parameters' importances (Optuna's evaluator, normalised to sum 1)."""
    items = sorted(importances.items(), key=lambda x: x[1])
    fig = _figure((6.4, max(3.0, 0.35 * len(items) + 1.2)))
    ax = fig.subplots()
    ax.barh(range(len(items)), [v for _, v in items], color="C0")
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=9)
    ax.set_xlabel("importance for val accuracy (fraction, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "parameter importances", fontsize=10)
    return _save(fig, path)


def params_size(num_params: int) -> tuple[float, float]:
    """Figure size (inches) of the accuracy-vs-parameter grid: 3 panels per row."""
    rows = max(1, math.ceil(num_params / 3))
    return (3.3 * min(3, max(1, num_params)), 2.9 * rows)


def _ordered(values: set[Any]) -> list[Any]:
    """Numbers in numeric order (8 before 16), anything else as text."""
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return sorted(values, key=str)


def plot_params(rows: list[dict[str, Any]], params: dict[str, str], path: Path, title: str = "") -> Path:
    """Val accuracy against each swept parameter, one panel each.

    Args:
        rows: trials with ``state``, ``value`` and ``params`` (name -> value).
        params: swept parameter name -> ``"log"``, ``"linear"`` or ``"categorical"`` (the x axis).
    """
    names = list(params)
    fig = _figure(params_size(len(names)))
    axes = fig.subplots(max(1, math.ceil(len(names) / 3)), min(3, max(1, len(names))), squeeze=False).flatten()
    for ax, name in zip(axes, names):
        for state, marker, color in (("COMPLETE", "o", "C0"), ("PRUNED", "x", "C7")):
            pts = [(r["params"][name], r["value"]) for r in rows
                   if r["state"] == state and r.get("value") is not None and name in r["params"]]
            if params[name] == "categorical":
                cats = [str(v) for v in _ordered({r["params"][name] for r in rows if name in r["params"]})]
                xs = [cats.index(str(x)) for x, _ in pts]
                ax.set_xticks(range(len(cats)), cats, fontsize=8)
            else:
                xs = [x for x, _ in pts]
            ax.plot(xs, [y for _, y in pts], marker, color=color, ms=4, ls="none",
                    label="complete" if state == "COMPLETE" else "pruned")
        if params[name] == "log":
            ax.set_xscale("log")
        _label(ax, name + (" (log scale)" if params[name] == "log" else ""), "val accuracy (%)", legend=False)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if names:  # one legend for all panels, under them, so it never hides a point
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- redraw


def redraw(target: Path | str, allow_empty: bool = False) -> list[Path]:
    """Every figure of a run, evaluation or ablation directory (and of the evaluations inside a run).

    A sweep directory's figures come from its study (``mdmf_cache.sweeps.summary.summarize``); ``allow_empty``
    says the caller drew those, so finding nothing else here is no error.
    """
    from mdmf_cache.errors import ConfigError

    target = Path(target)
    paths: list[Path | None] = []
    if (target / "metrics.jsonl").is_file():
        paths.append(train_curves(target))
    if (target / "results.json").is_file():
        paths += eval_figures(target)
    if (target / "ablation.csv").is_file():
        paths += ablate_figures(target)
    for sub in sorted(target.glob("*/results.json")) if target.is_dir() else []:
        paths += eval_figures(sub.parent)
    if not any(p is not None for p in paths) and not allow_empty:
        raise ConfigError(f"{target}: nothing to plot (expected a run, eval, ablation or sweep directory)")
    return [p for p in paths if p is not None]


# -------------------------------------------------------------------------------------------- compare


def compare_figure(rows: list[dict[str, Any]], shots: tuple[int, ...], path: Path, title: str = "") -> Path:
    """Accuracy against K per method (95% CI bars; with several training seeds each seed's mean as a small x), the
    reported numbers as open markers on their backbone."""
    fig = _figure(WIDE)
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        x = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(shots))]
        ax.errorbar(x, [r[f"{k}shot"] for k in shots], yerr=[r[f"{k}shot_ci95"] for k in shots], fmt="o", capsize=3,
                    color=f"C{i}", label=r["method"] + (" † (transductive)" if r.get("transductive") else ""))
        seeds = [(xi, r[key]) for xi, k in zip(x, shots) for key in r if key.startswith(f"{k}shot_seed")
                 and key[len(f"{k}shot_seed"):].isdigit()]  # each training seed's mean, when there are several
        if seeds:
            ax.plot([a for a, _ in seeds], [b for _, b in seeds], "x", color=f"C{i}", ms=4, alpha=0.7)
        rep = [(xi, r[f"{k}shot_reported"]) for xi, k in zip(x, shots) if f"{k}shot_reported" in r]
        if rep:
            ax.plot([a for a, _ in rep], [b for _, b in rep], "D", mfc="none", color=f"C{i}", ms=6)
    ax.set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
    ax.plot([], [], "D", mfc="none", color="gray", label="reported (its paper's backbone)")
    _label(ax, "", "test accuracy (%), 95% CI", title)
    return _save(fig, path)
