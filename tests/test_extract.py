"""Extraction end to end on synthetic videos: contents, determinism, resume after SIGKILL, ranks,
refused settings, corrupt and missing videos."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import forked, join_or_kill

from mdmf_cache.data.datasets import VideoIndex, load_splits
from mdmf_cache.errors import CacheError, DatasetError, MdmfError
from mdmf_cache.data.sampling import sample_indices, video_rng
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.layout import group_name
from mdmf_cache.store.read import load_split_features
from mdmf_cache.extraction.build import run_extract
from mdmf_cache.configs import ExtractConfig

T = 8
SIZES = {"train": (20, 2), "val": (8, 1), "test": (8, 1)}  # (videos, views) of tiny_cache

def fork_extract(kw: dict, delay: float = 0.0, cwd: Path | None = None):
    """``run_extract(ExtractConfig(**kw))`` in a forked child (conftest's :func:`forked`); ``delay`` > 0 slows every
    video down by that many seconds there (wrapping the decoder source: results are unchanged), so the run can be
    killed midway."""

    def child() -> None:
        import mdmf_cache.extraction.embed as ex

        if cwd is not None:
            os.chdir(cwd)
        if delay:
            get = ex.ClipSource.__getitem__

            def slow(self, i):
                time.sleep(delay)
                return get(self, i)

            ex.ClipSource.__getitem__ = slow
        run_extract(ExtractConfig(**kw))

    return forked(child)


def _done_count(path: Path) -> int:
    try:
        store = CacheStore(path)
        return sum(int(store.done_mask(s).sum()) for s in store.splits)
    except Exception:  # not created yet, or a split half-made: nothing done
        return 0


def fork_and_kill(kw: dict, path: Path, low: int, high: int, delay: float, cwd: Path, done=None) -> int:
    """Run ``run_extract(kw)`` in a forked child (:func:`fork_extract`), SIGKILL it once ``low <= done() < high``
    (``done``: the rows done in the cache at ``path``); returns the count seen when it was killed."""
    done = done or (lambda: _done_count(path))
    proc = fork_extract(kw, delay=delay, cwd=cwd)
    killed_at, deadline = None, time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.is_alive():
            n = done()
            if low <= n < high:
                proc.kill()  # SIGKILL
                killed_at = n
                break
            time.sleep(0.05)
    finally:
        join_or_kill(proc, 0)  # killed or not, it goes now
    assert killed_at is not None, f"run ended (exit code {proc.exitcode}) before it could be killed (its stderr above)"
    assert proc.exitcode == -signal.SIGKILL
    return killed_at


@pytest.fixture(scope="module")
def backbone():
    from mdmf_cache.clip.backbone import load_backbone

    return load_backbone("mdmf-tiny-vit", None, "cpu")


@pytest.fixture(scope="module")
def folder_splits(action_videos):
    return load_splits("folder", None, action_videos, 0)


def _cfg(settings: dict, root: Path, cache_dir: Path, **kw) -> ExtractConfig:
    return ExtractConfig(**{**settings, "root": str(root), "cache_dir": str(cache_dir), **kw})


# ---- contents of the cache --------------------------------------------------------------------
def test_tiny_cache_contents(tiny_cache, folder_splits, backbone):
    store = CacheStore(tiny_cache)
    assert store.is_complete() and store.splits == ["train", "val", "test"]
    assert tiny_cache.name == "videos__mdmf-tiny-vit__random.zarr"
    video = store.fingerprint["video"]
    assert video["train_views"] == 2 and video["weights"] == "random-init-seed0"
    assert store.fingerprint["text"] == {"prompt_template": "a photo of {}", "clean_names": False}
    for name, (n, views) in SIZES.items():
        g, sp = store.root[name], folder_splits[name]
        assert g["features"].shape == (n, views, T, backbone.dim) and g["features"].dtype == np.float16
        assert list(g["video_ids"][:]) == sp.video_ids
        assert np.array_equal(g["labels"][:], sp.labels)
        assert g.attrs["classes"] == sp.classes and len(sp.classes) == n // 4
        nf = np.asarray(g["num_frames"][:])
        fi = np.asarray(g["frame_indices"][:])
        assert (nf == 20).all()
        assert fi.shape == (n, views, T) and (fi >= 0).all() and (fi < nf[:, None, None]).all()
        assert not np.asarray(g["failed"][:]).any() and set(g["errors"][:].tolist()) == {""}
        feats = np.asarray(g["features"][:], dtype=np.float32)
        assert np.isfinite(feats).all() and (np.abs(feats).sum(-1) > 0).all()
        assert len({f.tobytes() for f in feats.reshape(n * views, -1)}) == n * views  # every clip its own
        # text: one prompt per class from the template, embedded by the text tower
        prompts = [f"a photo of {c}" for c in sp.class_names]
        assert g.attrs["prompts"] == prompts and g.attrs["prompt_template"] == "a photo of {}"
        text = np.asarray(g["text_features"][:])
        assert text.shape == (len(sp.classes), backbone.dim) and text.dtype == np.float32
        np.testing.assert_allclose(text, backbone.encode_texts(prompts).numpy(), rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_and_seeded(tiny_cache):
    store = CacheStore(tiny_cache)
    for name in ("val", "test"):  # tsn middle frames, identical for every video
        fi = np.asarray(store.root[name]["frame_indices"][:])
        assert (fi[:, 0] == sample_indices(20, T, "tsn")).all()
    fi = np.asarray(store.root["train"]["frame_indices"][:])
    ids = store.video_ids("train")
    for row in range(len(fi)):  # random inside segments, seeded per (seed, video id, view), not per row
        for v in range(2):
            assert np.array_equal(fi[row, v], sample_indices(20, T, "tsn", train=True, rng=video_rng(0, ids[row], v)))
    assert not np.array_equal(fi[:, 0], fi[:, 1])  # the views are different draws


def test_features_are_clip_of_the_decoded_crop(tiny_cache, folder_splits, action_videos, backbone):
    """Recompute one test row (centre crop) and one train view (seeded random crop) by hand."""
    import torch

    from mdmf_cache.data.preprocess import Crop, preprocess_clips
    from mdmf_cache.data.video import read_frames

    store = CacheStore(tiny_cache)
    index = VideoIndex(action_videos)
    for name, row, view in (("test", 5, 0), ("train", 3, 1)):
        g = store.root[name]
        path = index.resolve(folder_splits[name].video_ids[row])
        idx = np.asarray(g["frame_indices"][row, view])
        if name == "train":
            rng = video_rng(0, folder_splits[name].video_ids[row], view)
            assert np.array_equal(sample_indices(20, T, "tsn", train=True, rng=rng), idx)
            crop = Crop.random(rng, flip=False)  # the draw after the frame indices
            assert crop != Crop.centre()
        else:
            crop = Crop.centre()
        pix = preprocess_clips([read_frames(path, idx)], [crop], "cpu", normalize="clip")
        ref = backbone.encode_images(pix[0]).to(torch.float16).numpy()
        got = np.asarray(g["features"][row, view])
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


# ---- resume --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigkill_then_resume_equals_uninterrupted(tiny_cache, action_videos, tiny_extract_settings, tmp_path, same_cache):
    cache_dir = tmp_path / "cache"
    path = cache_dir / group_name(action_videos.name, "mdmf-tiny-vit", "random")
    total = sum(n for n, _ in SIZES.values())
    # the killed run writes small, partial chunks (a flush per row, batches of 2): resume must cope
    kw = {**tiny_extract_settings, "root": str(action_videos), "cache_dir": str(cache_dir),
          "batch_videos": 2, "flush_seconds": 0.0}
    killed_at = fork_and_kill(kw, path, 6, total, delay=0.15, cwd=tmp_path)  # chunk 0 done, chunk 1 half
    store = CacheStore(path)
    done_after = sum(int(store.done_mask(s).sum()) for s in store.splits)
    assert killed_at <= done_after < total and not store.is_complete()
    unfinished = next(s for s in ("train", "val", "test") if s not in store.splits or not store.done_mask(s).all())
    if unfinished in store.splits:
        with pytest.raises(CacheError, match="not extracted yet"):
            load_split_features(path, unfinished)

    # the same command again (default batching and flushing) finishes only what is missing
    _, results = run_extract(ExtractConfig(**{**kw, "batch_videos": 8, "flush_seconds": 30.0}))
    assert sum(r.extracted + r.failed for r in results) == total - done_after
    same_cache(path, tiny_cache)
    # and once more: nothing left to do
    _, results = run_extract(ExtractConfig(**kw))
    assert sum(r.extracted for r in results) == 0


@pytest.mark.integration
def test_crash_while_creating_splits_recovers(tiny_cache, action_videos, tiny_extract_settings, tmp_path,
                                              monkeypatch, same_cache):
    """A run that dies between creating a split's arrays and writing its text, then reruns."""
    from mdmf_cache.store.cache import CacheStore as Store

    real_init, real_text = Store.sync_rows, Store.write_text

    def init_then_die(self, name, *a, **kw):
        if name == "val":
            g = self.root.create_group(name)  # some arrays made, no attributes yet
            g.create_array("done", shape=(3,), dtype=bool, fill_value=False)
            raise KeyboardInterrupt
        return real_init(self, name, *a, **kw)

    def text_then_die(self, split, emb, *a, **kw):
        self.root[split].create_array("text_features", shape=emb.shape, dtype="float32", fill_value=0)
        raise KeyboardInterrupt  # embeddings array made, never filled

    cfg = _cfg(tiny_extract_settings, action_videos, tmp_path)
    monkeypatch.setattr(Store, "write_text", text_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg)
    monkeypatch.setattr(Store, "write_text", real_text)
    monkeypatch.setattr(Store, "sync_rows", init_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg)
    monkeypatch.setattr(Store, "sync_rows", real_init)
    path, _ = run_extract(cfg)
    same_cache(path, tiny_cache)


@pytest.mark.integration
def test_two_ranks_equal_single_process(tiny_cache, action_videos, tiny_extract_settings, tmp_path, same_cache):
    kw = {**tiny_extract_settings, "root": str(action_videos), "cache_dir": str(tmp_path / "cache"), "world_size": 2}
    rank1 = fork_extract({**kw, "rank": 1}, cwd=tmp_path)  # started first: waits for rank 0 to prepare the cache
    try:
        path, results = run_extract(ExtractConfig(**kw, rank=0))
        store = CacheStore(path)
        for r in results:  # rank 0 extracted exactly its chunks (chunk_rows 4: chunks 0, 2, 4)
            rows = np.arange(SIZES[r.split][0])
            assert r.extracted == int(((rows // 4) % 2 == 0).sum())
            assert store.done_mask(r.split)[(rows // 4) % 2 == 0].all()
        code = join_or_kill(rank1, 180)
    finally:
        join_or_kill(rank1, 0)  # rank 0 failed: rank 1 goes at once
    assert code == 0, "rank 1 failed (its stderr above)"
    same_cache(path, tiny_cache)


# ---- refused settings, corrupt and missing videos -----------------------------------------------
@pytest.mark.integration
def test_other_settings_refused_then_overwrite(tiny_cache, action_videos, tiny_extract_settings, tmp_path):
    shutil.copytree(tiny_cache, tmp_path / tiny_cache.name)
    with pytest.raises(CacheError, match=r"num_frames: cache has 8, asked 4") as err:
        run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path, num_frames=4))
    assert "train_views" not in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(CacheError, match=r"seed: cache has 0, asked 1"):
        run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path, seed=1))
    assert CacheStore(tmp_path / tiny_cache.name).root["train"]["features"].shape[2] == T  # untouched
    path, _ = run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path, num_frames=4, overwrite=True))
    store = CacheStore(path)
    assert store.is_complete() and store.fingerprint["video"]["num_frames"] == 4
    assert store.root["train"]["features"].shape[:3] == (20, 2, 4)
    assert (np.asarray(store.root["test"]["frame_indices"][:, 0]) == sample_indices(20, 4, "tsn")).all()


