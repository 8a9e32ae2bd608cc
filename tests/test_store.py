"""The Zarr cache: row writes, resumable state, rank partitions, fingerprints, loading and export."""

from __future__ import annotations

import json

import time

import numpy as np
import pytest

from mdmf_cache.errors import CacheError
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import export_h5, load_split_features
from mdmf_cache.store.layout import fingerprint_diff

N, V, T, D, C = 10, 2, 3, 5, 3
VIDEO_FP = {"model": "tiny", "num_frames": T, "seed": 0, "split_hashes": {"train": "abc"}}
FP = {"video": VIDEO_FP, "text": {"prompt_template": "a photo of {}"}}


def _sync(store, ids, present=None, chunk_rows=4, name="train"):
    """Rows for ``ids`` (class ``c<k>`` -> label k); ``present`` defaults to all on disk."""
    present = np.ones(len(ids), bool) if present is None else np.asarray(present)
    labels = np.array([int(v.split("/")[0][1:]) for v in ids])
    return store.sync_rows(name, ids, labels, present, [f"c{i}" for i in range(C)], [f"class {i}" for i in range(C)],
                           views=V, num_frames=T, dim=D, chunk_rows=chunk_rows)


def _new_store(path, n=N, chunk_rows=4, fp=FP) -> CacheStore:
    store = CacheStore.open_for_writing(path, fp)
    ids = [f"c{i % C}/v{i}" for i in range(n)]
    _sync(store, ids[:3] + ["c0/gone"] + ids[3:], present=[True] * 3 + [False] + [True] * (n - 3),
          chunk_rows=chunk_rows)
    store.write_text("train", np.arange(C * D, dtype=np.float32).reshape(C, D), [f"a photo of class {i}" for i in range(C)],
                     "a photo of {}")
    store.mark_ready()
    return store


def _rows(rows, failed=()):
    rows = np.asarray(rows)
    rng = np.random.default_rng(int(rows.sum()))
    bad = np.isin(rows, failed)
    return {
        "features": rng.standard_normal((len(rows), V, T, D)).astype(np.float16),
        "frame_indices": rng.integers(0, 50, (len(rows), V, T)).astype(np.int32),
        "num_frames": (rows + 40).astype(np.int32),
        "failed": bad,
        "errors": np.array([f"broken {r}" if b else "" for r, b in zip(rows, bad)]),
    }


def _write_all(store, n=N, chunk_rows=4, failed=()):
    expected = {}
    for lo in range(0, n, chunk_rows):
        rows = np.arange(lo, min(lo + chunk_rows, n))
        vals = _rows(rows, failed)
        store.write_rows("train", rows, vals)
        for k, v in vals.items():
            expected.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in expected.items()}


def test_round_trip(tmp_path):
    store = _new_store(tmp_path / "c.zarr")
    assert not store.done_mask("train").any() and not store.is_complete()
    expected = _write_all(store)
    again = CacheStore(tmp_path / "c.zarr")  # a fresh reader sees everything
    g = again.root["train"]
    for k, v in expected.items():
        assert np.array_equal(np.asarray(g[k][:]), v), k
    assert again.done_mask("train").all() and again.is_complete()
    assert np.array_equal(g["labels"][:], np.arange(N) % C)
    assert list(g["video_ids"][:]) == [f"c{i % C}/v{i}" for i in range(N)]
    assert g.attrs["missing"] == ["c0/gone"] and g.attrs["views"] == V
    s = again.split_summary("train")
    assert (s["videos"], s["done"], s["failed"], s["shape"]) == (N, N, 0, [N, V, T, D])


def test_not_complete_without_ready_or_text(tmp_path):
    store = CacheStore.open_for_writing(tmp_path / "c.zarr", FP)
    _sync(store, ["c0/1"])
    store.write_rows("train", np.array([0]), {"features": np.ones((1, V, T, D), np.float16)})
    assert store.done_mask("train").all()
    assert not store.is_complete()  # no text, not marked ready
    store.write_text("train", np.ones((1, D), np.float32), ["a photo of a"], "a photo of {}")
    assert not store.is_complete()
    store.mark_ready()
    assert store.is_complete()


