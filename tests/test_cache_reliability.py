"""The cache side of reliability: damaged caches found by ``verify`` and repaired by an extract rerun, failed
videos retried, same-name files kept apart, split changes named, concurrent extracts, Ctrl-C in extract,
and safe exports."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_features

from mdmf_cache.data.datasets import SPLITS, VideoIndex, load_splits, resolve_paths, scan_folder
from mdmf_cache.errors import CacheError, DatasetError
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import export_h5, load_split_features
from mdmf_cache.extraction.build import extract_lock, run_extract
from mdmf_cache.configs import ExtractConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _copy(tiny_cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache" / tiny_cache.name
    shutil.copytree(tiny_cache, dst)
    return dst


def _rerun(settings: dict, root: Path, cache: Path, **kw):
    path, results = run_extract(ExtractConfig(**{**settings, "root": str(root), "cache_dir": str(cache.parent), **kw}))
    assert path == cache
    return {r.split: r for r in results}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- item 2: damaged caches --------------------------------------------------------------------
def test_deleted_chunks_are_found_named_and_repaired(tiny_cache, action_videos, tiny_extract_settings, tmp_path,
                                                     same_cache, capsys):
    cache = _copy(tiny_cache, tmp_path)
    (cache / "train/features/c/1/0/0/0").unlink()  # rows 4-7 of train (chunk_rows 4)
    (cache / "val/labels/c/0").unlink()  # every label of val
    (cache / "test/text_features/c/0/0").unlink()

    damages = CacheStore(cache).verify()
    found = {(d.split, d.array): d for d in damages}
    assert set(found) == {("train", "features"), ("val", "labels"), ("test", "text_features")}
    assert found["train", "features"].rows == [4, 5, 6, 7] and found["train", "features"].file == "train/features/c/1/0/0/0"
    assert found["val", "labels"].rows == list(range(8))
    assert "train/features rows 4-7: chunk file missing" in str(found["train", "features"])

    # readers refuse before loading, naming the file (no zeros, no labels -1)
    with pytest.raises(CacheError, match=r"damaged: train/features rows 4-7.*train/features/c/1/0/0/0"):
        load_split_features(cache, "train")
    with pytest.raises(CacheError, match=r"val/labels rows 0-7: chunk file missing"):
        load_split_features(cache, "val")
    with pytest.raises(CacheError, match="damaged"):
        export_h5(cache, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()

    res = _cli("verify", str(cache))  # every part named, exit 2
    assert res.returncode == 2, res.stdout + res.stderr
    out = " ".join(res.stdout.split())
    assert "train/features rows 4-7: chunk file missing" in out and "(train/features/c/1/0/0/0)" in out
    assert "val/labels rows 0-7" in out and "test/text_features" in out
    assert res.stderr.startswith("error: 3 damaged parts in") and "Traceback" not in res.stderr
    from mdmf_cache.report.tables import print_info

    assert print_info(cache)["complete"] is False
    assert "complete: no, damaged" in " ".join(capsys.readouterr().out.split())

    # the same extract command repairs it: only the 4 damaged rows are extracted again, as they were
    results = _rerun(tiny_extract_settings, action_videos, cache)
    assert results["train"].repaired == 4 and results["train"].extracted == 4 and results["train"].reused == 16
    assert results["val"].extracted == 0 and results["test"].extracted == 0 and results["test"].text
    assert CacheStore(cache).verify() == []
    same_cache(cache, tiny_cache)


def test_truncated_chunk_and_corrupt_metadata_are_named_and_repaired(tiny_cache, action_videos,
                                                                     tiny_extract_settings, tmp_path, same_cache):
    cache = _copy(tiny_cache, tmp_path)
    _truncate(cache / "test/features/c/1/0/0/0")  # a garbled chunk: zstd cannot read it
    (cache / "val/frame_indices/zarr.json").write_text("{not json")
    _truncate(cache / "train/done/c/2")

    # readers: one line naming the file, not a raw decompression or JSON error
    with pytest.raises(CacheError, match=r"test/features rows 4-7: unreadable chunk .*\(test/features/c/1/0/0/0\)"):
        load_split_features(cache, "test")
    with pytest.raises(CacheError, match=r"val/frame_indices: unreadable zarr.json: JSONDecodeError.*"
                                         r"\(val/frame_indices/zarr.json\)"):
        load_split_features(cache, "val")
    damages = {(d.split, d.array): d for d in CacheStore(cache).verify()}
    assert set(damages) == {("test", "features"), ("val", "frame_indices"), ("train", "done")}
    assert damages["train", "done"].rows == [8, 9, 10, 11]

    results = _rerun(tiny_extract_settings, action_videos, cache)
    assert results["test"].extracted == 4 and results["train"].extracted == 4
    assert results["val"].extracted == 0  # the metadata is written again, its chunks are kept
    same_cache(cache, tiny_cache)

    # the root's own metadata: its settings are lost, said with the way out
    (cache / "zarr.json").write_text("")
    with pytest.raises(CacheError, match=r"zarr.json is damaged .*extract again with --overwrite"):
        load_split_features(cache, "train")
    with pytest.raises(CacheError, match="--overwrite"):
        _rerun(tiny_extract_settings, action_videos, cache)


# ---- reruns read in full only what changed since the last clean verify ------------------------------
def _count_feature_chunks_read(monkeypatch) -> list:
    import mdmf_cache.store.verify as store_verify

    read, real = [], store_verify.row_problems

    def counting(block):
        read.append(len(block))
        return real(block)

    monkeypatch.setattr(store_verify, "row_problems", counting)
    return read


def test_rerun_reads_only_changed_chunks_and_still_finds_same_size_garbage(tiny_cache, action_videos,
                                                                           tiny_extract_settings, tmp_path,
                                                                           same_cache, monkeypatch):
    from mdmf_cache.store.verify import record_path

    cache = _copy(tiny_cache, tmp_path)  # a copy: no record of a verify yet
    read = _count_feature_chunks_read(monkeypatch)
    _rerun(tiny_extract_settings, action_videos, cache)
    assert len(read) == 5 + 2 + 2  # every feature chunk (train 20 rows, val and test 8, 4 rows a chunk)
    assert record_path(cache).is_file()
    read.clear()
    _rerun(tiny_extract_settings, action_videos, cache)
    assert read == []  # nothing changed: no feature chunk read

    chunk = cache / "train/features/c/3/0/0/0"
    chunk.write_bytes(chunk.read_bytes())  # rewritten as it was: it counts as changed, and is read
    _rerun(tiny_extract_settings, action_videos, cache)
    assert read == [4]
    read.clear()

    # garbage of the same size, the mtime put back: the kernel still moves ctime, so the cheap check sees it
    st = chunk.stat()
    chunk.write_bytes(np.random.default_rng(0).bytes(st.st_size))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (chunk.stat().st_size, chunk.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    results = _rerun(tiny_extract_settings, action_videos, cache)
    assert results["train"].repaired == 4 and results["train"].extracted == 4
    assert "unreadable chunk" in results["train"].damage[0]
    same_cache(cache, tiny_cache)


def test_what_the_cheap_check_cannot_see_verify_and_verify_deep_find(tiny_cache, action_videos,
                                                                     tiny_extract_settings, tmp_path, same_cache):
    """Bytes changed with the file's size, times and inode as recorded (bit rot): an extract rerun does not read
    the chunk; ``verify`` does, and ``extract --verify-deep`` repairs it."""
    import json

    from mdmf_cache.store.verify import record_path

    cache = _copy(tiny_cache, tmp_path)
    _rerun(tiny_extract_settings, action_videos, cache)  # records a clean verify
    chunk = cache / "val/features/c/1/0/0/0"
    rel = "val/features/c/1/0/0/0"
    good = chunk.read_bytes()

    def rot() -> None:
        chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
        rec = json.loads(record_path(cache).read_text())
        st = chunk.stat()
        rec["splits"]["val"]["files"][rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        record_path(cache).write_text(json.dumps(rec))  # as if the file's metadata had not moved

    rot()
    assert CacheStore(cache).verify(deep="changed") == []  # the limit of the cheap check (said in its docstring)
    assert sum(r.extracted for r in _rerun(tiny_extract_settings, action_videos, cache).values()) == 0
    damages = CacheStore(cache).verify()  # mdmf-cache verify reads every chunk
    assert [(d.split, d.file, d.rows) for d in damages] == [("val", rel, [4, 5, 6, 7])]
    assert "val" not in json.loads(record_path(cache).read_text())["splits"]  # a damaged split is forgotten

    chunk.write_bytes(good)
    _rerun(tiny_extract_settings, action_videos, cache)  # val recorded clean again (the chunk changed: read)
    rot()
    assert sum(r.extracted for r in _rerun(tiny_extract_settings, action_videos, cache).values()) == 0
    results = _rerun(tiny_extract_settings, action_videos, cache, verify_deep=True)
    assert results["val"].repaired == 4 and results["val"].extracted == 4
    same_cache(cache, tiny_cache)


def test_nonfinite_rows_are_repaired_and_an_encoder_nan_is_a_failure(tiny_cache, action_videos,
                                                                     tiny_extract_settings, tmp_path, same_cache,
                                                                     monkeypatch):
    cache = _copy(tiny_cache, tmp_path)
    g = CacheStore(cache, mode="a").root["train"]
    row = np.asarray(g["features"][9])
    row[0, 3, :5] = np.inf
    g["features"][9] = row  # a hand edit (or a flaky disk)
    with pytest.raises(CacheError, match=r"train/features rows 9: finished rows with NaN or inf.*rerun the extract"):
        load_split_features(cache, "train")
    results = _rerun(tiny_extract_settings, action_videos, cache)
    assert results["train"].repaired == 1 and results["train"].extracted == 1
    same_cache(cache, tiny_cache)

    # the encoder itself gives NaN for a video: recorded as a failure (not decoded again unless its file
    # changes), never written as features
    import mdmf_cache.extraction.build as cache_build

    real = cache_build.encode_clips

    def nan_for_first(clips, *a, **kw):
        emb = real(clips, *a, **kw)
        emb[0] = np.nan
        return emb

    monkeypatch.setattr(cache_build, "encode_clips", nan_for_first)
    CacheStore(cache, mode="a").root["test"]["done"][0:4] = False  # four rows to extract again
    results = _rerun(tiny_extract_settings, action_videos, cache)
    assert results["test"].extracted + results["test"].failed == 4 and results["test"].failed >= 1
    summary = CacheStore(cache).split_summary("test")
    assert summary["failed"] == results["test"].failed
    assert all("NaN or inf" in err for _, err in summary["failures"])
    assert CacheStore(cache).verify() == []
    assert len(load_split_features(cache, "test").video_ids) == 8 - summary["failed"]


# ---- item 8: failed rows are retried -------------------------------------------------------------
def _mark_failed(cache: Path, split: str, row: int) -> None:
    store = CacheStore(cache, mode="a")
    g = store.root[split]
    store.write_rows(split, np.array([row]), {
        "features": np.zeros((1, *g["features"].shape[1:]), np.float16),
        "frame_indices": np.full((1, *g["frame_indices"].shape[1:]), -1, np.int32),
        "num_frames": np.zeros(1, np.int32), "failed": np.ones(1, bool), "errors": np.array(["cannot decode"])})


def test_failed_videos_are_retried_when_their_files_change_or_with_retry_failed(
        tiny_cache, action_videos, tiny_extract_settings, tmp_path, same_cache, capsys, monkeypatch):
    import mdmf_cache.extraction.embed as extraction
    from mdmf_cache.report.tables import print_extract_summary

    root = tmp_path / "videos"
    shutil.copytree(action_videos, root)  # copy2: the same sizes and mtimes as the files tiny_cache recorded
    cache = _copy(tiny_cache, tmp_path)
    ids = CacheStore(cache).video_ids("test")
    for row in (1, 6):  # two videos failed at the first run ...
        _mark_failed(cache, "test", row)
    broken = next((root / ids[6].split("/")[0]).glob(ids[6].split("/")[1] + ".*"))
    good = broken.read_bytes()
    broken.write_bytes(b"")  # ... one file changed since (still broken), the other is as it was
    decoded = []
    real = extraction.ClipSource.__getitem__

    def counting(self, i):
        decoded.append(self.ids[i])
        return real(self, i)

    monkeypatch.setattr(extraction.ClipSource, "__getitem__", counting)

    results = _rerun(tiny_extract_settings, root, cache)
    assert decoded == [ids[6]]  # the unchanged failure is not decoded again
    assert results["test"].retried == 1 and results["test"].still_failing == 1 and results["test"].failed == 1
    assert results["test"].kept_failed == 1 and results["test"].extracted == 0 and results["train"].retried == 0
    print_extract_summary(cache, list(results.values()))
    out = " ".join(capsys.readouterr().out.split())
    assert "test: retried 1 videos that had failed: 0 decode now, 1 still failing" in out
    assert "test: 1 videos that failed before were not decoded again" in out and "--retry-failed" in out
    assert CacheStore(cache).split_summary("test")["failed"] == 2

    decoded.clear()
    results = _rerun(tiny_extract_settings, root, cache)  # nothing changed: nothing decoded
    assert decoded == [] and results["test"].retried == 0 and results["test"].kept_failed == 2

    broken.write_bytes(good)  # fixed on disk; the other one is retried on request
    results = _rerun(tiny_extract_settings, root, cache, retry_failed=True)
    assert sorted(decoded) == sorted([ids[1], ids[6]])
    assert results["test"].retried == 2 and results["test"].still_failing == 0 and results["test"].failed == 0
    same_cache(cache, tiny_cache)


def test_a_replaced_video_is_extracted_again(tiny_cache, action_videos, tiny_extract_settings, tmp_path, same_cache):
    """Another file under the same name: its row gets the new file's features (those of a fresh extraction)."""
    root = tmp_path / "videos"
    shutil.copytree(action_videos, root)
    cache = _copy(tiny_cache, tmp_path)
    store = CacheStore(cache)
    ids = store.video_ids("test")
    target = next((root / ids[2].split("/")[0]).glob(ids[2].split("/")[1] + ".*"))
    other = next(p for p in sorted(root.glob(f"*/*{target.suffix}")) if p.parent != target.parent)
    assert other.stat().st_size != target.stat().st_size or other.read_bytes() != target.read_bytes()
    shutil.copyfile(other, target)  # same name, other video
    before = np.asarray(store.root["test"]["features"][:])

    results = _rerun(tiny_extract_settings, root, cache)
    assert results["test"].changed == 1 and results["test"].extracted == 1 and results["train"].extracted == 0
    after = np.asarray(CacheStore(cache).root["test"]["features"][:])
    assert not np.array_equal(after[2], before[2]) and np.array_equal(np.delete(after, 2, 0), np.delete(before, 2, 0))
    fresh, _ = run_extract(ExtractConfig(**{**tiny_extract_settings, "root": str(root),
                                            "cache_dir": str(tmp_path / "fresh"), "splits": ("test",)}))
    assert_same_features(after[2], np.asarray(CacheStore(fresh).root["test"]["features"][2]))  # encoded alone there
    size, mtime = CacheStore(cache).file_stats("test")
    assert (size[2], mtime[2]) == (target.stat().st_size, target.stat().st_mtime_ns)
    assert sum(r.extracted for r in _rerun(tiny_extract_settings, root, cache).values()) == 0  # recorded: once


