"""EpisodeSampler, Episodes (save/load, slicing), gather and mean_ci."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdmf_cache.data.episodes import Episodes, EpisodeSampler, gather, mean_ci
from mdmf_cache.errors import ConfigError


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` videos of class c."""
    lab = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(lab)


# 12 classes; classes 3 and 7 have only 4 videos (too few for 3 shots + 2 queries)
COUNTS = [8, 6, 9, 4, 7, 5, 10, 4, 6, 8, 5, 7]
WAY, SHOT, QUERIES, E = 5, 3, 2, 200


@pytest.fixture(scope="module")
def setup():
    labels = _labels(COUNTS)
    sampler = EpisodeSampler(labels, len(COUNTS), views=3)
    eps = sampler.sample(E, WAY, SHOT, QUERIES, np.random.default_rng(0), random_view=True)
    return labels, sampler, eps


def test_shapes_and_dtypes(setup) -> None:
    _, _, eps = setup
    assert len(eps) == E and eps.way == WAY and eps.shot == SHOT
    assert eps.classes.shape == (E, WAY)
    assert eps.support.shape == eps.support_view.shape == (E, WAY * SHOT)
    assert eps.query.shape == eps.query_labels.shape == eps.query_view.shape == (E, WAY * QUERIES)
    for f in Episodes.__dataclass_fields__:
        assert np.issubdtype(getattr(eps, f).dtype, np.integer), f


def test_support_and_query_disjoint_and_classes_distinct(setup) -> None:
    _, _, eps = setup
    for i in range(E):
        rows = np.concatenate([eps.support[i], eps.query[i]])
        assert len(np.unique(rows)) == len(rows)  # no video twice in an episode
        assert len(np.unique(eps.classes[i])) == WAY


def test_class_major_order_and_labels(setup) -> None:
    labels, _, eps = setup
    s_cls = np.arange(WAY * SHOT) // SHOT  # support s -> episode class s // K
    q_cls = np.arange(WAY * QUERIES) // QUERIES  # query j -> label j // q
    assert (eps.query_labels == q_cls[None]).all()
    # every support / query video really belongs to its episode class
    assert (labels[eps.support] == np.take_along_axis(eps.classes, np.broadcast_to(s_cls, eps.support.shape), 1)).all()
    assert (labels[eps.query] == np.take_along_axis(eps.classes, eps.query_labels, 1)).all()


def test_too_small_classes_never_chosen(setup) -> None:
    _, sampler, eps = setup
    assert not np.isin(eps.classes, [3, 7]).any()
    assert set(np.unique(eps.classes)) == set(range(12)) - {3, 7}  # the others all appear over 200 episodes
    np.testing.assert_array_equal(sampler.check(WAY, SHOT, QUERIES), [0, 1, 2, 4, 5, 6, 8, 9, 10, 11])


def test_config_error_when_too_few_eligible_classes() -> None:
    sampler = EpisodeSampler(_labels([6, 6, 6, 2, 2]), 5)
    sampler.sample(3, 3, 3, 2, np.random.default_rng(0))  # exactly 3 eligible: fine
    with pytest.raises(ConfigError, match="5-way"):
        sampler.sample(3, 5, 3, 2, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        sampler.check(3, 5, 2)  # needs 7 videos per class


def test_seeded_determinism(setup) -> None:
    labels, sampler, eps = setup
    again = EpisodeSampler(labels, len(COUNTS), views=3).sample(
        E, WAY, SHOT, QUERIES, np.random.default_rng(0), random_view=True
    )
    for f in Episodes.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(eps, f), getattr(again, f))
    other = sampler.sample(E, WAY, SHOT, QUERIES, np.random.default_rng(1), random_view=True)
    assert not np.array_equal(eps.support, other.support)


def test_views(setup) -> None:
    _, sampler, eps = setup
    for v in (eps.support_view, eps.query_view):
        assert v.min() >= 0 and v.max() < 3
        assert set(np.unique(v)) == {0, 1, 2}
    fixed = sampler.sample(50, WAY, SHOT, QUERIES, np.random.default_rng(0), random_view=False)
    assert (fixed.support_view == 0).all() and (fixed.query_view == 0).all()


