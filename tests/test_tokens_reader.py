"""The token reader (mdmf_cache/store/tokens.py) and the token plumbing of train, eval and sweep.

Until ``extract --tokens`` writes them, the token arrays are written straight into a copy of ``tiny_cache`` with
zarr, following the layout of docs/cache-format.md (:func:`add_tokens`): ``tokens_<layer>`` ``(N, V, T, P, Dt)``
float16, one row per chunk, and the split attribute ``tokens``. The copy has one failed train row and its split
order reversed, so that episode rows and array rows differ (the reader must map one to the other as the feature
readers do). A tiny token head registered for this module only (``tok-test``: prototypes of mean-pooled tokens
through one linear layer) records what its ``forward`` received.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mdmf_cache import heads
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.heads.base import FewShotHead, class_means, with_correct
from mdmf_cache.heads.spec import HeadSpec
from mdmf_cache.tokens import TokenInfo, array_name

GRID, DT = (2, 2), 6  # a tiny token layout: P = 1 + 2*2 = 5 tokens of width 6 per frame
LAYERS = ("4", "12")


def add_tokens(cache: Path, layers=LAYERS, grid=GRID, dim=DT, cls=True, seed=0) -> dict[str, np.ndarray]:
    """Give every split of ``cache`` token arrays of random values (the arrays made by the store, as ``extract
    --tokens`` makes them, then filled and marked ``tokens_done`` with zarr); returns per split the float16 values
    stacked as ``(N, V, T, L, P, Dt)``, indexed by array row."""
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.layout import TOKENS_DONE

    info = TokenInfo(",".join(layers), tuple(layers), grid, cls, dim)
    store = CacheStore(cache, mode="r+")
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val", "test"):
        g = store.root[split]
        n, v, t = store.num_rows(split), int(g.attrs["views"]), int(g["features"].shape[2])
        store.ensure_tokens(split, info, t)
        per_layer = []
        for layer in layers:
            data = rng.standard_normal((n, v, t, info.patches, dim)).astype(np.float16)
            g[array_name(layer)][:] = data
            per_layer.append(data)
        g[TOKENS_DONE][:n] = True
        out[split] = np.stack(per_layer, axis=3)  # (N, V, T, L, P, Dt)
    return out


# ---------------------------------------------------------------- the test-only token head


@dataclasses.dataclass
class TokOptions:
    dim: int = 0
    num_frames: int = 8
    token_dim: int | None = None
    token_layers: int | None = None
    token_grid: tuple[int, int] | None = None
    token_cls: bool | None = None
    width: int = 4


class TokHead(FewShotHead):
    """Prototypes of mean-pooled tokens through a linear layer; negative distances as logits. Records its inputs."""

    method = "tok-test"

    def __init__(self, options: TokOptions) -> None:
        super().__init__()
        self.options = options
        self.proj = nn.Linear(options.token_dim, options.width)
        self.seen: list[dict] = []

    def forward(self, support, query, text, query_labels=None, pps_noise=None, classes=None, class_text=None,
                support_tokens=None, query_tokens=None):
        self.seen.append({"training": self.training, "support": support.detach().clone(), "query": query.detach().clone(),
                          "support_tokens": support_tokens.detach().clone(), "query_tokens": query_tokens.detach().clone()})
        n = text.shape[1]
        s = self.proj(support_tokens.mean(dim=(2, 3, 4)))  # (E, S, T, L, P, Dt) -> (E, S, W)
        q = self.proj(query_tokens.mean(dim=(2, 3, 4)))  # (E, Q, W)
        logits = -((q[:, :, None] - class_means(s, n)[:, None]) ** 2).sum(-1)  # (E, Q, N)
        return with_correct({"logits": logits}, query_labels)


SPEC = HeadSpec(name="tok-test", options=TokOptions, build=TokHead, summary="test token head", source="tests",
                per_video=False, tokens=",".join(LAYERS))


@pytest.fixture(scope="module")
def registered():
    """``tok-test`` in the registry for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(heads.REGISTRY, "tok-test", heads.Entry("tok-test", __name__, "test token head"))
        mp.setattr(heads, "METHODS", (*heads.METHODS, "tok-test"))
        yield