# ---- item 3: same name, different extension ------------------------------------------------------
def test_same_stem_entries_get_apart_ids_or_are_refused(tmp_path):
    root = tmp_path / "v"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        (root / c / "solo.mp4").write_bytes(b"")
    (root / "a" / "clip.mp4").write_bytes(b"")
    (root / "a" / "clip.avi").write_bytes(b"")
    (root / "a" / "clip").mkdir()
    (root / "a" / "clip" / "img_00001.jpg").write_bytes(b"")
    ids = scan_folder(root)
    assert [i for i in ids if i.startswith("a/")] == ["a/clip/", "a/clip.avi", "a/clip.mp4", "a/solo"]
    idx = VideoIndex(root)
    assert idx.resolve("a/clip.avi") == root / "a" / "clip.avi"
    assert idx.resolve("a/clip.mp4") == root / "a" / "clip.mp4"
    assert idx.resolve("a/clip/") == root / "a" / "clip"
    assert idx.resolve("a/solo") == root / "a" / "solo.mp4"
    splits = load_splits("folder", None, root)  # the scan's ids: each resolves to its own entry
    paths = [p for s in splits.values() for p in (resolve_paths(s, root, idx) or s.paths)]
    assert len(set(paths)) == len(paths) == 6

    # a split file naming the bare stem: refused with the names, before any work
    lists = tmp_path / "lists"
    lists.mkdir()
    for s, c in zip(SPLITS, "abc"):
        (lists / f"{s}.txt").write_text(f"{c}/solo\n" + ("a/clip\n" if c == "a" else ""))
    splits = load_splits("folder", lists, root)
    with pytest.raises(DatasetError, match=r"train: 1 video ids name several files \(first: a/clip is "
                                           r"clip/, clip.avi, clip.mp4 under .*write the full name .*a/clip"):
        resolve_paths(splits["train"], root, VideoIndex(root))
    res = _cli("extract", "folder", "--root", str(root), "--splits", str(lists), "--cache-dir", str(tmp_path / "c"),
               "--model", "mdmf-tiny-vit", "--pretrained", "none", "--workers", "0")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "name several files" in res.stderr and not (tmp_path / "c").exists()


