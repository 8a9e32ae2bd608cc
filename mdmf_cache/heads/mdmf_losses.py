"""Losses of CLIP-MDMF (docs/method.md §8): episodic cross-entropy and reliability-gated mutual distillation.

Every loss is defined per episode, as in the released code (which trains on one episode at a time),
and then **averaged** over the E episodes of a batch: a batch of E episodes behaves like
accumulating E single-episode gradients divided by E.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mdmf_cache.heads.mdmf_config import MDMFConfig

__all__ = [
    "main_loss",
    "kl_div",
    "reliability_masks",
    "distillation_terms",
    "distillation_loss",
    "total_loss",
    "mean_parts",
]


def main_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over each episode's queries (released code), then mean over episodes.

    Args:
        logits: ``(E, Q, N)``.
        labels: ``(E, Q)`` episode-class indices.

    Returns:
        Scalar.
    """
    e, q, n = logits.shape
    ce = F.cross_entropy(logits.reshape(e * q, n), labels.reshape(e * q), reduction="none")  # (E*Q,)
    return ce.reshape(e, q).sum(dim=1).mean()


def kl_div(p_teacher: Tensor, p_student: Tensor) -> Tensor:
    """``KL(P_teacher || P_student) = sum_c p_t (log p_t - log p_s)`` over the last dim.

    Args:
        p_teacher: ``(..., N)`` probabilities (the first argument is the teacher).
        p_student: ``(..., N)`` probabilities.

    Returns:
        ``(...)``.
    """
    tiny = torch.finfo(p_student.dtype).tiny
    return (torch.xlogy(p_teacher, p_teacher) - p_teacher * p_student.clamp_min(tiny).log()).sum(dim=-1)


