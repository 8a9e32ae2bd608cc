"""What a sweep can fix or sweep: options named as in ``mdmf-cache train``, and the ``--space`` syntax.

The options are read from the ``TrainConfig`` dataclass and from the options dataclass of the swept
head (``--method``, MDMF by default), so a field added to either is fixable and sweepable without
changes here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from mdmf_cache.errors import ConfigError

# TrainConfig fields that belong to the sweep, not to a trial; ``method`` is fixed for a whole sweep.
_NOT_OPTIONS = ("cache", "out", "heads", "resume", "full")
# CLI names that differ from the field names, as in ``mdmf-cache train``: alias -> (field, invert).
_RENAMED: dict[str, tuple[str, bool]] = {"lambda": ("lam", False), "view": ("views", False),
                                         "otam-one-way": ("otam_bidirectional", True)}

#: Swept when ``--space`` is not given (minus whatever is fixed on the command line), for every head; the
#: head's own ``SPEC.space`` is added (MDMF: lambda, alpha-ltc, alpha-gtc, pps-temperature).
DEFAULT_SPACE: dict[str, str] = {
    "lr": "1e-5:1e-2:log",
    "dropout": "0:0.5",
    "episodes-per-step": "4|8|16|32",
    "episodes": "1000:10000:log",
}


def default_space(method: str = "mdmf") -> dict[str, str]:
    """The default sweep space of a head: :data:`DEFAULT_SPACE` plus the head's own (dropout only where it has one)."""
    from mdmf_cache import heads

    spec = heads.get(method)
    space = {**DEFAULT_SPACE, **spec.space}
    if not any(n.endswith("dropout") for n in spec.option_names):
        space.pop("dropout")
    return space

@dataclass(frozen=True)
class Option:
    """One sweepable option: its CLI name, the config fields it sets, its type and allowed values."""

    name: str
    targets: tuple[str, ...]  # "lr" (a TrainConfig field) or "heads.lam" (an MDMFConfig field)
    kind: type  # bool, int, float, str, or tuple (of ints: TRX's cardinalities)
    choices: tuple[Any, ...] | None = None
    invert: bool = False  # a flag that sets its bool field to False (--otam-one-way)

    def parse(self, text: Any) -> Any:
        """A value of this option from a command-line string (or a value of the right type)."""
        if not isinstance(text, str):
            value = text
        elif self.kind is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ConfigError(f"--{self.name} {text!r}: expected true or false")
            value = low in ("true", "1", "yes", "on")
        elif self.kind is tuple:  # "2,3" (or "(2, 3)") -> (2, 3)
            try:
                value = tuple(_int(v) for v in text.strip("()[] ").split(",") if v.strip())
            except ValueError as e:
                raise ConfigError(f"--{self.name} {text!r}: expected comma-separated integers like 2,3") from e
        else:
            try:
                value = self.kind(text) if self.kind is not int else _int(text)
            except ValueError as e:
                raise ConfigError(f"--{self.name} {text!r}: expected {self.kind.__name__}") from e
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"--{self.name} {text!r}: choose from {', '.join(map(str, self.choices))}")
        return value


