"""bench/scale.py --quick runs end to end and prints its JSON line (figures sane, not timed).

Its ``main`` runs in this process (no interpreter of its own to start and load torch and open_clip into); every
figure it takes from a fresh process (load, export, eval, the --jobs 2 sweep) still comes from one."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KEYS = {"bench", "rows", "views", "dim", "load_peak_over_features", "extract_rerun_s", "extract_first_rerun_s",
        "info_s", "verify_s", "export_peak_over_array", "sweep_jobs2_over_one_copy", "sweep_one_copy_gb",
        "sweep_jobs2_peak_pss_gb", "eval_peak_rss_gb", "eval_above_start_gb"}


def test_scale_bench_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    try:
        scale.main(["--quick", "--views", "2", "--dir", str(tmp_path)])
    finally:
        logging.disable(logging.NOTSET)  # the bench silences warnings for its whole process
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON line comes last
    assert KEYS <= set(out), KEYS - set(out)
    assert out["bench"] == "scale" and (out["rows"], out["views"], out["dim"]) == (2000, 2, 64)
    # peak memory over the features a load returns: at least the features themselves, and not absurd (a few MB
    # of features, so the fixed costs of a load weigh in; at scale the bench reads ~1.0)
    assert math.isfinite(out["load_peak_over_features"]) and 0.5 < out["load_peak_over_features"] < 50
    assert math.isfinite(out["export_peak_over_array"]) and out["export_peak_over_array"] > 0
    assert all(out[k] >= 0 for k in ("extract_rerun_s", "extract_first_rerun_s", "info_s", "verify_s"))
    # a --jobs 2 sweep: three processes with torch loaded hold far more than a few MB of features (at 67,013 x 4
    # x 1024 the bench reads 1.87, and 2.89 with a copy per worker)
    assert 0 < out["sweep_one_copy_gb"] < out["sweep_jobs2_peak_pss_gb"] and 1 < out["sweep_jobs2_over_one_copy"] < 5000
    # eval of 200 episodes: a process with torch and the model, its rise above that start small at this size
    assert 0 <= out["eval_above_start_gb"] < out["eval_peak_rss_gb"] < 8
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