def reliability_masks(
    v_l: Tensor, v_g: Tensor, t_l: Tensor, t_g: Tensor, condition: Literal["both", "text", "visual", "none"]
) -> tuple[Tensor, Tensor]:
    """Which view is reliable (a teacher) for each query.

    ``both``: local if ``v_l >= v_g and t_l >= t_g``, global if both are strictly lower, mixed
    queries are neither. ``text``/``visual``: decided by that confidence alone (ties go to local),
    every query is used. ``none``: both views for every query.

    Args:
        v_l: ``(...)`` visual confidence of the local view (max of its visual posterior).
        v_g: ``(...)`` visual confidence of the global view.
        t_l: ``(...)`` text confidence of the local view.
        t_g: ``(...)`` text confidence of the global view.
        condition: ``"both"``, ``"text"``, ``"visual"`` or ``"none"``.

    Returns:
        ``(local_reliable, global_reliable)`` bool tensors of shape ``(...)``.
    """
    if condition == "both":
        local = (v_l >= v_g) & (t_l >= t_g)
        return local, (v_l < v_g) & (t_l < t_g)
    if condition == "text":
        local = t_l >= t_g
        return local, ~local
    if condition == "visual":
        local = v_l >= v_g
        return local, ~local
    if condition == "none":
        every = torch.ones_like(v_l, dtype=torch.bool)
        return every, every.clone()
    raise ValueError(f"unknown condition {condition!r}; choose 'both', 'text', 'visual' or 'none'")


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``(E, Q), (E, Q) -> (E,)``; 0 for an episode whose weights are all zero, with a zero gradient there (dividing
    by a tiny number instead made the weights' gradient ``values / tiny`` = inf, and inf x 0 = NaN upstream)."""
    den = weights.sum(dim=-1)
    some = den > 0
    mean = (weights * values).sum(dim=-1) / torch.where(some, den, torch.ones_like(den))
    return torch.where(some, mean, torch.zeros_like(mean))


def distillation_terms(out: dict[str, Tensor], cfg: MDMFConfig) -> dict[str, Tensor]:
    """Per-direction distillation losses and reliability fractions.

    ``l2g`` is method.md §8's ``L_l->g`` (GTC teaches LTC: ``KL(P_g || P_l)`` over global-reliable
    queries, weights ``c_q = v_g + t_g``); ``g2l`` is ``L_g->l`` (LTC teaches GTC). Each is a
    weighted mean over the episode's reliable queries; for condition ``none`` (the paper gives no
    formula) it is the released code's unweighted **sum** over all the episode's queries. Then the
    mean over episodes. Nothing is detached (released code).

    Args:
        out: :class:`~mdmf_cache.models.mdmf.MDMF` output with ``p_visual_ltc``, ``p_visual_gtc``,
            ``p_text_ltc``, ``p_text_gtc``, each ``(E, Q, N)``.
        cfg: Head config (``condition``).

    Returns:
        Scalars ``l2g``, ``g2l``, and the fractions ``reliable_ltc``, ``reliable_gtc``.
    """
    p_l, p_g = out["p_visual_ltc"], out["p_visual_gtc"]  # (E, Q, N)
    v_l, v_g = p_l.max(dim=-1).values, p_g.max(dim=-1).values  # (E, Q)
    t_l, t_g = out["p_text_ltc"].max(dim=-1).values, out["p_text_gtc"].max(dim=-1).values  # (E, Q)
    local, glob = reliability_masks(v_l, v_g, t_l, t_g, cfg.condition)  # (E, Q) bool
    kl_l2g, kl_g2l = kl_div(p_g, p_l), kl_div(p_l, p_g)  # (E, Q) each
    if cfg.condition == "none":  # method.md §8: every query, unweighted, summed over the queries
        l2g, g2l = kl_l2g.sum(dim=-1), kl_g2l.sum(dim=-1)  # (E,)
    else:
        l2g = _weighted_mean(kl_l2g, glob * (v_g + t_g))  # (E,)
        g2l = _weighted_mean(kl_g2l, local * (v_l + t_l))
    return {
        "l2g": l2g.mean(),
        "g2l": g2l.mean(),
        "reliable_ltc": local.float().mean(),
        "reliable_gtc": glob.float().mean(),
    }


def distillation_loss(out: dict[str, Tensor], cfg: MDMFConfig) -> Tensor:
    """Mutual distillation loss for the configured direction (scalar, mean over episodes).

    ``bidirectional`` = ``l2g + g2l``; ``up-down`` = ``l2g`` only (GTC teaches LTC); ``down-up`` =
    ``g2l`` only (LTC teaches GTC). Zero when ``cfg.distill`` is False or a single view is used.

    Args:
        out: MDMF output (see :func:`distillation_terms`).
        cfg: Head config.

    Returns:
        Scalar.
    """
    if not cfg.distills:
        return out["logits"].new_zeros(())
    terms = distillation_terms(out, cfg)
    return _combine(terms, cfg)


def _combine(terms: dict[str, Tensor], cfg: MDMFConfig) -> Tensor:
    if cfg.direction == "up-down":
        return terms["l2g"]
    if cfg.direction == "down-up":
        return terms["g2l"]
    return terms["l2g"] + terms["g2l"]


def total_loss(out: dict[str, Tensor], labels: Tensor, cfg: MDMFConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = L_main + lam * L_dist``, each per episode and averaged over episodes.

    Nothing here waits for the device: the parts are returned as detached 0-dim tensors, so a
    training step does not pay a host sync per logged number. Convert many steps' parts at once
    with :func:`mean_parts` (one ``.tolist()``), e.g. at validation time.

    Args:
        out: MDMF output.
        labels: ``(E, Q)`` episode-class labels of the queries.
        cfg: Head config.

    Returns:
        The scalar loss (with its graph) and detached 0-dim tensor parts: ``main``, ``distill``,
        ``total`` and, when distillation is active, ``distill_l2g``, ``distill_g2l``,
        ``reliable_ltc``, ``reliable_gtc``.
    """
    main = main_loss(out["logits"], labels)
    parts: dict[str, Tensor] = {"main": main.detach()}
    if cfg.distills:
        terms = distillation_terms(out, cfg)
        distill = _combine(terms, cfg)
        parts.update({
            "distill_l2g": terms["l2g"].detach(),
            "distill_g2l": terms["g2l"].detach(),
            "reliable_ltc": terms["reliable_ltc"].detach(),
            "reliable_gtc": terms["reliable_gtc"].detach(),
        })
    else:
        distill = main.new_zeros(())
    loss = main + cfg.lam * distill
    parts["distill"] = distill.detach()
    parts["total"] = loss.detach()
    return loss, parts


def mean_parts(parts: list[dict[str, Tensor]]) -> dict[str, float]:
    """Mean of each loss part over steps, as Python floats, with a single device-to-host copy.

    Args:
        parts: :func:`total_loss` parts of several steps (the keys of the first step are used).

    Returns:
        ``{name: mean}`` (float64 mean of the float values); ``{}`` for an empty list.
    """
    if not parts:
        return {}
    keys = list(parts[0])
    table = torch.stack([torch.stack([p[k].float() for k in keys]) for p in parts]).tolist()  # (steps, keys)
    return {k: float(np.mean([row[i] for row in table])) for i, k in enumerate(keys)}
