"""STRM on cached patch tokens: equal to the released ``CNN_STRM`` re-derived per episode (``tests/reference_strm.py``),
its released defaults, the token layouts it takes and refuses, the release's unregistered-distance bug as an option,
and that no query's logits depend on another query or a label."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from mdmf_cache import heads
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.tokens import TokenInfo

D, T, DT = 8, 4, 6  # pooled width (shapes only), frames, token width
E, N, QC = 3, 3, 2  # episodes, ways, queries per class


def _info(grid: tuple[int, int] = (5, 5), cls: bool = True, dim: int = DT, layers: tuple = ("last",)) -> TokenInfo:
    return TokenInfo("last", layers, grid, cls, dim)


def _head(tokens: TokenInfo, dtype=torch.float64, dropout_off: bool = True, seed: int = 0, shot: int = 2, **overrides):
    spec = heads.get("strm")
    if dropout_off:
        overrides = {**{n: 0.0 for n in spec.option_names if n.endswith("dropout")}, **overrides}
    overrides = {"tuple_dim": 10, "cardinalities": (2, 3), **overrides}
    torch.manual_seed(seed)
    model = spec.build(spec.make_options(None, overrides, DataInfo(dim=D, num_frames=T, shot=shot, tokens=tokens)))
    with torch.no_grad():
        model.patch_attention.gamma.fill_(0.7)  # at its init 0 the patch attention would get no gradient to compare
    return model.to(dtype)


def _episodes(tokens: TokenInfo, k: int, dtype=torch.float64, e: int = E, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = tokens.patches
    centre = torch.randn(e, N, 1, 1, 1, DT, generator=g, dtype=dtype)  # a class signal shared by its videos
    labels = torch.arange(N).repeat_interleave(QC).expand(e, -1).contiguous()  # (E, Q)
    sup = torch.randn(e, N * k, T, 1, p, DT, generator=g, dtype=dtype) + centre.repeat_interleave(k, 1)
    qry = torch.randn(e, N * QC, T, 1, p, DT, generator=g, dtype=dtype) + centre[torch.arange(e)[:, None], labels]
    return {"support": torch.zeros(e, N * k, T, D, dtype=dtype), "query": torch.zeros(e, N * QC, T, D, dtype=dtype),
            "text": torch.zeros(e, N, D, dtype=dtype), "support_tokens": sup, "query_tokens": qry, "labels": labels}


def _forward(model, ep: dict, **extra):
    return model(ep["support"], ep["query"], ep["text"], support_tokens=ep["support_tokens"],
                 query_tokens=ep["query_tokens"], **extra)


@pytest.mark.parametrize("k, grid, cls", [(1, (5, 5), True), (2, (7, 7), True), (2, (4, 4), False)])
def test_strm_matches_reference(k: int, grid: tuple, cls: bool) -> None:
    """Logits (``logits + 0.1 logits_post_pat``), loss (summed CE + 0.1 x summed CE, the mean over the E = 3 episodes
    of one batched pass) and the gradient of every parameter equal the released ``CNN_STRM`` re-derived episode by
    episode with shuffled supports, in float64: ViT tokens (class token dropped, 5x5 or 7x7 max-pooled to 4x4, bins
    overlapping) and a ResNet map already 4x4; 1-shot (one support per class) and 2-shot."""
    from tests.reference_strm import strm_episode

    info = _info(grid, cls)
    model = _head(info, shot=k).train()
    ref = copy.deepcopy(model)
    ep = _episodes(info, k)
    out = _forward(model, ep)
    loss, parts = model.loss(out, ep["labels"])
    loss.backward()
    g = torch.Generator().manual_seed(5)
    total = 0.0
    for i in range(E):
        perm = torch.randperm(N * k, generator=g)  # the released loader shuffles the supports
        logits, li = strm_episode(ref, ep["support_tokens"][i][perm], torch.arange(N).repeat_interleave(k)[perm],
                                  ep["query_tokens"][i], ep["labels"][i])
        torch.testing.assert_close(out["logits"][i], logits, rtol=1e-5, atol=1e-5)
        (li / E).backward()
        total += li.item() / E
    assert loss.item() == pytest.approx(total, rel=1e-5) and parts["total"].item() == pytest.approx(total, rel=1e-5)
    for (name, p), (_, p1) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every layer takes part
        torch.testing.assert_close(p.grad, p1.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_strm_released_defaults() -> None:
    """The released values (model.py, the run scripts), the SPEC a ViT-B/16 cache holds for it, the position tables'
    rows, gamma's zero init and the parameter count."""
    spec = heads.get("strm")
    assert spec.tokens == "last@7x7" and not spec.per_video and not spec.transductive
    assert spec.train_shot(5) == 5 and spec.train_shot(1) == 1 and spec.train_queries(5) == 4
    w = 64
    o = spec.make_options(None, {}, DataInfo(dim=512, num_frames=8, shot=5, tokens=_info((7, 7), False, w, ("map",))))
    assert (o.patch_grid, o.patch_pool, o.cardinalities, o.tuple_dim, o.pe_scale, o.aux_weight, o.ce) == \
        (4, "max", (2,), 1152, 0.1, 0.1, "sum")
    assert (o.patch_dropout, o.frame_dropout, o.pe_dropout, o.distance_dropout, o.unregistered_distance) == \
        (0.1, 0.1, 0.1, 0.1, False)
    model = spec.build(o)
    assert model.patch_attention.gamma.item() == 0.0
    assert model.patch_attention.pe.pe.shape == (24, w) and model.frame_enrichment.pe.pe.shape == (12, w)
    assert [tr.num_tuples for tr in model.trx.transformers] == [28]
    h, t, a = w // 2, 8, 1152
    patch = 3 * (w * w + w) + 1 + (w * h + h) + (h * h + h) + (h * w + w)  # Self_Attn_Bot
    frame = 2 * (t * t + t) + 2 * (w * w + w)  # MLP_Mix_Enrich
    cross = 2 * (2 * w * a + a) + 2 * a  # TemporalCrossTransformer(2) without the unused norm_v
    distance = 2 * w * h + h  # DistanceLoss(2).clsW
    assert sum(p.numel() for p in model.parameters()) == patch + frame + cross + distance


