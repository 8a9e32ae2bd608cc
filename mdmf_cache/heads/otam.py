"""OTAM (Cao et al., CVPR 2020), ordered temporal alignment, as the FSAR codebase releases it (``CNN_OTAM``).

What the released head computes (alibaba-mmai-research/CLIP-FSAR, ``models/base/few_shot.py``,
``CNN_OTAM``, ``OTAM_cum_dist``, ``cos_sim``; docs/heads.md has the details) on pooled per-frame
features ``(V, T, D)``:

* frame distances ``1 - cos`` between every query frame and every frame of **each support** (0.01
  added to the product of the norms): ``(Q, S, T, T)``;
* ``d(q, s) = OTAM(D) + OTAM(D^T)`` with lambda 0.1 in both directions (``OTAM_cum_dist``'s default);
* class distance = the **mean over the class's K supports** of ``d(q, s)`` (no prototype);
  logits = minus the class distance, no temperature; loss = cross-entropy averaged over the queries.

The head has no parameters: on a cache it is scored as it is (``mdmf-cache eval CACHE --method otam``);
``train --mode full --method otam`` fine-tunes CLIP through its loss, as the released code trains its
backbone.

The soft-min is :func:`mdmf_cache.layers.otam.otam` (a stable log-sum-exp, row by row), the released
recurrence cell by cell: the same value wherever the released naive ``log(sum(exp))`` is finite (where
every term underflows, about cumulative distances above 10 at lambda 0.1 in float32, the released one
returns ``inf``). Distances are computed in float32 (float64 stays float64) with autocast off.
Evaluation takes the direct path: nothing costly is done per video (the DP is per (query, support)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, with_correct
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import frame_distances, otam_distance

__all__ = ["OTAMOptions", "OTAM", "SPEC"]


@dataclass
class OTAMOptions:
    """OTAM's options; the defaults are the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        cos_eps: added to the product of norms in the cosine (``cos_sim``'s 0.01).
        otam_lambda: the soft-min temperature (``OTAM_cum_dist``'s 0.1).
    """

    dim: int
    num_frames: int = 8
    cos_eps: float = 0.01
    otam_lambda: float = 0.1

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.check(self, "otam_lambda", 0.0, low_open=True)
        problems.check(self, "cos_eps", 0.0)
        problems.raise_any()


class OTAM(FewShotHead):
    """The released ``CNN_OTAM`` head (see the module docstring); no parameters."""

    method = "otam"

    def __init__(self, options: OTAMOptions) -> None:
        super().__init__()
        self.options = options

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``: minus the mean OTAM distance to the class's supports. ``text`` only gives N."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        o = self.options
        with torch.autocast(support.device.type, enabled=False):
            sup, qry = at_least_float32(support), at_least_float32(query)
            dist = frame_distances(qry, sup, o.cos_eps)  # (E, Q, S, T, T): [query frame, support frame]
            pair = otam_distance(dist, o.otam_lambda, bidirectional=True)  # (E, Q, S)
            class_dist = pair.reshape(e, q, n, s // n).mean(dim=-1)  # class-major supports: mean over the K shots
        return with_correct({"logits": -class_dist}, query_labels)


SPEC = HeadSpec(
    name="otam",
    options=OTAMOptions,
    build=OTAM,
    summary="OTAM (CVPR 2020) as released: ordered temporal alignment to every support, no parameters",
    source="Cao et al., Few-shot video classification via temporal alignment, CVPR 2020; released code "
           "alibaba-mmai-research/CLIP-FSAR (CNN_OTAM). No released config: full mode trains with the shared "
           "loop's values (the run's shot, 5 queries per class)",
    per_video=False,
    parametric=False,
    train_shot=lambda k: k,
    train_queries=lambda k: 5,
)