@pytest.fixture(scope="module")
def token_cache(tiny_cache, tmp_path_factory):
    """A copy of tiny_cache with one failed train row, the train order reversed and token arrays; (path, arrays)."""
    import zarr

    path = tmp_path_factory.mktemp("tokens") / tiny_cache.name
    shutil.copytree(tiny_cache, path)
    g = zarr.open_group(store=str(path), mode="r+")["train"]
    n = int(g.attrs["num_videos"])
    failed = np.zeros(n, dtype=bool)
    failed[3] = True
    g["failed"][:n] = failed
    g["errors"][3:4] = np.array(["cannot decode (test)"], dtype=object)
    g["order"][:n] = np.arange(n)[::-1]
    return path, add_tokens(path)


def usable(path, split):
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.read import usable_rows

    return usable_rows(CacheStore(path), split)


# ---------------------------------------------------------------- the reader


def test_rows_and_views_read_equal_the_arrays(token_cache):
    """read(rows, views) is the arrays' (array row, view) in float32, layers stacked in the cache's order, through
    the usable-row map (a failed row skipped, split-file order), repeated pairs included; the map is read_split's."""
    from mdmf_cache.store.read import read_split
    from mdmf_cache.store.tokens import TokenReader

    path, arrays = token_cache
    keep = usable(path, "train")
    assert 3 not in keep and len(keep) == 19 and keep[0] > keep[-1]
    feats = read_split(path, "train").features
    np.testing.assert_array_equal(feats, np.asarray(__import__("zarr").open_group(store=str(path))["train"]["features"])[keep])
    with TokenReader(path, "train", budget=1 << 20) as r:
        assert r.info.layers == LAYERS and r.shape == (8, 2, 5, DT) and r.views == 2
        rows = np.array([0, 5, 5, 18, 2, 0])
        views = np.array([1, 0, 1, 1, 0, 1])
        got = r.read(rows, views)
        assert got.dtype == np.float32 and got.shape == (6, 8, 2, 5, DT)
        np.testing.assert_array_equal(got, arrays["train"][keep[rows], views].astype(np.float32))
    with pytest.raises(IndexError):
        TokenReader(path, "train").read([19], [0])


def test_lru_never_exceeds_its_budget(token_cache, caplog):
    """Held bytes stay within the budget through many random reads, and reads stay exact; a budget below one read's
    rows (and 0) still reads right, warning once, the rows beyond it read from disk."""
    from mdmf_cache.store.tokens import TokenReader

    path, arrays = token_cache
    keep = usable(path, "train")
    rng = np.random.default_rng(0)
    for rows_fit in (5, 2, 0):
        with TokenReader(path, "train", prefetch=False) as probe:
            row_bytes = probe.row_bytes
        with caplog.at_level(logging.WARNING), TokenReader(path, "train", budget=rows_fit * row_bytes) as r:
            for _ in range(8):
                rows = rng.integers(0, 19, 4)
                views = rng.integers(0, 2, 4)
                r.prefetch(rng.integers(0, 19, 4))
                np.testing.assert_array_equal(r.read(rows, views), arrays["train"][keep[rows], views])
                assert r.held_bytes <= r.budget and r.peak_bytes <= r.budget
            assert r.rows_held == min(rows_fit, r.rows_held) and (rows_fit == 0) == (r.rows_held == 0)
    assert sum("exceeds the token cache" in m for m in caplog.messages) == 2  # once per reader whose reads overflow


