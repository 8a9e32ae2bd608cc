"""EMP-Net (``emp-net``) on cached tokens: equal to the released forward and loss re-derived per episode
(``tests/reference_empnet.py``), its released defaults, what it refuses, and that evaluation is deterministic and
inductive. Small sizes (T = 4 frames, a 2 x 2 patch grid, D = 16) keep the file at about a second."""

from __future__ import annotations

import copy

import pytest
import torch

from mdmf_cache import heads
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads import emp_net
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.tokens import TokenInfo

D, T, GRID = 16, 4, (2, 2)  # width, frames, patch grid
P = 1 + GRID[0] * GRID[1]  # tokens per frame, class token first
E, N, QC = 2, 3, 2  # episodes, ways, queries per class
TOKENS = TokenInfo("4,8,12", ("4", "8", "12"), GRID, True, D)
SPEC = heads.get("emp-net")


def _data(shot: int, tokens: TokenInfo | None = TOKENS, dim: int = D, dataset: str = "ucf101") -> DataInfo:
    return DataInfo(dim=dim, num_frames=T, num_classes=6, dataset=dataset, shot=shot, tokens=tokens)


def _head(shot: int, dtype=torch.float64, dropout_off: bool = True, **overrides):
    if dropout_off:
        overrides = {"attn_dropout": 0.0, "ffn_dropout": 0.0, **overrides}
    torch.manual_seed(0)
    opts = SPEC.make_options(None, {"patch_topk": 2, **overrides}, _data(shot))
    return SPEC.build(opts).to(dtype)


