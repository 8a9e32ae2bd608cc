"""Training-free baselines on cached features: a floor every dataset's trained heads must beat.

Each takes episode tensors and returns logits (E, Q, N), higher = more likely:
- ``zero-shot``: CLIP zero-shot, the query's mean frame embedding against the class prompts.
- ``protonet``: cosine of the mean-pooled query to the mean of the class's mean-pooled supports.

OTAM and TSN as the FSAR codebase releases them are registered heads without parameters
(:mod:`mdmf_cache.heads.otam`, :mod:`mdmf_cache.heads.tsn`), scored on a cache the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mdmf_cache.choices import BASELINES  # noqa: E402  (declared once)


def zero_shot(support: Tensor, query: Tensor, text: Tensor) -> Tensor:
    """support (E, S, T, D) unused; query (E, Q, T, D); text (E, N, D) -> (E, Q, N)."""
    q = F.normalize(query.mean(dim=2), dim=-1)  # (E, Q, D)
    t = F.normalize(text, dim=-1)  # (E, N, D)
    return q @ t.transpose(1, 2)


def _prototypes(support: Tensor, way: int) -> Tensor:
    e, s, t, d = support.shape
    return support.view(e, way, s // way, t, d).mean(dim=2)  # (E, N, T, D)


def protonet(support: Tensor, query: Tensor, text: Tensor) -> Tensor:
    """Cosine of mean-pooled query to the class mean of mean-pooled supports: (E, Q, N)."""
    way = text.shape[1]
    proto = F.normalize(_prototypes(support, way).mean(dim=2), dim=-1)  # (E, N, D)
    q = F.normalize(query.mean(dim=2), dim=-1)  # (E, Q, D)
    return q @ proto.transpose(1, 2)


def get_baseline(name: str):
    table = {"zero-shot": zero_shot, "protonet": protonet}
    if name not in table:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return table[name]


@torch.no_grad()
def baseline_logits(name: str, support: Tensor, query: Tensor, text: Tensor) -> Tensor:
    return get_baseline(name)(support, query, text)
