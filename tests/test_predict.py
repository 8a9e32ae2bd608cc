"""mdmf-cache predict: supports per class + unlabelled videos -> predictions.csv, with a trained run's backbone and head.

What is checked: a trained MDMF run labels other videos of the demo's test classes well above chance from
5 supports per class; the features predict extracts are bitwise those of the run's cache (fast mode) or of
its backbone.pt's eval cache (full mode), with the same prompts; a second call loads no backbone and adds no
row, a video added since is the only one extracted; the scoring rules (one episode per query, K-subsets,
per-video == direct, the PPS rule) on features in memory; and every input problem is one line, exit 2,
nothing written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from conftest import assert_same_features
from mdmf_cache import heads as head_registry
from mdmf_cache.configs import PredictConfig, TrainConfig
from mdmf_cache.errors import ConfigError
from mdmf_cache.prediction.inputs import SPLIT, find_queries, find_support
from mdmf_cache.prediction.scoring import class_probabilities, pps_rule, support_subsets
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import load_split_features
from pipelines.train import run as run_train
from pipelines.predict import run as predict

pytestmark = pytest.mark.integration


def _links(videos: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for v in videos:
        (folder / v.name).symlink_to(v)
    return [folder / v.name for v in videos]


def _split_inputs(root: Path, classes: list[str], shots: int, dest: Path) -> tuple[Path, list[Path]]:
    """``dest/support/<class>/`` linking the first ``shots`` videos of each class; the rest as query files."""
    queries = []
    for c in classes:
        vids = sorted((root / c).iterdir())
        _links(vids[:shots], dest / "support" / c)
        queries += vids[shots:]
    return dest / "support", queries


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _cfg(run, support, query, tmp_path, **kw) -> PredictConfig:
    return PredictConfig(run=str(run), support=str(support), query=tuple(map(str, query)), out=str(tmp_path / "out"),
                         cache_dir=str(tmp_path / "pcache"), workers=0, device="cpu", **kw)


def _no_backbone(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr("mdmf_cache.clip.backbone.load_backbone", refuse)


@pytest.fixture(scope="module")
def fast_run(demo_cache, tmp_path_factory) -> Path:
    """MDMF trained on the demo cache's train classes (1-shot episodes of 2 queries per class: cheap ones)."""
    out = tmp_path_factory.mktemp("predict_fast") / "run"
    run_train(TrainConfig(cache=str(demo_cache), out=str(out), shot=1, train_queries=2, episodes=128, episodes_per_step=16,
                          val_every=128, val_episodes=50, lr=3e-3, seed=0, device="cpu"), progress=False)
    return out


