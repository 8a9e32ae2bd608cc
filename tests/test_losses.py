"""Episodic cross-entropy, KL direction, reliability conditions and distillation directions."""

from __future__ import annotations

import math

import pytest
import torch

from mdmf_cache.heads.mdmf_losses import (distillation_loss, distillation_terms, kl_div, main_loss, mean_parts,
                                          reliability_masks, total_loss)
from mdmf_cache.heads.mdmf_config import build_config


def test_main_loss_sums_queries_and_averages_episodes() -> None:
    logits = torch.randn(3, 4, 5)
    labels = torch.randint(0, 5, (3, 4))
    per_episode = [
        torch.nn.functional.cross_entropy(logits[i], labels[i], reduction="sum") for i in range(3)
    ]
    torch.testing.assert_close(main_loss(logits, labels), torch.stack(per_episode).mean())


def test_kl_teacher_is_first_argument() -> None:
    teacher = torch.tensor([0.5, 0.5])
    student = torch.tensor([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
    torch.testing.assert_close(kl_div(teacher, student), torch.tensor(want))
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    torch.testing.assert_close(kl_div(student, teacher), torch.tensor(reverse))
    assert kl_div(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])) == 0


# (v_l, v_g, t_l, t_g) -> expected (local, global) per condition
_CASES = [
    (0.9, 0.5, 0.6, 0.4),  # local higher on both
    (0.5, 0.9, 0.4, 0.6),  # global higher on both
    (0.9, 0.5, 0.4, 0.6),  # mixed: visual says local, text says global
    (0.5, 0.9, 0.6, 0.4),  # mixed: the other way
    (0.7, 0.7, 0.5, 0.5),  # exact ties on both
    (0.7, 0.7, 0.4, 0.6),  # visual tie, text global
]
_EXPECTED = {
    "both": [(1, 0), (0, 1), (0, 0), (0, 0), (1, 0), (0, 0)],
    "text": [(1, 0), (0, 1), (0, 1), (1, 0), (1, 0), (0, 1)],
    "visual": [(1, 0), (0, 1), (1, 0), (0, 1), (1, 0), (1, 0)],
    "none": [(1, 1)] * 6,
}


@pytest.mark.parametrize("condition", sorted(_EXPECTED))
def test_reliability_truth_table(condition: str) -> None:
    v_l, v_g, t_l, t_g = (torch.tensor(col) for col in zip(*_CASES))
    local, glob = reliability_masks(v_l, v_g, t_l, t_g, condition)
    assert local.dtype == torch.bool and glob.dtype == torch.bool
    assert list(zip(local.int().tolist(), glob.int().tolist())) == _EXPECTED[condition]


def _posteriors() -> dict[str, torch.Tensor]:
    """One episode, three queries: q0 local-reliable, q1 global-reliable, q2 mixed."""
    return {
        "logits": torch.zeros(1, 3, 2),
        "p_visual_ltc": torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]]),
        "p_visual_gtc": torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]]),
        "p_text_ltc": torch.tensor([[[0.6, 0.4], [0.55, 0.45], [0.52, 0.48]]]),
        "p_text_gtc": torch.tensor([[[0.55, 0.45], [0.3, 0.7], [0.4, 0.6]]]),
    }


def test_distillation_both_condition_hand_computed() -> None:
    out = _posteriors()
    cfg = build_config("paper", 8)
    p_l, p_g = out["p_visual_ltc"][0], out["p_visual_gtc"][0]
    # Only q1 is global-reliable: L_l->g = KL(P_g || P_l) at q1 (a single weighted query).
    l2g = kl_div(p_g[1], p_l[1])
    # Only q0 is local-reliable: L_g->l = KL(P_l || P_g) at q0.
    g2l = kl_div(p_l[0], p_g[0])
    terms = distillation_terms(out, cfg)
    torch.testing.assert_close(terms["l2g"], l2g)
    torch.testing.assert_close(terms["g2l"], g2l)
    torch.testing.assert_close(distillation_loss(out, cfg), l2g + g2l)
    torch.testing.assert_close(distillation_loss(out, build_config("paper", 8, direction="up-down")), l2g)
    torch.testing.assert_close(distillation_loss(out, build_config("paper", 8, direction="down-up")), g2l)


def test_distillation_weights_and_none_condition() -> None:
    out = _posteriors()
    p_l, p_g = out["p_visual_ltc"][0], out["p_visual_gtc"][0]
    t_l, t_g = out["p_text_ltc"][0].max(-1).values, out["p_text_gtc"][0].max(-1).values
    v_l, v_g = p_l.max(-1).values, p_g.max(-1).values
    # visual condition: local = q0, q2 (v_l >= v_g); global = q1; weights c = v + t of the teacher.
    c = v_l + t_l
    want_g2l = (c[0] * kl_div(p_l[0], p_g[0]) + c[2] * kl_div(p_l[2], p_g[2])) / (c[0] + c[2])
    terms = distillation_terms(out, build_config("paper", 8, condition="visual"))
    torch.testing.assert_close(terms["g2l"], want_g2l)
    torch.testing.assert_close(terms["l2g"], kl_div(p_g[1], p_l[1]))
    assert v_g[1] + t_g[1] > 0
    # none: both terms for every query, unweighted, summed over the queries (method.md §8).
    none = distillation_loss(out, build_config("paper", 8, condition="none"))
    torch.testing.assert_close(none, kl_div(p_g, p_l).sum() + kl_div(p_l, p_g).sum())