@pytest.fixture(scope="module")
def corrupt_cache(action_videos, folder_splits, tiny_extract_settings, tmp_path_factory):
    """action_videos plus a truncated MP4 (unreadable), a zero-byte AVI and a half AVI (5 frames)."""
    from mdmf_cache.data.synthetic import truncate_file, write_empty_file

    base = tmp_path_factory.mktemp("corrupt")
    root = base / "videos"
    shutil.copytree(action_videos, root)
    cls = folder_splits["test"].classes[0]
    shutil.copy(root / cls / f"{cls}_v00.mp4", root / cls / "zz_truncated.mp4")
    truncate_file(root / cls / "zz_truncated.mp4", 0.5)
    write_empty_file(root / cls / "zz_empty.avi")
    shutil.copy(root / cls / f"{cls}_v01.avi", root / cls / "zz_short.avi")
    truncate_file(root / cls / "zz_short.avi", 0.5)
    path, results = run_extract(_cfg(tiny_extract_settings, root, base / "cache"))
    return root, base / "cache", path, cls, {r.split: r for r in results}


@pytest.mark.integration
def test_corrupt_videos_recorded(corrupt_cache, capsys):
    from mdmf_cache.report.tables import print_info

    root, _, path, cls, results = corrupt_cache
    assert results["test"].failed == 2 and results["test"].extracted == 9 and results["test"].short == 1
    assert {vid for vid, _ in results["test"].failures} == {f"{cls}/zz_truncated", f"{cls}/zz_empty"}
    store = CacheStore(path)
    assert store.is_complete()  # a recorded failure is a finished row
    g = store.root["test"]
    ids = list(g["video_ids"][:])
    failed = np.asarray(g["failed"][:])
    errors = np.asarray(g["errors"][:])
    bad = {ids[i]: str(errors[i]) for i in np.flatnonzero(failed)}
    assert set(bad) == {f"{cls}/zz_truncated", f"{cls}/zz_empty"}
    assert "zz_truncated.mp4" in bad[f"{cls}/zz_truncated"] and "zz_empty.avi" in bad[f"{cls}/zz_empty"]
    assert all(str(e) == "" for e in errors[~failed])
    assert not np.asarray(g["features"][:])[failed].any() and (np.asarray(g["frame_indices"][:])[failed] == -1).all()
    # the half AVI decodes 5 frames: indices clamped to the last one, recorded as short
    short = ids.index(f"{cls}/zz_short")
    assert int(g["num_frames"][short]) == 5
    fi = np.asarray(g["frame_indices"][short, 0])
    assert fi.max() == 4 and (np.diff(fi) >= 0).all() and len(set(fi.tolist())) < T
    assert store.split_summary("test")["short"] == 1
    fs = load_split_features(path, "test")
    assert len(fs.video_ids) == 9 and f"{cls}/zz_empty" not in fs.video_ids and f"{cls}/zz_short" in fs.video_ids

    capsys.readouterr()
    summary = print_info(path)
    out = capsys.readouterr().out
    assert summary["splits"]["test"]["failed"] == 2 and summary["complete"]
    assert f"{cls}/zz_empty" in out and "failed" in out


