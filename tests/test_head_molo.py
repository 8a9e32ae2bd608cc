"""The ``molo`` head: its equality with the released ``CNN_BiMHM_MoLo`` (re-derived per episode in
``tests/reference_molo.py``) in logits, loss and every parameter's gradient, on ViT tokens (class token dropped) and
on a ResNet map; its evaluation chunks; its released per-dataset values and its one-line refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mdmf_cache import heads
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.factory import build_head
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.tokens import TokenInfo, TokenSpec

D, T, C, DT, GRID = 8, 4, 6, 16, (2, 3)  # pooled width, frames, classes, token width, token grid (h, w)
E, N, QC = 3, 3, 2  # episodes, ways, queries per class


def _tokens(cls: bool = True) -> TokenInfo:
    return TokenInfo("last@2x3" if cls else "map", ("last",) if cls else ("map",), GRID, cls, DT)


def _head(shot: int, cls: bool = True, dataset: str = "hmdb51", seed: int = 0, **overrides):
    """A float64 MoLo head, dropout off, a small feed-forward; training mode."""
    torch.manual_seed(seed)
    opts = {"pe_dropout": 0.0, "attn_dropout": 0.0, "ffn_dropout": 0.0, "ffn_dim": 32, **overrides}
    data = DataInfo(dim=D, num_frames=T, num_classes=C, dataset=dataset, shot=shot, tokens=_tokens(cls))
    return build_head("molo", None, opts, data).to(torch.float64).train()


def _episodes(k: int, cls: bool = True, e: int = E, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = int(cls) + GRID[0] * GRID[1]
    classes = torch.stack([torch.randperm(C, generator=g)[:N] for _ in range(e)])  # (E, N) split classes
    centre = torch.randn(C, DT, generator=g, dtype=torch.float64)
    labels = torch.arange(N).repeat_interleave(QC).expand(e, -1).contiguous()  # (E, Q)
    sup_cls = classes.repeat_interleave(k, dim=1)  # (E, S)
    qry_cls = classes.gather(1, labels)  # (E, Q)
    tok = lambda ids: torch.randn(*ids.shape, T, 1, p, DT, generator=g, dtype=torch.float64) + centre[ids][:, :, None, None, None]  # noqa: E731
    return {"support": torch.randn(e, N * k, T, D, dtype=torch.float64), "query": torch.randn(e, N * QC, T, D, dtype=torch.float64),
            "text": torch.randn(e, N, D, dtype=torch.float64), "support_tokens": tok(sup_cls), "query_tokens": tok(qry_cls),
            "classes": classes, "labels": labels}


def _forward(model, ep: dict, lo: int = 0, hi: int | None = None) -> dict:
    sl = slice(lo, hi)
    return model(ep["support"][sl], ep["query"][sl], ep["text"][sl], classes=ep["classes"][sl],
                 support_tokens=ep["support_tokens"][sl], query_tokens=ep["query_tokens"][sl])


@pytest.mark.parametrize("shot, cls, overrides", [
    (1, True, {}),
    (2, True, {}),
    (2, False, {"dataset": "kinetics100"}),
    (2, True, {"learn_scale": False, "contrastive_scale": 2.5, "bidirectional": False, "motion_weight": 0.7}),
])
def test_molo_matches_reference(shot: int, cls: bool, overrides: dict) -> None:
    """E episodes in one batched pass against the released forward and loss re-derived one episode at a time (supports
    and queries shuffled, prototypes grouped by ``unique(labels)``, 2-D maps, Conv2d ``motion_up``, ``cos_sim``),
    float64: logits and the loss (the mean of the episodes') to 1e-5, and every parameter's gradient."""
    from tests.reference_molo import molo_episode

    model = _head(shot, cls, **overrides)
    if overrides.get("learn_scale", True):
        model.scale.data.fill_(1.7)  # away from 1, so that a missing or misplaced scale shows
        model.scale_motion.data.fill_(0.6)
    ref = copy.deepcopy(model)
    ep = _episodes(shot, cls)
    out = _forward(model, ep)
    loss, parts = model.loss(out, ep["labels"], ep["classes"])
    assert {"main", "videos", "contrast", "total"} <= set(parts)
    loss.backward()
    g = torch.Generator().manual_seed(5)
    total = 0.0
    for i in range(E):
        perm, qperm = torch.randperm(N * shot, generator=g), torch.randperm(N * QC, generator=g)
        sup_labels = torch.arange(N).repeat_interleave(shot)[perm]
        tgt_labels = ep["labels"][i][qperm]
        logits, li = molo_episode(ref, ep["support_tokens"][i][perm], sup_labels, ep["query_tokens"][i][qperm],
                                  tgt_labels, ep["classes"][i][sup_labels], ep["classes"][i][tgt_labels])
        torch.testing.assert_close(out["logits"][i][qperm], logits, rtol=1e-5, atol=1e-5)
        (li / E).backward()
        total += li.item() / E
    assert loss.item() == pytest.approx(total, rel=1e-5)
    names = [name for name, _ in model.named_parameters()]
    assert ("scale" in names) == overrides.get("learn_scale", True)
    for (name, p), (_, p1) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p1.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_chunks_and_queries_are_scored_alone(monkeypatch) -> None:
    """Eval-mode logits: one chunk per episode (``EVAL_ELEMENTS`` tiny) equals one pass; a query's logits do not depend
    on the episode's other queries (dropping one leaves the others' logits), and read no query label."""
    from mdmf_cache.heads import molo

    model = _head(2).eval()
    ep = _episodes(2)
    with torch.no_grad():
        whole = _forward(model, ep)["logits"]
        monkeypatch.setattr(molo, "EVAL_ELEMENTS", 1)
        chunked = _forward(model, ep)["logits"]
        fewer = model(ep["support"], ep["query"][:, 1:], ep["text"], query_labels=ep["labels"][:, 1:],
                      support_tokens=ep["support_tokens"], query_tokens=ep["query_tokens"][:, 1:])
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fewer["logits"], whole[:, 1:], rtol=1e-12, atol=1e-12)
    assert set(fewer) == {"logits", "d_app", "d_motion", "correct"}  # the training-only terms are not computed


def test_released_values_spec_and_parameters() -> None:
    """Per-dataset values of the released configs (the same at 1 and 5 shots), the SPEC (one ViT layer pooled to the
    released 7 x 7 map, 1-shot training, 6 queries per class) and the parameter count."""
    spec = heads.get("molo")
    got = {}
    for ds in ("hmdb51", "ucf101", "kinetics100", "ssv2-full", "ssv2-small", "folder"):
        for shot in (1, 5):
            o = spec.make_options(None, {}, DataInfo(dim=D, num_frames=T, dataset=ds, shot=shot, tokens=_tokens()))
            got[ds, shot] = (o.class_loss_weight, o.position_a, o.position_b)
    assert got == {(ds, k): v for ds, v in {"hmdb51": (0.4, 10, 1), "ucf101": (0.6, 10, 1), "kinetics100": (0.1, 2048, 0.02),
                                             "ssv2-full": (0.8, 10, 1), "ssv2-small": (0.15, 10, 1),
                                             "folder": (0.6, 10, 1)}.items() for k in (1, 5)}
    assert (o.heads, o.ffn_dim, o.motion_factor, o.pe_dropout, o.attn_dropout, o.ffn_dropout, o.cos_eps) == (
        8, 2048, 8, 0.1, 0.2, 0.05, 0.01)
    assert (o.motion_weight, o.contrastive_weight, o.learn_scale, o.contrastive_scale, o.bidirectional, o.reconstruction) == (
        0.3, 0.05, True, 1.0, True, False)
    assert len(TokenSpec.parse(spec.tokens).layers) == 1 and spec.tokens == "last@7x7" and not spec.per_video
    assert (spec.train_shot(5), spec.train_shot(1), spec.train_queries(5)) == (1, 1, 6)
    model = _head(1, ffn_dim=2048)
    dt, r, f = DT, DT // 8, 2048
    block = 2 * dt + 3 * dt * dt + dt * dt + dt + dt * f + f + f * dt + dt  # LN, qkv, out, FFN
    motion = (27 * dt * r + r) + (9 * r * r + r) + (r * dt + dt)  # Conv3d, Conv2d 3x3, Conv2d 1x1
    assert sum(p.numel() for p in model.parameters()) == 2 * block + motion + (dt * C + C) + 2 * dt + 2


@pytest.mark.parametrize("overrides, tokens, words", [
    ({"reconstruction": True}, _tokens(), "--head-opt reconstruction=true: the cache holds no frame differences"),
    ({}, TokenInfo("4,8,12", ("4", "8", "12"), GRID, True, DT), "the cached token layers L is 3: molo reads one token layer"),
    ({"heads": 3}, _tokens(), "--head-opt heads=3: must divide the cached tokens' width Dt=16"),
    ({"motion_factor": 32}, _tokens(), "--head-opt motion_factor=32: must divide the cached tokens' width Dt=16"),
    ({"contrastive_scale": 0.0}, _tokens(), "--head-opt contrastive_scale=0.0: must be a finite number > 0"),
    ({"contrastive_scale": math.nan}, _tokens(), "--head-opt contrastive_scale=nan"),
])
def test_bad_options_are_one_line(overrides: dict, tokens: TokenInfo, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        heads.get("molo").make_options(None, overrides, DataInfo(dim=D, num_frames=T, tokens=tokens))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_or_misshapen_tokens_are_refused() -> None:
    """Options resolve without a token cache (the registry's checks), but the head is not built from them; a forward
    without tokens or with tokens of the wrong grid is a ValueError naming the argument."""
    spec = heads.get("molo")
    with pytest.raises(ConfigError, match="extract the cache with --tokens last@7x7"):
        spec.build(spec.make_options(None, {}, DataInfo(dim=D, num_frames=T)))
    model = _head(1)
    ep = _episodes(1)
    with pytest.raises(ValueError, match="pass support_tokens"):
        model(ep["support"], ep["query"], ep["text"], query_tokens=ep["query_tokens"])
    with pytest.raises(ValueError, match="query_tokens shape"):
        model(ep["support"], ep["query"], ep["text"], support_tokens=ep["support_tokens"],
              query_tokens=ep["query_tokens"][..., 1:, :])