@pytest.mark.parametrize("tokens, words", [
    (_info((7, 7), True, 8, ("4", "8", "12")), "token layers L is 3: strm reads one patch map"),
    (_info((3, 3), False, 8, ("map",)), "token grid is 3x3: strm pools the patch map to 4x4"),
])
def test_strm_refuses_a_cache_it_cannot_read(tokens: TokenInfo, words: str) -> None:
    """Three token layers, or a grid smaller than 4x4: one line naming what the cache holds."""
    with pytest.raises(ConfigError, match=words) as e:
        heads.get("strm").make_options(None, {}, DataInfo(dim=8, num_frames=8, tokens=tokens))
    assert "\n" not in str(e.value) and str(e.value).startswith("strm options: ")


def test_strm_forward_needs_matching_tokens() -> None:
    """No tokens, or tokens of another grid than the head was built for: a ValueError saying what it needs."""
    info = _info((5, 5), True)
    model = _head(info, torch.float32)
    ep = _episodes(info, 2, torch.float32)
    with pytest.raises(ValueError, match="pass support_tokens and query_tokens"):
        model(ep["support"], ep["query"], ep["text"])
    other = {**ep, "support_tokens": ep["support_tokens"][..., :17, :], "query_tokens": ep["query_tokens"][..., :17, :]}
    with pytest.raises(ValueError, match="built for a 5x5 grid plus a class token"):
        _forward(model, other)


def test_strm_avg_pool_option_is_the_pooled_grid() -> None:
    """``patch_pool=avg`` on a 7x7 map scores like the same weights on the map average-pooled to 4x4 beforehand
    (``map@4x4``); the released max pool does not."""
    big, small = _info((7, 7), False), _info((4, 4), False)
    ep = _episodes(big, 2)
    x = ep["support_tokens"], ep["query_tokens"]
    pooled = [F.adaptive_avg_pool2d(t.reshape(-1, 7, 7, DT).permute(0, 3, 1, 2), (4, 4)).permute(0, 2, 3, 1)
              .reshape(*t.shape[:4], 16, DT) for t in x]
    on_small = _head(small).eval()
    with torch.no_grad():
        ref = _forward(on_small, {**ep, "support_tokens": pooled[0], "query_tokens": pooled[1]})["logits"]
        for pool, same in (("avg", True), ("max", False)):
            model = _head(big, patch_pool=pool).eval()
            model.load_state_dict(on_small.state_dict())
            got = _forward(model, ep)["logits"]
            assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10) == same, pool


def test_strm_unregistered_distance_is_the_release_bug() -> None:
    """Default: the patch distance's map trains and eval is deterministic. ``unregistered_distance=True`` (the
    release's plain-list ``DistanceLoss``): the map gets no update and its dropout stays on in eval mode, while the
    patch attention still learns through it."""
    info = _info((5, 5), True)
    ep = _episodes(info, 2, torch.float32)
    for bug in (False, True):
        model = _head(info, torch.float32, dropout_off=False, unregistered_distance=bug).train()
        loss, _ = model.loss(_forward(model, ep), ep["labels"])
        loss.backward()
        maps = list(model.distance_maps.parameters())
        assert all(p.requires_grad != bug and (p.grad is None) == bug for p in maps)
        assert model.patch_attention.query_proj.weight.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            a, b = _forward(model, ep)["logits"], _forward(model, ep)["logits"]
        assert torch.equal(a, b) != bug
        assert any(n.startswith("distance_maps.") for n in model.state_dict())  # in the checkpoint either way


def test_strm_is_inductive_and_reads_no_query_label() -> None:
    """A query's logits depend on its own tokens and the supports only (the release has no transductive step):
    permuted queries give permuted logits, another query changed leaves them, and labels change nothing. Eval mode
    runs in chunks of episodes that score like one pass."""
    import mdmf_cache.heads.strm as strm

    info = _info((5, 5), True)
    model = _head(info).eval()
    ep = _episodes(info, 2)
    with torch.no_grad():
        base = _forward(model, ep)["logits"]
        perm = torch.randperm(N * QC, generator=torch.Generator().manual_seed(1))
        shuffled = _forward(model, {**ep, "query_tokens": ep["query_tokens"][:, perm]})["logits"]
        torch.testing.assert_close(shuffled, base[:, perm], rtol=1e-10, atol=1e-10)
        changed = ep["query_tokens"].clone()
        changed[:, 0] = torch.randn_like(changed[:, 0])
        torch.testing.assert_close(_forward(model, {**ep, "query_tokens": changed})["logits"][:, 1:], base[:, 1:],
                                   rtol=1e-10, atol=1e-10)
        labelled = _forward(model, ep, query_labels=ep["labels"].flip(-1))
        assert torch.equal(labelled["logits"], base) and labelled["correct"].shape == (E, N * QC)
        old, strm.EVAL_ELEMENTS = strm.EVAL_ELEMENTS, 1  # one episode per chunk
        try:
            torch.testing.assert_close(_forward(model, ep)["logits"], base, rtol=1e-12, atol=1e-12)
        finally:
            strm.EVAL_ELEMENTS = old
