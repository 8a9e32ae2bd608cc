"""evaluate_episodes: per-episode accuracy, per-class totals, batching, and the CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdmf_cache.data.episodes import EpisodeSampler
from mdmf_cache.evaluation.scoring import EvalResult, evaluate_episodes
from mdmf_cache.store.read import FeatureSplit

C, PER_CLASS, T = 8, 6, 4
WAY, SHOT, QPC = 5, 2, 2


@pytest.fixture(scope="module")
def split():
    """Each video's frames are the one-hot vector of its class (D = C); text = one-hot too."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(C), PER_CLASS))
    onehot = torch.eye(C)[torch.as_tensor(labels)]  # (N, C)
    features = onehot[:, None, None, :].expand(-1, 1, T, -1).half().contiguous()  # (N, 1, T, D)
    names = [f"c{i}" for i in range(C)]
    return FeatureSplit(features, torch.as_tensor(labels), [str(i) for i in range(len(labels))], names, names,
                        torch.eye(C))


def _episodes(split, n, seed=0, queries=QPC):
    return EpisodeSampler(split.labels.numpy(), C).sample(n, WAY, SHOT, queries, np.random.default_rng(seed))


def oracle(support, query, text, uniforms=None):
    return query.mean(dim=2) @ text.transpose(1, 2)  # (E, Q, N): 1 at the true class, 0 elsewhere


def constant(support, query, text, uniforms=None):
    return torch.zeros(query.shape[0], query.shape[1], text.shape[1])  # argmax = episode class 0


def wrong_on_class_2(support, query, text, uniforms=None):
    sim = oracle(support, query, text)
    is_2 = query.mean(dim=2)[..., 2] > 0.5  # (E, Q): the query's split class is 2
    return torch.where(is_2[..., None], -sim, sim)


def test_oracle_is_perfect(split) -> None:
    eps = _episodes(split, 40)
    res = evaluate_episodes(oracle, split, eps)
    assert isinstance(res, EvalResult)
    np.testing.assert_array_equal(res.episode_acc, np.ones(40))
    assert res.mean == 1.0 and res.ci95 == 0.0
    want_total = QPC * np.bincount(eps.classes.ravel(), minlength=C)
    np.testing.assert_array_equal(res.class_total, want_total)
    np.testing.assert_array_equal(res.class_correct, want_total)
    assert res.class_total.sum() == 40 * WAY * QPC


def test_constant_gives_one_over_way(split) -> None:
    eps = _episodes(split, 40, seed=1)
    res = evaluate_episodes(constant, split, eps, batch_size=7)
    np.testing.assert_allclose(res.episode_acc, 1 / WAY)
    assert res.mean == pytest.approx(1 / WAY)
    # only the queries of each episode's first class are right
    np.testing.assert_array_equal(res.class_correct, QPC * np.bincount(eps.classes[:, 0], minlength=C))
    assert res.class_total.sum() == 40 * WAY * QPC


def test_per_class_and_per_episode_hand_built(split) -> None:
    eps = _episodes(split, 30, seed=2)
    seen = []
    res = evaluate_episodes(wrong_on_class_2, split, eps, batch_size=8, on_batch=seen.append)
    assert seen == [8, 8, 8, 6]
    has_2 = (eps.classes == 2).any(axis=1)
    np.testing.assert_allclose(res.episode_acc, np.where(has_2, 1 - 1 / WAY, 1.0))
    assert res.class_correct[2] == 0 and res.class_total[2] == QPC * has_2.sum()
    others = np.arange(C) != 2
    np.testing.assert_array_equal(res.class_correct[others], res.class_total[others])
    summary = res.summary([f"c{i}" for i in range(C)])
    assert summary["episodes"] == 30
    assert summary["accuracy"] == pytest.approx(res.mean * 100)
    assert summary["per_class"]["c2"] == 0.0 and summary["per_class"]["c0"] in (None, 100.0)
    # batching does not change anything
    whole = evaluate_episodes(wrong_on_class_2, split, eps)
    np.testing.assert_array_equal(whole.episode_acc, res.episode_acc)
    np.testing.assert_array_equal(whole.class_correct, res.class_correct)


def test_ci_shrinks_with_more_episodes(split) -> None:
    g = torch.Generator().manual_seed(0)

    def random_logits(support, query, text, uniforms=None):
        return torch.rand(query.shape[0], query.shape[1], text.shape[1], generator=g)

    small = evaluate_episodes(random_logits, split, _episodes(split, 100, seed=3))
    large = evaluate_episodes(random_logits, split, _episodes(split, 1600, seed=4))
    assert 0.1 < small.mean < 0.3 and 0.15 < large.mean < 0.25  # chance = 1/5
    assert large.ci95 < small.ci95 / 2.5  # ~ 1/4: sqrt(1600 / 100)
    assert large.ci95 > 0
