"""``compare``: several heads on one cache, identical episodes, paired CIs, reported numbers; a rerun does only what is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mdmf_cache.errors import ConfigError
from mdmf_cache.report.compare_tables import table_rows
from pipelines.compare import CompareConfig, run as run_compare

TRAIN = {"episodes": 16, "episodes_per_step": 16, "val_every": 16, "val_episodes": 20, "lr": 1e-3}


def _killed_at_the_second_training(monkeypatch) -> list[str]:
    """The train recipe's ``run`` as before, except that its second call is "killed" (KeyboardInterrupt) and every later one
    trains again; returns the list of the runs it was called for (clear it to count the calls of a rerun)."""
    import pipelines.train as training

    real_train, calls = training.run, []

    def train(tcfg, **kw):
        calls.append(tcfg.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(tcfg, **kw)

    monkeypatch.setattr(training, "run", train)
    return calls


@pytest.mark.integration
def test_compare_trains_scores_and_resumes(demo_cache, tmp_path, monkeypatch):
    import mdmf_cache.evaluation.scoring as evaluation
    import pipelines.train as training

    out = tmp_path / "cmp"
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("mdmf", "clip-fsar", "protonet"), shots=(1, 3),
                        train=TRAIN, test_episodes=60)
    real_train = training.run
    _killed_at_the_second_training(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, progress=False)
    first = out / "runs" / "mdmf_1shot" / "best.pt"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(training, "run", real_train)
    scored = []
    real_score = evaluation.score
    monkeypatch.setattr(evaluation, "score", lambda m, *a, **k: scored.append(m) or real_score(m, *a, **k))
    res = run_compare(cfg, progress=False)
    assert first.stat().st_mtime_ns == stamp  # the finished run was reused, not trained again
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["clip-fsar_1shot", "clip-fsar_3shot", "mdmf_1shot",
                                                                  "mdmf_3shot"]
    # CLIP-FSAR's 3-shot run trained on 1-shot episodes, as released; MDMF's at its own shot
    assert json.loads((out / "runs" / "clip-fsar_3shot" / "config.json").read_text())["train_shot"] == 1
    assert json.loads((out / "runs" / "mdmf_3shot" / "config.json").read_text())["train_shot"] == 3

    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"mdmf", "clip-fsar", "protonet"} and "1shot_diff" not in rows["mdmf"]
    for m in ("clip-fsar", "protonet"):  # the paired difference is over the same episodes
        for k in (1, 3):
            diff = np.load(out / "scores" / f"{m}_{k}shot.npy") - np.load(out / "scores" / f"mdmf_{k}shot.npy")
            assert rows[m][f"{k}shot_diff"] == pytest.approx(diff.mean())
            assert rows[m][f"{k}shot"] == pytest.approx(np.load(out / "scores" / f"{m}_{k}shot.npy").mean())
    assert (out / "table.md").is_file() and (out / "table.csv").is_file() and (out / "table.png").is_file()
    assert "| mdmf |" in (out / "table.md").read_text()

    # again: nothing to train, nothing to score
    scored.clear()
    monkeypatch.setattr(training, "run", lambda *a, **k: pytest.fail("trained again"))
    again = run_compare(cfg, progress=False)
    assert scored == [] and again["rows"] == res["rows"]
    with pytest.raises(ConfigError, match="other"):  # other settings into the same --out
        run_compare(CompareConfig(**{**cfg.__dict__, "test_episodes": 50}), progress=False)


@pytest.mark.integration
def test_compare_sweep_tunes_on_val_scores_the_best_trial_and_resumes(demo_cache, tmp_path, monkeypatch):
    import optuna

    import pipelines.train as training
    from mdmf_cache.data.episodes import Episodes
    from mdmf_cache.evaluation.scoring import score
    from mdmf_cache.heads.factory import load_head
    from mdmf_cache.store.read import load_split_features
    from pipelines.compare import sweep_config

    out = tmp_path / "tuned"
    small = {"episodes": 4, "episodes_per_step": 4, "val_every": 4, "val_episodes": 10, "train_queries": 1}  # lr: swept
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("mdmf", "protonet"), shots=(1,), train=small,
                        test_episodes=30, sweep=2)
    calls = _killed_at_the_second_training(monkeypatch)  # the sweep's second trial
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, progress=False)
    sweep = out / "sweeps" / "mdmf_1shot"
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("trials/*/best.pt")}
    assert len(stamps) == 1 and not (out / "runs").exists()  # tuned: no run with the defaults
    calls.clear()
    res = run_compare(cfg, progress=False)
    # the unfinished sweep resumed with the one trial it lacked, the finished trial untouched
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    scfg = sweep_config(cfg, "mdmf", 1)
    study = optuna.load_study(study_name=scfg.study_name, storage=scfg.storage_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert {"lr", "dropout", "lambda"} <= set(complete[0].params)  # the head's default space ...
    assert not {"episodes", "episodes-per-step"} & set(complete[0].params)  # ... less compare's training options
    assert all(t.user_attrs["config"]["shot"] == 1 and t.user_attrs["config"]["train_queries"] == 1 for t in complete)
    best = max(complete, key=lambda t: t.value)
    # the score is the best trial's best.pt on the saved test episodes
    model = load_head(best.user_attrs["config"]["out"])[0]
    eps = Episodes.load(out / "episodes_5way_1shot.npz")
    acc = score("mdmf", load_split_features(demo_cache, "test"), eps, model, cfg.seed).episode_acc * 100
    assert np.array_equal(np.load(out / "scores" / "mdmf_1shot.npy"), acc)
    row = next(r for r in res["rows"] if r["method"] == "mdmf")
    assert row["1shot_tuned_val"] == best.value and f"lr={best.params['lr']:.3g}" in row["1shot_tuned"]
    md = (out / "table.md").read_text().splitlines()
    assert md[0].endswith("| tuned on val (best trial) |") and "| 1-shot: lr=" in md[2]
    assert md[3].startswith("| protonet |") and md[3].endswith("| - |")  # nothing to tune
    # again: the finished sweep reused, nothing trained, nothing scored
    monkeypatch.setattr(training, "run", lambda *a, **k: pytest.fail("trained again"))
    assert run_compare(cfg, progress=False)["rows"] == res["rows"]
    with pytest.raises(ConfigError, match="other sweep"):
        run_compare(CompareConfig(**{**cfg.__dict__, "sweep": 3}), progress=False)


def test_the_table_names_each_tuned_shot_s_parameters(tmp_path):
    from mdmf_cache.report.compare_tables import write_tables

    cfg = CompareConfig(methods=("mdmf", "protonet"), shots=(1, 5))
    accs = {(m, k): np.full(4, 50.0) for m in cfg.methods for k in cfg.shots}
    tuned = {("mdmf", 1): {"params": {"lr": 0.000312, "lambda": 0.8}, "val_acc": 61.5},
             ("mdmf", 5): {"params": {"lr": 0.002, "episodes-per-step": 8}, "val_acc": 70.0}}
    rows = table_rows(cfg, accs, "ucf101", "RN50", tuned)
    assert rows[0]["1shot_tuned"] == "lr=0.000312, lambda=0.8" and rows[0]["5shot_tuned_val"] == 70.0
    assert "1shot_tuned" not in rows[1]
    write_tables(tmp_path, rows, cfg.shots, sweep=20)
    md = (tmp_path / "table.md").read_text()
    assert "| 1-shot: lr=0.000312, lambda=0.8; 5-shot: lr=0.002, episodes-per-step=8 |" in md
    assert "a 20-trial sweep on val" in md
    write_tables(tmp_path, table_rows(cfg, accs, "ucf101", "RN50"), cfg.shots)
    assert "tuned" not in (tmp_path / "table.md").read_text()  # without --sweep, as before


def test_compare_checks_everything_before_work(demo_cache, tmp_path):
    for kw, match in (({"methods": ("mdmf", "nope")}, "unknown"), ({"methods": ("clip-fsar",)}, "--reference"),
                      ({"train": {"lr": -1.0}}, "--lr"), ({"train": {"shot": 3}}, "set by compare"),
                      ({"shots": (1, 40)}, "the test split has"), ({"sweep": -1}, "--sweep -1")):
        with pytest.raises(ConfigError, match=match):
            run_compare(CompareConfig(cache=str(demo_cache), out=str(tmp_path / "c"), **kw), progress=False)
        assert not (tmp_path / "c").exists()


def test_a_comparison_saved_before_sweep_existed_goes_on(demo_cache, tmp_path):
    from dataclasses import asdict

    cfg = CompareConfig(cache=str(demo_cache), out=str(tmp_path / "c"), methods=("protonet",), reference="protonet",
                        shots=(1, 40))
    saved = json.loads(json.dumps(asdict(cfg)))
    del saved["sweep"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="the test split has"):  # past the comparison of the settings
        run_compare(cfg, progress=False)
    with pytest.raises(ConfigError, match="other sweep"):
        run_compare(CompareConfig(**{**cfg.__dict__, "sweep": 2}), progress=False)


def test_reported_numbers_carry_their_backbone():
    cfg = CompareConfig(methods=("mdmf", "clip-fsar", "protonet"), shots=(1, 5))
    accs = {(m, k): np.full(4, 50.0) for m in cfg.methods for k in cfg.shots}
    rows = {r["method"]: r for r in table_rows(cfg, accs, "ucf101", "RN50")}
    assert (rows["mdmf"]["1shot_reported"], rows["mdmf"]["1shot_reported_backbone"]) == (94.3, "CLIP-RN50")
    assert rows["clip-fsar"]["5shot_reported"] == 97.0 and "1shot_reported" not in rows["protonet"]
    vit = {r["method"]: r for r in table_rows(cfg, accs, "hmdb51", "ViT-B-16")}
    assert vit["mdmf"]["5shot_reported"] == 88.0 and vit["mdmf"]["5shot_reported_backbone"] == "CLIP-ViT-B/16"
    from mdmf_cache.paper import reported

    assert reported("trx", "ssv2-full", 5, "RN50") == (63.0, "ResNet-50 (ImageNet)")  # never read as a CLIP number
    assert reported("hyrsm", "kinetics100", 3, "ViT-B-16") == (83.5, "ResNet-50 (ImageNet)")


@pytest.mark.parametrize("kw,needle", [
    ({"way": 0}, "--way 0: an episode needs at least 2 classes"),
    ({"way": -1}, "--way -1: an episode needs at least 2 classes"),
    ({"way": 1}, "--way 1: an episode needs at least 2 classes"),  # untrained methods only: a table at 100 +- 0
    ({"seed": -5}, "--seed -5: must be >= 0"),
    ({"test_episodes": 1_000_000_000}, "--test-episodes 1000000000: at most 1,000,000 (the episode list alone would "
                                       "take about"),
    ({"train": {"nope": 1}}, "unknown training option(s) nope"),
], ids=["way0", "way-1", "way1", "seed", "test-episodes", "train-field"])
def test_compare_refuses_bad_values_before_writing(demo_cache, tmp_path, kw, needle):
    """One line, before compare_config.json: the corrected command is not refused by a saved config."""
    out = tmp_path / "c"
    base = {"cache": str(demo_cache), "out": str(out), "methods": ("protonet", "tsn"), "reference": "protonet",
            "shots": (1,), "test_episodes": 20}
    with pytest.raises(ConfigError) as e:
        run_compare(CompareConfig(**{**base, **kw}), progress=False)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert not out.exists()
    run_compare(CompareConfig(**base), progress=False, show=False)  # the corrected command


def test_compare_checks_the_train_split_for_every_shot_before_writing(demo_cache, tmp_path):
    """The test split holds 5-way 9-shot episodes (10 videos a class) but MDMF trains on 9-shot episodes of 5 queries
    per class: refused before compare_config.json, naming the training episodes."""
    out = tmp_path / "c"
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("mdmf", "protonet"), shots=(9,), train=TRAIN,
                        test_episodes=20)
    with pytest.raises(ConfigError, match=r"mdmf --shot 9 training episodes: 5-way 9-shot with 5 queries per class "
                                          r"needs 5 classes with >= 14 videos; the train split has 0"):
        run_compare(cfg, progress=False)
    assert not out.exists()


@pytest.mark.integration
def test_compare_over_seeds_resumes_only_the_missing_run_and_reports_spread_and_test_selection(demo_cache, tmp_path,
                                                                                               monkeypatch):
    import pipelines.train as training
    from mdmf_cache.data.episodes import Episodes
    from mdmf_cache.evaluation.scoring import score
    from mdmf_cache.heads.factory import load_head
    from mdmf_cache.store.read import load_split_features

    out = tmp_path / "seeds"
    train = {**TRAIN, "episodes_per_step": 8, "val_every": 8}  # two validations: two kept checkpoints per run
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("mdmf", "otam"), shots=(1,), train=train,
                        test_episodes=40, seeds=2, test_selected=True)
    calls = _killed_at_the_second_training(monkeypatch)  # seed 1's run
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, progress=False)
    runs = [out / "runs" / f"mdmf_1shot_seed{i}" for i in (0, 1)]
    stamp = (runs[0] / "best.pt").stat().st_mtime_ns
    calls.clear()
    res = run_compare(cfg, progress=False)
    assert calls == [str(runs[1])] and (runs[0] / "best.pt").stat().st_mtime_ns == stamp  # only the missing run
    assert [json.loads((r / "config.json").read_text())["seed"] for r in runs] == [0, 1]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["mdmf_1shot_seed0", "mdmf_1shot_seed1"]

    # the numbers, recomputed from the saved per-episode scores
    rows = {r["method"]: r for r in res["rows"]}
    mdmf = [np.load(out / "scores" / f"mdmf_1shot_seed{i}.npy") for i in (0, 1)]
    otam = np.load(out / "scores" / "otam_1shot.npy")  # no training seed: scored once
    means = [a.mean() for a in mdmf]
    assert rows["mdmf"]["1shot"] == pytest.approx(np.mean(means))
    assert [rows["mdmf"][f"1shot_seed{i}"] for i in (0, 1)] == pytest.approx(means)
    assert rows["mdmf"]["1shot_seed_std"] == pytest.approx(np.std(means, ddof=1))
    assert (rows["mdmf"]["1shot_seed_min"], rows["mdmf"]["1shot_seed_max"]) == pytest.approx((min(means), max(means)))
    per_seed = [(otam - a).mean() for a in mdmf]  # paired: the same episodes, seed i of the reference
    assert [rows["otam"][f"1shot_diff_seed{i}"] for i in (0, 1)] == pytest.approx(per_seed)
    assert rows["otam"]["1shot_diff"] == pytest.approx(np.mean(per_seed))
    assert rows["otam"]["1shot_diff_seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert "1shot_seed_std" not in rows["otam"] and "1shot_test_selected" not in rows["otam"]

    # test-selected: the best checkpoint on test, each checkpoint scored here independently
    split = load_split_features(demo_cache, "test")
    eps = Episodes.load(out / "episodes_5way_1shot.npz")
    best_on_test = []
    for run, val_selected in zip(runs, mdmf):
        ckpts = sorted((run / "checkpoints").glob("ep*.pt"))
        assert [p.name for p in ckpts] == ["ep0000008.pt", "ep0000016.pt"]
        test = [score("mdmf", split, eps, load_head(run, "cpu", checkpoint=f"checkpoints/{p.name}")[0]).mean * 100
                for p in ckpts]
        best_on_test.append(max(test))
        assert max(test) >= val_selected.mean() - 1e-9  # best.pt is one of the checkpoints
    assert rows["mdmf"]["1shot_test_selected"] == pytest.approx(np.mean(best_on_test))
    assert rows["mdmf"]["1shot_test_selected_gap"] == pytest.approx(np.mean(best_on_test) - np.mean(means))

    md = (out / "table.md").read_text().splitlines()
    assert md[0] == ("| method | 1-shot | 1-shot seeds: sd [min, max] | 1-shot vs ref | 1-shot vs ref per seed | "
                     "reported (backbone) | 1-shot test-selected (gap) |")
    cells = [c.strip() for c in md[3].split("|")[1:-1]]  # otam: no seeds of its own, one difference per seed
    assert cells[0] == "otam" and cells[2] == "-" and cells[4].startswith(f"{per_seed[0]:+.2f}, ") and cells[6] == "-"
    assert f"{rows['mdmf']['1shot_test_selected']:.2f} (" in md[2]
    assert "Training seeds" in "\n".join(md) and "ON TEST" in "\n".join(md)

    # again: nothing trained, nothing scored; without --test-selected into the same --out: refused, named
    monkeypatch.setattr(training, "run", lambda *a, **k: pytest.fail("trained again"))
    assert run_compare(cfg, progress=False)["rows"] == res["rows"]
    with pytest.raises(ConfigError, match="other test_selected"):
        run_compare(CompareConfig(**{**cfg.__dict__, "test_selected": False}), progress=False)


@pytest.mark.integration
def test_a_transductive_head_is_marked_and_gets_its_own_list_when_its_test_queries_differ(demo_cache, tmp_path,
                                                                                        monkeypatch):
    import dataclasses

    import mdmf_cache.heads.otam as otam_head
    import mdmf_cache.heads.tsn as tsn_head
    from mdmf_cache.data.episodes import Episodes
    from mdmf_cache.evaluation.scoring import score
    from mdmf_cache.store.read import load_split_features

    # every released transductive head tests with 1 query per class; two made-up ones here: 2 (otam), 1 (tsn)
    monkeypatch.setattr(otam_head, "SPEC", dataclasses.replace(otam_head.SPEC, transductive=True,
                                                               test_queries=lambda k: 2))
    monkeypatch.setattr(tsn_head, "SPEC", dataclasses.replace(tsn_head.SPEC, transductive=True,
                                                              test_queries=lambda k: 1))
    out = tmp_path / "td"
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("protonet", "otam", "tsn"), reference="protonet",
                        shots=(1,), test_episodes=30)
    rows = {r["method"]: r for r in run_compare(cfg, progress=False, show=False)["rows"]}
    own = Episodes.load(out / "episodes_5way_1shot_2queries.npz")
    assert own.query.shape == (30, 10) and Episodes.load(out / "episodes_5way_1shot.npz").query.shape == (30, 5)
    acc = score("otam", load_split_features(demo_cache, "test"), own).episode_acc * 100
    assert np.array_equal(np.load(out / "scores" / "otam_1shot_2queries.npy"), acc)
    proto = np.load(out / "scores" / "protonet_1shot.npy")
    assert rows["otam"]["1shot_diff"] == pytest.approx(acc.mean() - proto.mean())  # unpaired: other episodes
    assert not rows["otam"]["1shot_diff_paired"] and rows["tsn"]["1shot_diff_paired"]
    assert rows["otam"]["vs_ref_transductive_inductive"] and rows["otam"]["transductive"]
    md = (out / "table.md").read_text()
    assert "| otam † |" in md and "| tsn † |" in md and "| protonet |" in md
    assert "† transductive: uses the episode's other queries" in md and "‡" in md
    assert "unpaired ‡" in md and "otam 1-shot: scored on its own list of 30 episodes with 2 queries per class" in md
    assert "tsn 1-shot: scored on its own" not in md


def test_the_released_transductive_heads_are_marked_and_seedless_rows_show_no_spread(tmp_path):
    from mdmf_cache.report.compare_tables import table_notes, write_tables

    cfg = CompareConfig(methods=("mdmf", "clip-mei", "mpl", "otam", "protonet"), shots=(1, 5), seeds=2)
    accs = {(m, k): (np.array([[50.0, 60.0], [54.0, 62.0]]) if m in ("mdmf", "clip-mei", "mpl") else
                     np.array([40.0, 50.0])) for m in cfg.methods for k in cfg.shots}
    rows = {r["method"]: r for r in table_rows(cfg, accs, "ucf101", "RN50")}
    assert [m for m, r in rows.items() if r["transductive"]] == ["clip-mei", "mpl"]
    assert rows["clip-mei"]["vs_ref_transductive_inductive"] and not rows["otam"]["vs_ref_transductive_inductive"]
    assert rows["mdmf"]["1shot"] == 56.5 and rows["mdmf"]["1shot_seed_std"] == pytest.approx(np.std([55, 58], ddof=1))
    assert [rows["otam"][f"5shot_diff_seed{i}"] for i in (0, 1)] == [-10.0, -13.0]  # counted once for every seed
    write_tables(tmp_path, list(rows.values()), cfg.shots, seeds=2, notes=table_notes(cfg, list(rows.values())))
    md = (tmp_path / "table.md").read_text()
    assert "| clip-mei † |" in md and "| mpl † |" in md and "| mdmf |" in md
    otam = next(line for line in md.splitlines() if line.startswith("| otam |"))
    assert otam.split(" | ")[3:5] == ["-", "-"]  # no training seed: no spread
    assert "+0.00 ± 0.00 ‡" in md  # clip-mei (transductive) against mdmf (inductive)


# ---- a comparison bound to its cache, found by its folder, shown again, extended ----------------------------------

BASE = {"methods": ("protonet", "tsn"), "reference": "protonet", "shots": (1,), "test_episodes": 20}


def _count_scores(monkeypatch) -> list[str]:
    import mdmf_cache.evaluation.scoring as evaluation

    real, scored = evaluation.score, []
    monkeypatch.setattr(evaluation, "score", lambda m, *a, **k: scored.append(m) or real(m, *a, **k))
    return scored


def test_a_cache_re_extracted_with_other_prompts_is_refused_naming_the_prompt(demo_cache, demo_videos, tmp_path):
    import shutil

    from mdmf_cache.configs import ExtractConfig
    from mdmf_cache.extraction.build import run_extract

    shutil.copytree(demo_cache.parent, tmp_path / "cache")
    cache = tmp_path / "cache" / demo_cache.name
    out = tmp_path / "cmp"
    cfg = CompareConfig(cache=str(cache), out=str(out), **BASE)
    run_compare(cfg, progress=False, show=False)
    saved = json.loads((out / "compare_config.json").read_text())
    record = json.loads((out / "scores" / "tsn_1shot.json").read_text())
    assert saved["cache_identity"] == record["cache_identity"] and record["episodes"] == "episodes_5way_1shot.npz"
    assert saved["cache_identity"]["fingerprint"]["text"]["prompt_template"] == "a photo of {}"
    # the text embeddings only, in place (as test_extract's test_changed_prompt_recomputes_text_only)
    run_extract(ExtractConfig(dataset="folder", root=str(demo_videos), cache_dir=str(tmp_path / "cache"), name="demo",
                              model="mdmf-tiny-vit", pretrained=None, train_views=2, flip=False, workers=0,
                              chunk_rows=16, progress=False, clean_names=True, prompt_template="a video of {}"))
    table = (out / "table.md").read_text()
    with pytest.raises(ConfigError) as e:
        run_compare(cfg, progress=False, show=False)
    msg = str(e.value)
    assert "another cache" in msg and "text.prompt_template: 'a photo of {}' then, 'a video of {}' now" in msg
    assert len(msg.splitlines()) == 1 and (out / "table.md").read_text() == table  # nothing rewritten


def test_out_spelled_otherwise_or_moved_is_the_same_comparison_and_show_gives_its_table(demo_cache, tmp_path,
                                                                                        monkeypatch, cli_runner):
    import pipelines.compare as compare
    from pipelines.compare import show

    bars = []
    real_bar = compare.make_progress
    monkeypatch.setattr(compare, "make_progress", lambda *a: bars.append(real_bar(*a)) or bars[-1])
    monkeypatch.chdir(tmp_path)
    first = run_compare(CompareConfig(cache=str(demo_cache), out="cmp", **BASE), progress=True, show=False)
    (task,) = bars[0].tasks  # one bar over every score to make: 2 methods x 20 episodes
    assert task.total == task.completed == 40
    scored = _count_scores(monkeypatch)
    for out in (str(tmp_path / "cmp"), "./cmp/"):
        assert run_compare(CompareConfig(cache=str(demo_cache), out=out, **BASE), progress=False,
                           show=False)["rows"] == first["rows"]
    (tmp_path / "cmp").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path.parent)
    again = run_compare(CompareConfig(cache=str(demo_cache), out=str(tmp_path / "moved"), **BASE), progress=False,
                        show=False)
    assert again["rows"] == first["rows"] and scored == []  # nothing scored again

    shown = show(tmp_path / "moved", show=False)
    assert shown["rows"] == first["rows"]
    assert shown["markdown"] == (tmp_path / "moved" / "table.md").read_text()
    res = cli_runner.invoke(__import__("cli").app, ["compare", "show", str(tmp_path / "moved")])
    assert res.exit_code == 0 and "protonet" in res.output and "tsn" in res.output, res.output
    with pytest.raises(ConfigError, match="holds no comparison"):
        show(tmp_path)
    (tmp_path / "moved" / "scores" / "tsn_1shot.npy").unlink()
    with pytest.raises(ConfigError, match=r"is not finished \(1 score file\(s\) missing"):
        show(tmp_path / "moved")


@pytest.mark.integration
def test_a_finished_comparison_extended_trains_and_scores_only_what_is_new(demo_cache, tmp_path, monkeypatch):
    out = tmp_path / "ext"
    base = {"cache": str(demo_cache), "out": str(out), "train": TRAIN, "test_episodes": 20}
    run_compare(CompareConfig(methods=("mdmf", "protonet"), reference="protonet", shots=(1,), **base), progress=False,
                show=False)
    calls = _killed_at_the_second_training(monkeypatch)  # records the runs trained; none is killed here
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.npy")}
    cfg = CompareConfig(methods=("mdmf", "otam", "protonet"), reference="otam", shots=(1, 2), **base)
    rows = {r["method"]: r for r in run_compare(cfg, progress=False, show=False)["rows"]}
    assert calls == [str(out / "runs" / "mdmf_2shot")]  # mdmf 1-shot reused
    now = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("*.npy")}
    assert {k: now[k] for k in stamps} == stamps  # the finished scores kept; the new method's and shot's made
    assert sorted(set(now) - set(stamps)) == ["mdmf_2shot.npy", "otam_1shot.npy", "otam_2shot.npy",
                                              "protonet_2shot.npy"]
    assert "1shot_diff" not in rows["otam"] and "1shot_diff" in rows["mdmf"]  # the new reference

    calls.clear()  # another training seed: only seed 1 (seed 0 is the one-seed run mdmf_1shot)
    seeds = CompareConfig(**{**cfg.__dict__, "shots": (1,), "seeds": 2})
    rows = {r["method"]: r for r in run_compare(seeds, progress=False, show=False)["rows"]}
    assert calls == [str(out / "runs" / "mdmf_1shot_seed1")] and "1shot_seed_std" in rows["mdmf"]

    for kw, needle in (({"test_episodes": 30}, "other test_episodes"), ({"train": {**TRAIN, "lr": 1e-2}}, "other train"),
                       ({"head_opts": {"mdmf": {"heads": 4}}}, "other head_opts of mdmf"),
                       ({"preset": {"mdmf": "reference"}}, "other preset of mdmf")):
        with pytest.raises(ConfigError, match=needle):
            run_compare(CompareConfig(**{**cfg.__dict__, **kw}), progress=False, show=False)
    # mdmf left out, then back with another preset: its finished run refuses it, named
    run_compare(CompareConfig(**{**cfg.__dict__, "methods": ("otam", "protonet")}), progress=False, show=False)
    with pytest.raises(ConfigError, match=r"mdmf 1-shot run .* was trained with other preset"):
        run_compare(CompareConfig(**{**cfg.__dict__, "preset": {"mdmf": "reference"}}), progress=False, show=False)


def test_preset_train_shot_and_head_options_reach_the_trained_methods(demo_cache, tmp_path, monkeypatch, cli_runner):
    import cli
    import pipelines.compare as compare
    import pipelines.train as training

    seen = []

    def train(tcfg, **kw):
        seen.append(tcfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run", train)
    cfg = CompareConfig(cache=str(demo_cache), out=str(tmp_path / "c"), methods=("mdmf", "otam"), reference="otam",
                        shots=(1,), train=TRAIN, test_episodes=20, preset={"mdmf": "reference"}, train_shot=2,
                        head_opts={"mdmf": {"heads": 4}})
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, progress=False, show=False)
    (t,) = seen
    assert (t.method, t.preset, t.train_shot, t.heads) == ("mdmf", "reference", 2, {"heads": 4})
    for kw, needle in (({"head_opts": {"otam": {"x": 1}}}, "--head-opt otam:...: otam is not trained here"),
                       ({"head_opts": {"trx": {"x": 1}}}, "--head-opt trx:...: trx is not among --methods"),
                       ({"preset": {"mdmf": "nope"}}, "--preset 'nope'")):
        with pytest.raises(ConfigError, match=needle):
            run_compare(CompareConfig(**{**cfg.__dict__, "out": str(tmp_path / "d"), **kw}), progress=False)
        assert not (tmp_path / "d").exists()

    got = []  # the CLI: typed as train's --head-opt, a bare --preset for every trained method
    monkeypatch.setattr(compare, "run", lambda c, **k: got.append(c))
    args = ["compare", str(demo_cache), "--methods", "mdmf,otam", "--reference", "otam", "--out", str(tmp_path / "e")]
    res = cli_runner.invoke(cli.app, [*args, "--preset", "reference", "--train-shot", "2", "--head-opt",
                                      "mdmf:heads=4", "--head-opt", "mdmf:pps=false"])
    assert res.exit_code == 0, res.output
    assert got[0].preset == {"mdmf": "reference"} and got[0].train_shot == 2
    assert got[0].head_opts == {"mdmf": {"heads": 4, "pps": False}}
    res = cli_runner.invoke(cli.app, [*args, "--head-opt", "trx:heads=4"])
    assert res.exit_code == 2 and "trx: not among --methods" in res.output


def test_table_tex_is_booktabs_with_one_bold_per_shot_and_the_marks_of_table_md(tmp_path):
    from mdmf_cache.report.compare_tables import table_notes, write_tables

    cfg = CompareConfig(methods=("mdmf", "clip-mei", "otam", "protonet"), shots=(1, 5), seeds=2)
    accs = {(m, k): np.array([[50.0 + i, 60.0], [54.0, 62.0 + k]]) for i, m in enumerate(cfg.methods)
            for k in cfg.shots}
    rows = table_rows(cfg, accs, "ucf101", "my_model")
    write_tables(tmp_path, rows, cfg.shots, seeds=2, test_selected=True, notes=table_notes(cfg, rows))
    tex = (tmp_path / "table.tex").read_text().splitlines()
    assert tex[0].startswith("% ") and "table.md" in tex[1] and "table.csv" in tex[1]
    body = [line for line in tex if not line.startswith("%")]
    assert body[0] == r"\begin{tabular}{lrrrr}" and body[-1] == r"\end{tabular}"
    assert [body[1], body[3], body[-2]] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert body[2] == r"Method & 1-shot & 5-shot & $\Delta$ 1-shot & $\Delta$ 5-shot \\"
    cells = [line.removesuffix(r" \\").split(" & ") for line in body[4:-2]]
    assert [c[0] for c in cells] == ["mdmf", r"clip-mei$^\dagger$", "otam", "protonet"]
    assert all(len(c) == 5 for c in cells) and all(line.endswith(r" \\") for line in body[2:-2] if line != r"\midrule")
    for col in (1, 2):  # the best mean of each shot, once: protonet
        assert [c[col].startswith(r"\textbf{") for c in cells] == [False, False, False, True]
    assert cells[0][3:] == ["(ref)", "(ref)"] and cells[1][3].endswith(r"$^\ddagger$")
    assert "seeds" not in "\n".join(body) and "test-selected" not in "\n".join(body)  # those are table.md's
