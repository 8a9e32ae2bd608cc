"""mdmf-cache runs: what exists under a folder, read from the small files each command writes.

What is checked: a finished run, an evaluation of it and a run stopped after its first validation are listed with
their kind, cache, method, shot, best numbers and completeness; comparisons, an ablation and a sweep (their files
written by the code that writes them) likewise, a finished comparison with its reference row, an unfinished one
with what it lacks; a recorded cache that is gone is marked moved, a relative one is found from where its command
ran; the runs inside an experiment are listed only with ``--all``; ``--json`` prints the same rows as JSON lines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mdmf_cache.configs import EvalConfig, TrainConfig
from pipelines.evaluate import run as run_eval
from pipelines.runs import RunsConfig, run as list_runs
from pipelines.train import run as run_train

pytestmark = pytest.mark.integration


class _Stop(Exception):
    pass


def _stop(done: int, acc: float) -> None:
    raise _Stop  # ends the run after its first validation, as a kill would after last.pt


@pytest.fixture(scope="module")
def tree(demo_cache, tmp_path_factory):
    """``root/`` with a finished run and its eval, a stopped run, two comparisons, an ablation and a sweep."""
    from mdmf_cache.sweeps.summary import write_tables as sweep_tables
    from pipelines.compare import write_tables as compare_tables

    root = tmp_path_factory.mktemp("listing")
    train = dict(cache=str(demo_cache), episodes=32, episodes_per_step=8, val_every=16, val_episodes=50, lr=1e-3,
                 shot=1, train_queries=2, device="cpu")
    done = run_train(TrainConfig(out=str(root / "runs" / "done"), **train), progress=False, show=False)
    with pytest.raises(_Stop):
        run_train(TrainConfig(out=str(root / "runs" / "stopped"), **train), progress=False, show=False, on_val=_stop)
    ev = run_eval(EvalConfig(target=str(root / "runs" / "done"), shots=(1,), episodes=50, device="cpu"), progress=False,
                  show=False)

    # a finished comparison (on a cache that is gone), with a run inside it; an unfinished one on a relative cache
    cmp = root / "results" / "cmp"
    (cmp / "runs" / "mdmf_1shot").mkdir(parents=True)
    (cmp / "runs" / "mdmf_1shot" / "config.json").write_text(json.dumps({**train, "episodes": 32, "out": "x"}))
    (cmp / "compare_config.json").write_text(json.dumps({"cache": str(root / "gone.zarr"), "out": str(cmp),
                                                         "methods": ["mdmf", "protonet"], "shots": [1, 5],
                                                         "reference": "mdmf"}))
    compare_tables(cmp, [{"method": "mdmf", "1shot": 41.5, "1shot_ci95": 1.25, "5shot": 60.0, "5shot_ci95": 1.0},
                         {"method": "protonet", "1shot": 30.0, "1shot_ci95": 1.0, "1shot_diff": -11.5,
                          "1shot_diff_ci95": 1.0, "5shot": 50.0, "5shot_ci95": 1.0, "5shot_diff": -10.0,
                          "5shot_diff_ci95": 1.0}], (1, 5))
    half = root / "results" / "half"
    (half / "scores").mkdir(parents=True)
    np.save(half / "scores" / "mdmf_1shot.npy", np.zeros(3))
    (root / "cache" / "here.zarr").mkdir(parents=True)
    (root / "cache" / "here.zarr" / "zarr.json").write_text("{}")
    (half / "compare_config.json").write_text(json.dumps({"cache": "cache/here.zarr", "out": "results/half",
                                                          "methods": ["mdmf", "otam"], "shots": [1],
                                                          "reference": "mdmf"}))
    # an ablation and an unfinished sweep
    abl = root / "ablate"
    abl.mkdir()
    (abl / "ablate_config.json").write_text(json.dumps({"cache": str(demo_cache), "out": str(abl), "preset": "paper",
                                                        "shot": 5}))
    (abl / "ablation.csv").write_text("arm,accuracy,ci95,episodes\nfull,50.0,1.0,100\npps=False,48.5,1.0,100\n")
    sw = root / "sweeps" / "s"
    sw.mkdir(parents=True)
    (sw / "sweep.json").write_text(json.dumps({"cache": str(demo_cache), "out": str(sw), "trials": 4,
                                               "fixed": {"method": "clip-fsar", "shot": 1}}))
    sweep_tables([{"number": 0, "state": "COMPLETE", "value": 40.0, "params": {"lr": 1e-3}, "episodes": 32},
                  {"number": 1, "state": "COMPLETE", "value": 45.5, "params": {"lr": 1e-2}, "episodes": 32},
                  {"number": 2, "state": "PRUNED", "value": 20.0, "params": {"lr": 1e-5}, "episodes": 16}], sw)
    return root, done, ev


def test_runs_lists_every_kind_with_its_numbers_and_completeness(tree, demo_cache, tmp_path, monkeypatch):
    root, done, ev = tree
    monkeypatch.chdir(tmp_path)  # not where the relative cache path was written from
    rows = {r["path"].removeprefix(str(root) + "/"): r for r in list_runs(RunsConfig(dir=str(root)), show=False)}
    assert {p: r["kind"] for p, r in rows.items()} == {
        "runs/done": "run", "runs/done/eval_mdmf_test": "eval", "runs/stopped": "run", "results/cmp": "compare",
        "results/half": "compare", "ablate": "ablate", "sweeps/s": "sweep"}  # not the run inside results/cmp

    run = rows["runs/done"]
    assert run["complete"] and run["cache"] == str(demo_cache) and not run["cache_moved"]
    assert (run["method"], run["shot"]) == ("mdmf", "1")
    assert run["scores"]["best_val"] == pytest.approx(done["best_val"]) and run["scores"]["episodes"] == 32
    assert run["when"] and run["mtime"] > 0
    stopped = rows["runs/stopped"]
    assert not stopped["complete"] and stopped["status"] == "stopped at 16/32 episodes"
    assert stopped["scores"]["best_at"] == 16
    evr = rows["runs/done/eval_mdmf_test"]
    assert evr["complete"] and evr["scores"]["1shot"] == pytest.approx(ev["shots"]["1"]["accuracy"])
    assert evr["cache"] == str(demo_cache) and not evr["cache_moved"]

    cmp = rows["results/cmp"]
    assert cmp["complete"] and cmp["cache_moved"] and cmp["best"] == "mdmf: 1-shot 41.50 ± 1.25, 5-shot 60.00 ± 1.00"
    half = rows["results/half"]
    assert not half["complete"] and "no table.csv (1/2 scored" in half["status"]
    assert half["cache"] == "cache/here.zarr" and not half["cache_moved"]  # found from where compare ran
    abl = rows["ablate"]
    assert abl["complete"] and abl["scores"] == {"full": 50.0, "pps=False": 48.5} and abl["best"] == "best full 50.00"
    sw = rows["sweeps/s"]
    assert (sw["method"], sw["shot"]) == ("clip-fsar", "1") and not sw["complete"] and sw["status"].startswith("3/4")
    assert sw["scores"]["best_trial"] == 1 and sw["best"] == "trial 1: val 45.50%"

    nested = list_runs(RunsConfig(dir=str(root), nested=True), show=False)
    assert str(root / "results" / "cmp" / "runs" / "mdmf_1shot") in {r["path"] for r in nested}


def test_runs_cli_table_and_json_lines(tree, cli_runner, tmp_path, monkeypatch):
    from rich.console import Console

    import cli
    import mdmf_cache.report.tables as tables

    # the table is printed on the module's console, whose width was fixed when another test of this process made it
    monkeypatch.setattr(tables, "console", Console(width=250))

    root, _, _ = tree
    res = cli_runner.invoke(cli.app, ["runs", str(root), "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert lines == json.loads(json.dumps(list_runs(RunsConfig(dir=str(root)), show=False)))
    import mdmf_cache as mc

    assert mc.runs(dir=root) == list_runs(RunsConfig(dir=str(root)), show=False)  # the API takes a Path
    res = cli_runner.invoke(cli.app, ["runs", str(root)])
    assert res.exit_code == 0 and "7 found under" in res.output and "(moved)" in res.output
    assert "stopped at 16/32 episodes" in res.output
    res = cli_runner.invoke(cli.app, ["runs", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "is not a folder" in str(res.exception)