def test_same_stem_videos_are_extracted_apart(action_videos, tmp_path):
    root = tmp_path / "v"
    classes = sorted(p.name for p in action_videos.iterdir())[:3]
    for c in classes:
        (root / c).mkdir(parents=True)
        shutil.copy(action_videos / c / f"{c}_v00.mp4", root / c / "clip.mp4")
        shutil.copy(action_videos / c / f"{c}_v01.avi", root / c / "clip.avi")
    path, _ = run_extract(ExtractConfig(dataset="folder", root=str(root), cache_dir=str(tmp_path / "c"),
                                        model="mdmf-tiny-vit", pretrained=None, workers=0, progress=False, way=1))
    store = CacheStore(path)
    for split in store.splits:
        ids = store.video_ids(split)
        assert sorted(v.split("/")[1] for v in ids) == ["clip.avi", "clip.mp4"]
        feats = np.asarray(store.root[split]["features"][:])
        assert not np.array_equal(feats[0], feats[1])  # two videos, two encodings


# ---- item 11: split changes, concurrent extracts, Ctrl-C -----------------------------------------
def _lists(tmp_path: Path, root: Path, per_split: dict[str, list[str]]) -> Path:
    lists = tmp_path / "lists"
    lists.mkdir(exist_ok=True)
    for s, ids in per_split.items():
        (lists / f"{s}.txt").write_text("\n".join(ids) + "\n")
    return lists


