"""Configuration of the CLIP-MDMF heads: one dataclass holding every switch, plus named presets.

Two presets exist (docs/method.md §9):

* ``paper``: the method as described in the paper (Conv-ReLU-BN LTCE, learned position embeddings,
  mean-pooled PPS score, text compared at position 0, a tiny cosine eps). Where the paper is silent
  it takes the released code's values (PPS temperature, OTAM lambda and directions, summed CE, the
  MMFE's norms, heads and dropouts).
* ``reference``: the authors' released code, quirks included (linear LTCE, no position embeddings,
  top-4 frame PPS score, text compared at position 1, ``cos`` with 0.01 added to the product of
  norms everywhere).

Both draw the PPS class at test time as in training (seeded); ``pps_test="argmax"`` is an option.

Every preset switch is also an ordinary field, so ablations can mix them through
:func:`build_config` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.spec import Problems

__all__ = ["MDMFConfig", "PRESETS", "PRESET_DATA", "list_presets", "build_config"]

_CHOICES: dict[str, tuple[Any, ...]] = {
    "ltce": ("linear", "bn"),
    "pps_score": ("mean", "top4"),
    "pps_test": ("argmax", "sample"),
    "text_pos": (0, 1),
    "views": ("both", "ltc", "gtc", "ntc"),
    "condition": ("both", "text", "visual", "none"),
    "direction": ("bidirectional", "up-down", "down-up"),
}


@dataclass
class MDMFConfig:
    """Every switch of the CLIP-MDMF heads (defaults = the ``paper`` preset).

    Attributes:
        dim: Embedding width D (1024 for CLIP RN50, 512 for ViT-B/16).
        num_frames: Frames per video T.
        ltce: Local extractor: ``"linear"`` = Conv1d, Conv1d (released code); ``"bn"`` =
            Conv-ReLU-BN x2 (paper Eq. 3).
        pos_embed: Learned (T+1, D) position embeddings added to the MMFE inputs (paper only).
        pps: Probability Prompt Selector on; off gives all-zero query tokens.
        pps_score: ``"mean"`` = cos(mean-pooled query, text) (paper); ``"top4"`` = mean of the
            top-4 per-frame cosines (released code).
        pps_test: Rule at eval: ``"sample"`` (both presets: a seeded categorical draw, as in training)
            or ``"argmax"`` (an option of this project, not of either source).
        pps_temperature: Softmax temperature t of PPS (0.005, i.e. x200).
        pps_topk: Frames averaged by the ``top4`` score (clipped to T).
        text_pos: MMFE output position compared by the text posteriors: 0 = the token (paper),
            1 = the first frame (released code's slicing bug).
        cos_eps: Added to the product of norms in every cosine (0.01 in the released code).
        views: ``"both"`` (LTC + GTC with distillation) or a single view of Table 3: ``"ltc"``,
            ``"gtc"``, ``"ntc"`` (no extractor).
        distill: Mutual distillation between the two views on.
        condition: Reliability test: ``"both"`` (text and visual), ``"text"``, ``"visual"``,
            ``"none"`` (every query, both terms, unweighted).
        direction: ``"bidirectional"``; ``"up-down"`` = only GTC teaches LTC; ``"down-up"`` = only
            LTC teaches GTC.
        lam: Weight lambda of the distillation loss.
        alpha_ltc: Weight of the LTC distance in the logits.
        alpha_gtc: Weight of the GTC distance in the logits.
        otam_lambda: OTAM soft-min temperature.
        otam_bidirectional: OTAM(D) + OTAM(D^T) if True, else OTAM(D) only.
        mmfe_dropout: Dropout after the MMFE attention out projection.
        ffn_dropout: Dropout inside the MMFE feed-forward block (both places).
        tcn_dropout: Dropout inside the GTCE temporal blocks.
        ffn_dim: Hidden width of the MMFE feed-forward block.
        heads: Attention heads of the MMFE (head width D / heads).
        tcn_levels: Residual blocks of the GTCE TCN (dilations 1, 2, 4, ...).
        tcn_kernel: Kernel size of the GTCE convolutions.
    """

    dim: int
    num_frames: int = 8
    ltce: Literal["linear", "bn"] = "bn"
    pos_embed: bool = True
    pps: bool = True
    pps_score: Literal["mean", "top4"] = "mean"
    pps_test: Literal["argmax", "sample"] = "sample"
    pps_temperature: float = 0.005
    pps_topk: int = 4
    text_pos: Literal[0, 1] = 0
    cos_eps: float = 1e-8
    views: Literal["both", "ltc", "gtc", "ntc"] = "both"
    distill: bool = True
    condition: Literal["both", "text", "visual", "none"] = "both"
    direction: Literal["bidirectional", "up-down", "down-up"] = "bidirectional"
    lam: float = 1.0
    alpha_ltc: float = 1.0
    alpha_gtc: float = 1.0
    otam_lambda: float = 0.5
    otam_bidirectional: bool = True
    mmfe_dropout: float = 0.2
    ffn_dropout: float = 0.05
    tcn_dropout: float = 0.1
    ffn_dim: int = 2048
    heads: int = 8
    tcn_levels: int = 3
    tcn_kernel: int = 3

    def __post_init__(self) -> None:
        problems = Problems()
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                problems.add(name, value, f"choose from {', '.join(map(repr, choices))}")
        problems.data(self)
        problems.sizes(self, ("ffn_dim", "heads", "pps_topk", "tcn_levels", "tcn_kernel"))
        problems.heads_divide(self)
        problems.check(self, ("pps_temperature", "otam_lambda"), 0.0, low_open=True)
        # loss and distance weights: a negative one inverts its term
        problems.check(self, ("lam", "alpha_ltc", "alpha_gtc", "cos_eps"), 0.0)
        if self.views == "both" and self.alpha_ltc == 0 and self.alpha_gtc == 0:
            problems.add("alpha_gtc", self.alpha_gtc,
                         "alpha_ltc and alpha_gtc are both 0: the logits would not depend on the videos")
        problems.check(self, ("mmfe_dropout", "ffn_dropout", "tcn_dropout"), 0.0, 1.0, high_open=True)
        problems.raise_any()

    @property
    def view_names(self) -> tuple[str, ...]:
        """Names of the active views, e.g. ``("ltc", "gtc")``."""
        return ("ltc", "gtc") if self.views == "both" else (self.views,)

    @property
    def distills(self) -> bool:
        """Mutual distillation is part of the loss (both views, distillation on)."""
        return self.views == "both" and self.distill

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict copy (JSON serialisable)."""
        return dataclasses.asdict(self)


# Switches of docs/method.md §9 that concern the heads. Items equal in both presets are listed too, so
# a preset fully pins the method regardless of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "ltce": "bn",
        "pos_embed": True,
        "pps": True,
        "pps_score": "mean",
        "pps_test": "sample",
        "text_pos": 0,
        "cos_eps": 1e-8,
        "distill": True,
        "condition": "both",
        "direction": "bidirectional",
        "lam": 1.0,
    },
    "reference": {
        "ltce": "linear",
        "pos_embed": False,
        "pps": True,
        "pps_score": "top4",
        "pps_test": "sample",
        "text_pos": 1,
        "cos_eps": 0.01,
        "distill": True,
        "condition": "both",
        "direction": "bidirectional",
        "lam": 1.0,
    },
}

# Preset switches of the extract side (frame sampler, pixel normalisation), kept apart from the heads.
PRESET_DATA: dict[str, dict[str, str]] = {
    "paper": {"sampler": "tsn", "normalize": "clip"},
    "reference": {"sampler": "linspace", "normalize": "none"},
}


def list_presets() -> list[str]:
    """Names of the available presets, sorted."""
    return sorted(PRESETS)


def build_config(preset: str, dim: int, **overrides: Any) -> MDMFConfig:
    """Build the head config of a named preset, with optional per-field overrides.

    Args:
        preset: A name from :func:`list_presets`.
        dim: Embedding width D.
        **overrides: Any :class:`MDMFConfig` field except ``dim``, e.g. ``views="gtc"``.

    Returns:
        The config.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown preset, an unknown override key, or an
            invalid value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(list_presets())}")
    fields = {f.name for f in dataclasses.fields(MDMFConfig)} - {"dim"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown MDMFConfig option(s): {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}"
        )
    return MDMFConfig(dim=dim, **{**PRESETS[preset], **overrides})
