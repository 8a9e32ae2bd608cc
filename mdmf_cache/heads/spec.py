"""What a head file declares: :class:`HeadSpec`, and how a head's options are made from a preset, the data and overrides.

A head's options are a dataclass. Three kinds of fields:

* **data fields** ``dim`` (D), ``num_frames`` (T) and ``num_classes`` (C, the train split's classes):
  set from the data by whoever builds the head, never by the user;
* **released per-dataset or per-shot values** (a loss weight that the released configs set per
  dataset, a merge rule of the 5-shot configs): declared ``None`` by default and filled by the options
  class's ``resolve(data)`` method from :class:`DataInfo`; an explicit value always wins;
* everything else: plain defaults, which are the released code's.

Every option value is checked in one place, :meth:`HeadSpec.make_options`, which train, eval, compare, sweep,
ablate and the API all pass through: first the rules every head shares, read from the field's type
(:func:`shared_problems`: a float is a finite number, an int is a size >= 1, a ``Literal`` one of its values;
a field's ``metadata`` may say otherwise: ``{"min": 0}`` for a count that may be 0), then the head's own ranges
in its options' ``__post_init__`` (a :class:`Problems` list raised as an :class:`OptionError`). Every message
names the option as the user writes it (``--head-opt NAME=VALUE``), never a data field's value as if it were one.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

from mdmf_cache.errors import ConfigError
from mdmf_cache.tokens import TokenInfo

__all__ = ["DataInfo", "HeadSpec", "DATA_FIELDS", "OptionError", "Problems", "shared_problems", "head_opt_flag"]

#: Option fields that come from the data, never from the user (the token fields: a token head's, from the
#: cache's token arrays, :class:`~mdmf_cache.tokens.TokenInfo`).
DATA_FIELDS = ("dim", "num_frames", "num_classes", "token_dim", "token_layers", "token_grid", "token_cls")
#: How a message names a data field's value (the user never sets one).
DATA_LABELS = {"dim": "the features' width D", "num_frames": "the frames per video T",
               "num_classes": "the train split's classes C", "token_dim": "the cached tokens' width Dt",
               "token_layers": "the cached token layers L", "token_grid": "the cached token grid",
               "token_cls": "the cached tokens' class token"}


def head_opt_flag(name: str, value: Any) -> str:
    """How ``train``, ``compare``, ``ablate`` and the API name a head option: ``--head-opt NAME=VALUE``."""
    return f"--head-opt {name}={_text(value)}"


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


class OptionError(ConfigError):
    """Head options that cannot be used: ``problems`` holds (option, value, why) triples; the one-line message
    names each option with ``flag`` (``--head-opt NAME=VALUE`` by default; a sweep names its own)."""

    def __init__(self, problems: Iterable[tuple[str, Any, str]], method: str = "") -> None:
        self.problems = list(problems)
        self.method = method
        super().__init__(self.text())

    def text(self, flag: Callable[[str, Any], str] = head_opt_flag) -> str:
        parts = [f"{DATA_LABELS[n]} is {_text(v)}: {why}" if n in DATA_FIELDS else f"{flag(n, v)}: {why}"
                 for n, v, why in self.problems]
        return (f"{self.method} options: " if self.method else "") + "; ".join(parts)


class Problems(list):
    """What is wrong with a head's options, as (option, value, why); an option is reported once (its first problem)."""

    def add(self, name: str, value: Any, why: str) -> None:
        if all(n != name for n, _, _ in self):
            self.append((name, value, why))

    def check(self, opts: Any, names: str | Iterable[str], low: float = -math.inf, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> None:
        """Each option in ``names`` (None passes: an unset released value) a finite number within the bounds."""
        for name in [names] if isinstance(names, str) else names:
            value = getattr(opts, name)
            if value is None:
                continue
            ok = _number(value) and math.isfinite(value) and (value > low if low_open else value >= low) \
                and (value < high if high_open else value <= high)
            if not ok:
                self.add(name, value, _interval(low, high, low_open, high_open))

    def sizes(self, opts: Any, names: Iterable[str]) -> None:
        """Each option in ``names`` (None passes) an integer >= 1."""
        for name in names:
            value = getattr(opts, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                self.add(name, value, "must be an integer >= 1 (a size)")

    def heads_divide(self, opts: Any, name: str = "heads") -> None:
        """``opts.heads`` attention heads split the width D (head width D / heads)."""
        value = getattr(opts, name)
        if isinstance(value, int) and value >= 1 and opts.dim % value:
            self.add(name, value, f"must divide the features' width D={opts.dim} (head width D / {name})")

    def data(self, opts: Any, min_frames: int = 1) -> None:
        """The data fields: D >= 1, T >= ``min_frames``, C >= 1 (where the options have them)."""
        for name, low in (("dim", 1), ("num_frames", min_frames), ("num_classes", 1)):
            value = getattr(opts, name, None)
            if value is not None and value < low:
                self.add(name, value, f"must be >= {low}")

    def raise_any(self) -> None:
        if self:
            raise OptionError(self)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    def num(x: float) -> str:
        return f"{x:g}"

    if high == math.inf:
        return f"must be a finite number {'>' if low_open else '>='} {num(low)}" if low > -math.inf \
            else "must be a finite number"
    if low == -math.inf:
        return f"must be a finite number {'<' if high_open else '<='} {num(high)}"
    return f"must be in {'(' if low_open else '['}{num(low)}, {num(high)}{')' if high_open else ']'}"


def shared_problems(options: type, values: Mapping[str, Any]) -> Problems:
    """The rules every head's options share, read from each field's type (module docstring); data fields skipped."""
    hints = typing.get_type_hints(options)
    problems = Problems()
    for f in dataclasses.fields(options):
        if f.name in DATA_FIELDS or f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None:
            if type(None) not in args:
                problems.add(f.name, value, "must be set")
            continue
        kinds = [a for a in args if a is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else None
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if value not in choices or type(value) is bool and bool not in map(type, choices):
                problems.add(f.name, value, f"choose {' or '.join(map(_text, choices))}")
        elif kind is bool:
            if not isinstance(value, bool):
                problems.add(f.name, value, "must be true or false")
        elif kind is int:
            low = f.metadata.get("min", 1)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                problems.add(f.name, value, f"must be an integer >= {low}"
                             + (" (a size)" if low == 1 else ""))
        elif kind is float:
            if not _number(value):
                problems.add(f.name, value, "must be a number")
            elif not math.isfinite(value) and f.metadata.get("finite", True):
                problems.add(f.name, value, "must be a finite number")
        elif typing.get_origin(kind) is tuple:  # of ints (TRX's cardinalities): sizes
            if not (isinstance(value, (tuple, list)) and value
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
                problems.add(f.name, value, "must be one or more integers >= 1, e.g. 2,3")
    return problems


def as_tuples(options: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with a list given to a tuple field (TRX's cardinalities, the token grid) made a tuple: what a JSON
    file or a sweep's space hands over, so every head's options hold one type whatever their source."""
    hints = typing.get_type_hints(options)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if isinstance(value, list) and any(typing.get_origin(k) is tuple for k in kinds):
            out[name] = tuple(value)
    return out


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
        tokens: what the cache's token arrays hold, for a head that reads tokens (None: no token arrays, or a
            head of pooled features); its fields reach the options as ``token_dim`` (Dt), ``token_layers`` (L),
            ``token_grid`` ((h, w)) and ``token_cls``.
    """

    dim: int
    num_frames: int = 8
    num_classes: int = 64
    dataset: str = ""
    shot: int = 5
    tokens: TokenInfo | None = None

    @property
    def token_dim(self) -> int | None:
        return None if self.tokens is None else self.tokens.dim

    @property
    def token_layers(self) -> int | None:
        return None if self.tokens is None else len(self.tokens.layers)

    @property
    def token_grid(self) -> tuple[int, int] | None:
        return None if self.tokens is None else self.tokens.grid

    @property
    def token_cls(self) -> bool | None:
        return None if self.tokens is None else self.tokens.cls


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
        tokens: for a head that reads cached tokens, the ``extract --tokens`` SPEC its released form reads
            (on ViT-B/16), named in the one-line error for a cache without token arrays; its ``forward`` then
            also takes ``support_tokens`` / ``query_tokens`` (:mod:`mdmf_cache.heads.base`). None: pooled
            features only.
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
    tokens: str | None = None

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
        values = {**given, **self.presets[preset], **overrides}
        problems = shared_problems(self.options, values)
        if problems:
            raise OptionError(problems, self.name)
        try:
            opts = self.options(**as_tuples(self.options, values))
        except OptionError as e:
            raise OptionError(e.problems, self.name) from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.name} options: {e}") from e
        resolve = getattr(opts, "resolve", None)
        return resolve(data) if resolve is not None else opts

    def load_options(self, saved: Mapping[str, Any]) -> Any:
        """Options saved by :meth:`make_options` (a checkpoint's ``options``), as they were."""
        try:
            return self.options(**as_tuples(self.options, saved))
        except TypeError as e:
            raise ConfigError(f"{self.name}: saved options do not fit this version's ({e})") from e
