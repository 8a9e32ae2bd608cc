"""The few-shot heads: one file each in this package, plus one entry in :data:`REGISTRY` below.

Every command reads this table: ``train`` (fast and full mode), ``eval``, ``ablate``, ``sweep``,
``compare``, ``predict`` and the CLI's ``--method`` choices. A head file defines the head's options
(a small dataclass), its ``nn.Module`` (``forward`` and ``loss``), whether its evaluation splits into
per-video work, and a module-level ``SPEC`` (:class:`~mdmf_cache.heads.spec.HeadSpec`) that ties them
together. Adding a head is writing that file and adding its line here (docs/architecture.md).

Importing this package imports neither torch nor a head: the table holds module names, and
:func:`get` imports a head's module the first time it is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mdmf_cache.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mdmf_cache.heads.spec import HeadSpec

__all__ = ["Entry", "REGISTRY", "METHODS", "FEATURE_METHODS", "get", "parameter_free"]


@dataclass(frozen=True)
class Entry:
    """One registered head: its ``--method`` name, the module holding its ``SPEC``, and a line for ``--help``."""

    name: str
    module: str
    summary: str
    parametric: bool = True  # False: no trainable parameters (scored on a cache directly; full mode fine-tunes CLIP)
    tokens: bool = False  # reads cached tokens (its SPEC.tokens set): needs a cache extracted with --tokens


REGISTRY: dict[str, Entry] = {e.name: e for e in (
    Entry("mdmf", "mdmf_cache.heads.mdmf", "CLIP-MDMF: prompt selector, two temporal views, MMFE fusion, OTAM, mutual distillation"),
    Entry("clip-fsar", "mdmf_cache.heads.clip_fsar", "CLIP-FSAR (IJCV 2023) as released: text-conditioned supports, temporal transformer, OTAM"),
    Entry("hyrsm", "mdmf_cache.heads.hyrsm", "HyRSM (CVPR 2022) as released: 1-shot and 5-shot forms, per-query set attention, Bi-MHM"),
    Entry("hyrsm++", "mdmf_cache.heads.hyrsm_pp", "HyRSM++ as released: HyRSM plus the temporal-coherence regulariser"),
    Entry("cpm2c", "mdmf_cache.heads.cpm2c", "CLIP-CPM2C (Neurocomputing 2025) as released: text-consistent query token, motion stream, OTAM"),
    Entry("clip-mei", "mdmf_cache.heads.clip_mei", "CLIP-MEI (KBS 2025) as released, test label leak removed: QSA tokens, transductive TFE, MIC, OTAM"),
    Entry("molo", "mdmf_cache.heads.molo", "MoLo (CVPR 2023) as released on cached spatial maps: motion branch, Bi-MHM, long-short contrast; no reconstruction", tokens=True),
    Entry("trx", "mdmf_cache.heads.trx", "TRX (CVPR 2021) as released: cross-transformers over frame pairs and triples"),
    Entry("strm", "mdmf_cache.heads.strm", "STRM (CVPR 2022) as released, on cached patch maps: patch attention, frame MLP-mixing, TRX", tokens=True),
    Entry("mpl", "mdmf_cache.heads.mpl", "MPL as released: query-augmented supports, shot attention, match-guided key frames"),
    Entry("team", "mdmf_cache.heads.team", "TEAM (CVPR 2025) as released: pattern tokens, class-adapted supports, no alignment"),
    Entry("emp-net", "mdmf_cache.heads.emp_net", "EMP-Net (ECCV 2024) as released on cached ViT tokens: skip fusion, multi-level reasoning, text and OTAM matching", tokens=True),
    Entry("chamfer", "mdmf_cache.heads.chamfer", "Chamfer++ (2023) as released: frame triples, joint symmetric Chamfer; matching=... switches"),
    Entry("otam", "mdmf_cache.heads.otam", "OTAM (CVPR 2020) as released: ordered temporal alignment to every support",
          parametric=False),
    Entry("tsn", "mdmf_cache.heads.tsn", "TSN (ECCV 2016) as released: mean-pooled videos, mean cosine to every support",
          parametric=False),
)}

#: Every ``--method`` a run can be trained or scored with.
METHODS: tuple[str, ...] = tuple(REGISTRY)
#: The heads of the cached features alone: ``compare``'s default set (a token head is compared when named, on a
#: cache with its token arrays).
FEATURE_METHODS: tuple[str, ...] = tuple(name for name, e in REGISTRY.items() if not e.tokens)


def parameter_free() -> tuple[str, ...]:
    """Heads without trainable parameters: scored on a cache as they are (like the baselines)."""
    return tuple(name for name, e in REGISTRY.items() if not e.parametric)


def get(name: str) -> "HeadSpec":
    """The spec of the head registered as ``name``; an unknown name is a ConfigError listing the known ones."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown method {name!r}; registered heads: {', '.join(METHODS)}")
    spec = importlib.import_module(entry.module).SPEC
    if spec.name != name:  # a copied file whose SPEC kept another head's name
        raise ConfigError(f"{entry.module}.SPEC is named {spec.name!r}, registered as {name!r}")
    return spec