def _int(text: str) -> int:
    """``"2000"`` or ``"2e3"`` as 2000; ``"2.5"`` is a ValueError."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _option_of(name: str, targets: tuple[str, ...], default: Any, hint: Any, invert: bool = False) -> Option:
    choices = tuple(get_args(hint)) if get_origin(hint) is Literal else None
    if choices:
        kind: type = type(choices[0])
    elif default is not None and default is not dataclasses.MISSING:
        kind = type(default)
    else:  # no default to read it from, e.g. ``int | None = None``: the first plain type of the hint
        plain = [a for a in (get_args(hint) or (hint,)) if a in (bool, int, float, str)]
        kind = plain[0] if plain else str
    return Option(name, targets, kind, choices, invert)


def sweep_options(method: str = "mdmf") -> dict[str, Option]:
    """Every option a trial of a ``method`` sweep can fix or sweep, by CLI name (TrainConfig fields, then the head's)."""
    from mdmf_cache import heads
    from mdmf_cache.configs import TrainConfig

    spec = heads.get(method)
    opts: dict[str, Option] = {}
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _NOT_OPTIONS:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            opts[f.name.replace("_", "-")] = _option_of(f.name.replace("_", "-"), (f.name,), default, hints[f.name])
    hints = get_type_hints(spec.options)
    fields = {f.name: f for f in dataclasses.fields(spec.options) if f.name in spec.option_names}
    renamed = {fld: (alias, invert) for alias, (fld, invert) in _RENAMED.items() if fld in fields}
    for f in fields.values():
        name, invert = renamed.get(f.name, (f.name.replace("_", "-"), False))
        opts.setdefault(name, _option_of(name, (f"heads.{f.name}",), f.default, hints[f.name], invert))
    dropouts = tuple(f"heads.{n}" for n in fields if n.endswith("dropout"))
    if dropouts and "dropout" not in opts:  # one value for every dropout of the head, as train --dropout
        first = dropouts[0][len("heads."):]
        opts["dropout"] = _option_of("dropout", dropouts, fields[first].default, hints[first])
    return opts


def option_of_field(name: str, opts: dict[str, Option]) -> str | None:
    """The option that sets the head field ``name`` (``lam`` -> ``lambda``): the one that sets it alone, else one
    that sets it with others (``dropout``); None if no option does."""
    target = f"heads.{name}"
    alone = next((o.name for o in opts.values() if o.targets == (target,)), None)
    return alone or next((o.name for o in opts.values() if target in o.targets), None)


def method_of(args: list[str] | dict[str, Any]) -> str:
    """The ``--method`` among fixed options (a sweep tunes one head), default mdmf."""
    if isinstance(args, dict):
        return str(args.get("method", "mdmf"))
    for i, arg in enumerate(args):
        if arg == "--method" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return "mdmf"


def _unknown(name: str, opts: dict[str, Option], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(opts), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown {what} {name!r}{hint}; see 'mdmf-cache sweep --help' for the names")


def parse_fixed(args: list[str], opts: dict[str, Option] | None = None) -> dict[str, Any]:
    """``--name value``, ``--name=value``, ``--flag`` and ``--no-flag`` pairs as {name: value}."""
    opts = opts or sweep_options(method_of(args))
    fixed: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are written --name value")
        key, _, text = arg[2:].partition("=")
        value: Any
        if key in opts and opts[key].kind is bool:
            value = opts[key].parse(text) if text else True
        elif key.startswith("no-") and key[3:] in opts and opts[key[3:]].kind is bool:
            key, value = key[3:], False
        elif key in opts:
            if not text:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{key} needs a value")
                i += 1
                text = args[i]
            value = opts[key].parse(text)
        else:
            raise _unknown(key, opts, "option --")
        fixed[key] = value
        i += 1
    return fixed


def check_fixed(fixed: dict[str, Any], opts: dict[str, Option] | None = None) -> dict[str, Any]:
    """Fixed option values (strings or typed values) checked and typed; an unknown name is a ConfigError."""
    opts = opts or sweep_options(method_of(fixed))
    for name in fixed:
        if name not in opts:
            raise _unknown(name, opts, "option --")
    return {name: opts[name].parse(value) for name, value in fixed.items()}


@dataclass(frozen=True)
class Dim:
    """One swept parameter: a float or int range (optionally log-scaled) or a list of values."""

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    @property
    def scale(self) -> str:
        return "categorical" if self.kind == "categorical" else "log" if self.log else "linear"

    def corners(self) -> list[Any]:
        """The values that must all be valid: both ends of a range, every listed value."""
        if self.kind == "categorical":
            return list(self.values)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def parse_space(spec: dict[str, str], opts: dict[str, Option] | None = None) -> list[Dim]:
    """``{"lr": "1e-5:1e-2:log", "episodes-per-step": "8|16"}`` as Dims; a bad name or range is a ConfigError."""
    opts = opts or sweep_options()
    dims = []
    for name, text in spec.items():
        if name not in opts:
            raise _unknown(name, opts, "parameter")
        opt = opts[name]
        if "|" in text:
            values = tuple(opt.parse(v.strip()) for v in text.split("|"))
            if len(set(values)) < 2:
                raise ConfigError(f"--space {name}={text}: list at least two different values")
            dims.append(Dim(name, "categorical", values=values))
            continue
        parts = text.split(":")
        if opt.kind not in (int, float) or opt.choices is not None:
            raise ConfigError(f"--space {name}={text}: {name} takes listed values, e.g. "
                              f"{name}={'|'.join(map(str, opt.choices or (True, False)))}")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
            raise ConfigError(f"--space {name}={text}: write LOW:HIGH, LOW:HIGH:log or A|B|C")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError as e:
            raise ConfigError(f"--space {name}={text}: LOW and HIGH must be numbers") from e
        log_scale = len(parts) == 3 and parts[2] == "log"
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"--space {name}={text}: LOW and HIGH must be finite numbers")
        if not low < high:
            raise ConfigError(f"--space {name}={text}: LOW must be below HIGH")
        if log_scale and low <= 0:
            raise ConfigError(f"--space {name}={text}: a log range needs LOW > 0")
        if opt.kind is int and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"--space {name}={text}: {name} is an integer")
        dims.append(Dim(name, "int" if opt.kind is int else "float", low, high, log_scale))
    return dims


def parse_space_text(text: str) -> dict[str, str]:
    """``"lr=1e-5:1e-2:log,lambda=0.1:2"`` as ``{"lr": "1e-5:1e-2:log", "lambda": "0.1:2"}``."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, eq, rng = item.partition("=")
        if not eq or not rng:
            raise ConfigError(f"--space item {item!r}: write NAME=LOW:HIGH[:log] or NAME=A|B|C")
        if name.strip() in out:
            raise ConfigError(f"--space names {name.strip()} twice ({name.strip()}={out[name.strip()]} and "
                              f"{item}); give each parameter once")
        out[name.strip()] = rng.strip()
    return out


def trial_config(base: dict[str, Any], values: dict[str, Any], opts: dict[str, Option]):
    """A TrainConfig: ``base`` (TrainConfig fields) with option values applied to their fields."""
    from mdmf_cache.configs import TrainConfig

    cfg = json.loads(json.dumps(base))  # deep copy
    heads = dict(cfg.get("heads") or {})
    for name, value in values.items():
        opt = opts[name]
        for target in opt.targets:
            v = (not value) if opt.invert else value
            if target.startswith("heads."):
                heads[target[6:]] = v
            else:
                cfg[target] = v
    cfg["heads"] = heads
    return TrainConfig(**cfg)
