"""Frame samplers (docs/method.md §3)."""

from __future__ import annotations

import numpy as np
import pytest

from mdmf_cache.data.sampling import SAMPLERS, sample_indices, video_key, video_rng


def _linspace_reference(n: int, train: bool, rng=None) -> list[int]:
    """method.md §3 written out longhand, T = 8."""
    if train:
        pad = int(min(5, (n - 8) / 2))
        if pad >= 1:
            start = int(rng.integers(0, pad + 1))
            end = int(rng.integers(n - 1 - pad, n))
        else:
            start, end = 0, n - 1
    else:
        start, end = 1, n - 2
    if end - start < 8:
        start, end = 0, n - 1
    return [int(np.floor(x)) for x in np.linspace(start, end, 8)]


# ---- tsn ----------------------------------------------------------------------------------


def test_tsn_test_middle_frames():
    # Segment i = [floor(i*n/8), floor((i+1)*n/8)); middle = (start + end) // 2.
    assert sample_indices(80).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert sample_indices(8).tolist() == list(range(8))
    assert sample_indices(16).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(100, num_segments=4).tolist() == [12, 37, 62, 87]
    assert sample_indices(9).tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    out = sample_indices(80)
    assert out.dtype == np.int64 and out.shape == (8,)


@pytest.mark.parametrize("n", [8, 9, 13, 37, 80, 101, 173, 300])
def test_tsn_indices_inside_their_segments(n):
    starts = [(i * n) // 8 for i in range(8)]
    ends = [((i + 1) * n) // 8 for i in range(8)]
    test = sample_indices(n)
    assert all(s <= x < e for s, x, e in zip(starts, test, ends))
    for seed in range(20):
        train = sample_indices(n, train=True, rng=np.random.default_rng(seed))
        assert all(s <= x < e for s, x, e in zip(starts, train, ends))


def test_tsn_train_covers_segment_and_is_seeded():
    draws = np.stack([sample_indices(80, train=True, rng=np.random.default_rng(s))
                      for s in range(400)])
    assert draws[:, 0].min() == 0 and draws[:, 0].max() == 9
    assert draws[:, 7].min() == 70 and draws[:, 7].max() == 79
    a = sample_indices(80, train=True, rng=video_rng(0, 5, 1))
    b = sample_indices(80, train=True, rng=video_rng(0, 5, 1))
    c = sample_indices(80, train=True, rng=video_rng(0, 5, 2))
    assert a.tolist() == b.tolist()
    views = {tuple(sample_indices(80, train=True, rng=video_rng(0, 5, v))) for v in range(10)}
    assert len(views) > 1
    assert c.dtype == np.int64


# ---- linspace -----------------------------------------------------------------------------


def test_linspace_test_exact():
    # n = 80: start 1, end 78.
    assert sample_indices(80, sampler="linspace").tolist() == \
        np.floor(np.linspace(1, 78, 8)).astype(int).tolist() == [1, 12, 23, 34, 45, 56, 67, 78]
    for n in range(1, 60):
        assert sample_indices(n, sampler="linspace").tolist() == _linspace_reference(n, False)


def test_linspace_short_videos_use_whole_range():
    # n = 9: end - start = 6 < 8, so 0..n-1.
    assert sample_indices(9, sampler="linspace").tolist() == \
        np.floor(np.linspace(0, 8, 8)).astype(int).tolist()
    assert sample_indices(10, sampler="linspace").tolist() == [0, 1, 2, 3, 5, 6, 7, 9]
    assert sample_indices(11, sampler="linspace").tolist() == [1, 2, 3, 4, 5, 6, 7, 9]


@pytest.mark.parametrize("n", [1, 5, 8, 9, 10, 11, 12, 13, 17, 18, 19, 40, 173])
def test_linspace_train_matches_reference(n):
    for seed in range(10):
        got = sample_indices(n, sampler="linspace", train=True, rng=np.random.default_rng(seed))
        assert got.tolist() == _linspace_reference(n, True, np.random.default_rng(seed))


def test_linspace_train_pad_range():
    # n = 80: pad = 5, start in 0..5, end in 74..79.
    firsts, lasts = set(), set()
    for seed in range(300):
        idx = sample_indices(80, sampler="linspace", train=True, rng=np.random.default_rng(seed))
        firsts.add(int(idx[0]))
        lasts.add(int(idx[-1]))
    assert firsts == set(range(0, 6))
    assert lasts == set(range(74, 80))
    # n = 11: pad = int(1.5) = 1; n = 9: pad 0 -> deterministic 0..n-1.
    draws = {tuple(sample_indices(9, sampler="linspace", train=True, rng=np.random.default_rng(s)))
             for s in range(20)}
    assert draws == {tuple(np.floor(np.linspace(0, 8, 8)).astype(int))}


# ---- short videos and errors ----------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shorter_than_t_repeats(sampler, train, n):
    idx = sample_indices(n, sampler=sampler, train=train, rng=np.random.default_rng(0))
    assert idx.shape == (8,) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() <= n - 1
    assert np.all(np.diff(idx) >= 0)
    assert len(set(idx.tolist())) <= n


def test_single_frame_and_tsn_short_exact():
    assert sample_indices(1).tolist() == [0] * 8
    assert sample_indices(3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert sample_indices(1, sampler="linspace").tolist() == [0] * 8


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_frame_count_raises(n):
    for sampler in SAMPLERS:
        with pytest.raises(ValueError):
            sample_indices(n, sampler=sampler)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tsn"):
        sample_indices(80, sampler="uniform")
    with pytest.raises(ValueError, match="rng"):
        sample_indices(80, train=True)
    with pytest.raises(ValueError):
        sample_indices(80, num_segments=0)
    with pytest.raises(ValueError):
        video_rng(-1, 0, 0)


def test_test_mode_is_deterministic():
    for sampler in SAMPLERS:
        assert sample_indices(123, sampler=sampler).tolist() == \
            sample_indices(123, sampler=sampler).tolist()


def test_video_rng_is_keyed_by_the_video_id_stably():
    """Train views depend on the video id only (not its row), the same in every process and run."""
    import subprocess
    import sys

    vid = "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"
    assert video_key(vid) == 16113191353450786141  # sha256-based: no per-process hash salt
    a = sample_indices(80, train=True, rng=video_rng(0, vid, 0))
    code = ("import sys; from mdmf_cache.data.sampling import sample_indices, video_rng; "
            f"print(sample_indices(80, train=True, rng=video_rng(0, {vid!r}, 0)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout
    assert out.strip() == str(a.tolist())
    others = {tuple(sample_indices(80, train=True, rng=video_rng(0, f"c/v{k}", 0))) for k in range(20)}
    assert len(others) > 15  # different videos, different draws
    assert sample_indices(80, train=True, rng=video_rng(1, vid, 0)).tolist() != a.tolist() or \
        sample_indices(80, train=True, rng=video_rng(2, vid, 0)).tolist() != a.tolist()  # the seed matters
