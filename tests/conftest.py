"""Shared fixtures: a tiny synthetic action dataset and its feature cache (built once per session).

Under pytest-xdist (``make test``) the read-only datasets and caches below are built once for all the workers of
a run, by whichever worker needs them first, while the others wait on a file lock (:func:`_built_once`).

``HF_HUB_OFFLINE`` is set before anything imports open_clip / huggingface_hub: the tests never
download and the tiny backbones (``mdmf-tiny-vit``, ``mdmf-tiny-rn``) need no weights.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import signal  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A suite started in the background by a non-interactive shell (`make test &`, a CI script) inherits SIGINT ignored,
# and so would every command the tests start: the tests that press Ctrl-C need it delivered as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)


#: Head options for MDMF, CLIP-FSAR and CLIP-CPM2C on the tests' 64-d caches: the released 2048-wide feed-forward
#: blocks (32 x D there) would be most of each training step; 4 x D, a transformer's usual ratio, trains the same
#: code, for tests about what a run keeps rather than what the released head scores.
NARROW_FFN = {"ffn_dim": 256}


def forked(target, daemon: bool = True):
    """``target()`` in a forked child of this process, started: a process of its own (to SIGKILL, or to race this
    one) without the seconds a fresh interpreter spends importing torch and open_clip. The child runs torch on one
    thread, as a DataLoader worker does (the parent's OpenMP pool does not survive a fork), so a caller comparing its
    own runs with the child's runs them on one thread too. Its traceback, if any, goes to this process's stderr; its
    exit code is the returned process's ``exitcode``. ``daemon=False`` for a child that starts processes itself."""
    import multiprocessing

    def child() -> None:
        import torch

        torch.set_num_threads(1)
        target()

    proc = multiprocessing.get_context("fork").Process(target=child, daemon=daemon)
    proc.start()
    return proc


def join_or_kill(proc, timeout: float) -> int | None:
    """Wait up to ``timeout`` seconds for a :func:`forked` child to end, SIGKILL it if it has not (no test leaves one
    behind); returns its exit code (``-9`` where it had to be killed)."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(60)
    return proc.exitcode


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """``base/name``, made by ``build(folder)`` once per test run: per session without xdist, else once for every
    worker (they share the parent of their base temporary folders); ``build`` must not depend on the worker."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            import shutil

            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder

#: The extraction settings of ``tiny_cache`` (besides root and cache_dir). Tests that need a cache
#: identical to it (resume, ranks, CLI) start from these.
TINY_EXTRACT = dict(
    dataset="folder",
    model="mdmf-tiny-vit",
    pretrained=None,
    workers=0,
    progress=False,
    chunk_rows=4,
    train_views=2,
    flip=False,
)


@pytest.fixture(scope="session")
def tiny_extract_settings() -> dict:
    """A copy of the ``ExtractConfig`` keyword arguments ``tiny_cache`` was made with."""
    return dict(TINY_EXTRACT)


@pytest.fixture(scope="session")
def action_videos(tmp_path_factory) -> Path:
    """``root/<class>/<class>_vNN.{mp4,avi}``: 9 classes x 4 videos of 20 frames, 64x48.

    The default folder split (seed 0, 60/20/20 % of classes) gives 5/2/2 classes, 20/8/8 videos.
    """
    from mdmf_cache.data.synthetic import make_action_dataset

    build = lambda d: make_action_dataset(d / "videos", num_classes=9, videos_per_class=4, num_frames=20,  # noqa: E731
                                          size=(64, 48))
    return _built_once(tmp_path_factory, "action", build) / "videos"


@pytest.fixture(scope="session")
def tiny_cache(action_videos, tmp_path_factory) -> Path:
    """A complete cache of ``action_videos`` (tiny ViT, random init, V=2 train views); read-only."""
    from mdmf_cache.extraction.build import run_extract
    from mdmf_cache.configs import ExtractConfig

    build = lambda d: run_extract(ExtractConfig(root=str(action_videos), cache_dir=str(d), **TINY_EXTRACT))  # noqa: E731
    (path,) = _built_once(tmp_path_factory, "tiny_cache", build).glob("*.zarr")
    return path


@pytest.fixture(scope="session")
def demo_videos(tmp_path_factory) -> Path:
    """25 classes x 10 videos (moving shapes) of 16 frames, 64x48: enough classes for 5-way train, val and test
    episodes (15/5/5 with the folder split). Read-only."""
    from mdmf_cache.data.synthetic import make_action_dataset

    build = lambda d: make_action_dataset(d / "videos", num_classes=25, videos_per_class=10, num_frames=16,  # noqa: E731
                                          size=(64, 48), seed=1)
    return _built_once(tmp_path_factory, "train_demo", build) / "videos"


@pytest.fixture(scope="session")
def demo_cache(demo_videos, tmp_path_factory) -> Path:
    """``demo_videos``' tiny-vit features, 2 train views. Read-only; shared by the training, evaluation and
    reliability tests."""
    from mdmf_cache.extraction.build import run_extract
    from mdmf_cache.configs import ExtractConfig

    def build(folder: Path) -> None:
        run_extract(ExtractConfig(dataset="folder", root=str(demo_videos), cache_dir=str(folder / "cache"),
                                  name="demo", model="mdmf-tiny-vit", pretrained=None, train_views=2, flip=False,
                                  workers=0, chunk_rows=16, progress=False, clean_names=True))

    (path,) = (_built_once(tmp_path_factory, "demo_cache", build) / "cache").glob("*.zarr")
    return path


@pytest.fixture(scope="session")
def splits_dir() -> Path:
    """The split files of the built-in datasets, as shipped with the package (``mdmf_cache/data/splits``)."""
    from mdmf_cache.data.datasets import shipped_splits_dir

    return shipped_splits_dir()


@pytest.fixture
def cli_runner():
    """typer's CliRunner; afterwards removes the log handler the CLI installs on the root logger."""
    import logging

    from typer.testing import CliRunner

    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    yield CliRunner()
    for h in list(root.handlers):
        if h not in before and type(h).__name__ == "RichHandler":
            root.removeHandler(h)
    root.setLevel(level)


#: The per-row arrays of a cache that the image encoder computes in batches of clips; the others (indices, flags,
#: labels, and the text embeddings, encoded all classes at once) are compared exactly.
ENCODED = ("features",)


def assert_same_features(x, y, what: str = "features") -> None:
    """Two float16 encodings of the same frames agree to one float16 step.

    Two extractions that batch the clips differently (a resumed run, another rank's share, one video re-encoded
    alone) run the encoder's float32 matrix products at other batch shapes, and some CPUs' kernels round those
    differently in the last bits; after the cast to float16 an element can then sit one step (2**-10 relative)
    away. A wrong frame, view or row differs by far more (the tests' synthetic frames give cosines well below 0.99)."""
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, (what, x.shape, y.shape, x.dtype, y.dtype)
    np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2.0 ** -10, atol=2.0 ** -24,
                               err_msg=what)


