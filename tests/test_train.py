"""End to end on a synthetic cache: fast-mode training, resume, evaluation, ablation, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mdmf_cache.store.read import load_split_features  # noqa: E402
from mdmf_cache.evaluation.scoring import score  # noqa: E402
from mdmf_cache.configs import EvalConfig
from mdmf_cache.evaluation.scoring import episode_list  # noqa: E402
from pipelines.evaluate import run as run_eval
from mdmf_cache.configs import TrainConfig
from mdmf_cache.heads.factory import build_model, load_head
from pipelines.train import run as run_train  # noqa: E402

from conftest import NARROW_FFN as FFN  # noqa: E402

pytestmark = pytest.mark.integration


def _train(cache, out, **kw):
    cfg = dict(cache=str(cache), out=str(out), episodes=64, episodes_per_step=8, val_every=32, val_episodes=100,
               lr=1e-3, seed=0)
    cfg.update(kw)
    if cfg.get("method", "mdmf") in ("mdmf", "clip-fsar"):
        cfg["heads"] = {**FFN, **cfg.get("heads", {})}
    return run_train(TrainConfig(**cfg), progress=False)


def test_training_beats_untrained_and_protonet_on_val(demo_cache, tmp_path):
    res = _train(demo_cache, tmp_path / "run", episodes=200, episodes_per_step=16, val_every=100, val_episodes=300)
    val = load_split_features(demo_cache, "val")
    eps = episode_list(val, 5, 5, 1, 300, seed=7)
    trained, _ = load_head(tmp_path / "run", "cpu")
    torch.manual_seed(0)
    untrained = build_model("paper", val.features.shape[-1], val.features.shape[2], FFN).eval()
    acc_trained = score("mdmf", val, eps, trained).mean * 100
    acc_untrained = score("mdmf", val, eps, untrained).mean * 100
    acc_proto = score("protonet", val, eps).mean * 100
    assert res["best_val"] > 0
    assert acc_trained > acc_untrained + 10, (acc_trained, acc_untrained)
    assert acc_trained > acc_proto + 10, (acc_trained, acc_proto)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in metrics] == [112, 200]  # validation when crossing every 100 episodes
    assert metrics[-1]["best_val"] == max(m["val_acc"] for m in metrics)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["resolved_heads"]["ltce"] == "bn" and cfg["lr"] == 1e-3


def _state(run):
    return torch.load(run / "last.pt", weights_only=False)["model"]


def test_resume_equals_uninterrupted_and_is_deterministic(demo_cache, tmp_path):
    run = {"episodes": 48, "val_every": 16, "val_episodes": 50}  # three validations; the cut after the first
    kept = {**run, "keep_checkpoints": True}  # a and b also keep every validation's heads
    _train(demo_cache, tmp_path / "a", **kept)
    _train(demo_cache, tmp_path / "b", **{**kept, "episodes": 16})
    with pytest.raises(Exception, match="--resume"):
        _train(demo_cache, tmp_path / "b", **kept)  # refuses to overwrite a run silently
    with pytest.raises(Exception, match="different keep_checkpoints"):
        _train(demo_cache, tmp_path / "b", resume=True, **run)  # its checkpoints would stop half-way
    _train(demo_cache, tmp_path / "b", resume=True, **kept)
    _train(demo_cache, tmp_path / "c", **run)
    # every validation's heads in best.pt's format, the same after a resume; none without the option
    names = [f"ep{e:07d}.pt" for e in (16, 32, 48)]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == names
    assert not (tmp_path / "c" / "checkpoints").exists()
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=False)
    for name in names:
        ca, cb = (torch.load(tmp_path / r / "checkpoints" / name, weights_only=False) for r in ("a", "b"))
        assert set(ca) == set(best) and ca["episodes"] == int(name[2:9])
        assert ca["val_acc"] == cb["val_acc"]
        assert all(torch.equal(v, cb["model"][k]) for k, v in ca["model"].items())
        if ca["episodes"] == best["episodes"]:  # best.pt is the checkpoint of its validation
            assert all(torch.equal(v, best["model"][k]) for k, v in ca["model"].items())
    assert load_head(tmp_path / "a", "cpu", checkpoint=f"checkpoints/{names[0]}")[0].method == "mdmf"
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    mc = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "episodes_per_s"} for x in lines]  # noqa: E731
    assert strip(ma) == strip(mb) == strip(mc)
    for key, val in _state(tmp_path / "a").items():
        assert torch.equal(val, _state(tmp_path / "b")[key]), key
        assert torch.equal(val, _state(tmp_path / "c")[key]), key


def test_keep_checkpoints_is_refused_in_full_mode():
    from mdmf_cache.errors import ConfigError

    cfg = TrainConfig(mode="full", full={"dataset": "ucf101", "root": "videos"}, keep_checkpoints=True)
    with pytest.raises(ConfigError, match="--keep-checkpoints .* fast mode only"):
        cfg.validate()


def test_eval_ci_shrinks_and_episodes_are_saved(demo_cache, tmp_path):
    small = run_eval(EvalConfig(target=str(demo_cache), method="protonet", shots=(1,), episodes=100,
                                out=str(tmp_path / "s")), progress=False)
    large = run_eval(EvalConfig(target=str(demo_cache), method="protonet", shots=(1,), episodes=1600,
                                out=str(tmp_path / "l")), progress=False)
    assert large["shots"]["1"]["ci95"] < small["shots"]["1"]["ci95"] * 0.5
    again = run_eval(EvalConfig(target=str(demo_cache), method="protonet", shots=(1,), episodes=100,
                                out=str(tmp_path / "s2")), progress=False)
    a = np.load(tmp_path / "s" / "episodes_5way_1shot.npz")
    b = np.load(tmp_path / "s2" / "episodes_5way_1shot.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert again["shots"]["1"]["accuracy"] == small["shots"]["1"]["accuracy"]
    per_class = small["shots"]["1"]["per_class"]
    assert len(per_class) == 5 and all(0 <= v <= 100 for v in per_class.values() if v is not None)
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert saved["shots"]["1"]["episodes"] == 100


def test_eval_mdmf_run_several_shots(demo_cache, tmp_path):
    _train(demo_cache, tmp_path / "run", episodes=16, val_every=16, shot=3)
    default = run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=50), progress=False)
    assert set(default["shots"]) == {"3"} and default["trained_shot"] == 3  # the shot it was trained at
    res = run_eval(EvalConfig(target=str(tmp_path / "run"), method="mdmf", shots=(1, 3), episodes=50), progress=False)
    assert set(res["shots"]) == {"1", "3"}
    assert (tmp_path / "run" / "eval_mdmf_test" / "results.json").is_file()
    direct = run_eval(EvalConfig(target=str(tmp_path / "run"), shots=(1, 3), episodes=50, path="direct",
                                 out=str(tmp_path / "direct")), progress=False)
    for shot in ("1", "3"):  # the reference path scores the same episodes alike (float32 near-ties: one query)
        assert direct["shots"][shot]["accuracy"] == pytest.approx(res["shots"][shot]["accuracy"], abs=100 / 250 + 1e-9)
    with pytest.raises(Exception, match="trained as mdmf"):
        run_eval(EvalConfig(target=str(tmp_path / "run"), method="clip-fsar"), progress=False)
    with pytest.raises(Exception, match="run directory"):
        run_eval(EvalConfig(target=str(demo_cache), method="mdmf"), progress=False)


def test_ablate_no_pps_scores_both_arms_on_identical_episodes(demo_cache, tmp_path):
    from pipelines.ablate import AblateConfig, run as run_ablate

    res = run_ablate(AblateConfig(cache=str(demo_cache), out=str(tmp_path / "abl"), variant={"pps": False},
                                  train={"episodes": 32, "episodes_per_step": 8, "val_every": 32, "val_episodes": 50,
                                         "lr": 1e-3, "heads": FFN},
                                  test_episodes=200), progress=False)
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {"full", "pps=False"}
    # both arms re-scored on the saved list give the table's numbers: one list served both
    test = load_split_features(demo_cache, "test")
    from mdmf_cache.data.episodes import Episodes

    eps = Episodes.load(tmp_path / "abl" / "episodes_5way_5shot.npz")
    accs = {}
    for arm, run in (("full", "arm_full"), ("pps=False", "arm_pps=False")):
        model, cfg = load_head(tmp_path / "abl" / run, "cpu")
        assert model.cfg.pps == (arm == "full") and model.cfg.ffn_dim == FFN["ffn_dim"]  # train's heads: every arm
        accs[arm] = score("mdmf", test, eps, model).episode_acc * 100
        assert accs[arm].mean() == pytest.approx(rows[arm]["accuracy"])
    assert rows["pps=False"]["diff_vs_full"] == pytest.approx((accs["pps=False"] - accs["full"]).mean())
    assert (tmp_path / "abl" / "ablation.md").read_text().count("\n") == 4


def test_ablate_refuses_an_out_of_other_settings_naming_them(demo_cache, tmp_path):
    """A rerun into the same --out with other settings would reuse arms trained with the old ones and rewrite
    ablate_config.json to claim the new: refused in one line naming the fields, nothing rewritten; the original
    command still goes on."""
    from dataclasses import replace

    from mdmf_cache.errors import ConfigError
    from pipelines.ablate import AblateConfig, run as run_ablate

    out = tmp_path / "abl"
    cfg = AblateConfig(cache=str(demo_cache), out=str(out), variant={"pps": False}, shot=1,
                       train={"episodes": 8, "episodes_per_step": 8, "val_every": 8, "val_episodes": 10, "lr": 1e-3,
                              "heads": FFN},
                       test_episodes=20, device="cpu")
    run_ablate(cfg, progress=False, show=False)
    saved = (out / "ablate_config.json").read_bytes()
    other = replace(cfg, preset="reference", shot=5, train={**cfg.train, "lr": 1e-2})
    with pytest.raises(ConfigError) as e:
        run_ablate(other, progress=False, show=False)
    assert str(e.value) == (f"{out} holds an ablation made with other preset, shot, train; rerun it as it was (it goes "
                            "on where it stopped) or choose another --out")
    assert (out / "ablate_config.json").read_bytes() == saved
    run_ablate(cfg, progress=False, show=False)  # the original command: its arms reused


def test_clip_fsar_trains_and_ablate_compares_it_on_identical_episodes(demo_cache, tmp_path):
    from pipelines.ablate import AblateConfig, run as run_ablate

    # CLIP-FSAR through the same trainer: its loss falls and it beats the same head untrained
    res = _train(demo_cache, tmp_path / "fsar", method="clip-fsar", episodes=240, episodes_per_step=16,
                 val_every=80, val_episodes=300)
    metrics = [json.loads(x) for x in (tmp_path / "fsar" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["main"] < metrics[0]["main"], metrics  # the few-shot loss falls
    # the released video-text loss: on a frozen cache only its scale learns (about log C with scale ~1)
    assert all(0 < m["text"] < 1.1 * np.log(15) for m in metrics) and metrics[-1]["loss"] > metrics[-1]["main"]
    fsar, cfg = load_head(tmp_path / "fsar", "cpu")
    assert type(fsar).__name__ == "CLIPFSAR" and cfg["method"] == "clip-fsar"
    val = load_split_features(demo_cache, "val")
    eps = episode_list(val, 5, 5, 1, 300, seed=7)
    torch.manual_seed(0)
    untrained = build_model(None, val.features.shape[-1], val.features.shape[2], FFN, "clip-fsar").eval()
    assert res["best_val"] > score("clip-fsar", val, eps, untrained).mean * 100 + 4

    # ablate --method clip-fsar: both methods on one saved test list, with the paired difference
    train = {"episodes": 32, "episodes_per_step": 16, "val_every": 32, "val_episodes": 50, "lr": 1e-3, "heads": FFN}
    abl = run_ablate(AblateConfig(cache=str(demo_cache), out=str(tmp_path / "abl"), variant={"method": "clip-fsar"},
                                  train=train, test_episodes=200), progress=False)
    rows = {r["arm"]: r for r in abl["rows"]}
    assert set(rows) == {"full", "method=clip-fsar"} and "diff_vs_full" in rows["method=clip-fsar"]
    arm = tmp_path / "abl" / "arm_method=clip-fsar"
    assert json.loads((arm / "config.json").read_text())["method"] == "clip-fsar"
    assert json.loads((arm / "config.json").read_text())["resolved_heads"]["ffn_dim"] == FFN["ffn_dim"]
    # eval of that run takes its own head; with the same seed its test list is the ablation's
    ev = run_eval(EvalConfig(target=str(arm), episodes=200), progress=False)
    assert ev["method"] == "clip-fsar"
    assert ev["shots"]["5"]["accuracy"] == pytest.approx(rows["method=clip-fsar"]["accuracy"])


def test_cli_train_eval(demo_cache, tmp_path):
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    r = runner.invoke(cli.app, ["train", str(demo_cache), "--out", str(tmp_path / "r"), "--episodes", "16",
                                "--episodes-per-step", "8", "--val-every", "16", "--val-episodes", "20", "--no-pps",
                                "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["heads"] == {"pps": False}
    r = runner.invoke(cli.app, ["eval", str(tmp_path / "r"), "--shot", "1,5", "--episodes", "30"])
    assert r.exit_code == 0, r.output
    assert "1" in r.output and "per-class" in r.output
    r = runner.invoke(cli.app, ["train", str(demo_cache), "--mode", "full", "--out", str(tmp_path / "f")])
    assert r.exit_code != 0 and "fast" in str(r.exception)


def test_eval_scores_a_transductive_head_with_its_released_test_queries(demo_cache, tmp_path, monkeypatch, capsys):
    """A transductive head's accuracy depends on the queries per class of its episodes: without --queries-per-class,
    eval scores it with its released test queries (``SPEC.test_queries(K)``, here patched to 2), records them in
    eval_config.json and results.json and marks the head; an explicit --queries-per-class wins; other methods get 1."""
    import dataclasses

    from mdmf_cache import heads
    from mdmf_cache.data.episodes import Episodes
    from mdmf_cache.errors import ConfigError

    _train(demo_cache, tmp_path / "run", method="mpl", shot=1, train_queries=1, episodes=8, val_every=8,
           val_episodes=10)
    monkeypatch.setattr("mdmf_cache.heads.mpl.SPEC", dataclasses.replace(heads.get("mpl"), test_queries=lambda k: 2))
    res = run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=20, out=str(tmp_path / "e")), progress=False)
    assert Episodes.load(tmp_path / "e" / "episodes_5way_1shot.npz").query.shape == (20, 5 * 2)
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["transductive"] is True and saved["queries_per_class"] == {"1": 2}
    assert saved["shots"]["1"]["queries_per_class"] == 2 and res["shots"]["1"]["episodes"] == 20
    config = json.loads((tmp_path / "e" / "eval_config.json").read_text())
    assert config["queries_per_class"] is None and config["resolved"]["queries_per_class"] == {"1": 2}
    run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=20, queries_per_class=1, out=str(tmp_path / "one")),
             progress=False, show=True)
    assert Episodes.load(tmp_path / "one" / "episodes_5way_1shot.npz").query.shape == (20, 5)
    assert "mpl (transductive)" in capsys.readouterr().out
    base = run_eval(EvalConfig(target=str(demo_cache), method="protonet", shots=(1,), episodes=20,
                               out=str(tmp_path / "p")), progress=False)
    assert base["queries_per_class"] == {"1": 1} and base["transductive"] is False
    # the resolved number is checked against the split before anything is written; 0 is refused
    monkeypatch.setattr("mdmf_cache.heads.mpl.SPEC", dataclasses.replace(heads.get("mpl"), test_queries=lambda k: 50))
    with pytest.raises(ConfigError, match="with 50 queries per class"):
        run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=20, out=str(tmp_path / "big")), progress=False)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ConfigError, match="--queries-per-class"):
        EvalConfig(target=str(tmp_path / "run"), queries_per_class=0).validate()
    for name in heads.METHODS:  # the one place: a transductive head's released choice, else 1
        spec = heads.get(name)
        expect = spec.test_queries(5) if spec.transductive and spec.test_queries else 1
        assert EvalConfig().queries_for(name, 5) == expect and EvalConfig(queries_per_class=3).queries_for(name, 5) == 3


def test_training_bar_shows_dashes_until_there_is_a_value():
    from rich.progress import Progress

    from mdmf_cache.progress import FieldColumn
    from mdmf_cache.training.loop import RunState, train_bar_fields, train_progress

    bar = train_progress()
    columns = [c for c in bar.columns if isinstance(c, FieldColumn)]
    task_id = bar.add_task("train (fast)", total=64, **train_bar_fields(RunState()))
    render = lambda: [str(c.render(bar.tasks[task_id])) for c in columns]  # noqa: E731
    assert render() == ["loss -", "val -"]  # before the first loss and the first validation
    bar.update(task_id, loss=0.6931)
    assert render() == ["loss 0.693", "val -"]
    bar.update(task_id, val=42.3)
    assert render() == ["loss 0.693", "val 42.3%"]
    resumed = bar.add_task("train (fast)", total=64, **train_bar_fields(RunState(done=32, best=37.5)))
    assert [str(c.render(bar.tasks[resumed])) for c in columns] == ["loss -", "val 37.5%"]  # the run's best so far
    other = Progress(*columns)
    sub = other.add_task("val", total=1)  # a task without the fields (a sub-task on the bar): blank
    assert [str(c.render(other.tasks[sub])) for c in columns] == ["", ""]


def test_tensorboard_events_hold_the_metrics_lines_and_a_resume_appends(demo_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = {"episodes": 32, "val_every": 16, "val_episodes": 30, "tensorboard": True}
    _train(demo_cache, tmp_path / "r", **{**run, "episodes": 16})
    _train(demo_cache, tmp_path / "r", resume=True, **run)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "main", "val_acc", "episodes_per_s"} <= tags
    for tag in ("loss", "val_acc", "episodes_per_s"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [16, 32]  # one event per metrics line, at its episodes, across the resume
        assert [e.value for e in events] == pytest.approx([m[tag] for m in lines], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_before_anything_is_written(demo_cache, tmp_path, monkeypatch):
    import sys

    from mdmf_cache.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails, as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'mdmf-cache\[tensorboard\]'") as err:
        _train(demo_cache, tmp_path / "r", episodes=16, val_every=16, tensorboard=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()
