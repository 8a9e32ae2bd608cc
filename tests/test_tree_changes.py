"""A cache stays true when the video tree changes: videos added, removed, replaced or back.

Every video of the stamped tree is told apart by its frames and its length
(:func:`mdmf_cache.data.synthetic.make_stamped_tree`). A tree that grows or shrinks between runs, with
runs SIGKILLed in a child process midway, must end with every row equal, by video id, to a fresh
extraction of its own video, and with ``load_split_features`` equal to a fresh extraction of the
current tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_features

from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.layout import group_name
from mdmf_cache.store.read import load_split_features
from mdmf_cache.extraction.build import run_extract
from mdmf_cache.configs import ExtractConfig

from conftest import join_or_kill
from test_extract import _done_count, fork_and_kill, fork_extract

CLASSES = ["archery", "brush_hair", "cartwheel"]  # the folder split gives one class to each split
PER_CLASS = 5
SETTINGS = dict(dataset="folder", model="mdmf-tiny-vit", pretrained=None, workers=0, progress=False,
                chunk_rows=2, train_views=2, flip=False, num_frames=4)


@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    """(full tree, its id -> (code base, frames), a fresh cache of the full tree)."""
    from mdmf_cache.data.synthetic import make_stamped_tree

    base = tmp_path_factory.mktemp("stamped")
    stamps = make_stamped_tree(base / "videos", CLASSES, PER_CLASS)
    path, _ = run_extract(ExtractConfig(**SETTINGS, root=str(base / "videos"), cache_dir=str(base / "fresh")))
    return base / "videos", stamps, path


def _files(full: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(full.glob("*/*"))}


def _tree(full: Path, root: Path, ids) -> Path:
    """``root`` holding exactly the videos ``ids`` of the full tree (added and removed as needed). Files are copied
    with their mtimes (copy2): a video that comes back is the same file, not one changed since (which a rerun
    would extract again)."""
    files = _files(full)
    for vid, src in files.items():
        dst = root / src.parent.name / src.name
        if vid in ids and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif vid not in ids and dst.exists():
            dst.unlink()
    return root


def _path(cache_dir: Path, root: Path) -> Path:
    return cache_dir / group_name(root.name, SETTINGS["model"], "random")


def _assert_rows_true(path: Path, fresh: Path, stamps: dict) -> int:
    """Every finished row equals the fresh extraction's row of the same video id; returns their count."""
    store, ref = CacheStore(path), CacheStore(fresh)
    checked = 0
    for split in store.splits:
        ids, ref_ids = store.video_ids(split), ref.video_ids(split)
        where = {v: i for i, v in enumerate(ref_ids)}
        done = store.done_mask(split)
        g, rg = store.root[split], ref.root[split]
        for row in np.flatnonzero(done):
            vid, r = ids[row], where[ids[row]]
            assert int(g["num_frames"][row]) == stamps[vid][1], (split, vid)  # its own video's length
            assert int(g["labels"][row]) == int(rg["labels"][r]), (split, vid)
            assert np.array_equal(g["frame_indices"][row], rg["frame_indices"][r]), (split, vid)
            assert_same_features(g["features"][row], rg["features"][r], f"{split} {vid}")  # batched otherwise
            checked += 1
    return checked


def _assert_loads_like_fresh(path: Path, fresh: Path, on_disk: set[str]) -> None:
    """What the trainer reads equals a fresh extraction of the current tree: same rows, order, values."""
    for split in ("train", "val", "test"):
        got, ref = load_split_features(path, split), load_split_features(fresh, split)
        keep = [i for i, v in enumerate(ref.video_ids) if v in on_disk]
        assert got.video_ids == [ref.video_ids[i] for i in keep], split
        assert_same_features(got.features.numpy(), ref.features.numpy()[keep], split)
        assert got.labels.tolist() == ref.labels[keep].tolist(), split
        assert np.array_equal(got.text.numpy(), ref.text.numpy()) and got.classes == ref.classes


def _kill_midway(kw: dict, path: Path, low: int, high: int) -> int:
    """Extract in a forked child (a row per flush), SIGKILL it once ``low <= done rows < high``; returns the rows done
    after the kill."""
    fork_and_kill({**kw, "batch_videos": 1, "flush_seconds": 0.0}, path, low, high, delay=0.3, cwd=path.parent.parent)
    return _done_count(path)