def assert_same_argmax(logits, reference, margin: float) -> None:
    """``logits`` (another computation of ``reference``, equal to within ``margin / 2``) pick the same class wherever
    the reference's two best logits are more than ``margin`` apart, and such clear cases are nearly all of them."""
    logits, reference = np.asarray(logits), np.asarray(reference)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > margin
    assert clear.mean() > 0.95, f"only {clear.mean():.1%} of the queries have a clear best class"
    np.testing.assert_array_equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])


def assert_same_cache(a: Path, b: Path) -> None:
    """Two caches hold the same arrays and split attributes: exactly, except the encoder's outputs (:data:`ENCODED`),
    which may differ by one float16 step when the two extractions batched the clips differently
    (:func:`assert_same_features`).

    The size and mtime recorded of each row's file are left out: they describe the files, which two trees
    (a copy of the videos) hold with other times."""
    from mdmf_cache.store.layout import STAT_ARRAYS
    from mdmf_cache.store.cache import CacheStore

    sa, sb = CacheStore(a), CacheStore(b)
    assert sa.splits == sb.splits
    assert sa.fingerprint == sb.fingerprint
    for split in sa.splits:
        ga, gb = sa.root[split], sb.root[split]
        names = sorted(set(ga.array_keys()) - set(STAT_ARRAYS))
        assert names == sorted(set(gb.array_keys()) - set(STAT_ARRAYS))
        for name in names:
            x, y = np.asarray(ga[name][:]), np.asarray(gb[name][:])
            assert x.shape == y.shape and x.dtype == y.dtype, (split, name)
            if x.dtype.kind in "OUT":
                assert x.tolist() == y.tolist(), (split, name)
            elif name in ENCODED:
                assert_same_features(x, y, f"{split}/{name}")
            else:
                assert np.array_equal(x, y), f"{split}/{name} differs in {int((x != y).sum())} elements"
        for key in ("classes", "class_names", "prompts", "views", "chunk_rows", "missing", "num_videos"):
            assert ga.attrs.get(key) == gb.attrs.get(key), (split, key)


@pytest.fixture(scope="session")
def same_cache():
    """``assert_same_cache(a, b)``: two caches hold the same rows (the encoder's outputs to one float16 step)."""
    return assert_same_cache