def test_write_rows_non_contiguous(tmp_path):
    store = _new_store(tmp_path / "c.zarr")
    g = store.root["train"]
    a = _rows([4, 6])
    store.write_rows("train", np.array([4, 6]), a)
    assert np.flatnonzero(store.done_mask("train")).tolist() == [4, 6]
    assert np.array_equal(g["features"][[4, 6]], a["features"])
    assert np.array_equal(g["frame_indices"][5], np.full((V, T), -1))  # row 5 untouched (fill value)
    assert not np.asarray(g["features"][5]).any()
    b = _rows([5, 7])
    store.write_rows("train", np.array([5, 7]), b)
    assert np.flatnonzero(store.done_mask("train")).tolist() == [4, 5, 6, 7]
    assert np.array_equal(g["features"][4:8], np.stack([a["features"][0], b["features"][0], a["features"][1], b["features"][1]]))
    assert np.array_equal(g["num_frames"][4:8], [44, 45, 46, 47])
    with pytest.raises(ValueError, match="one chunk"):
        store.write_rows("train", np.array([3, 4]), _rows([3, 4]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pending_rows_partition_by_whole_chunks(tmp_path, world_size):
    n, cr = 11, 3
    store = _new_store(tmp_path / "c.zarr", n=n, chunk_rows=cr)
    store.write_rows("train", np.array([1, 2]), _rows([1, 2]))  # part of chunk 0 already done
    parts = [store.pending_rows("train", r, world_size) for r in range(world_size)]
    union = np.sort(np.concatenate(parts))
    assert np.array_equal(union, np.setdiff1d(np.arange(n), [1, 2]))  # everything pending, once
    for r, rows in enumerate(parts):
        assert np.all(np.diff(rows) > 0)
        assert set((rows // cr) % world_size) <= {r}  # only this rank's chunks
    if world_size == 2:
        assert parts[0].tolist() == [0, 6, 7, 8] and parts[1].tolist() == [3, 4, 5, 9, 10]


def test_fingerprint_mismatch_named_and_overwrite(tmp_path):
    path = tmp_path / "c.zarr"
    _new_store(path)
    _write_all(_new_store(path))  # same fingerprint: reopened, kept
    assert CacheStore(path).done_mask("train").all()
    other = {**FP, "video": {**VIDEO_FP, "num_frames": 4}}
    with pytest.raises(CacheError) as err:
        CacheStore.open_for_writing(path, other)
    msg = str(err.value)
    assert "num_frames" in msg and "3" in msg and "4" in msg and "--overwrite" in msg
    assert "seed" not in msg  # only the differing field
    assert CacheStore(path).done_mask("train").all()  # refused: untouched
    store = CacheStore.open_for_writing(path, other, overwrite=True)
    assert store.splits == [] and store.fingerprint == other


def test_fingerprint_diff():
    assert fingerprint_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == [
        "b: cache has 2, asked 3", "c: cache has None, asked 0"]
    assert fingerprint_diff(VIDEO_FP, dict(VIDEO_FP)) == []


def test_rank_waits_for_rank0_fingerprint(tmp_path):
    path = tmp_path / "c.zarr"
    _new_store(path)
    assert CacheStore.open_for_writing(path, FP, rank=1, wait_s=1).fingerprint == FP
    # other settings: named at once (rank 0 refuses them too), not after the whole wait
    t0 = time.monotonic()
    seed1 = {**FP, "video": {**VIDEO_FP, "seed": 1}}
    with pytest.raises(CacheError, match="seed: cache has"):
        CacheStore.open_for_writing(path, seed1, rank=1, wait_s=30)
    assert time.monotonic() - t0 < 10
    with pytest.raises(CacheError, match="rank 1:.*seed"):  # with --overwrite it waits for rank 0, then says why
        CacheStore.open_for_writing(path, seed1, rank=1, wait_s=0.2, overwrite=True)
    # another prompt: waits for rank 0 to record it (and recompute the text), then says why
    with pytest.raises(CacheError, match="rank 1:.*prompt_template"):
        CacheStore.open_for_writing(path, {**FP, "text": {"prompt_template": "{}"}}, rank=1, wait_s=0.2)


def test_killed_during_creation_recovers(tmp_path):
    """A run killed while creating the group or a split leaves pieces; the next run completes them."""
    import zarr

    path = tmp_path / "c.zarr"
    zarr.open_group(store=str(path), mode="w")  # killed before the fingerprint was written
    store = CacheStore.open_for_writing(path, FP)
    assert store.fingerprint == FP
    g = store.root.create_group("train")  # killed after a few arrays, before the split's attrs
    g.create_array("done", shape=(3,), dtype=bool, fill_value=False)
    store = _new_store(path)
    assert store.root["train"]["features"].shape == (N, V, T, D)
    assert np.array_equal(store.root["train"]["labels"][:], np.arange(N) % C)
    with pytest.raises(CacheError):  # and the recovered fingerprint is enforced
        CacheStore.open_for_writing(path, {**FP, "video": {**VIDEO_FP, "seed": 9}})


def test_load_split_features(tmp_path):
    path = tmp_path / "c.zarr"
    store = _new_store(path)
    store.write_rows("train", np.arange(4), _rows(np.arange(4)))
    with pytest.raises(CacheError, match="6 of 10 videos not extracted"):
        load_split_features(path, "train")
    part = load_split_features(path, "train", allow_incomplete=True)
    assert part.video_ids == [f"c{i % C}/v{i}" for i in range(4)]
    expected = _write_all(store, failed=(2, 7))
    fs = load_split_features(path, "train")
    keep = np.setdiff1d(np.arange(N), [2, 7])
    assert fs.features.shape == (N - 2, V, T, D)
    assert np.array_equal(fs.features.numpy(), expected["features"][keep])
    assert fs.labels.tolist() == (keep % C).tolist()
    assert fs.video_ids == [f"c{i % C}/v{i}" for i in keep]
    assert fs.classes == [f"c{i}" for i in range(C)] and fs.class_names[0] == "class 0"
    assert np.array_equal(fs.text.numpy(), np.arange(C * D, dtype=np.float32).reshape(C, D))
    assert CacheStore(path).split_summary("train")["failures"] == [("c2/v2", "broken 2"), ("c1/v7", "broken 7")]
    with pytest.raises(CacheError, match="no split 'val'"):
        load_split_features(path, "val")
    with pytest.raises(CacheError, match="no cache"):
        load_split_features(tmp_path / "nothing.zarr", "train")


def test_export_h5_equal(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "c.zarr"
    expected = _write_all(_new_store(path), failed=(3,))
    out = export_h5(path, tmp_path / "out" / "c.h5")
    g = CacheStore(path).root["train"]
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["fingerprint"]) == FP
        names = sorted(g.array_keys())
        assert sorted(f["train"].keys()) == names
        for name in names:
            ours = np.asarray(g[name][:])
            theirs = f["train"][name][()]
            if ours.dtype.kind in "OUT":  # numpy 2 StringDType ("T") or str; h5py gives bytes
                assert [t.decode() if isinstance(t, bytes) else t for t in theirs] == [str(o) for o in ours], name
            else:
                assert theirs.dtype == ours.dtype, name
                assert np.array_equal(ours, theirs), name
        assert np.array_equal(f["train"]["features"][()], expected["features"])
        assert json.loads(f["train"].attrs["classes"]) == [f"c{i}" for i in range(C)]
        assert json.loads(f["train"].attrs["prompts"])[1] == "a photo of class 1"


# ---- rows keyed by video id ------------------------------------------------------------------
def test_sync_rows_grows_keeps_and_marks(tmp_path):
    """Rows only ever get appended; vanished videos keep their rows, unused until they are back."""
    path = tmp_path / "c.zarr"
    store = CacheStore.open_for_writing(path, FP)
    listed = ["c0/a", "c1/b", "c2/c", "c0/d"]
    sync = _sync(store, listed, present=[False, True, False, True], chunk_rows=2)
    assert (sync.rows, sync.added, sync.vanished) == (2, 2, [])
    assert store.video_ids("train") == ["c1/b", "c0/d"] and store.root["train"].attrs["missing"] == ["c0/a", "c2/c"]
    store.write_rows("train", np.array([0, 1]), _rows([0, 1]))
    store.write_text("train", np.ones((C, D), np.float32), ["p"] * C, "{}")
    store.mark_ready()
    assert store.is_complete()  # the missing videos are not waited for

    # c0/a and c2/c arrive, c1/b (finished) vanishes: appended in listing order, c1/b kept
    sync = _sync(store, listed, present=[True, False, True, True], chunk_rows=2)
    assert (sync.rows, sync.added, sync.vanished) == (4, 2, ["c1/b"])
    assert store.video_ids("train") == ["c1/b", "c0/d", "c0/a", "c2/c"]
    assert store.present_mask("train").tolist() == [False, True, True, True]
    assert np.asarray(store.root["train"]["order"][:]).tolist() == [1, 3, 0, 2]
    assert np.asarray(store.root["train"]["labels"][:]).tolist() == [1, 0, 0, 2]
    assert store.pending_rows("train").tolist() == [2, 3] and not store.is_complete()
    store.write_rows("train", np.array([2, 3]), _rows([2, 3]))
    assert store.is_complete()
    fs = load_split_features(path, "train")
    assert fs.video_ids == ["c0/a", "c2/c", "c0/d"]  # listing order, the vanished row left out
    assert np.array_equal(fs.features.numpy(), np.asarray(store.root["train"]["features"][:])[[2, 3, 1]])
    s = store.split_summary("train")
    assert (s["videos"], s["done"], s["kept"], s["missing"]) == (3, 3, 1, 1)

    # c1/b back: its row is reused as it is (nothing pending)
    sync = _sync(store, listed, present=[True] * 4, chunk_rows=2)
    assert (sync.rows, sync.added, sync.vanished) == (4, 0, [])
    assert store.pending_rows("train").tolist() == [] and load_split_features(path, "train").video_ids == listed[:1] + [
        "c1/b", "c2/c", "c0/d"]


def test_sync_rows_after_a_run_killed_while_growing(tmp_path):
    """Killed after growing the arrays but before ``num_videos``: the next sync redoes it right."""
    store = CacheStore.open_for_writing(tmp_path / "c.zarr", FP)
    _sync(store, ["c0/a", "c1/b", "c2/c"], present=[True, False, False], chunk_rows=2)
    store.write_rows("train", np.array([0]), _rows([0]))
    g = store.root["train"]
    for name in g.array_keys():  # what the killed run left: 3 more rows, one marked done
        if name != "text_features":
            g[name].resize((4, *g[name].shape[1:]))
    g["video_ids"][1:4] = np.array(["c1/x", "c1/y", "c1/z"])
    g["done"][1:4] = True
    assert store.num_rows("train") == 1 and store.video_ids("train") == ["c0/a"]
    sync = _sync(store, ["c0/a", "c1/b", "c2/c"], present=[True, False, True], chunk_rows=2)
    assert (sync.rows, sync.added) == (2, 1)
    assert store.video_ids("train") == ["c0/a", "c2/c"] and g["done"].shape == (2,)
    assert store.done_mask("train").tolist() == [True, False]


def test_text_rewrite_killed_is_redone(tmp_path):
    store = _new_store(tmp_path / "c.zarr")
    assert store.prompts("train") == [f"a photo of class {i}" for i in range(C)]
    store.root["train"].attrs["prompts"] = None  # write_text clears it first: killed mid-write
    assert store.prompts("train") is None and not store.is_complete()
    with pytest.raises(CacheError, match="no text embeddings"):
        load_split_features(tmp_path / "c.zarr", "train", allow_incomplete=True)


def test_format_1_cache_reads_but_is_not_extended(tmp_path):
    """An older cache (rows fixed by the first run, flat fingerprint) still trains; extract says what to do."""
    path = tmp_path / "c.zarr"
    expected = _write_all(_new_store(path))
    store = CacheStore(path, mode="a")
    for name in ("present", "order"):
        del store.root["train"][name]
    store.root.attrs.update({"format": 1, "fingerprint": VIDEO_FP})
    fs = load_split_features(path, "train")
    assert fs.video_ids == [f"c{i % C}/v{i}" for i in range(N)]
    assert np.array_equal(fs.features.numpy(), expected["features"])
    assert CacheStore(path).is_complete()
    with pytest.raises(CacheError, match="format 1.*--overwrite"):
        CacheStore.open_for_writing(path, FP)
    assert CacheStore.open_for_writing(path, FP, overwrite=True).splits == []


# ---- reading at scale: memory, block by block, damaged values --------------------------------------
def _big_store(path, n=600, views=2, frames=4, dim=64, chunk_rows=16):
    """A finished split of ``n`` rows with random features (no zeros), some failed and one vanished video."""
    store = CacheStore.open_for_writing(path, FP)
    ids = [f"c{i % C}/v{i}" for i in range(n)]
    store.sync_rows("train", ids, np.arange(n) % C, np.ones(n, bool), [f"c{i}" for i in range(C)],
                    [f"class {i}" for i in range(C)], views=views, num_frames=frames, dim=dim, chunk_rows=chunk_rows)
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((n, views, frames, dim)) + 8).astype(np.float16)
    failed = np.isin(np.arange(n), [5, 100, 101])
    for lo in range(0, n, chunk_rows):
        rows = np.arange(lo, min(n, lo + chunk_rows))
        store.write_rows("train", rows, {"features": np.where(failed[rows, None, None, None], 0, feats[rows]),
                                         "frame_indices": np.zeros((len(rows), views, frames), np.int32),
                                         "num_frames": np.full(len(rows), 9, np.int32), "failed": failed[rows],
                                         "errors": np.array(["bad" if f else "" for f in failed[rows]])})
    store.write_text("train", np.ones((C, dim), np.float32), ["p"] * C, "{}")
    store.mark_ready()
    return store, feats, failed


def test_load_fills_block_by_block_in_split_order_without_a_second_copy(tmp_path, monkeypatch):
    """Rows out of split-file order (a grown tree), failed and vanished rows left out, blocks smaller than the
    split: the same array as indexing the whole one; memory (tracemalloc) the result plus about a block."""
    import tracemalloc

    import mdmf_cache.store.read as store_read

    path = tmp_path / "c.zarr"
    store, feats, failed = _big_store(path)
    n = len(feats)
    ids = store.video_ids("train")
    listed = ids[300:] + ids[:300]  # the split file now lists the second half first
    present = np.ones(n, bool)
    present[7] = False  # a vanished video: kept, unused
    store.sync_rows("train", [v for i, v in enumerate(listed)], np.array([int(v[1]) for v in listed]),
                    present[np.r_[300:n, 0:300]], [f"c{i}" for i in range(C)], [f"class {i}" for i in range(C)],
                    views=2, num_frames=4, dim=64, chunk_rows=16)
    keep = np.r_[300:n, 0:300]
    keep = keep[~failed[keep] & (keep != 7)]
    monkeypatch.setattr(store_read, "BLOCK_BYTES", 16 * 2 * 4 * 64 * 2)  # a chunk a block: 38 blocks
    fs = load_split_features(path, "train")
    assert fs.video_ids == [ids[r] for r in keep]
    assert np.array_equal(fs.features.numpy(), feats[keep])
    # what the features cost on their own (the load's small arrays and checks are a fixed cost beside them)
    reader = CacheStore(path)
    tracemalloc.start()
    try:
        got = store_read.read_rows(reader, "train", "features", keep)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, feats[keep])
    assert peak < 1.25 * got.nbytes, (peak, got.nbytes)  # reading all rows, then indexing them, held twice as much


def test_export_copies_block_by_block(tmp_path, monkeypatch):
    import tracemalloc

    h5py = pytest.importorskip("h5py")
    import mdmf_cache.store.read as store_read

    path = tmp_path / "c.zarr"
    _, feats, failed = _big_store(path, dim=1024)  # 10 MB: the export's fixed costs (checks, h5py) are ~2 MB
    monkeypatch.setattr(store_read, "BLOCK_BYTES", 16 * 2 * 4 * 1024 * 2)  # a chunk a block
    export_h5(path, tmp_path / "warm.h5")  # imports before memory is traced
    tracemalloc.start()
    try:
        out = export_h5(path, tmp_path / "c.h5")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with h5py.File(out, "r") as f:
        got = f["train"]["features"][()]
    assert np.array_equal(got[~failed], feats[~failed]) and not got[failed].any()
    assert peak < 0.5 * feats.nbytes, (peak, feats.nbytes)  # the whole array is not held


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_features_are_refused_by_readers_and_named_by_verify(tmp_path, value):
    from mdmf_cache.store.verify import NONFINITE

    path = tmp_path / "c.zarr"
    store, feats, _ = _big_store(path)
    g = CacheStore(path, mode="a").root["train"]
    for row in (40, 41, 333):  # a bad decode, a flaky disk, a hand edit
        block = np.asarray(g["features"][row])
        block[1, 2, 7] = value
        g["features"][row] = block
    with pytest.raises(CacheError) as err:
        load_split_features(path, "train")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg
    assert "train/features rows 40-41, 333: finished rows with NaN or inf" in msg and "rerun the extract" in msg
    damages = CacheStore(path).verify()
    assert [(d.array, d.what, d.rows, d.fix) for d in damages] == [("features", NONFINITE, [40, 41, 333], "rows")]
    import mdmf_cache.report.tables as report

    with report.console.capture() as cap, pytest.raises(CacheError, match="rerun the extract command"):
        report.print_verify(path)  # mdmf-cache verify: named, with what a rerun does about it
    out = " ".join(cap.get().split())
    assert "train/features rows 40-41, 333: finished rows with NaN or inf" in out
    assert "repair (rows): those rows are extracted again" in out
    assert CacheStore(path).verify(deep=False) == []  # the cheap check reads no features
    # a failed row's features are never read: NaN there is nobody's business
    block = np.asarray(g["features"][5])
    block[:] = np.nan
    g["features"][5] = block
    assert [d.rows for d in CacheStore(path).verify()] == [[40, 41, 333]]


# ---- the layout: small per-row arrays in units of several chunks, older caches -------------------------
def test_large_split_gets_units_of_chunks_and_ranks_own_whole_units(tmp_path, monkeypatch):
    import mdmf_cache.store.layout as store_mod
    from mdmf_cache.store.layout import unit_rows_for

    assert unit_rows_for(10, 4) == 4 and unit_rows_for(67013, 64) == 256 and unit_rows_for(200000, 64) == 768
    assert unit_rows_for(10**7, 64) == 4096  # at most 4,096 rows
    monkeypatch.setattr(store_mod, "UNITS_PER_SPLIT", 16)  # the same rule on 64 rows instead of 1,024
    n, cr = 4 * store_mod.UNITS_PER_SPLIT, 1  # 4 rows a unit
    store = CacheStore.open_for_writing(tmp_path / "c.zarr", FP)
    ids = [f"c{i % C}/v{i}" for i in range(n)]
    _sync(store, ids, chunk_rows=cr)
    g = store.root["train"]
    assert store.unit_rows("train") == 4 and g.attrs["unit_rows"] == 4
    assert g["features"].chunks[0] == 1 and g["done"].chunks[0] == 4 and g["file_size"].chunks[0] == 4
    assert g["video_ids"].chunks[0] == 1 << 16
    parts = [store.pending_rows("train", r, 2) for r in range(2)]
    assert parts[0][:8].tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and parts[1][:4].tolist() == [4, 5, 6, 7]
    # two writers filling their own units row by row, interleaved: no row lost (they share no chunk)
    for a, b in zip(parts[0], parts[1]):
        for r in (a, b):
            store.write_rows("train", np.array([r]), {**_rows([r]), "file_size": np.array([r], np.int64),
                                                      "file_mtime": np.array([r + 1], np.int64)})
    assert store.done_mask("train").all()
    size, mtime = store.file_stats("train")
    assert size.tolist() == list(range(n)) and mtime.tolist() == list(range(1, n + 1))


def test_a_cache_in_the_layout_before_units_and_file_stats_reads_and_grows(tmp_path):
    """What the previous version wrote: no unit_rows, every per-row array chunked by chunk_rows, no file stats."""
    import shutil

    import zarr

    path = tmp_path / "c.zarr"
    expected = _write_all(_new_store(path), failed=(2,))
    g = zarr.open_group(str(path / "train"), mode="a")
    del g.attrs["unit_rows"]
    for name in ("file_size", "file_mtime"):
        shutil.rmtree(path / "train" / name)
    store = CacheStore(path)
    assert store.unit_rows("train") == 4 and store.file_stats("train")[0].tolist() == [-1] * N  # unknown
    assert store.verify() == [] and store.is_complete()
    fs = load_split_features(path, "train")
    keep = np.setdiff1d(np.arange(N), [2])
    assert np.array_equal(fs.features.numpy(), expected["features"][keep])
    # an extract rerun's sync adds the stat arrays (unknown) and grows them with the split
    writer = CacheStore(path, mode="a")
    ids = [f"c{i % C}/v{i}" for i in range(N)]
    _sync(writer, ids[:3] + ["c0/gone"] + ids[3:] + ["c1/new"], chunk_rows=4)
    assert writer.root["train"]["file_size"].shape == (N + 2,) and writer.file_stats("train")[0].tolist() == [-1] * (N + 2)
    assert writer.root["train"]["file_size"].chunks == (4,)  # the chunking of its siblings
    assert writer.verify() == []


def test_a_reader_reads_each_small_array_once(tiny_cache, monkeypatch):
    """``info`` verifies (cheap part), summarises and checks completeness: every small per-row array is read once."""
    import zarr

    from mdmf_cache.report.tables import print_info

    reads: dict[str, int] = {}
    real = zarr.Array.__getitem__

    def counting(self, sel):
        reads[self.path] = reads.get(self.path, 0) + 1
        return real(self, sel)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    print_info(tiny_cache)
    assert reads and max(reads.values()) == 1, reads
    assert "train/done" in reads and not any(k.endswith("/features") for k in reads)