@pytest.fixture
def run_main(monkeypatch, capsys):
    """``mdmf-cache ARGS`` through the console entry in this process: (exit code, stdout, stderr)."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mdmf-cache", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    yield invoke
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)


def test_a_trained_run_labels_the_test_classes_from_their_supports(fast_run, demo_cache, demo_videos, tmp_path):
    store = CacheStore(demo_cache)
    classes = list(store.root["test"].attrs["classes"])
    support, queries = _split_inputs(demo_videos, classes, 5, tmp_path / "in")
    flat = tmp_path / "in" / "query"
    _links(queries, flat)
    cfg = _cfg(fast_run, support, [flat], tmp_path)
    res = predict(cfg, progress=False, show=False)

    header, rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert header == ["query", "predicted", *classes]
    assert len(rows) == len(queries) == 25
    for r in rows:
        p = np.array([float(r[c]) for c in classes])
        assert abs(p.sum() - 1) < 1e-9 and r["predicted"] == classes[int(p.argmax())]
    acc = np.mean([r["predicted"] == Path(r["query"]).resolve().parent.name for r in rows])  # the link's target's class
    assert acc >= 0.36, acc  # 5-way: chance is 0.2; measured 0.44 (2-core CPU)
    assert res["shot"] == 5 and res["passes"] == 1 and res["extracted"] == 50

    # the features are the run's: the cache's test rows (batched otherwise: to one float16 step), the same prompts
    test = load_split_features(demo_cache, "test")
    pstore = CacheStore(res["cache"])
    row = {k.rsplit("|", 2)[0]: i for i, k in enumerate(pstore.video_ids(SPLIT))}
    mine = np.asarray(pstore.root[SPLIT]["features"][:])[:, 0]
    for i, vid in enumerate(test.video_ids):
        path = next((demo_videos / vid.split("/")[0]).glob(vid.split("/")[1] + ".*")).resolve()
        assert_same_features(mine[row[str(path)]], test.features[i, 0].numpy(), vid)
    saved = json.loads((tmp_path / "out" / "predict_config.json").read_text())
    assert saved["resolved"]["prompts"] == store.root["test"].attrs["prompts"]  # template and clean names of the cache
    with np.load(Path(res["cache"]).with_name(Path(res["cache"]).stem + ".text.npz")) as z:
        np.testing.assert_allclose(z["embeddings"], store.root["test"]["text_features"][:], atol=1e-5)
    assert PredictConfig(**{k: tuple(v) if k == "query" else v for k, v in saved.items() if k != "resolved"}) == cfg


def test_predict_cache_must_be_the_run_s_cache(fast_run, demo_cache, tiny_cache, demo_videos, tmp_path, run_main):
    """--cache stands in for a moved cache only if it is the run's (as eval --cache): another backbone's or dataset's
    cache is refused in one line before anything is extracted or written; the run's own is taken."""
    classes = sorted(p.name for p in demo_videos.iterdir())[:2]
    support, queries = _split_inputs(demo_videos, classes, 2, tmp_path / "in")
    args = ["predict", fast_run, "--support", support, "--query", *queries[:2], "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "pcache", "--workers", 0, "--device", "cpu"]
    code, _, err = run_main(*args, "--cache", tiny_cache)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"predict {fast_run} --cache: {tiny_cache} is not the cache this run was trained on (" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pcache").exists()
    code, _, err = run_main(*args, "--cache", demo_cache)
    assert code == 0, err


def test_a_second_call_extracts_nothing_and_new_videos_alone(fast_run, demo_videos, tmp_path, run_main, monkeypatch):
    classes = sorted(p.name for p in demo_videos.iterdir())[:2]
    support, queries = _split_inputs(demo_videos, classes, 2, tmp_path / "in")
    queries = queries[:3]
    args = ["predict", fast_run, "--support", support, "--query", *queries, "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "pcache", "--workers", 0, "--device", "cpu"]
    code, out, err = run_main(*args)
    assert code == 0, err
    assert "per class" in out and "predictions:" in out and "transductive" not in err  # MDMF is not
    first = (tmp_path / "out" / "predictions.csv").read_bytes()
    _, first_rows = _read_csv(tmp_path / "out" / "predictions.csv")
    group = next((tmp_path / "pcache").glob("*.zarr"))
    assert CacheStore(group).num_rows(SPLIT) == 7  # 4 supports + 3 queries

    records: list[logging.LogRecord] = []
    with monkeypatch.context() as m:  # nothing changed: no backbone, no row, the same predictions; a head marked
        _no_backbone(m)  # transductive: one warning line (one query per episode)
        m.setattr("mdmf_cache.heads.mdmf.SPEC", dataclasses.replace(head_registry.get("mdmf"), transductive=True))
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        m.setattr(logging.getLogger("pipelines.predict"), "handlers", [handler])
        res = predict(_cfg(fast_run, support, queries, tmp_path), progress=False, show=False)
    said = [r.getMessage() for r in records if "transductive" in r.getMessage()]
    assert len(said) == 1 and "one query per episode" in said[0] and "\n" not in said[0]
    assert res["extracted"] == 0 and not res["backbone_loaded"]
    assert CacheStore(group).num_rows(SPLIT) == 7
    assert (tmp_path / "out" / "predictions.csv").read_bytes() == first

    added = tmp_path / "in" / "new" / "copy.mp4"  # a new file (another path: another video)
    added.parent.mkdir()
    shutil.copy(next((demo_videos / classes[0]).glob("*.mp4")), added)
    res = predict(_cfg(fast_run, support, [*queries, added.parent], tmp_path), progress=False, show=False)
    assert res["extracted"] == 1 and CacheStore(group).num_rows(SPLIT) == 8
    _, rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert [r["query"] for r in rows] == [*map(str, queries), str(added)]
    # one episode per query: the first three keep their class and their probabilities. The fourth video joins the
    # per-video batch, and float32 kernels may round a batch of another shape differently on some CPUs: to 1e-5
    assert [r["predicted"] for r in rows[:3]] == [r["predicted"] for r in first_rows]
    for again, before in zip(rows[:3], first_rows):
        assert [float(again[c]) for c in classes] == pytest.approx([float(before[c]) for c in classes], abs=1e-5)


def _features(demo_cache, n_classes=3, per_class=4):
    test = load_split_features(demo_cache, "test")
    feats, labels = test.features[:, 0].float(), test.labels.numpy()
    support = [feats[np.flatnonzero(labels == c)[:per_class]] for c in range(n_classes)]
    qi = np.concatenate([np.flatnonzero(labels == c)[per_class:] for c in range(n_classes)])
    return support, feats[qi], test.text[:n_classes].float()


@pytest.mark.parametrize("method", [m for m in head_registry.METHODS if head_registry.get(m).tokens is None])
def test_scoring_rules(demo_cache, method):
    from mdmf_cache.heads.factory import build_model

    support, query, text = _features(demo_cache)
    torch.manual_seed(0)
    head = build_model(None, int(query.shape[-1]), int(query.shape[1]), method=method).eval()
    # balanced supports: one pass, the softmax of the head's logits of an episode with every support and one query
    p = class_probabilities(head, support, query, text)
    with pps_rule(head, "argmax"), torch.no_grad():
        logits = torch.cat([head(torch.cat(support)[None], query[j : j + 1][None], text[None])["logits"][0]
                            for j in range(len(query))])  # (Q, N)
    torch.testing.assert_close(p, torch.softmax(logits.double(), -1), atol=1e-5, rtol=0)
    assert torch.allclose(p.sum(1), torch.ones(len(query), dtype=torch.float64))
    # more supports than K: the mean over the seeded K-subsets, the same on both paths and call after call
    uneven = [support[0], support[1][:2], support[2][:3]]
    k, passes = support_subsets([4, 2, 3], None, 4, seed=0)
    assert k == 2 and len(passes) == 4 and len({tuple(np.concatenate(x)) for x in passes}) > 1
    p = class_probabilities(head, uneven, query, text, subsets=4)
    by_pass = [class_probabilities(head, [x[torch.as_tensor(i)] for x, i in zip(uneven, picks)], query, text)
               for picks in passes]
    torch.testing.assert_close(p, torch.stack(by_pass).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, class_probabilities(head, uneven, query, text, subsets=4, path="direct"), atol=1e-5, rtol=0)
    assert torch.equal(p, class_probabilities(head, uneven, query, text, subsets=4))
    # one episode per query: a query's answer does not depend on the others (its PPS draw neither)
    keys = [f"q{i}" for i in range(len(query))]
    for rule in ("argmax", "sample"):
        full = class_probabilities(head, support, query, text, pps_test=rule, query_keys=keys)
        part = class_probabilities(head, support, query[3:], text, pps_test=rule, query_keys=keys[3:])
        torch.testing.assert_close(full[3:], part, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        class_probabilities(head, support[:1], query, text[:1])
    with pytest.raises(ConfigError, match="at most 2"):
        class_probabilities(head, uneven, query, text, shot=3)


def test_finding_videos(tmp_path):
    from mdmf_cache.errors import DatasetError
    from mdmf_cache.data.synthetic import write_empty_file, write_index_frames

    q = tmp_path / "q"
    write_empty_file(q / "a" / "x.mp4")
    write_index_frames(q / "a" / "frames_clip", 2, size=(96, 16))
    write_empty_file(q / "b" / "c" / "y.avi")
    write_empty_file(q / ".hidden" / "z.mp4")
    write_empty_file(q / "notes.txt")
    found = find_queries([q, q / "a" / "x.mp4"])
    assert [p.relative_to(q).as_posix() for p in found] == ["a/frames_clip", "a/x.mp4", "b/c/y.avi"]  # sorted per folder, once
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no query video"):
        find_queries([tmp_path / "none"])
    with pytest.raises(DatasetError, match="is not a video"):
        find_queries([q / "notes.txt"])
    s = tmp_path / "s"
    write_empty_file(s / "run" / "1.mp4")
    write_empty_file(s / "jump" / "1.mp4")
    write_empty_file(s / "jump" / "2.webm")
    assert {c: [p.name for p in v] for c, v in find_support(s).items()} == {"jump": ["1.mp4", "2.webm"], "run": ["1.mp4"]}


def test_a_query_that_is_also_a_support_is_warned_about(fast_run, demo_cache, demo_videos, tmp_path, caplog):
    from mdmf_cache.prediction.inputs import queries_among_supports

    classes = list(CacheStore(demo_cache).root["test"].attrs["classes"])[:2]
    support, others = _split_inputs(demo_videos, classes, 2, tmp_path / "in")
    sup = find_support(support)
    q = tmp_path / "in" / "query"
    q.mkdir()
    (q / "linked.avi").symlink_to(sup[classes[0]][0])  # the same file
    shutil.copy(sup[classes[1]][1], q / "copied.avi")  # the same content
    shutil.copy(others[0], q / "other.avi")
    found = queries_among_supports(sup, find_queries([q]))
    assert [(p.name, c, v.name, how) for p, c, v, how in found] == [
        ("copied.avi", classes[1], sup[classes[1]][1].name, "the same content"),
        ("linked.avi", classes[0], sup[classes[0]][0].name, "the same file")]
    same_size = tmp_path / "same_size.mp4"  # a file of a support's size, other bytes: not a support
    data = bytearray(sup[classes[0]][1].read_bytes())
    data[-1] ^= 0xFF
    data[0] ^= 0xFF
    same_size.write_bytes(bytes(data))
    assert queries_among_supports(sup, [same_size]) == []

    with caplog.at_level(logging.WARNING, logger="pipelines.predict"):
        predict(_cfg(fast_run, support, [q], tmp_path), progress=False, show=False)
    warned = [r.getMessage() for r in caplog.records if "support" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "query" in warned[0] and "copied.avi" in warned[0] and "the same content" in warned[0]
    assert "1 more queries are supports too" in warned[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(fast_run, demo_cache, demo_videos, tmp_path, run_main):
    from mdmf_cache.data.synthetic import write_empty_file

    classes = sorted(p.name for p in demo_videos.iterdir())[:2]
    support, queries = _split_inputs(demo_videos, classes, 1, tmp_path / "in")
    out = tmp_path / "out"

    def fails(run, support, *query, match: str, extra=()) -> None:
        code, _, err = run_main("predict", run, "--support", support, "--query", *query, "--out", out,
                                "--cache-dir", tmp_path / "pcache", "--workers", 0, "--device", "cpu", *extra)
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in " ".join(err.split()), err
        assert not out.exists()

    fails(tmp_path, support, queries[0], match="is not a run directory")
    fails(demo_cache, support, queries[0], match="is a cache, not a run")
    # a support class without any decodable video, named with its file
    bad = tmp_path / "bad"
    shutil.copytree(support, bad, symlinks=True)
    write_empty_file(bad / "broken" / "clip.mp4")
    fails(fast_run, bad, queries[0], match="support class broken: no video could be decoded (broken: clip.mp4:")
    (bad / "broken" / "clip.mp4").unlink()
    fails(fast_run, bad, queries[0], match="support class broken has no video")
    one = tmp_path / "one"
    shutil.copytree(support / classes[0], one / classes[0], symlinks=True)
    fails(fast_run, one, queries[0], match="at least 2 classes")
    (tmp_path / "empty").mkdir()
    fails(fast_run, support, tmp_path / "empty", match="no query video under")
    fails(fast_run, support, tmp_path / "nowhere.mp4", match="no such file")
    fails(fast_run, support, queries[0], match="--shot 0", extra=("--shot", 0))
    # features made with weights that cannot be loaded here: a tag open_clip would have to download
    moved = tmp_path / "tagged_run"
    moved.mkdir()
    shutil.copy(fast_run / "best.pt", moved)
    cfg = json.loads((fast_run / "config.json").read_text())
    cfg["cache_identity"]["fingerprint"]["video"]["weights"] = "openai"
    (moved / "config.json").write_text(json.dumps(cfg))
    fails(moved, support, queries[0], match="downloads its 'openai' weights on first use")
    # a checkpoint whose path only the (moved) cache knew, and a --weights file that is another checkpoint
    cfg["cache_identity"]["fingerprint"]["video"]["weights"] = "sha256:" + "0" * 64
    cfg["cache"] = cfg["cache_abs"] = str(tmp_path / "gone.zarr")
    (moved / "config.json").write_text(json.dumps(cfg))
    fails(moved, support, queries[0], match="whose path only its cache records")
    fails(moved, support, queries[0], match="pass --weights PATH to that checkpoint", extra=("--weights", moved / "best.pt"))
    assert not list((tmp_path / "pcache").glob("*openai*.zarr"))  # nothing half-made


@pytest.fixture(scope="module")
def full_run(action_videos, tmp_path_factory) -> Path:
    """A tiny full-mode run on ``action_videos`` (2-way 1-shot, 8 episodes)."""
    out = tmp_path_factory.mktemp("predict_full") / "run"
    full = {"dataset": "folder", "root": str(action_videos), "model": "mdmf-tiny-vit", "pretrained": None, "workers": 0,
            "flip": False, "episodes_per_forward": 8}
    run_train(TrainConfig(mode="full", out=str(out), way=2, shot=1, train_queries=1, episodes=8, episodes_per_step=8,
                          val_every=8, val_episodes=4, lr=1e-3, device="cpu", full=full), progress=False)
    return out


def test_a_full_run_predicts_with_its_backbone(full_run, action_videos, tmp_path, monkeypatch, run_main):
    from mdmf_cache.extraction.eval_cache import full_run_cache

    run_cfg = json.loads((full_run / "config.json").read_text())
    eval_cache = full_run_cache(full_run, run_cfg, "test", "cpu", progress=False)  # the test split with backbone.pt
    classes = list(CacheStore(eval_cache).root["test"].attrs["classes"])
    support, queries = _split_inputs(action_videos, classes, 2, tmp_path / "in")
    res = predict(_cfg(full_run, support, queries, tmp_path), progress=False, show=False)
    header, rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert header == ["query", "predicted", *classes] and len(rows) == 4
    assert all(abs(sum(float(r[c]) for c in classes) - 1) < 1e-9 for r in rows)
    assert res["weights"].startswith("sha256:") and res["method"] == "mdmf"
    test = load_split_features(eval_cache, "test")
    pstore = CacheStore(res["cache"])
    row = {k.rsplit("|", 2)[0]: i for i, k in enumerate(pstore.video_ids(SPLIT))}
    mine = np.asarray(pstore.root[SPLIT]["features"][:])[:, 0]
    for i, vid in enumerate(test.video_ids):
        path = next((action_videos / vid.split("/")[0]).glob(vid.split("/")[1] + ".*")).resolve()
        assert_same_features(mine[row[str(path)]], test.features[i, 0].numpy(), vid)
    with monkeypatch.context() as m:
        _no_backbone(m)
        again = predict(_cfg(full_run, support, queries, tmp_path), progress=False, show=False)
    assert again["extracted"] == 0 and not again["backbone_loaded"]
    # a full run without its backbone.pt
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "best.pt"):
        shutil.copy(full_run / name, bare)
    code, _, err = run_main("predict", bare, "--support", support, "--query", queries[0], "--out", tmp_path / "o2",
                            "--workers", 0, "--device", "cpu")
    assert code == 2 and "without backbone.pt" in err and not (tmp_path / "o2").exists()
