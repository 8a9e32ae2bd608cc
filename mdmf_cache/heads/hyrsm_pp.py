"""HyRSM++ (Wang et al., arXiv 2301.03330), HyRSM with a temporal-coherence regulariser, as its authors released it.

The released ``CNN_HyRSM_plusplus_1shot`` / ``_5shot`` heads (alibaba-mmai-research/CLIP-FSAR,
``models/base/few_shot.py``) compute HyRSM's logits unchanged (:mod:`mdmf_cache.heads.hyrsm`, whose module
this one extends) and, from the same post-``layer2`` frames, a regulariser on each video's frame
self-distances ``A = 1 - n(x) n(x)^T`` (T x T, ``n = F.normalize``) with two fixed T x T matrices,
``W`` the window:

* ``w_ij = 1 / ((i - j)^2 + 1)`` where ``|i - j| <= W``, else ``1 - exp(-(|i - j| - W)^2 / TEMPORAL_BALANCE)``;
* ``m_ij = 1`` where ``|i - j| <= W``, else 0;

``L_temp = mean[A m w + beta (1 - m) relu(w - A)]`` over every support copy as each query sees it (``Q S``
of them in the 1-shot form, ``Q N`` prototypes in the 5-shot form: a support enters once per query) and
every T x T entry, plus the same mean over the ``Q`` queries; ``beta = BALANCE_COEFFICIENT``.

Loss: ``TEMPORAL_LOSS_WEIGHT x L_temp`` + HyRSM's loss (query cross-entropy + ``USE_CLASSIFICATION_VALUE`` x
the per-frame cross-entropy), with the released per-dataset values (:data:`RELEASED`). The released code
computes ``L_temp`` at evaluation too and never uses it there; this module computes it in training only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from mdmf_cache.heads.hyrsm import HyRSM, HyRSMOptions, released_train_queries
from mdmf_cache.heads.spec import HeadSpec, Problems

__all__ = ["HyRSMPlusPlusOptions", "HyRSMPlusPlus", "RELEASED", "temporal_matrices", "SPEC"]

_COMMON = {"window": 3, "temporal_balance": 23.0, "balance_coeff": 10.0}
#: The released configs' per-dataset values (``configs/projects/hyrsmplusplus/<dataset>/HyRSMplusplus_*_{1..5}shot_v1
#: .yaml`` of alibaba-mmai-research/CLIP-FSAR; the same for every shot): ``USE_CLASSIFICATION_VALUE``,
#: ``POSITION_A`` / ``POSITION_B`` (10 / 1 where unset), ``WINDOW_SIZE``, ``TEMPORAL_BALANCE``,
#: ``BALANCE_COEFFICIENT`` and ``TEMPORAL_LOSS_WEIGHT``. A folder dataset takes UCF101's (as HyRSM's).
RELEASED: dict[str, dict[str, float]] = {
    "hmdb51": {"class_loss_weight": 0.15, "position_a": 50.0, "position_b": 1.0, "window": 1,
               "temporal_balance": 51.0, "balance_coeff": 20.0, "temporal_loss_weight": 0.2},
    "ucf101": {"class_loss_weight": 0.6, "position_a": 10.0, "position_b": 1.0, **_COMMON, "temporal_loss_weight": 0.1},
    "kinetics100": {"class_loss_weight": 0.1, "position_a": 10.0, "position_b": 1.0, **_COMMON,
                    "temporal_loss_weight": 0.1},
    "ssv2-full": {"class_loss_weight": 0.6, "position_a": 10.0, "position_b": 1.0, "window": 1,
                  "temporal_balance": 51.0, "balance_coeff": 10.0, "temporal_loss_weight": 0.3},
    "ssv2-small": {"class_loss_weight": 0.2, "position_a": 10.0, "position_b": 1.0, **_COMMON,
                   "temporal_loss_weight": 0.3},
}


@dataclass
class HyRSMPlusPlusOptions(HyRSMOptions):
    """HyRSM++'s options: HyRSM's (:class:`~mdmf_cache.heads.hyrsm.HyRSMOptions`, with this head's per-dataset
    values) and the regulariser's; None: the released config's for the dataset (:data:`RELEASED`).

    Attributes:
        window: W, the window of ``m`` and ``w`` in frames (``WINDOW_SIZE``).
        temporal_balance: the width of ``w`` outside the window (``TEMPORAL_BALANCE``).
        balance_coeff: beta, the weight of the outside-window hinge (``BALANCE_COEFFICIENT``).
        temporal_loss_weight: the weight of ``L_temp`` in the loss (``TEMPORAL_LOSS_WEIGHT``).
    """

    RELEASED: ClassVar[dict[str, dict[str, float]]] = RELEASED

    window: int | None = field(default=None, metadata={"min": 0})  # 0: no window
    temporal_balance: float | None = None
    balance_coeff: float | None = None
    temporal_loss_weight: float | None = None

    def problems(self) -> Problems:
        problems = super().problems()
        problems.check(self, "window", 0.0)
        problems.check(self, "temporal_balance", 0.0, low_open=True)
        problems.check(self, ("balance_coeff", "temporal_loss_weight"), 0.0)
        return problems


def temporal_matrices(num_frames: int, window: int, balance: float) -> tuple[Tensor, Tensor]:
    """The released fixed ``(T, T)`` matrices ``w`` and ``m`` (float32, as built there; see the module docstring)."""
    gap = (torch.arange(num_frames)[:, None] - torch.arange(num_frames)[None]).double()  # i - j
    inside = gap.abs() <= window
    outside = 1.0 - torch.exp((-((gap.abs() - window) ** 2) / balance).float())  # exp in float32, as released
    return torch.where(inside, (1.0 / (gap ** 2 + 1.0)).float(), outside), inside.float()


class HyRSMPlusPlus(HyRSM):
    """The released HyRSM++ head: HyRSM's forward plus the regulariser ``"temporal"`` ``(E,)`` in training."""

    method = "hyrsm++"

    def __init__(self, options: HyRSMPlusPlusOptions) -> None:
        super().__init__(options)
        o = options
        if None in (o.window, o.temporal_balance, o.balance_coeff, o.temporal_loss_weight):
            raise ValueError("HyRSM++ options must be resolved (HeadSpec.make_options) before building the head")
        w, m = temporal_matrices(o.num_frames, o.window, o.temporal_balance)
        self.register_buffer("temporal_w", w)  # (T, T)
        self.register_buffer("temporal_m", m)  # (T, T)

    def coherence(self, x: Tensor) -> Tensor:
        """``[A m w + beta (1 - m) relu(w - A)]`` of every video ``(..., T, D) -> (..., T, T)``."""
        n = F.normalize(x, dim=-1)
        a = 1.0 - n @ n.transpose(-1, -2)  # (..., T, T) frame self-distances
        w, m = self.temporal_w.to(a.dtype), self.temporal_m.to(a.dtype)
        return a * m * w + self.options.balance_coeff * (1.0 - m) * F.relu(w - a)

    def extra_terms(self, support_out: Tensor, query_out: Tensor) -> dict[str, Tensor]:
        """``L_temp`` per episode ``(E,)`` from the support copies ``(E, Q, M, T, D)`` and queries ``(E, Q, T, D)``."""
        e = support_out.shape[0]
        return {"temporal": self.coherence(support_out).reshape(e, -1).mean(dim=1)
                + self.coherence(query_out).reshape(e, -1).mean(dim=1)}

    def extra_loss(self, out: dict[str, Tensor], total: Tensor, parts: dict[str, Tensor]) -> Tensor:
        if "temporal" not in out:
            return total
        temporal = out["temporal"].mean()  # mean over the episodes
        parts["temporal"] = temporal.detach()
        return total + self.options.temporal_loss_weight * temporal


SPEC = HeadSpec(
    name="hyrsm++",
    options=HyRSMPlusPlusOptions,
    build=HyRSMPlusPlus,
    summary="HyRSM++ as released: HyRSM plus a temporal-coherence regulariser on each video's frame self-distances",
    source="Wang et al., HyRSM++: Hybrid relation guided temporal set matching for few-shot action recognition "
           "(arXiv 2301.03330); released code alibaba-mmai-research/CLIP-FSAR "
           "models/base/few_shot.py (CNN_HyRSM_plusplus_1shot, CNN_HyRSM_plusplus_5shot), configs/projects/hyrsmplusplus",
    per_video=False,  # HyRSM's set module: every support depends on the query and the whole episode
    space={"class-loss-weight": "0:1", "temporal-loss-weight": "0:1"},
    train_shot=lambda k: k,
    train_queries=released_train_queries,  # QUERY_PER_CLASS 8 - K
)