def test_distillation_none_sums_over_queries_by_hand() -> None:
    """Two queries, two classes, numbers worked out by hand: sum, not mean, over the queries."""
    p_l = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)  # (E=1, Q=2, N=2)
    p_g = torch.tensor([[[0.8, 0.2], [0.5, 0.5]]], dtype=torch.float64)
    out = {"logits": torch.zeros(1, 2, 2, dtype=torch.float64), "p_visual_ltc": p_l, "p_visual_gtc": p_g,
           "p_text_ltc": p_l, "p_text_gtc": p_g}
    # KL(P_g || P_l): q0 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.192745, q1 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826
    # KL(P_l || P_g): q0 0.223144, q1 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.368064
    terms = distillation_terms(out, build_config("paper", 8, condition="none"))
    assert terms["l2g"].item() == pytest.approx(0.703570380788, abs=1e-9)
    assert terms["g2l"].item() == pytest.approx(0.591207758483, abs=1e-9)
    total = distillation_loss(out, build_config("paper", 8, condition="none"))
    assert total.item() == pytest.approx(1.294778139271, abs=1e-9)  # 25 queries would weigh 25x a mean


def test_distillation_zero_without_reliable_queries_or_when_off() -> None:
    out = _posteriors()
    mixed_only = {k: v[:, 2:] for k, v in out.items()}
    assert distillation_loss(mixed_only, build_config("paper", 8)) == 0
    assert distillation_loss(out, build_config("paper", 8, distill=False)) == 0
    single = {"logits": out["logits"]}
    assert distillation_loss(single, build_config("paper", 8, views="gtc")) == 0


def test_distillation_mean_over_episodes() -> None:
    out = _posteriors()
    swapped = dict(out)
    for a, b in (("p_visual_ltc", "p_visual_gtc"), ("p_text_ltc", "p_text_gtc")):
        swapped[a], swapped[b] = out[b], out[a]
    both = {k: torch.cat([out[k], swapped[k]]) for k in out}
    cfg = build_config("reference", 8)
    want = (distillation_loss(out, cfg) + distillation_loss(swapped, cfg)) / 2
    torch.testing.assert_close(distillation_loss(both, cfg), want)


def test_distillation_detaches_nothing() -> None:
    scores = {k: torch.randn(2, 6, 5, requires_grad=True) for k in ("vl", "vg", "tl", "tg")}
    out = {
        "logits": torch.zeros(2, 6, 5),
        "p_visual_ltc": scores["vl"].softmax(-1),
        "p_visual_gtc": scores["vg"].softmax(-1),
        "p_text_ltc": scores["tl"].softmax(-1),
        "p_text_gtc": scores["tg"].softmax(-1),
    }
    distillation_loss(out, build_config("paper", 8, condition="text")).backward()
    for name in ("vl", "vg"):  # both views are students (and teachers) somewhere
        assert scores[name].grad.abs().sum() > 0
    # The text posteriors only enter through the weights c_q = v + t: they get gradient too.
    assert scores["tl"].grad.abs().sum() > 0 or scores["tg"].grad.abs().sum() > 0


def test_total_loss_parts() -> None:
    out = _posteriors()
    out["logits"] = torch.randn(1, 3, 2)
    labels = torch.tensor([[0, 1, 0]])
    cfg = build_config("paper", 8, lam=0.5)
    loss, parts = total_loss(out, labels, cfg)
    want = main_loss(out["logits"], labels) + 0.5 * distillation_loss(out, cfg)
    torch.testing.assert_close(loss, want)
    # parts are detached 0-dim tensors (no host sync inside the training step)
    assert set(parts) == {"main", "distill", "total", "distill_l2g", "distill_g2l", "reliable_ltc", "reliable_gtc"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    assert parts["total"].item() == pytest.approx(loss.item())
    assert parts["main"].item() + 0.5 * parts["distill"].item() == pytest.approx(parts["total"].item())
    loss_off, parts_off = total_loss(out, labels, build_config("paper", 8, distill=False))
    torch.testing.assert_close(loss_off, main_loss(out["logits"], labels))
    assert parts_off["distill"].item() == 0.0
    assert set(parts_off) == {"main", "distill", "total"}


def test_total_loss_parts_do_not_hold_the_graph() -> None:
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    _, parts = total_loss({"logits": logits}, labels, build_config("paper", 8, distill=False))
    assert all(v.grad_fn is None for v in parts.values())


def test_mean_parts_one_conversion() -> None:
    steps = [
        {"total": torch.tensor(1.0), "main": torch.tensor(0.5)},
        {"total": torch.tensor(2.0), "main": torch.tensor(0.25)},
    ]
    got = mean_parts(steps)
    assert got == {"total": 1.5, "main": 0.375}
    assert all(type(v) is float for v in got.values())
    assert mean_parts([]) == {}