@pytest.mark.integration
def test_strict_fails_on_recorded_failures(corrupt_cache, cli_runner):
    import cli

    root, cache_dir, path, _, _ = corrupt_cache
    args = ["extract", "folder", "--root", str(root), "--cache-dir", str(cache_dir), "--model", "mdmf-tiny-vit",
            "--pretrained", "none", "--workers", "0", "--chunk-rows", "4", "--train-views", "2", "--no-flip"]
    ok = cli_runner.invoke(cli.app, args)
    assert ok.exit_code == 0, ok.output
    res = cli_runner.invoke(cli.app, args + ["--strict"])
    assert res.exit_code != 0
    assert isinstance(res.exception, MdmfError) and "2 videos could not be decoded" in str(res.exception)


@pytest.mark.integration
def test_missing_entries_warn_or_fail(action_videos, folder_splits, tiny_extract_settings, tmp_path, caplog):
    lists = tmp_path / "lists"
    lists.mkdir()
    tr = folder_splits["train"].video_ids
    gone = tr[0].split("/")[0] + "/not_there"
    (lists / "train.txt").write_text(f"{tr[0]}\n{gone}\n{tr[1]}\n")
    (lists / "val.txt").write_text(folder_splits["val"].video_ids[0] + "\n")
    (lists / "test.txt").write_text(folder_splits["test"].video_ids[0] + "\n")
    with caplog.at_level(logging.WARNING):
        path, results = run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path / "c", splits_dir=str(lists)))
    assert "1 videos listed in the split files are not under" in caplog.text and gone in caplog.text
    g = CacheStore(path).root["train"]
    assert list(g["video_ids"][:]) == [tr[0], tr[1]] and g.attrs["missing"] == [gone]
    assert results[0].missing == 1 and CacheStore(path).is_complete()
    assert CacheStore(path).split_summary("train")["missing"] == 1
    with pytest.raises(DatasetError, match="not_there"):
        run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path / "c2", splits_dir=str(lists), strict=True))
    assert not (tmp_path / "c2").exists()  # refused before anything was written


