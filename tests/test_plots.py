"""Figures: each function writes a PNG of the size it promises from a small fixture; recipes never fail on a plot."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

import mdmf_cache.report.plots as plots


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def expected(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * plots.FIG_DPI), round(size[1] * plots.FIG_DPI)


def check(path: Path, size: tuple[float, float]) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path  # drawn, not an empty canvas
    assert png_size(path) == expected(size), path


def test_train_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"episodes": e, "loss": 2.0 / (i + 1), "main": 1.5 / (i + 1), "distill": 0.5 / (i + 1), "val_acc": 40 + 5 * i}
             for i, e in enumerate((100, 200, 300))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "config.json").write_text(json.dumps({"way": 5, "shot": 1, "lr": 1e-3}))
    check(plots.train_curves(run), plots.WIDE)
    (tmp_path / "empty").mkdir()
    assert plots.train_curves(tmp_path / "empty") is None


def test_eval_figures(tmp_path):
    classes = {f"class {i}": 10.0 * i for i in range(7)} | {"unseen": None}
    res = {"method": "mdmf", "split": "test", "way": 5,
           "shots": {str(k): {"accuracy": 50.0 + k, "ci95": 1.0, "episodes": 100, "per_class": classes} for k in (1, 5)}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    paths = plots.eval_figures(tmp_path)
    assert [p.name for p in paths] == ["per_class_1shot.png", "per_class_5shot.png", "accuracy_vs_shot.png"]
    check(paths[0], plots.per_class_size(len(classes)))
    check(paths[2], plots.SINGLE)


def test_ablate_and_lambda_figures(tmp_path):
    rows = [{"arm": f"lambda={lam:g}", "accuracy": 60 + 5 * lam - 2 * lam * lam, "ci95": 1.2, "episodes": 500}
            for lam in (0.25, 0.5, 1.0, 2.0)]
    with (tmp_path / "ablation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths = plots.ablate_figures(tmp_path)
    assert [p.name for p in paths] == ["ablation.png", "lambda.png"]
    check(paths[1], plots.SINGLE)
    # a variant beside full: accuracy and the paired difference, two panels
    paired = [{"arm": "full", "accuracy": 60.0, "ci95": 1.0}, {"arm": "pps=False", "accuracy": 57.0, "ci95": 1.1,
                                                                 "diff_vs_full": -3.0, "diff_ci95": 0.6}]
    path = plots.plot_ablation(paired, tmp_path / "paired.png")
    check(path, (9.0, max(3.0, 0.35 * 2 + 1.5)))


def test_sweep_figures(tmp_path):
    rows = [{"number": i, "state": "PRUNED" if i % 3 == 2 else "COMPLETE", "value": 50.0 + (i * 7) % 11,
             "params": {"lr": 10 ** (-4 + i / 4), "lambda": 0.2 * i, "episodes-per-step": (8, 16)[i % 2]}}
            for i in range(9)]
    check(plots.plot_history(rows, tmp_path / "history.png"), plots.SINGLE)
    scales = {"lr": "log", "lambda": "linear", "episodes-per-step": "categorical"}
    check(plots.plot_params(rows, scales, tmp_path / "params.png"), plots.params_size(3))
    check(plots.plot_importances({"lr": 0.7, "lambda": 0.2, "episodes-per-step": 0.1}, tmp_path / "imp.png"),
          (6.4, max(3.0, 0.35 * 3 + 1.2)))


def test_a_failing_plot_is_a_warning(tmp_path, caplog):
    def broken(_):
        raise ValueError("no data")

    assert plots.plot_safely(broken, tmp_path) is None
    assert "could not draw broken: ValueError: no data" in caplog.text


def test_redraw_refuses_an_unknown_directory(tmp_path):
    from mdmf_cache.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to plot"):
        plots.redraw(tmp_path)