def test_save_load_roundtrip_and_slicing(setup, tmp_path) -> None:
    _, _, eps = setup
    eps.save(tmp_path / "eps.npz")
    back = Episodes.load(tmp_path / "eps.npz")
    for f in Episodes.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(eps, f), getattr(back, f))
        assert getattr(back, f).dtype == getattr(eps, f).dtype
    part = eps[10:25]
    assert len(part) == 15 and part.way == WAY and part.shot == SHOT
    for f in Episodes.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(part, f), getattr(eps, f)[10:25])


def test_gather_returns_the_right_rows(setup) -> None:
    labels, _, eps = setup
    ep = eps[:7]
    n, v, t, d = len(labels), 3, 4, 6
    features = torch.randn(n, v, t, d).half()
    text = torch.randn(len(COUNTS), d)
    support, query, txt, lab = gather(features, text, ep)
    assert support.shape == (7, WAY * SHOT, t, d) and query.shape == (7, WAY * QUERIES, t, d)
    assert txt.shape == (7, WAY, d) and lab.shape == (7, WAY * QUERIES)
    assert support.dtype == query.dtype == txt.dtype == torch.float32
    for i in range(7):
        for s in range(WAY * SHOT):
            assert torch.equal(support[i, s], features[ep.support[i, s], ep.support_view[i, s]].float())
        for j in range(WAY * QUERIES):
            assert torch.equal(query[i, j], features[ep.query[i, j], ep.query_view[i, j]].float())
        for c in range(WAY):
            assert torch.equal(txt[i, c], text[ep.classes[i, c]])
    np.testing.assert_array_equal(lab.numpy(), ep.query_labels)
    s16, *_ = gather(features, text, ep, dtype=torch.float16)
    assert s16.dtype == torch.float16


def test_mean_ci_known_values() -> None:
    acc = np.array([0.0, 1.0, 1.0, 0.0])  # mean 0.5, population std 0.5
    mean, ci = mean_ci(acc)
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * 0.5 / 2)
    assert mean_ci(np.full(9, 0.8)) == (pytest.approx(0.8), 0.0)
    m, c = mean_ci(np.array([]))
    assert np.isnan(m) and np.isnan(c)


def _sample_by_full_sort(sampler: EpisodeSampler, n, way, shot, queries, rng) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's draw with a full sort of every class's random keys (what it did before the partial one)."""
    eligible = sampler.check(way, shot, queries)
    classes = eligible[np.argsort(rng.random((n, len(eligible))), axis=1)[:, :way]]
    width = sampler.members.shape[1]
    keys = rng.random((n, way, width))
    keys[np.arange(width)[None, None, :] >= sampler.counts[classes][..., None]] = np.inf
    slots = np.argsort(keys, axis=2)[:, :, : shot + queries]
    rows = np.take_along_axis(sampler.members[classes], slots, axis=2)
    return rows[:, :, :shot].reshape(n, -1), rows[:, :, shot:].reshape(n, -1)


def test_partial_selection_draws_what_a_full_sort_draws() -> None:
    """Uneven classes (padding), one of exactly shot + queries videos: the same episodes, seed for seed."""
    for counts in ([8, 90, 70, 5, 120, 60, 300], [300, 310, 5, 330, 320, 301]):
        sampler = EpisodeSampler(_labels(counts, seed=3), len(counts))
        # large m: numpy returns a partition of a few dozen sorted anyway, of more in no order
        for seed, (shot, queries) in enumerate([(3, 5), (5, 55), (20, 40)]):
            eps = sampler.sample(50, 4, shot, queries, np.random.default_rng(seed))
            support, query = _sample_by_full_sort(sampler, 50, 4, shot, queries, np.random.default_rng(seed))
            assert np.array_equal(eps.support, support) and np.array_equal(eps.query, query)
