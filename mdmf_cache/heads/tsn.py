"""TSN (Wang et al., ECCV 2016) as a few-shot head, as the FSAR codebase releases it (``CNN_TSN``).

What the released head computes (alibaba-mmai-research/CLIP-FSAR, ``models/base/few_shot.py``,
``CNN_TSN``, ``cos_sim``; docs/heads.md has the details) on pooled per-frame features ``(V, T, D)``:
the mean over the T frames of every video; the cosine (0.01 added to the product of the norms) of each
query to **each support**; the class score = the mean over the class's K supports of those cosines;
logits = the scores themselves (raw cosines in [-1, 1], no temperature); loss = cross-entropy averaged
over the queries. (The released ``norm_sq_dist`` branch is switched off there, and is not built here.)

The head has no parameters: on a cache it is scored as it is (``mdmf-cache eval CACHE --method tsn``);
``train --mode full --method tsn`` fine-tunes CLIP through its loss. Evaluation takes the direct path
(one mean vector per video and a cosine per pair: nothing worth caching). Cosines are computed in
float32 (float64 stays float64) with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mdmf_cache.heads.base import FewShotHead, check_episode_shapes, with_correct
from mdmf_cache.heads.spec import HeadSpec, Problems
from mdmf_cache.device import at_least_float32
from mdmf_cache.layers.otam import cosine_similarity

__all__ = ["TSNOptions", "TSN", "SPEC"]


@dataclass
class TSNOptions:
    """TSN's options; the default is the released code's.

    Attributes:
        dim: D (data).
        num_frames: T (data).
        cos_eps: added to the product of norms in the cosine (``cos_sim``'s 0.01).
    """

    dim: int
    num_frames: int = 8
    cos_eps: float = 0.01

    def __post_init__(self) -> None:
        problems = Problems()
        problems.data(self)
        problems.check(self, "cos_eps", 0.0)
        problems.raise_any()


class TSN(FewShotHead):
    """The released ``CNN_TSN`` head (see the module docstring); no parameters."""

    method = "tsn"

    def __init__(self, options: TSNOptions) -> None:
        super().__init__()
        self.options = options

    def forward(self, support: Tensor, query: Tensor, text: Tensor, query_labels: Tensor | None = None,
                pps_noise: Tensor | None = None, classes: Tensor | None = None,
                class_text: Tensor | None = None) -> dict[str, Tensor]:
        """``"logits"`` ``(E, Q, N)``: the mean cosine to the class's supports. ``text`` only gives N."""
        e, s, q, n, t, d = check_episode_shapes(support, query, text)
        with torch.autocast(support.device.type, enabled=False):
            sup = at_least_float32(support).mean(dim=2)  # (E, S, D)
            qry = at_least_float32(query).mean(dim=2)  # (E, Q, D)
            sim = cosine_similarity(qry, sup, self.options.cos_eps)  # (E, Q, S)
            scores = sim.reshape(e, q, n, s // n).mean(dim=-1)  # class-major supports: mean over the K shots
        return with_correct({"logits": scores}, query_labels)


SPEC = HeadSpec(
    name="tsn",
    options=TSNOptions,
    build=TSN,
    summary="TSN (ECCV 2016) as released: mean-pooled videos, mean cosine to every support, no parameters",
    source="Wang et al., Temporal segment networks, ECCV 2016, as the few-shot baseline of the released code "
           "alibaba-mmai-research/CLIP-FSAR (CNN_TSN). No released config: full mode trains with the shared "
           "loop's values (the run's shot, 5 queries per class)",
    per_video=False,
    parametric=False,
    train_shot=lambda k: k,
    train_queries=lambda k: 5,
)