@pytest.mark.integration
def test_growing_tree_killed_midway(stamped, tmp_path):
    full, stamps, fresh = stamped
    ids = sorted(stamps)
    # two videos per class on disk at first, the last two: the others arrive before them in split order
    first = {v for v in ids if int(v[-2:]) >= 3}
    root = _tree(full, tmp_path / "videos", first)
    kw = {**SETTINGS, "root": str(root), "cache_dir": str(tmp_path / "cache")}
    path, results = run_extract(ExtractConfig(**kw))
    assert sum(r.extracted for r in results) == len(first) == 6
    _assert_loads_like_fresh(path, fresh, first)

    _tree(full, root, set(ids))  # the other nine videos arrive
    done = _kill_midway(kw, path, low=len(first) + 2, high=len(ids))
    assert len(first) + 2 <= done < len(ids)
    store = CacheStore(path)
    assert not store.is_complete() and sum(store.num_rows(s) for s in store.splits) == len(ids)
    assert _assert_rows_true(path, fresh, stamps) == done  # mid-run too: no row holds another video

    path, results = run_extract(ExtractConfig(**kw))
    assert sum(r.extracted for r in results) == len(ids) - done  # only what was left
    assert sum(r.reused for r in results) == done and sum(r.added for r in results) == 0
    assert CacheStore(path).is_complete()
    assert _assert_rows_true(path, fresh, stamps) == len(ids)
    _assert_loads_like_fresh(path, fresh, set(ids))


@pytest.mark.integration
def test_shrinking_tree_killed_midway_then_videos_back(stamped, tmp_path, caplog):
    full, stamps, fresh = stamped
    ids = sorted(stamps)
    root = _tree(full, tmp_path / "videos", set(ids))
    kw = {**SETTINGS, "root": str(root), "cache_dir": str(tmp_path / "cache")}
    path = _path(tmp_path / "cache", root)
    done = _kill_midway(kw, path, low=5, high=10)

    # remove two finished and two unfinished videos (every class keeps some)
    store = CacheStore(path)
    finished = {v for s in store.splits for v, d in zip(store.video_ids(s), store.done_mask(s)) if d}
    gone_done = sorted(finished)[:2]
    gone_pending = [v for v in ids if v not in finished and v.endswith("_v04")][:2]
    assert len(gone_pending) == 2
    gone = set(gone_done) | set(gone_pending)
    on_disk = set(ids) - gone
    _tree(full, root, on_disk)
    done_again = _kill_midway(kw, path, low=done + 1, high=len(ids) - len(gone_pending))
    assert _assert_rows_true(path, fresh, stamps) == done_again

    path, results = run_extract(ExtractConfig(**kw))
    assert sum(r.extracted for r in results) == len(ids) - len(gone_pending) - done_again
    assert sorted(v for r in results for v in r.vanished) == sorted(gone_done)  # reported, rows kept
    store = CacheStore(path)
    assert store.is_complete()  # every video on disk is done; the vanished ones are not waited for
    assert sum(store.split_summary(s)["kept"] for s in store.splits) == 2
    assert _assert_rows_true(path, fresh, stamps) == len(ids) - len(gone_pending)
    _assert_loads_like_fresh(path, fresh, on_disk)  # vanished rows are not used

    # the videos come back: the kept rows are reused, the unfinished ones extracted
    _tree(full, root, set(ids))
    path, results = run_extract(ExtractConfig(**kw))
    assert sum(r.extracted for r in results) == len(gone_pending)
    assert not any(r.vanished for r in results)
    assert _assert_rows_true(path, fresh, stamps) == len(ids)
    _assert_loads_like_fresh(path, fresh, set(ids))


@pytest.mark.integration
def test_two_ranks_extend_a_grown_tree(stamped, tmp_path):
    """Rank 0 appends the new rows before any rank starts; rank 1 waits for the rows it needs."""
    full, stamps, fresh = stamped
    ids = sorted(stamps)
    first = {v for v in ids if int(v[-2:]) % 2}
    root = _tree(full, tmp_path / "videos", first)
    kw = {**SETTINGS, "root": str(root), "cache_dir": str(tmp_path / "cache")}
    run_extract(ExtractConfig(**kw))
    _tree(full, root, set(ids))
    kw = {**kw, "world_size": 2}
    rank1 = fork_extract({**kw, "rank": 1}, cwd=tmp_path)  # started first: its new videos have no rows yet
    try:
        path, results = run_extract(ExtractConfig(**kw, rank=0))
        code = join_or_kill(rank1, 180)
    finally:
        join_or_kill(rank1, 0)  # rank 0 failed: rank 1 goes at once
    assert code == 0, "rank 1 failed (its stderr above)"
    assert sum(r.added for r in results) == len(ids) - len(first)
    assert _assert_rows_true(path, fresh, stamps) == len(ids)
    _assert_loads_like_fresh(path, fresh, set(ids))
