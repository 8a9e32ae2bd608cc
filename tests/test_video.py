"""Frame-accurate decoding: every backend against index-coded ground truth."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

import mdmf_cache.data.synthetic as synthetic
from mdmf_cache.errors import ConfigError, VideoReadError
from mdmf_cache.data.sampling import sample_indices
from mdmf_cache.data.synthetic import decode_index
from mdmf_cache.data.video import BACKENDS, Clip, decode_clip, probe_num_frames, read_frames, resolve_backend

try:
    import decord  # noqa: F401  (imported after av, see mdmf_cache.video)

    HAVE_DECORD = True
except ImportError:
    HAVE_DECORD = False

needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")

# ---- fixtures (module scope: encoding is the slow part) -----------------------------------

N = 200  # frames per index video; keyframe every 12 frames, B-frames on
EXTS = (".avi", ".mp4", ".webm", ".mkv")


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    """Index-coded videos, one per container."""
    root = tmp_path_factory.mktemp("vids")
    return {ext: synthetic.write_index_video(root / f"idx{ext}", N, gop=12) for ext in EXTS}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> Path:
    """A folder of 40 index-coded JPEG frames."""
    return synthetic.write_index_frames(tmp_path_factory.mktemp("jpg") / "video", 40)


@pytest.fixture(scope="module")
def truncated_avi(vids, tmp_path_factory) -> tuple[Path, int]:
    """An AVI cut to 60% of its bytes: the header still says N frames. Returns (path, decodable)."""
    path = tmp_path_factory.mktemp("trunc") / "cut.avi"
    shutil.copy(vids[".avi"], path)
    synthetic.truncate_file(path, 0.6)
    with av.open(str(path)) as c:
        decodable = sum(1 for _ in c.decode(video=0))
    return path, decodable


def _ids(frames: np.ndarray) -> list[int]:
    return [decode_index(f) for f in frames]


def _request(n: int, seed: int = 0) -> list[int]:
    """Unsorted indices with repeats, plus the first and the last frame."""
    rng = np.random.default_rng(seed)
    idx = list(rng.integers(0, n, 20))
    idx += [n - 1, 0, idx[3], n - 1, idx[0]]
    rng.shuffle(idx)
    return [int(i) for i in idx]


# ---- the synthetic files are what they claim to be ----------------------------------------


def test_avi_has_bframes_and_mid_video_keyframes(vids):
    types = synthetic.frame_types(vids[".avi"])
    assert len(types) == N
    assert types.count("B") > N // 3
    assert [i for i, t in enumerate(types) if t == "I"][:4] == [0, 12, 24, 36]
    with av.open(str(vids[".avi"])) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"


def test_decode_index_rejects_non_index_frames():
    with pytest.raises(ValueError):
        decode_index(np.full((96, 192, 3), 128, np.uint8))
    assert decode_index(synthetic.index_frame(4095)) == 4095


# ---- backend choice -----------------------------------------------------------------------


def test_auto_backend_choice(vids, jpeg_dir, tmp_path):
    assert resolve_backend(vids[".avi"], "auto") == "pyav"
    assert resolve_backend(tmp_path / "X.AVI", "auto") == "pyav"
    expected = "decord" if HAVE_DECORD else "pyav"
    for ext in (".mp4", ".webm", ".mkv"):
        assert resolve_backend(vids[ext], "auto") == expected
    assert resolve_backend(jpeg_dir, "auto") == "jpeg"
    assert resolve_backend(tmp_path / "clip.mov", "auto") == "pyav"
    for name in ("decord", "pyav", "jpeg"):
        assert resolve_backend(vids[".avi"], name) == name


def test_unknown_backend_lists_valid_ones(vids):
    with pytest.raises(ValueError, match="pyav") as info:
        read_frames(vids[".mp4"], [0], backend="opencv")
    assert all(b in str(info.value) for b in BACKENDS)


@needs_decord
def test_decord_returns_wrong_frames_on_bframe_avi(vids):
    """Why auto never uses decord for AVI: it seeks to the wrong frames (deterministic)."""
    asked = [131, 11, 150, 3, N - 1]
    got = _ids(read_frames(vids[".avi"], asked, backend="decord"))
    assert got != asked
    assert _ids(read_frames(vids[".avi"], asked)) == asked


# ---- frame correctness --------------------------------------------------------------------

CORRECT = [(".avi", "auto"), (".avi", "pyav"),
           (".mp4", "auto"), (".mp4", "pyav"), (".mp4", "decord"),
           (".webm", "auto"), (".webm", "pyav"), (".webm", "decord"),
           (".mkv", "auto"), (".mkv", "pyav"), (".mkv", "decord")]


@pytest.mark.parametrize("ext,backend", CORRECT)
def test_read_frames_exact(vids, ext, backend):
    if backend == "decord" and not HAVE_DECORD:
        pytest.skip("decord not installed")
    for seed in range(3):
        asked = _request(N, seed)
        frames = read_frames(vids[ext], asked, backend=backend)
        assert frames.dtype == np.uint8 and frames.shape == (len(asked), 96, 192, 3)
        assert _ids(frames) == asked
    assert _ids(read_frames(vids[ext], np.array([N - 1]), backend=backend)) == [N - 1]
    assert _ids(read_frames(vids[ext], [0], backend=backend)) == [0]


@pytest.mark.parametrize("ext", EXTS)
def test_probe_num_frames(vids, ext):
    assert probe_num_frames(vids[ext]) == N
    assert probe_num_frames(vids[ext], backend="pyav") == N


def test_jpeg_folder(jpeg_dir):
    asked = _request(40, 5)
    for backend in ("auto", "jpeg"):
        assert _ids(read_frames(jpeg_dir, asked, backend=backend)) == asked
    assert probe_num_frames(jpeg_dir) == 40
    clip = decode_clip(jpeg_dir, functools.partial(sample_indices, num_segments=8))
    assert _ids(clip.frames) == clip.indices.tolist() == [2, 7, 12, 17, 22, 27, 32, 37]


@pytest.mark.parametrize("ext", EXTS)
def test_decode_clip_with_sampler(vids, ext):
    rng = np.random.default_rng(1)
    sample = functools.partial(sample_indices, sampler="tsn", train=True, rng=rng)
    clip = decode_clip(vids[ext], sample)
    assert isinstance(clip, Clip)
    assert clip.indices.dtype == np.int32 and clip.frames.dtype == np.uint8
    assert clip.num_frames == N
    assert _ids(clip.frames) == clip.indices.tolist()


# ---- clamping past the decodable end ------------------------------------------------------


@pytest.mark.parametrize("ext,backend", [(".avi", "pyav"), (".mp4", "auto"), (".webm", "pyav"),
                                         ("jpeg", "jpeg")])
def test_indices_past_end_are_clamped(vids, jpeg_dir, ext, backend):
    path, n = (jpeg_dir, 40) if ext == "jpeg" else (vids[ext], N)
    clip = decode_clip(path, lambda _n: np.array([n + 10, 0, n - 1, n]), backend=backend)
    assert clip.indices.tolist() == [n - 1, 0, n - 1, n - 1]
    assert _ids(clip.frames) == [n - 1, 0, n - 1, n - 1]
    assert clip.num_frames == n
    assert _ids(read_frames(path, [n + 3, 1], backend=backend)) == [n - 1, 1]


def test_header_count_exceeds_decodable_frames(truncated_avi):
    path, decodable = truncated_avi
    assert probe_num_frames(path) == N  # the AVI header still claims every frame
    assert 0 < decodable < N - 20

    for sampler in ("tsn", "linspace"):
        clip = decode_clip(path, functools.partial(sample_indices, sampler=sampler))
        asked = sample_indices(N, sampler=sampler)
        assert clip.num_frames == decodable
        assert clip.indices.tolist() == np.minimum(asked, decodable - 1).tolist()
        assert _ids(clip.frames) == clip.indices.tolist()


# ---- errors -------------------------------------------------------------------------------


def _assert_read_error(path, backend="auto"):
    with pytest.raises(VideoReadError) as info:
        read_frames(path, [0], backend=backend)
    msg = str(info.value)
    assert Path(path).name in msg and "\n" not in msg
    with pytest.raises(VideoReadError):
        probe_num_frames(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    _assert_read_error(tmp_path / "nope.avi", backend)


@pytest.mark.parametrize("ext", [".avi", ".mp4", ".webm"])
def test_zero_byte_file(tmp_path, ext):
    path = synthetic.write_empty_file(tmp_path / f"empty{ext}")
    _assert_read_error(path)
    _assert_read_error(path, "pyav")


@pytest.mark.parametrize("ext,keep", [(".avi", 0.02), (".mp4", 0.5), (".webm", 0.001)])
def test_truncated_file(vids, tmp_path, ext, keep):
    path = tmp_path / f"cut{ext}"
    shutil.copy(vids[ext], path)
    synthetic.truncate_file(path, keep)
    _assert_read_error(path)
    _assert_read_error(path, "pyav")


def test_garbage_and_empty_folder(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    _assert_read_error(garbage)
    empty = tmp_path / "empty_video"
    empty.mkdir()
    _assert_read_error(empty)
    _assert_read_error(empty, "jpeg")


def test_chained_cause_and_bad_indices(vids, tmp_path):
    path = synthetic.write_empty_file(tmp_path / "z.avi")
    with pytest.raises(VideoReadError) as info:
        read_frames(path, [0], backend="pyav")
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError):
        read_frames(vids[".avi"], [-1])
    with pytest.raises(ValueError):
        read_frames(vids[".avi"], [])


def test_decord_backend_without_decord(vids, monkeypatch):
    import mdmf_cache.data.video as video

    monkeypatch.setattr(video, "_decord_checked", True)
    monkeypatch.setattr(video, "_decord_module", None)
    assert resolve_backend(vids[".mp4"], "auto") == "pyav"
    with pytest.raises(ConfigError):
        read_frames(vids[".mp4"], [0], backend="decord")


# ---- synthetic action dataset -------------------------------------------------------------


def test_make_action_dataset(tmp_path):
    classes = synthetic.make_action_dataset(
        tmp_path, classes=["a red circle moving left", "blue_square_moving_up"],
        videos_per_class=3, num_frames=16, formats=(".mp4", ".avi", ".webm"), seed=3)
    assert classes == ["red_circle_moving_left", "blue_square_moving_up"]
    files = sorted(tmp_path.glob("*/*"))
    assert [f.suffix for f in files[:3]] == [".mp4", ".avi", ".webm"]
    assert len(files) == 6
    clips = [read_frames(f, list(range(16))) for f in files]
    assert all(c.shape == (16, 72, 96, 3) for c in clips)
    assert not np.array_equal(clips[0], clips[3])
    # The shape moves: first and last frames differ.
    assert np.abs(clips[0][0].astype(int) - clips[0][-1].astype(int)).mean() > 2
    assert len(synthetic.all_action_classes()) == 48


def test_webm_encoding_in_subprocess(tmp_path):
    """The fallback used when decord's libvpx was loaded before PyAV's."""
    frames = np.stack([synthetic.index_frame(i) for i in range(10)])
    path = tmp_path / "sub.webm"
    synthetic._encode_in_subprocess(path, frames, (192, 96), 25, True, 12)
    assert _ids(read_frames(path, [9, 0, 4], backend="pyav")) == [9, 0, 4]


@pytest.mark.parametrize("pattern", ["{}.jpg", "img_{}.jpg", "frame{}.png"])
def test_unpadded_frame_names_read_in_numeric_order(tmp_path, pattern):
    """``1.jpg ... 24.jpg`` is frames 1..24, not 1, 10, 11, ..., 19, 2, 20, ... (string order)."""
    from PIL import Image

    folder = tmp_path / "video"
    folder.mkdir()
    for i in range(24):
        Image.fromarray(synthetic.index_frame(i)).save(folder / pattern.format(i + 1), quality=95)
    assert sorted(p.name for p in folder.iterdir())[:3] != [pattern.format(k) for k in (1, 2, 3)]  # string order differs
    want = [0, 1, 2, 9, 10, 23]
    assert _ids(read_frames(folder, want, backend="jpeg")) == want
    assert _ids(read_frames(folder, want)) == want  # auto picks jpeg for a folder


def test_mov_is_read(tmp_path):
    path = synthetic.write_index_video(tmp_path / "clip.mov", 30, gop=12)
    assert resolve_backend(path, "auto") == "pyav" and probe_num_frames(path) == 30
    assert _ids(read_frames(path, [0, 13, 29])) == [0, 13, 29]
