"""``compare``: several heads on one cache, identical episodes, paired CIs, reported numbers; a rerun does only what is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mdmf_cache.errors import ConfigError
from pipelines.compare import CompareConfig, run_compare, table_rows

TRAIN = {"episodes": 16, "episodes_per_step": 16, "val_every": 16, "val_episodes": 20, "lr": 1e-3}


@pytest.mark.integration
def test_compare_trains_scores_and_resumes(demo_cache, tmp_path, monkeypatch):
    import mdmf_cache.evaluation as evaluation
    import mdmf_cache.training as training

    out = tmp_path / "cmp"
    cfg = CompareConfig(cache=str(demo_cache), out=str(out), methods=("mdmf", "clip-fsar", "protonet"), shots=(1, 3),
                        train=TRAIN, test_episodes=60)
    real_train = training.run_train
    calls = []

    def killed_after_first(tcfg, **kw):  # the second training is "killed"
        calls.append(tcfg.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(tcfg, **kw)

    monkeypatch.setattr(training, "run_train", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, progress=False)
    first = out / "runs" / "mdmf_1shot" / "best.pt"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(training, "run_train", real_train)
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
    monkeypatch.setattr(training, "run_train", lambda *a, **k: pytest.fail("trained again"))
    again = run_compare(cfg, progress=False)
    assert scored == [] and again["rows"] == res["rows"]
    with pytest.raises(ConfigError, match="other"):  # other settings into the same --out
        run_compare(CompareConfig(**{**cfg.__dict__, "test_episodes": 50}), progress=False)


def test_compare_checks_everything_before_work(demo_cache, tmp_path):
    for kw, match in (({"methods": ("mdmf", "nope")}, "unknown"), ({"methods": ("clip-fsar",)}, "--reference"),
                      ({"train": {"lr": -1.0}}, "--lr"), ({"train": {"shot": 3}}, "set by compare"),
                      ({"shots": (1, 40)}, "the test split has")):
        with pytest.raises(ConfigError, match=match):
            run_compare(CompareConfig(cache=str(demo_cache), out=str(tmp_path / "c"), **kw), progress=False)
        assert not (tmp_path / "c").exists()


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