def test_prefetch_gives_the_same_tokens_and_stops(token_cache):
    """With prefetch the reads equal those without; the prefetched rows are found in the LRU (no disk read by the
    read), and closing (also on an exception in the with block) stops the thread."""
    from mdmf_cache.store.tokens import TokenReader

    path, _ = token_cache
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 19, 6), rng.integers(0, 2, 6)) for _ in range(5)]
    with TokenReader(path, "train", prefetch=False) as plain:
        want = [plain.read(*b) for b in batches]
    with pytest.raises(KeyboardInterrupt), TokenReader(path, "train") as r:
        for i, b in enumerate(batches):
            before = r.misses
            got = r.read(*b)
            np.testing.assert_array_equal(got, want[i])
            if i:  # this batch's rows were prefetched during the previous one
                assert r.misses == before
            if i + 1 < len(batches):
                r.prefetch(batches[i + 1][0])
            assert r.prefetching
        thread = r._thread
        raise KeyboardInterrupt
    assert not thread.is_alive() and not r.prefetching
    assert not [t for t in threading.enumerate() if t.name.startswith("tokens-")]


def test_missing_tokens_is_one_line_naming_extract(tiny_cache, registered, tmp_path):
    """A split without token arrays: the reader, train and sweep planning stop with one line naming the extract
    command and the head's SPEC; nothing is written."""
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.store.tokens import TokenReader
    from mdmf_cache.sweeps.study import SweepConfig, plan
    from pipelines.train import run

    with pytest.raises(CacheError) as e:
        TokenReader(tiny_cache, "val", spec="last")
    assert "\n" not in str(e.value) and "mdmf-cache extract folder ... --tokens last" in str(e.value)
    with pytest.raises(CacheError) as e:
        run(TrainConfig(cache=str(tiny_cache), out=str(tmp_path / "run"), method="tok-test", way=2, shot=1,
                        train_queries=2, episodes=2, device="cpu"), progress=False, show=False)
    assert "\n" not in str(e.value) and f"--tokens {SPEC.tokens}" in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(CacheError, match="--tokens 4,12"):
        plan(SweepConfig(cache=str(tiny_cache), out=str(tmp_path / "sweep"), fixed={"method": "tok-test"},
                         space={"lr": "1e-4:1e-3:log"}))


def test_full_mode_refuses_a_token_head(registered):
    """train --mode full with a token head: one line saying to train it in fast mode on a token cache."""
    from mdmf_cache.configs import TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig(mode="full", method="tok-test", full={"dataset": "ucf101", "root": "/nowhere"}).validate()
    assert "\n" not in str(e.value) and "train it in fast mode" in str(e.value) and "--tokens 4,12" in str(e.value)


# ---------------------------------------------------------------- train and eval