@pytest.mark.integration
def test_splits_extracted_separately_share_one_cache(tiny_cache, action_videos, tiny_extract_settings, tmp_path,
                                                     same_cache):
    """--split test now, the rest later: one fingerprint (all split files), the same cache."""
    kw = {**tiny_extract_settings, "root": str(action_videos), "cache_dir": str(tmp_path / "cache")}
    path, _ = run_extract(ExtractConfig(**kw, splits=("test",)))
    assert CacheStore(path).splits == ["test"]
    path, results = run_extract(ExtractConfig(**kw, splits=("train", "val")))
    assert {r.split: r.extracted for r in results} == {"train": SIZES["train"][0], "val": SIZES["val"][0]}
    same_cache(path, tiny_cache)


# ---- nothing found, most missing -----------------------------------------------------------------
def _lists(tmp_path: Path, folder_splits, train: list[str]) -> Path:
    lists = tmp_path / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "train.txt").write_text("\n".join(train) + "\n")
    (lists / "val.txt").write_text(folder_splits["val"].video_ids[0] + "\n")
    (lists / "test.txt").write_text(folder_splits["test"].video_ids[0] + "\n")
    return lists


@pytest.mark.integration
def test_nothing_found_is_an_error_with_a_hint(action_videos, folder_splits, tiny_extract_settings, tmp_path):
    lists = _lists(tmp_path, folder_splits, folder_splits["train"].video_ids[:3])
    cache_dir = tmp_path / "c"
    with pytest.raises(DatasetError) as err:  # --root one level too high
        run_extract(_cfg(tiny_extract_settings, action_videos.parent, cache_dir, splits_dir=str(lists)))
    msg = str(err.value)
    assert msg.startswith("none of the 5 videos of the split files is under") and "\n" not in msg
    assert f"the class folders are one level down: try --root {action_videos}" in msg
    assert not cache_dir.exists()  # nothing written
    with pytest.raises(DatasetError, match="looks like one class folder"):  # --root one level too deep
        cls = folder_splits["train"].classes[-1]  # a class the lists do not name
        run_extract(_cfg(tiny_extract_settings, action_videos / cls, cache_dir, splits_dir=str(lists)))
    assert not cache_dir.exists()


