"""Config presets, head modules and the full MDMF model on tiny dims."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mdmf_cache.heads.mdmf_losses import total_loss
from mdmf_cache.heads.mdmf_config import PRESET_DATA, PRESETS, MDMFConfig, build_config, list_presets
from mdmf_cache.heads.mdmf import MDMF
from mdmf_cache.layers.mmfe import MMFE
from mdmf_cache.layers.otam import cosine_distance, cosine_similarity, otam_distance
from mdmf_cache.layers.pps import ProbabilityPromptSelector, pps_scores, token_for
from mdmf_cache.layers.temporal import GTCE, LTCE, TCN, EpisodeBatchNorm1d

DIM, T = 32, 8
E, N, K, Q = 2, 3, 2, 4  # tiny episodes: S = 6 supports, 4 queries


def _cfg(preset: str = "paper", **overrides) -> MDMFConfig:
    return build_config(preset, DIM, ffn_dim=64, **overrides)


def _episodes(seed: int = 0, e: int = E) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(e, N * K, T, DIM, generator=gen)
    query = torch.randn(e, Q, T, DIM, generator=gen)
    text = torch.randn(e, N, DIM, generator=gen)
    labels = torch.randint(0, N, (e, Q), generator=gen)
    return support, query, text, labels


# ---------------------------------------------------------------- config


def test_presets_set_spec_section_9_switches() -> None:
    assert list_presets() == ["paper", "reference"]
    paper, ref = _cfg("paper"), _cfg("reference")
    assert (paper.ltce, ref.ltce) == ("bn", "linear")
    assert (paper.pos_embed, ref.pos_embed) == (True, False)
    assert (paper.pps_score, ref.pps_score) == ("mean", "top4")
    assert (paper.pps_test, ref.pps_test) == ("sample", "sample")  # both draw at test (method.md §6)
    assert (paper.text_pos, ref.text_pos) == (0, 1)
    assert ref.cos_eps == 0.01 and paper.cos_eps < 1e-6
    for cfg in (paper, ref):
        assert (cfg.distill, cfg.condition, cfg.direction, cfg.lam) == (True, "both", "bidirectional", 1.0)
        assert (cfg.pps, cfg.pps_temperature, cfg.otam_lambda) == (True, 0.005, 0.5)
    assert PRESET_DATA == {
        "paper": {"sampler": "tsn", "normalize": "clip"},
        "reference": {"sampler": "linspace", "normalize": "none"},
    }
    assert set(PRESETS) == set(PRESET_DATA)


def test_build_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="paper, reference"):
        build_config("nope", DIM)
    with pytest.raises(ValueError, match="not_a_field"):
        build_config("paper", DIM, not_a_field=1)
    with pytest.raises(ValueError, match="--head-opt views=xyz: choose"):
        build_config("paper", DIM, views="xyz")
    cfg = build_config("reference", DIM, views="gtc", ltce="bn")
    assert (cfg.views, cfg.ltce, cfg.pos_embed) == ("gtc", "bn", False)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("norm", [False, True])
def test_ltce(norm: bool) -> None:
    ltce = LTCE(DIM, norm=norm)
    kinds = [type(m) for m in ltce.net]
    if norm:
        assert kinds == [nn.Conv1d, nn.ReLU, EpisodeBatchNorm1d] * 2
    else:
        assert kinds == [nn.Conv1d, nn.Conv1d]
    out = ltce(torch.randn(5, T, DIM))
    assert out.shape == (5, T, DIM) and torch.isfinite(out).all()


def test_tcn_is_causal() -> None:
    torch.manual_seed(0)
    tcn = TCN(DIM, levels=3, kernel_size=3, dropout=0.1).eval()
    x = torch.randn(3, T, DIM)
    base = tcn(x)
    for t in range(T - 1):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        out = tcn(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])
    dilations = [blk.conv1.dilation[0] for blk in tcn.blocks]
    assert dilations == [1, 2, 4]


def test_gtce_is_last_step_plus_input() -> None:
    gtce = GTCE(DIM, dropout=0.1).eval()
    x = torch.randn(4, T, DIM)
    out = gtce(x)
    assert out.shape == (4, T, DIM)
    torch.testing.assert_close(out - x, gtce.tcn(x)[:, -1:].expand(4, T, DIM))


@pytest.mark.parametrize("positions", [None, T + 1])
def test_mmfe(positions: int | None) -> None:
    mmfe = MMFE(DIM, heads=8, ffn_dim=64, num_positions=positions).eval()
    assert (mmfe.pos_embed is None) == (positions is None)
    assert sum(isinstance(m, nn.LayerNorm) for m in mmfe.modules()) == 1
    assert mmfe.to_q.bias is None and mmfe.to_k.bias is None and mmfe.to_v.bias is None
    out = mmfe(torch.randn(5, DIM), torch.randn(5, T, DIM), torch.randn(5, T, DIM))
    assert out.shape == (5, T + 1, DIM) and torch.isfinite(out).all()


def test_pps_off_gives_zero_tokens() -> None:
    _, query, text, _ = _episodes()
    pps = ProbabilityPromptSelector(enabled=False).train()
    chosen, prob = pps(query, text)
    tokens = token_for(text, chosen)
    assert tokens.shape == (E, Q, DIM) and (tokens == 0).all()
    assert (chosen == -1).all() and prob.shape == (E, Q, N)
    model = MDMF(_cfg(pps=False)).eval()
    assert (model(*_episodes()[:3])["query_token_class"] == -1).all()


def test_pps_temperature_sharpens_and_selects_text() -> None:
    _, query, text, _ = _episodes()
    soft = ProbabilityPromptSelector(temperature=1.0).probabilities(query, text)
    sharp = ProbabilityPromptSelector(temperature=0.005).probabilities(query, text)
    assert (sharp.max(-1).values >= soft.max(-1).values).all()
    assert sharp.max(-1).values.mean() > soft.max(-1).values.mean() + 0.1
    pps = ProbabilityPromptSelector(test_rule="argmax").eval()
    chosen, prob = pps(query, text)
    assert torch.equal(chosen, prob.argmax(-1))
    torch.testing.assert_close(token_for(text, chosen), text[torch.arange(E)[:, None], chosen])


def test_pps_draws_at_train_and_with_sample_rule() -> None:
    _, query, text, _ = _episodes()
    query = query.repeat(1, 50, 1, 1)  # many identical queries
    torch.manual_seed(0)
    pps = ProbabilityPromptSelector(temperature=100.0, test_rule="sample").eval()
    chosen, _ = pps(query, text)
    assert chosen.unique().numel() > 1  # near-uniform p: a draw, not an argmax
    pps = ProbabilityPromptSelector(temperature=100.0, test_rule="argmax").train()
    assert pps(query, text)[0].unique().numel() > 1


def test_pps_scores_values() -> None:
    query = torch.zeros(1, 1, 8, 2)
    query[0, 0, :, 0] = torch.arange(8.0)  # frames along +x with growing norm
    query[0, 0, :4, 1] = 1e3  # first four frames point (almost) along +y
    text = torch.tensor([[[1.0, 0.0]]])
    top4 = pps_scores(query, text, "top4", eps=0.0)
    torch.testing.assert_close(top4, torch.ones(1, 1, 1))  # frames 4..7 have cos 1
    mean = pps_scores(query, text, "mean", eps=0.0)
    m = query.mean(2)[0, 0]
    torch.testing.assert_close(mean, (m[0] / m.norm()).reshape(1, 1, 1))


# ---------------------------------------------------------------- MDMF


@pytest.mark.parametrize("preset", ["paper", "reference"])
@pytest.mark.parametrize("views", ["both", "ltc", "gtc", "ntc"])
def test_mdmf_shapes(preset: str, views: str) -> None:
    torch.manual_seed(0)
    model = MDMF(_cfg(preset, views=views)).train()
    support, query, text, labels = _episodes()
    out = model(support, query, text, labels)
    names = ("ltc", "gtc") if views == "both" else (views,)
    expected = {"logits", "query_token_class", "pps_prob", "correct"}
    expected |= {f"{k}_{v}" for v in names for k in ("d", "p_visual", "p_text")}
    assert set(out) == expected
    for key, value in out.items():
        want = (E, Q) if key in ("query_token_class", "correct") else (E, Q, N)
        assert value.shape == want, key
        assert torch.isfinite(value.float()).all(), key
    torch.testing.assert_close(out["logits"], -sum(out[f"d_{v}"] for v in names))
    if views == "ntc":
        assert model.views["ntc"].extractor is None


def test_mdmf_reproduces_manual_pipeline() -> None:
    """Prototypes = mean over K, OTAM on positions 1..T, text posterior at cfg.text_pos."""
    for preset in ("paper", "reference"):
        cfg = _cfg(preset, pps_test="argmax", alpha_ltc=0.5, alpha_gtc=2.0)
        model = MDMF(cfg).eval()
        support, query, text, _ = _episodes(1)
        out = model(support, query, text)
        e = 0
        q_tok = text[e][out["query_token_class"][e]]  # (Q, D)
        s_tok = text[e].repeat_interleave(K, 0)  # (S, D)
        logits = 0
        for name, alpha in (("ltc", 0.5), ("gtc", 2.0)):
            view = model.views[name]
            protos = view(support[e], s_tok).reshape(N, K, T + 1, DIM).mean(1)  # (N, T+1, D)
            q_out = view(query[e], q_tok)  # (Q, T+1, D)
            frame_d = cosine_distance(q_out[:, None, 1:], protos[None, :, 1:], cfg.cos_eps)  # (Q, N, T, T)
            d = otam_distance(frame_d, 0.5, True)
            torch.testing.assert_close(out[f"d_{name}"][e], d, rtol=1e-4, atol=1e-4)
            p_text = cosine_similarity(q_out[:, cfg.text_pos], protos[:, cfg.text_pos], cfg.cos_eps).softmax(-1)
            torch.testing.assert_close(out[f"p_text_{name}"][e], p_text, rtol=1e-4, atol=1e-5)
            logits = logits - alpha * d
        torch.testing.assert_close(out["logits"][e], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_batched_equals_separate(preset: str) -> None:
    torch.manual_seed(0)
    model = MDMF(_cfg(preset, pps_test="argmax")).eval()
    support, query, text, _ = _episodes(2, e=3)
    with torch.no_grad():
        batched = model(support, query, text)
        for i in range(3):
            single = model(support[i : i + 1], query[i : i + 1], text[i : i + 1])
            for key, value in single.items():
                torch.testing.assert_close(batched[key][i : i + 1], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_gradients_reach_all_parameters(preset: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(preset)
    model = MDMF(cfg).train()
    support, query, text, labels = _episodes(3)
    loss, _ = total_loss(model(support, query, text), labels, cfg)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert any("pos_embed" in n for n, _ in model.named_parameters()) == (preset == "paper")


def test_training_mode_is_deterministic_under_seed() -> None:
    torch.manual_seed(0)
    model = MDMF(_cfg("reference")).train()
    twin = copy.deepcopy(model)
    support, query, text, labels = _episodes(4)
    runs = []
    for m in (model, twin, model):
        torch.manual_seed(123)
        runs.append(m(support, query, text, labels))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key])
        torch.testing.assert_close(runs[0][key], runs[2][key])
    torch.manual_seed(999)
    other = model(support, query, text, labels)
    assert not torch.equal(other["logits"], runs[0]["logits"])  # dropout / draws do use the RNG


def test_mdmf_rejects_bad_shapes() -> None:
    model = MDMF(_cfg())
    support, query, text, _ = _episodes()
    with pytest.raises(ValueError, match="multiple"):
        model(support[:, :5], query, text)
    with pytest.raises(ValueError):
        model(support, query[..., :16], text)
