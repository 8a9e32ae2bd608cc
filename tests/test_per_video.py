"""The per-video evaluation path gives the direct path's logits, at the cost of one fusion per (video, token)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_argmax

from mdmf_cache.data.episodes import EpisodeSampler
from mdmf_cache.evaluation.scoring import pps_uniforms, score
from mdmf_cache.heads.mdmf import MDMF
from mdmf_cache.heads.mdmf_config import build_config
from mdmf_cache.store.read import FeatureSplit

C, PER, T, D = 8, 7, 4, 32


def _split(seed: int = 0) -> FeatureSplit:
    """Random float16 features with class structure (so PPS picks the true class often, not always)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(C, D, generator=g)
    labels = torch.arange(C).repeat_interleave(PER)
    feats = (0.15 * text[labels][:, None, None, :] + torch.randn(C * PER, 1, T, D, generator=g)).half()
    names = [f"c{i}" for i in range(C)]
    return FeatureSplit(feats, labels, [f"v{i}" for i in range(C * PER)], names, names, text)


def _model(cfg_kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = build_config(cfg_kwargs.pop("preset"), D, num_frames=T, heads=4, ffn_dim=64, **cfg_kwargs)
    model = MDMF(cfg)
    for m in model.modules():  # non-default running statistics, so eval-mode BatchNorm matters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


ARMS = [
    {"preset": "paper"},
    {"preset": "reference"},
    {"preset": "paper", "pps_test": "argmax"},
    {"preset": "paper", "pps": False},
    {"preset": "paper", "views": "ntc"},
    {"preset": "reference", "views": "gtc"},
]  # every registered head's per-video path against its direct one: tests/test_heads.py


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("arm", ARMS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_per_video_equals_direct(arm: dict, shot: int) -> None:
    split = _split()
    model = _model(dict(arm))
    eps = EpisodeSampler(split.labels.numpy(), C).sample(60, 5, shot, 1, np.random.default_rng(shot))
    direct = score("mdmf", split, eps, model, seed=3, batch_size=16, path="direct", keep_logits=True)
    fast = score("mdmf", split, eps, model, seed=3, batch_size=16, keep_logits=True)
    np.testing.assert_allclose(fast.logits, direct.logits, rtol=1e-4, atol=1e-4)
    assert_same_argmax(fast.logits, direct.logits, margin=1e-3)  # float32 in two orders: near-ties may flip
    np.testing.assert_allclose(fast.episode_acc, direct.episode_acc, atol=1.01 / fast.logits.shape[1])  # one query at most


def test_fuse_pairs_equals_fuse_on_gathered_pairs() -> None:
    """The per-video/per-token split of the MMFE's work gives the MMFE's own output."""
    for preset in ("paper", "reference"):
        model = _model({"preset": preset})
        g = torch.Generator().manual_seed(1)
        frames, tokens = torch.randn(6, T, D, generator=g), torch.randn(4, D, generator=g)
        pv, pt = torch.tensor([0, 0, 5, 3, 3, 1, 2]), torch.tensor([1, 3, 0, 0, 2, 2, 1])
        name = next(iter(model.views))
        with torch.no_grad():
            ctx = model.context(name, frames)
            direct = model.fuse(name, frames[pv], ctx[pv], tokens[pt])
            torch.testing.assert_close(model.fuse_pairs(name, frames, ctx, tokens, pv, pt, chunk=3), direct,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.fuse_pairs(name, frames, ctx, tokens, pv, pt, token_output=False),
                                       direct[:, 1:], rtol=1e-5, atol=1e-5)


def test_per_video_fuses_each_video_token_pair_once(monkeypatch) -> None:
    split = _split()
    model = _model({"preset": "paper"})
    eps = EpisodeSampler(split.labels.numpy(), C).sample(300, 5, 5, 1, np.random.default_rng(0))
    fused, contexts = [], []
    context = model.context
    for view in model.views.values():  # every fusion of a pair goes through its view's attention
        attend = view.mmfe.attend
        monkeypatch.setattr(view.mmfe, "attend", lambda fp, tp=None, pv=None, pt=None, token_output=True, attend=attend:
                            fused.append(len(pv)) or attend(fp, tp, pv, pt, token_output))
    monkeypatch.setattr(model, "context", lambda name, f, e=1: contexts.append(len(f)) or context(name, f, e))
    res = score("mdmf", split, eps, model, seed=0, batch_size=100, keep_logits=True)

    # the pairs, counted independently: supports with their class, queries with the class PPS drew
    with torch.no_grad():
        query = split.features[torch.as_tensor(eps.query), 0].float()
        text = split.text[torch.as_tensor(eps.classes)]
        chosen, _ = model.query_choice(query, text, torch.as_tensor(pps_uniforms(eps, 0)))
    query_cls = np.take_along_axis(eps.classes, chosen.numpy(), axis=1)
    pairs = set(zip(eps.support.ravel(), np.repeat(eps.classes, 5, axis=1).ravel()))
    pairs |= set(zip(eps.query.ravel(), query_cls.ravel()))
    videos = set(eps.support.ravel()) | set(eps.query.ravel())
    assert sum(fused) == 2 * len(pairs) and res.fused == len(pairs)  # two views
    assert sum(contexts) == 2 * len(videos)
    assert len(pairs) < 0.05 * 300 * 30  # the direct path fuses every slot of every episode
    assert 0.2 < res.mean < 1.0


def test_pps_draws_seeded_and_independent_of_batch_size() -> None:
    split = _split()
    model = _model({"preset": "paper", "pps_temperature": 0.5})  # a soft selector: draws really vary
    eps = EpisodeSampler(split.labels.numpy(), C).sample(80, 5, 1, 1, np.random.default_rng(0))
    a = score("mdmf", split, eps, model, seed=1, batch_size=7, keep_logits=True).logits
    b = score("mdmf", split, eps, model, seed=1, batch_size=80, keep_logits=True).logits
    c = score("mdmf", split, eps, model, seed=2, batch_size=80, keep_logits=True).logits
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(b, c, atol=1e-3)  # another seed draws other tokens
    argmax = _model({"preset": "paper", "pps_temperature": 0.5, "pps_test": "argmax"})
    d = score("mdmf", split, eps, argmax, seed=1, keep_logits=True).logits
    e = score("mdmf", split, eps, argmax, seed=2, keep_logits=True).logits
    np.testing.assert_array_equal(d, e)  # argmax: no draw, no seed dependence


def test_query_pairs_in_chunks_give_the_same_logits() -> None:
    """Query pairs fused chunk by chunk (the memory bound) score what one table of every pair scores."""
    from mdmf_cache.evaluation.scoring import pps_uniforms
    from mdmf_cache.heads.mdmf import MDMFScorer

    split = _split()
    model = _model({"preset": "paper", "pps_temperature": 0.5})  # a soft selector: queries pair with many tokens
    eps = EpisodeSampler(split.labels.numpy(), C).sample(50, 5, 2, 1, np.random.default_rng(4))
    u = pps_uniforms(eps, 0)
    whole = MDMFScorer(model, split.features[:, 0], split.text, eps, u, chunk_episodes=10_000)
    chunked = MDMFScorer(model, split.features[:, 0], split.text, eps, u, chunk_episodes=7)
    a = torch.cat([whole.logits(lo, min(lo + 5, 50)) for lo in range(0, 50, 5)])
    b = torch.cat([chunked.logits(lo, min(lo + 5, 50)) for lo in range(0, 50, 5)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert chunked.fused > whole.fused  # a query pair shared by two chunks is fused in each
    assert chunked.query_table[next(iter(model.views))].shape[0] < whole.query_table[next(iter(model.views))].shape[0]


def test_a_chunk_with_nothing_new_to_fuse() -> None:
    """A chunk whose query pairs are all support pairs fuses nothing (an empty table, not an error)."""
    from mdmf_cache.evaluation.scoring import pps_uniforms
    from mdmf_cache.heads.mdmf import MDMFScorer

    split = _split()
    model = _model({"preset": "paper"})
    eps = EpisodeSampler(split.labels.numpy(), C).sample(6, 5, 5, 1, np.random.default_rng(0))
    scorer = MDMFScorer(model, split.features[:, 0], split.text, eps, pps_uniforms(eps, 0))
    empty = scorer._fuse(np.empty(0, dtype=np.int64))
    assert all(t.shape == (0, T, D) for t in empty.values())