def _episodes(shot: int, dtype=torch.float64, e: int = E, seed: int = 0) -> dict:
    """Random tokens (E, V, T, 3, P, D) that lean towards their class's text, so the softmaxes are not flat."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(e, N, D, generator=g, dtype=dtype)  # (E, N, D)
    labels = torch.arange(N).repeat_interleave(QC).expand(e, -1).contiguous()  # (E, Q)
    sup_text = text.repeat_interleave(shot, dim=1)  # (E, S, D) class-major
    qry_text = text.gather(1, labels[..., None].expand(-1, -1, D))  # (E, Q, D)
    tokens = lambda tx: torch.randn(*tx.shape[:2], T, 3, P, D, generator=g, dtype=dtype) + 0.3 * tx[:, :, None, None, None]
    st, qt = tokens(sup_text), tokens(qry_text)
    return {"support": st[:, :, :, 2, 0], "query": qt[:, :, :, 2, 0], "text": text, "labels": labels,
            "support_tokens": st, "query_tokens": qt}


def _forward(model, ep: dict, **kw) -> dict:
    return model(ep["support"], ep["query"], ep["text"], support_tokens=ep["support_tokens"],
                 query_tokens=ep["query_tokens"], **kw)


@pytest.mark.parametrize("shot,merge_before", [(1, None), (2, None), (2, False)], ids=["1shot", "5shot-form", "2shot-merge-after"])
def test_matches_reference(shot: int, merge_before) -> None:
    """Logits, loss and every parameter's gradient of the batched head (E episodes in one pass, mean loss) equal
    the released forward and loss re-derived per episode (supports and queries shuffled, prototypes by
    ``unique(labels)``, cell-by-cell OTAM), float64, to 1e-5."""
    from tests.reference_empnet import empnet_episode

    over = {} if merge_before is None else {"merge_before": merge_before}
    model = _head(shot, **over).train()
    assert model.options.merge_before == (shot > 1 if merge_before is None else merge_before)
    ref = copy.deepcopy(model)
    ep = _episodes(shot)
    out = _forward(model, ep)
    loss, parts = model.loss(out, ep["labels"])
    loss.backward()
    assert {"main", "text", "total"} <= set(parts)

    g = torch.Generator().manual_seed(5)
    ref_total = 0.0
    for i in range(E):
        sp, qp = torch.randperm(N * shot, generator=g), torch.randperm(N * QC, generator=g)  # the loader's shuffles
        sup_labels = torch.arange(N).repeat_interleave(shot)[sp]
        logits, li = empnet_episode(ref, ep["support_tokens"][i][sp], sup_labels, ep["query_tokens"][i][qp],
                                    ep["labels"][i][qp], ep["text"][i][sup_labels])
        torch.testing.assert_close(out["logits"][i][qp], logits, rtol=1e-5, atol=1e-5)
        (li / E).backward()
        ref_total += li.item() / E
    assert loss.item() == pytest.approx(ref_total, rel=1e-5)
    for (name, p), (_, p1) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p1.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_is_deterministic_inductive_and_chunked(monkeypatch) -> None:
    """With the released dropouts: training passes differ (dropout), eval passes are equal; a query's eval
    logits do not move when another query changes (inductive) and do not read query_labels; chunked episodes
    give the logits of one pass."""
    model = _head(2, dtype=torch.float32, dropout_off=False)
    ep = _episodes(2, torch.float32, e=3)
    model.train()
    assert not torch.equal(_forward(model, ep)["logits"], _forward(model, ep)["logits"])
    model.eval()
    with torch.no_grad():
        a = _forward(model, ep)["logits"]
        b = _forward(model, ep, query_labels=ep["labels"])
        torch.testing.assert_close(a, b["logits"], rtol=0, atol=0)
        assert b["correct"].shape == (3, N * QC)
        other = {**ep, "query_tokens": ep["query_tokens"].clone()}
        other["query_tokens"][:, 0] += 1.0
        c = _forward(model, other)["logits"]
        assert not torch.allclose(a[:, 0], c[:, 0])
        torch.testing.assert_close(a[:, 1:], c[:, 1:], rtol=1e-6, atol=1e-7)
        monkeypatch.setattr(emp_net, "EVAL_ELEMENTS", 1)  # one episode per chunk
        torch.testing.assert_close(_forward(model, ep)["logits"], a, rtol=1e-6, atol=1e-7)


def test_released_defaults() -> None:
    """The released values: 4 heads of D/8, FFN D/4, dropouts 0.2/0.05, 49 patches, 2 frames, MERGE_BEFORE in the
    5-shot configs only (the same for every dataset); an explicit value wins; the spec reads 4,8,12 tokens,
    trains K-shot with 5 queries per class; the parameter count of the released module."""
    one = SPEC.make_options(None, {}, DataInfo(dim=512, num_frames=8, dataset="hmdb51", shot=1))
    five = SPEC.make_options(None, {}, DataInfo(dim=512, num_frames=8, dataset="ssv2-full", shot=5))
    assert (one.heads, one.head_divisor, one.ffn_divisor, one.attn_dropout, one.ffn_dropout) == (4, 8, 4, 0.2, 0.05)
    assert (one.head_dim, one.ffn_dim) == (64, 128)  # D = 512
    assert (one.patch_topk, one.frame_topk, one.cos_eps, one.otam_lambda) == (49, 2, 0.01, 0.5)
    assert one.merge_before is False and five.merge_before is True
    assert SPEC.make_options(None, {"merge_before": False, "patch_topk": 2}, _data(5)).merge_before is False
    assert SPEC.tokens == emp_net.LAYERS == "4,8,12" and not SPEC.per_video and not SPEC.transductive
    assert SPEC.train_shot(5) == 5 and SPEC.train_queries(1) == SPEC.train_queries(5) == 5
    d, i, f = D, 4 * (D // 8), D // 4
    mmfe = 2 * d + 3 * d * i + i * d + d + d * f + f + f * d + d  # Transformer_v1
    ffn = d * f + f + f * d + d
    block = 2 * (2 * d + 3 * d * i + i * d + d) + ffn  # Transformer_v3
    assert sum(p.numel() for p in _head(1).parameters()) == 6 * mmfe + 3 * block


@pytest.mark.parametrize("tokens,needle", [
    (TokenInfo("12", ("12",), GRID, True, D), "the cached token layers L is 1: EMP-Net fuses exactly 3"),
    (TokenInfo("2,4,8,12", ("2", "4", "8", "12"), GRID, True, D), "the cached token layers L is 4"),
    (TokenInfo("map", ("map",), GRID, False, D), "class token is false"),
    (TokenInfo("4,8,12", ("4", "8", "12"), GRID, True, 8), "width Dt is 8: must equal the text width D=16"),
    (TokenInfo("4,8,12", ("4", "8", "12"), GRID, True, D), "--head-opt patch_topk=49: must be <= the cached patches"),
])
def test_refuses_a_cache_that_does_not_fit(tokens: TokenInfo, needle: str) -> None:
    """A cache without 3 layers, without a class token, of another width, or with fewer patches than patch_topk
    is refused in one line naming what is wrong (here patch_topk keeps its default 49 against a 2 x 2 grid)."""
    with pytest.raises(ConfigError) as e:
        SPEC.make_options(None, {}, _data(1, tokens))
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_option_ranges_and_missing_tokens() -> None:
    """Bad option values are one-line ConfigErrors; options without a token cache are accepted (listed, checked
    later against the cache); a forward without tokens, or with 2 layers, is a ValueError."""
    for bad, needle in (({"attn_dropout": 1.0}, "attn_dropout=1.0"), ({"otam_lambda": 0.0}, "otam_lambda=0.0"),
                        ({"heads": 0}, "heads=0"), ({"frame_topk": 5}, "frame_topk=5: must be <= the frames per video T=4"),
                        ({"head_divisor": 0}, "head_divisor=0"), ({"ffn_divisor": 17}, "ffn_divisor=17: must be <= the features' width D=16"), ({"cos_eps": -1.0}, "cos_eps=-1.0")):
        with pytest.raises(ConfigError, match="emp-net options") as e:
            SPEC.make_options(None, {"patch_topk": 2, **bad}, _data(1))
        assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert SPEC.make_options(None, {}, _data(1, tokens=None)).token_layers is None
    model, ep = _head(1), _episodes(1)
    with pytest.raises(ValueError, match="reads cached tokens"):
        model(ep["support"], ep["query"], ep["text"])
    with pytest.raises(ValueError, match="support_tokens"):
        model(ep["support"], ep["query"], ep["text"], support_tokens=ep["support_tokens"][:, :, :, :2],
              query_tokens=ep["query_tokens"][:, :, :, :2])