def test_split_change_refusal_names_videos_not_hashes(action_videos, tmp_path):
    ids = sorted(f"{p.parent.name}/{p.stem}" for p in action_videos.glob("*/*"))
    per = {"train": ids[0:2], "val": ids[4:6], "test": ids[8:10]}
    lists = _lists(tmp_path, action_videos, per)
    kw = dict(dataset="folder", root=str(action_videos), splits_dir=str(lists), cache_dir=str(tmp_path / "c"),
              model="mdmf-tiny-vit", pretrained=None, workers=0, progress=False, way=1)
    run_extract(ExtractConfig(**kw))
    _lists(tmp_path, action_videos, {"test": [ids[8], ids[11], ids[12]]})  # -1 video, +1 video, +1 class
    with pytest.raises(CacheError) as err:
        run_extract(ExtractConfig(**kw))
    msg = str(err.value)
    cls12 = ids[12].split("/")[0]
    assert (f"test split changed: 1 classes added ({cls12}); 2 videos added ({ids[11]}, {ids[12]}); "
            f"1 videos removed ({ids[9]})") in msg
    assert "split_hashes" not in msg and "--overwrite" in msg


def test_a_second_extract_of_the_same_cache_is_refused(action_videos, tmp_path, tiny_extract_settings, monkeypatch):
    ids = sorted(f"{p.parent.name}/{p.stem}" for p in action_videos.glob("*/*"))
    lists = _lists(tmp_path, action_videos, {"train": ids[0:2], "val": ids[4:6], "test": ids[8:10]})
    cache_dir = tmp_path / "c"
    args = ["extract", "folder", "--root", str(action_videos), "--splits", str(lists), "--cache-dir", str(cache_dir),
            "--model", "mdmf-tiny-vit", "--pretrained", "none", "--workers", "0"]
    # in process: the lock is held, the extract is refused, naming the holder, before any weights load
    import mdmf_cache.clip.backbone as backbone

    path = cache_dir / "videos__mdmf-tiny-vit__random.zarr"
    with extract_lock(path), monkeypatch.context() as m:
        m.setattr(backbone, "load_backbone", lambda *a, **k: pytest.fail("the weights loaded before the lock"))
        with pytest.raises(CacheError, match=rf"another extract \(pid {os.getpid()} .*\) is writing"):
            run_extract(ExtractConfig(dataset="folder", root=str(action_videos), splits_dir=str(lists),
                                      cache_dir=str(cache_dir), model="mdmf-tiny-vit", pretrained=None, workers=0,
                                      progress=False, way=1))
    # two processes starting at the same moment: one extracts, the other waits for nothing and says why
    procs = [subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, outs
    for code, (_, err) in zip(codes, outs):
        assert "Traceback" not in err and "ContainsGroupError" not in err
        if code == 2:
            assert err.strip().startswith("error: another extract (pid") and len(err.strip().splitlines()) == 1
    assert CacheStore(path).is_complete() and CacheStore(path).verify() == []


# Runs the CLI with every decoded video slowed down (in the DataLoader worker too), so it can be interrupted midway.
SLOW_CLI = r"""
import sys, time
import mdmf_cache.extraction.embed as ex
get = ex.ClipSource.__getitem__
def slow(self, i):
    time.sleep(0.4)
    return get(self, i)
ex.ClipSource.__getitem__ = slow
import cli
sys.argv = ["mdmf-cache", *sys.argv[1:]]
cli.main()
"""


def test_ctrl_c_in_extract_exits_130_and_a_rerun_completes(tiny_cache, action_videos, tiny_extract_settings, tmp_path,
                                                           same_cache):
    cache_dir = tmp_path / "c"
    path = cache_dir / tiny_cache.name
    args = ["extract", "folder", "--root", str(action_videos), "--cache-dir", str(cache_dir), "--model",
            "mdmf-tiny-vit", "--pretrained", "none", "--workers", "1", "--chunk-rows", "4", "--train-views", "2",
            "--no-flip", "--batch-videos", "2"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def done() -> int:
        try:
            return int(CacheStore(path).done_mask("train").sum())
        except Exception:
            return 0

    deadline = time.monotonic() + 240
    while done() < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the process group, workers included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("interrupted: the videos finished so far are in the cache; rerun the "
                                            "same command to extract the rest")
    assert "Traceback" not in err
    kept = done()
    assert 4 <= kept < 20

    _rerun(tiny_extract_settings, action_videos, path)  # the same settings, in process
    same_cache(path, tiny_cache)


# ---- item 12: export -------------------------------------------------------------------------------
def test_export_refuses_unsafe_outputs_and_never_leaves_half_a_file(tiny_cache, tmp_path, caplog, monkeypatch):
    import h5py

    cache = _copy(tiny_cache, tmp_path)
    with pytest.raises(CacheError, match="inside the cache"):
        export_h5(cache, cache / "zarr.json")
    with pytest.raises(CacheError, match="inside the cache"):
        export_h5(cache, cache / "train" / "out.h5")
    assert json.loads((cache / "zarr.json").read_text())["node_type"] == "group"

    out = tmp_path / "out.h5"
    out.write_text("precious")
    with pytest.raises(CacheError, match=r"out.h5 exists; pass --overwrite"):
        export_h5(cache, out)
    assert out.read_text() == "precious"

    # a failure midway (a full disk, a kill): no half-written file, the old one untouched
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError):
        export_h5(cache, out, overwrite=True)
    monkeypatch.undo()
    assert out.read_text() == "precious" and not (tmp_path / "out.h5.tmp").exists()

    export_h5(cache, out, overwrite=True)
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"train", "val", "test"}

    # an incomplete cache is exported with a warning
    store = CacheStore(cache, mode="a")
    store.root["val"]["done"][:4] = False
    with caplog.at_level(logging.WARNING):
        export_h5(cache, tmp_path / "partial.h5")
    assert "not complete (val: 4 videos not extracted)" in caplog.text


def test_full_disk_while_writing_rows_is_named(tiny_cache, action_videos, tiny_extract_settings, tmp_path, monkeypatch):
    import errno

    from mdmf_cache.fileio import DiskFullError

    cache = _copy(tiny_cache, tmp_path)
    (cache / "test/done/c/1").unlink()  # rows 4-7 to redo

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheStore, "write_rows", full)
    with pytest.raises(DiskFullError, match=rf"disk full while writing {cache / 'test'} \(\d+ MB free"):
        _rerun(tiny_extract_settings, action_videos, cache)


def test_verify_says_unfinished_is_not_damaged(tiny_cache, tmp_path, capsys):
    cache = _copy(tiny_cache, tmp_path)
    (cache / "val/done/c/1").unlink()  # rows 4-7 no longer finished: pending, not damage
    from mdmf_cache.report.tables import print_verify

    capsys.readouterr()
    assert print_verify(cache) == []  # no CacheError: exit 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no damage" in out and "not complete: val: 4 videos not extracted yet" in out