@pytest.fixture(scope="module")
def trained(token_cache, registered, tmp_path_factory):
    """tok-test trained 3 updates of 2 episodes in fast mode on the token cache (val after the last); (run, head
    instance that trained, config)."""
    from mdmf_cache.configs import TrainConfig
    from pipelines import train

    built = []
    orig = train.build_head

    def keep(*a, **k):
        built.append(orig(*a, **k))
        return built[-1]

    path, _ = token_cache
    cfg = TrainConfig(cache=str(path), out=str(tmp_path_factory.mktemp("run") / "tok"), method="tok-test", way=2,
                      shot=1, train_queries=2, episodes=6, episodes_per_step=2, val_every=6, val_episodes=5,
                      device="cpu", token_cache_mb=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_head", keep)
        train.run(cfg, progress=False, show=False)
    return Path(cfg.out), built[0], cfg


def test_fast_training_feeds_each_episode_its_own_tokens(token_cache, trained):
    """Every training forward got the tokens of its episodes' videos and views (the episode stream re-drawn here
    without any look-ahead: the prefetch's sampling ahead left it as it was), and the features of the same
    episodes; validation forwards got the val split's tokens; the options took the cache's TokenInfo."""
    from mdmf_cache.data.episodes import EpisodeSampler, gather
    from mdmf_cache.store.read import load_split_features

    path, arrays = token_cache
    _, head, cfg = trained
    assert (head.options.token_dim, head.options.token_layers, head.options.token_grid, head.options.token_cls) == \
        (DT, 2, GRID, True)
    train = load_split_features(path, "train")
    keep = usable(path, "train")
    sampler = EpisodeSampler(train.labels.numpy(), train.num_classes, views=2)
    rng = np.random.default_rng([cfg.seed, 0])
    steps = [s for s in head.seen if s["training"]]
    assert len(steps) == 3
    for seen in steps:
        ep = sampler.sample(2, 2, 1, 2, rng, random_view=True)
        support, query, _, _ = gather(train.features, train.text, ep)
        assert torch.equal(seen["support"], support) and torch.equal(seen["query"], query)
        want_s = torch.from_numpy(arrays["train"][keep[ep.support], ep.support_view].astype(np.float32))
        want_q = torch.from_numpy(arrays["train"][keep[ep.query], ep.query_view].astype(np.float32))
        assert torch.equal(seen["support_tokens"], want_s) and torch.equal(seen["query_tokens"], want_q)
    val = [s for s in head.seen if not s["training"]]
    assert val and all(s["support_tokens"].shape[1:] == (2, 8, 2, 5, DT) for s in val)
    metrics = [json.loads(line) for line in (trained[0] / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["token_hits"] > 0  # the prefetched updates found their rows in memory


def test_eval_of_a_token_head_equals_scoring_its_episodes_by_hand(token_cache, trained, tmp_path):
    """eval's accuracies of the trained token head (in chunks of 3 episodes, prefetched) equal its forward on each
    saved episode with the arrays' tokens, one episode at a time (float32 logits within 1e-5)."""
    from mdmf_cache.configs import EvalConfig
    from mdmf_cache.data.episodes import Episodes, gather
    from mdmf_cache.evaluation.scoring import pps_uniforms, score
    from mdmf_cache.heads.factory import load_head
    from mdmf_cache.store.read import load_split_features
    from mdmf_cache.store.tokens import TokenReader
    from pipelines.evaluate import run

    path, arrays = token_cache
    run_dir = trained[0]
    res = run(EvalConfig(target=str(run_dir), split="test", way=2, shots=(1,), episodes=7, batch_size=3,
                         out=str(tmp_path / "ev"), device="cpu", token_cache_mb=1), progress=False, show=False)
    acc = np.load(tmp_path / "ev" / "episode_acc_1shot.npy")
    eps = Episodes.load(tmp_path / "ev" / "episodes_2way_1shot.npz")
    model, _ = load_head(run_dir, "cpu")
    split = load_split_features(path, "test")
    keep = usable(path, "test")
    uniforms = pps_uniforms(eps, 0)
    by_hand = []
    for i in range(len(eps)):
        ep = eps[i:i + 1]
        support, query, text, labels = gather(split.features, split.text, ep)
        st = torch.from_numpy(arrays["test"][keep[ep.support], ep.support_view].astype(np.float32))
        qt = torch.from_numpy(arrays["test"][keep[ep.query], ep.query_view].astype(np.float32))
        with torch.no_grad():
            by_hand.append(model(support, query, text, pps_noise=torch.as_tensor(uniforms[i:i + 1]),
                                 support_tokens=st, query_tokens=qt)["logits"])
    by_hand = torch.cat(by_hand)
    labels = torch.as_tensor(eps.query_labels)
    np.testing.assert_array_equal(acc, (by_hand.argmax(-1) == labels).double().mean(1).numpy())
    assert res["shots"]["1"]["episodes"] == 7
    with TokenReader(path, "test", budget=1 << 20) as reader:
        kept = score("tok-test", dataclasses.replace(split, tokens=reader), eps, model, batch_size=3, keep_logits=True)
    torch.testing.assert_close(torch.from_numpy(kept.logits), by_hand, rtol=0, atol=1e-5)


def test_tokens_unfinished_name_the_rerun(token_cache):
    """A usable row not yet tokens_done (an extension with --tokens cut short): one line asking to rerun extract."""
    import zarr

    from mdmf_cache.store.layout import TOKENS_DONE
    from mdmf_cache.store.tokens import TokenReader

    path, _ = token_cache
    done = zarr.open_group(store=str(path), mode="r+")["val"][TOKENS_DONE]
    done[2] = False
    try:
        with pytest.raises(CacheError) as e:
            TokenReader(path, "val")
        assert "\n" not in str(e.value) and "1 of 8 videos have no tokens yet" in str(e.value)
        assert "--tokens 4,12" in str(e.value)
    finally:
        done[2] = True


def test_predict_extracts_and_feeds_the_videos_tokens(tiny_cache, action_videos, registered, tmp_path):
    """predict with a token run (trained on a cache of ``last`` tokens, a SPEC the tiny backbone gives) extracts its
    videos with token arrays of the run's SPEC and feeds the head exactly those of its supports and queries; the
    probabilities sum to 1."""
    import zarr

    from mdmf_cache.configs import PredictConfig, TrainConfig
    from mdmf_cache.heads import factory
    from mdmf_cache.prediction.inputs import video_key
    from pipelines import predict, train

    cache = tmp_path / tiny_cache.name
    shutil.copytree(tiny_cache, cache)
    add_tokens(cache, layers=("last",), grid=(7, 7), dim=64)  # mdmf-tiny-vit: 224 / 32 patches, width 64
    out = tmp_path / "run"
    train.run(TrainConfig(cache=str(cache), out=str(out), method="tok-test", way=2, shot=1, train_queries=2,
                          episodes=2, episodes_per_step=2, val_every=2, val_episodes=2, device="cpu"),
              progress=False, show=False)
    assert json.loads((out / "config.json").read_text())["tokens"]["spec"] == "last"
    support = tmp_path / "support"
    classes = sorted(p.name for p in action_videos.iterdir())[:2]
    for c in classes:
        (support / c).mkdir(parents=True)
        for v in sorted((action_videos / c).iterdir())[:2]:
            shutil.copy(v, support / c / v.name)
    queries = [sorted((action_videos / c).iterdir())[3] for c in classes]
    heads_made = []
    orig = factory.load_head

    def keep(*a, **k):
        heads_made.append(orig(*a, **k))
        return heads_made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predict, "load_head", keep)
        res = predict.run(PredictConfig(run=str(out), support=str(support), query=tuple(map(str, queries)),
                                        workers=0, device="cpu", cache_dir=str(tmp_path / "pc")), progress=False,
                          show=False)
    probs = np.array([r["probs"] for r in res["rows"]])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-9)
    (group,) = (tmp_path / "pc").glob("*.zarr")
    g = zarr.open_group(store=str(group))["test"]
    assert g.attrs["tokens"]["spec"] == "last"
    row = {k: i for i, k in enumerate(np.asarray(g["video_ids"][:]).tolist())}
    arr = np.asarray(g["tokens_last"][:])  # (R, 1, T, P, Dt)

    def want(paths):
        return torch.from_numpy(arr[[row[video_key(p)] for p in paths], 0][:, :, None].astype(np.float32))

    (seen,) = heads_made[0][0].seen  # one pass (K = 2 = every class's count), both queries in one batch
    sup = [support / c / v.name for c in classes for v in sorted((support / c).iterdir())]
    assert torch.equal(seen["support_tokens"][0], want(sup)) and torch.equal(seen["query_tokens"][:, 0], want(queries))
    assert seen["support_tokens"].abs().sum() > 0


def test_damaged_token_rows_are_named(token_cache):
    """A row holding NaN or inf, or never written (all zero), is refused naming the row; the others still read."""
    import zarr

    from mdmf_cache.store.tokens import TokenReader

    path, arrays = token_cache
    keep = usable(path, "test")
    arr = zarr.open_group(store=str(path), mode="r+")["test"][array_name("12")]
    saved = np.asarray(arr[keep[1]])
    try:
        for bad, what in ((np.inf, "NaN or inf"), (np.nan, "NaN or inf"), (0.0, "row [0-9]+ has no 12 tokens")):
            value = saved.copy() if bad else np.zeros_like(saved)
            value.flat[7] = bad if bad else 0
            arr[keep[1]] = value
            with TokenReader(path, "test", budget=0) as r:
                with pytest.raises(CacheError, match=what):
                    r.read([1], [0])
                np.testing.assert_array_equal(r.read([0], [0]), arrays["test"][keep[[0]], 0])
    finally:
        arr[keep[1]] = saved