@pytest.mark.integration
def test_most_of_a_split_missing_warns_loudly(action_videos, folder_splits, tiny_extract_settings, tmp_path, caplog):
    train = folder_splits["train"].video_ids
    lists = _lists(tmp_path, folder_splits, [train[0], train[1].split("/")[0] + "/gone1", train[2].split("/")[0] + "/gone2"])
    with caplog.at_level(logging.WARNING):
        run_extract(_cfg(tiny_extract_settings, action_videos, tmp_path / "c", splits_dir=str(lists)))
    assert "train: 2 of 3 listed videos are not under" in caplog.text
    assert "hold no video the split files name" in caplog.text  # the class folders are there, the names are not
    # a folder split this small cannot make 5-way episodes: said now, not at train time
    assert "folder: val has 1 classes, fewer than a 5-way episode needs" in caplog.text


# ---- prompts are cheap ---------------------------------------------------------------------------
@pytest.mark.integration
def test_changed_prompt_recomputes_text_only(tiny_cache, action_videos, tiny_extract_settings, tmp_path, backbone,
                                             caplog):
    shutil.copytree(tiny_cache, tmp_path / tiny_cache.name)
    cfg = _cfg(tiny_extract_settings, action_videos, tmp_path, prompt_template="a video of a {}", clean_names=True)
    with caplog.at_level(logging.INFO):
        path, results = run_extract(cfg)
    assert sum(r.extracted for r in results) == 0  # no video decoded
    assert all(r.text.startswith(f"{len(CacheStore(path).root[r.split].attrs['classes'])} of ") for r in results)
    assert "recomputing the text embeddings only; frame features unchanged" in caplog.text
    store, old = CacheStore(path), CacheStore(tiny_cache)
    assert store.fingerprint["video"] == old.fingerprint["video"]
    assert store.fingerprint["text"] == {"prompt_template": "a video of a {}", "clean_names": True}
    for split in store.splits:
        g, og = store.root[split], old.root[split]
        for name in ("features", "frame_indices", "done"):
            assert np.array_equal(g[name][:], og[name][:])  # bit-identical
        names = [c.replace("_", " ") for c in g.attrs["classes"]]
        assert g.attrs["prompts"] == [f"a video of a {n}" for n in names]
        np.testing.assert_allclose(g["text_features"][:], backbone.encode_texts(g.attrs["prompts"]).numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert store.is_complete()
    _, results = run_extract(cfg)  # and again: nothing to do
    assert not any(r.text or r.extracted for r in results)


@pytest.mark.integration
def test_ssv2_labels_file_added_later_updates_the_prompts(splits_dir, tmp_path, tiny_extract_settings):
    """SSv2-Full val names come only from the download's labels file; dropping it in later is seen."""
    from mdmf_cache.data.synthetic import write_index_frames

    val = load_splits("ssv2-full", splits_dir, None)["val"]
    root = tmp_path / "20bn-something-something-v2"
    for vid in val.video_ids[:2]:  # the frames download: root/<video id>/*.jpg
        write_index_frames(root / vid.split("/")[1], 12, size=(96, 32))
    kw = {**tiny_extract_settings, "dataset": "ssv2-full", "splits_dir": str(splits_dir), "splits": ("val",)}
    path, _ = run_extract(_cfg(kw, root, tmp_path / "c"))
    g = CacheStore(path).root["val"]
    assert g.attrs["prompts"][0] == f"a photo of label {val.classes[0]}"
    features = np.asarray(g["features"][:])
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps({f"Doing {c} [something]": c
                                                                               for c in val.classes}))
    path, results = run_extract(_cfg(kw, root, tmp_path / "c", clean_names=True))
    g = CacheStore(path).root["val"]
    assert results[0].extracted == 0 and "prompts changed" in results[0].text
    assert g.attrs["prompts"][0] == f"a photo of Doing {val.classes[0]} something"
    assert g.attrs["class_names"][0] == f"Doing {val.classes[0]} [something]"
    assert np.array_equal(g["features"][:], features) and load_split_features(path, "val").features.shape[0] == 2
