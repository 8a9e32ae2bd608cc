"""What a head file declares: :class:`HeadSpec`, and how a head's options are made from a preset, the data and overrides.

A head's options are a dataclass. Three kinds of fields:

* **data fields** ``dim`` (D), ``num_frames`` (T) and ``num_classes`` (C, the train split's classes):
  set from the data by whoever builds the head, never by the user;
* **released per-dataset or per-shot values** (a loss weight that the released configs set per
  dataset, a merge rule of the 5-shot configs): declared ``None`` by default and filled by the options
  class's ``resolve(data)`` method from :class:`DataInfo`; an explicit value always wins;
* everything else: plain defaults, which are the released code's.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mdmf_cache.errors import ConfigError

__all__ = ["DataInfo", "HeadSpec", "DATA_FIELDS"]

#: Option fields that come from the data, never from the user.
DATA_FIELDS = ("dim", "num_frames", "num_classes")


@dataclass(frozen=True)
class DataInfo:
    """What a head's options may take from the data and the run.

    Attributes:
        dim: D, the frame and text embedding width.
        num_frames: T frames per video.
        num_classes: C classes of the train split (heads with a classification layer).
        dataset: the cache's dataset name (``ucf101``, ``hmdb51``, ``kinetics100``, ``ssv2-small``,
            ``ssv2-full``, ``folder``), for values the released configs set per dataset.
        shot: K, the shot the run is for (the released 5-shot configs differ from the 1-shot ones).
    """

    dim: int
    num_frames: int = 8
    num_classes: int = 64
    dataset: str = ""
    shot: int = 5


def _one(k: int) -> int:
    return k


def _five(k: int) -> int:
    return 5


@dataclass(frozen=True)
class HeadSpec:
    """A registered head.

    Attributes:
        name: the ``--method`` name.
        options: the options dataclass (see the module docstring for its kinds of fields).
        build: ``options -> nn.Module``; the module has ``forward(support, query, text, query_labels=None,
            pps_noise=None, classes=None, class_text=None) -> dict`` (``"logits"`` ``(E, Q, N)``) and
            ``loss(out, labels, classes=None) -> (scalar, parts)``; with ``per_video`` also
            ``per_video(features, text, episodes, uniforms, batch_size)`` (see :mod:`mdmf_cache.heads.base`).
        summary: one line for ``--help`` and the tables.
        source: the paper and the released code it reproduces.
        per_video: evaluation splits into per-video work (the eval path that runs each video once).
        parametric: has trainable parameters (False: scored on a cache as it is; full mode fine-tunes CLIP).
        transductive: a query's logits depend on the other queries of its episode (the tables mark it).
        test_queries: the queries per class its released test episodes use, as a function of K, for a
            transductive head (its accuracy depends on them); None: the evaluation's own setting.
        presets: named option sets; the first is the default.
        space: the default sweep space of its options (``mdmf-cache sweep`` syntax, by CLI name).
        train_shot: the shot its released configs train with, for a run for K-shot.
        train_queries: the queries per class its released configs train with, for a run for K-shot.
    """

    name: str
    options: type
    build: Callable[[Any], Any]
    summary: str
    source: str
    per_video: bool
    parametric: bool = True
    transductive: bool = False
    test_queries: Callable[[int], int] | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"released": {}})
    space: Mapping[str, str] = field(default_factory=dict)
    train_shot: Callable[[int], int] = _one
    train_queries: Callable[[int], int] = _five

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))

    @property
    def option_names(self) -> tuple[str, ...]:
        """The options a user may set (everything but the data fields)."""
        return tuple(f.name for f in dataclasses.fields(self.options) if f.name not in DATA_FIELDS)

    def make_options(self, preset: str | None, overrides: Mapping[str, Any], data: DataInfo) -> Any:
        """The head's resolved options: the data fields, then the preset, then ``overrides``, then the
        released per-dataset/per-shot values for what is still unset.

        Raises:
            ConfigError: an unknown preset or option (the valid ones listed), or a bad value.
        """
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise ConfigError(f"--preset {preset!r}: {self.name} has {', '.join(self.presets)}")
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(overrides) - (names - set(DATA_FIELDS)))
        if unknown:
            raise ConfigError(f"unknown {self.name} option(s): {', '.join(unknown)}; {self.name} takes: "
                              f"{', '.join(self.option_names)}")
        given = {k: getattr(data, k) for k in DATA_FIELDS if k in names}
        try:
            opts = self.options(**{**given, **self.presets[preset], **overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.name} options: {e}") from e
        resolve = getattr(opts, "resolve", None)
        return resolve(data) if resolve is not None else opts

    def load_options(self, saved: Mapping[str, Any]) -> Any:
        """Options saved by :meth:`make_options` (a checkpoint's ``options``), as they were."""
        try:
            return self.options(**saved)
        except TypeError as e:
            raise ConfigError(f"{self.name}: saved options do not fit this version's ({e})") from e
