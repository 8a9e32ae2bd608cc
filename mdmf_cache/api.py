"""The Python API: what a notebook needs, with the CLI's defaults (docs/python-api.md).

Every function takes the config dataclass of its command or that dataclass's fields as keyword
arguments, so a default is defined once (:mod:`mdmf_cache.configs` and the recipes' configs) and the
CLI and this API cannot drift apart::

    import mdmf_cache as mc

    cache = mc.extract(dataset="ucf101", root="~/data/UCF-101", model="RN50", pretrained="openai")
    run = mc.train(cache=cache, out="runs/ucf_rn50", shot=5)
    print(run.score(shot=5, episodes=10000).summary())

Nothing prints except the progress bars a call shows when ``progress=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from mdmf_cache.configs import EVAL_QUERIES, EvalConfig, ExtractConfig, TrainConfig
from mdmf_cache.errors import ConfigError

__all__ = ["extract", "open_cache", "load_split", "episode_list", "train", "evaluate", "ablate", "compare", "sweep",
           "predict", "runs", "Run", "load_run", "list_heads"]


def _config(cls, cfg, kwargs: dict[str, Any]):
    """``cfg`` with ``kwargs`` applied, or ``cls(**kwargs)``; unknown names are a TypeError naming them, and each value
    is taken in its natural Python type (:func:`_natural`)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    kwargs = {k: _natural(k, v, hints[k]) for k, v in kwargs.items()}
    return replace(cfg, **kwargs) if cfg is not None else cls(**kwargs)


def _natural(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field ``name`` of type ``hint`` stores it: a Path for a ``str``; a comma-separated string, a
    list or one item for a ``tuple[X, ...]``; a whole float for an ``int``. Anything else of the wrong type is a
    ConfigError naming the argument."""
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    if value is None and type(None) in get_args(hint):
        return None
    want = args[0] if len(args) == 1 else None
    origin = get_origin(want)
    if origin is tuple:
        item = get_args(want)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float, Path)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: a list of {item.__name__} (or one, or a comma-separated string) is "
                              "expected")
        return tuple(_natural(name, v, item) for v in value)
    if want is str and isinstance(value, Path):
        return str(value)
    if want is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{name}={value!r}: a whole number is expected")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want in (int, float, str, bool) and not isinstance(value, want):
        raise ConfigError(f"{name}={value!r}: a {want.__name__} is expected")
    return value


def extract(cfg: ExtractConfig | None = None, progress: bool = False, **kwargs: Any) -> Path:
    """Build or extend a cache (``mdmf-cache extract``); returns its path. Fields: :class:`ExtractConfig`."""
    from pipelines.extract import run

    cfg = _config(ExtractConfig, cfg, {"progress": progress, **kwargs})
    return run(cfg, show=False)[0]


def open_cache(path: str | Path):
    """A cache for reading (:class:`~mdmf_cache.store.cache.CacheStore`): ``.splits``, ``.fingerprint``, ``.split_summary(name)``."""
    from mdmf_cache.store.cache import CacheStore

    return CacheStore(path)


def load_split(cache: str | Path, split: str = "test", device: str = "cpu"):
    """A split's features in memory (:class:`~mdmf_cache.store.read.FeatureSplit`: features ``(N, V, T, D)`` float16,
    labels, video ids, class names, prompt embeddings ``(C, D)``)."""
    from mdmf_cache.store.read import load_split_features

    return load_split_features(cache, split, device=device)


def episode_list(split, way: int = EvalConfig.way, shot: int = 5, episodes: int = EvalConfig.episodes,
                 queries_per_class: int = EVAL_QUERIES, seed: int = EvalConfig.seed):
    """The seeded episode list ``eval`` scores (the same arguments give the same episodes)."""
    from mdmf_cache.evaluation.scoring import episode_list as make

    way, shot, episodes = (_natural(k, v, int) for k, v in (("way", way), ("shot", shot), ("episodes", episodes)))
    queries_per_class, seed = _natural("queries_per_class", queries_per_class, int), _natural("seed", seed, int)
    for name, value, low in (("way", way, 2), ("shot", shot, 1), ("episodes", episodes, 1),
                             ("queries_per_class", queries_per_class, 1), ("seed", seed, 0)):
        if value < low:
            raise ConfigError(f"{name}={value}: must be >= {low}")
    return make(split, way, shot, queries_per_class, episodes, seed)


def train(cfg: TrainConfig | None = None, progress: bool = False, **kwargs: Any) -> "Run":
    """Train (``mdmf-cache train``, either mode) and return the finished run. Fields: :class:`TrainConfig`."""
    from pipelines import train as train_recipe

    cfg = _config(TrainConfig, cfg, kwargs)
    res = train_recipe.run(cfg, progress=progress, show=False)
    return load_run(res["run"])


def evaluate(cfg: EvalConfig | None = None, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``mdmf-cache eval``: a run or a cache scored on the saved seeded episodes; returns what ``results.json`` holds.
    Fields: :class:`EvalConfig` (``target``: a run directory or a cache)."""
    from pipelines import evaluate as evaluate_recipe

    cfg = _config(EvalConfig, cfg, {k: str(v) if k == "target" else v for k, v in kwargs.items()})
    return evaluate_recipe.run(cfg, progress=progress, show=False)


def ablate(cfg=None, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``mdmf-cache ablate``: arms trained and scored on identical episodes. Fields: ``pipelines.ablate.AblateConfig``."""
    from pipelines.ablate import AblateConfig, run

    return run(_config(AblateConfig, cfg, kwargs), progress=progress, show=False)


def compare(cfg=None, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``mdmf-cache compare``: heads on one cache, identical episodes, the paper's table. Fields:
    ``pipelines.compare.CompareConfig``."""
    from pipelines.compare import CompareConfig, run

    return run(_config(CompareConfig, cfg, kwargs), progress=progress, show=False)


def sweep(cfg=None, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``mdmf-cache sweep``: tune fast-mode training on a cache with Optuna, each trial scored on val; writes what
    the command writes and returns ``{"rows": [...], "best": {...} or None, "out": ..., "figures": [...]}``.
    Fields: :class:`~mdmf_cache.sweeps.study.SweepConfig` (``space``: ``{"lr": "1e-5:1e-2:log", ...}``; ``fixed``:
    ``train`` options by name, ``{"episodes": 2000, "method": "clip-fsar"}``; ``_`` in a name reads as ``-``)."""
    from mdmf_cache.sweeps.study import SweepConfig
    from pipelines import sweep as sweep_recipe

    if isinstance(kwargs.get("space"), str):  # the CLI's --space text
        from mdmf_cache.sweeps.space import parse_space_text

        kwargs["space"] = parse_space_text(kwargs["space"])
    for key in ("space", "fixed"):
        if key in kwargs and not isinstance(kwargs[key], dict):
            raise ConfigError(f"{key}={kwargs[key]!r}: a dict of option names to values is expected"
                              + (" (or the --space text: 'lr=1e-5:1e-2:log,...')" if key == "space" else ""))
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = {k.replace("_", "-"): v for k, v in kwargs[key].items()}
    return sweep_recipe.run(_config(SweepConfig, cfg, kwargs), progress=progress, show=False)


def predict(cfg=None, progress: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``mdmf-cache predict``: label new videos with a run and a few labelled supports per class; writes
    ``predictions.csv`` and returns ``{"rows": [...], "classes": [...], "out": ...}``. Fields:
    :class:`~mdmf_cache.configs.PredictConfig` (``run``, ``support``, ``query``, ...)."""
    from mdmf_cache.configs import PredictConfig
    from pipelines.predict import run

    if isinstance(kwargs.get("query"), (str, Path)):
        kwargs["query"] = (str(kwargs["query"]),)
    kwargs = {k: str(v) if k in ("run", "support") else v for k, v in kwargs.items()}
    return run(_config(PredictConfig, cfg, kwargs), progress=progress, show=False)


def runs(cfg=None, **kwargs: Any) -> list[dict[str, Any]]:
    """``mdmf-cache runs``: the runs, evaluations, comparisons, ablations and sweeps under a folder, one dict each
    (kind, path, cache, cache_moved, method, shot, when, best, scores, complete, status, mtime). Fields:
    ``pipelines.runs.RunsConfig`` (``dir``, default the current folder; ``nested``: also the runs inside comparisons,
    ablations and sweeps)."""
    from pipelines.runs import RunsConfig, run

    return run(_config(RunsConfig, cfg, kwargs), progress=False, show=False)


def list_heads() -> dict[str, str]:
    """The registered heads (``--method`` names) and a line on each."""
    from mdmf_cache import heads

    return {name: entry.summary for name, entry in heads.REGISTRY.items()}


@dataclass
class Run:
    """A finished run: its directory, its ``config.json`` and its best head (eval mode).

    Attributes:
        path: the run directory.
        config: the resolved training config, as saved.
        head: the head of ``best.pt``, in eval mode (an ``nn.Module``: tensors in, tensors out).
    """

    path: Path
    config: dict[str, Any]
    head: Any

    @property
    def method(self) -> str:
        return self.head.method

    def split(self, split: str = "test", device: str = "cpu"):
        """A split of the cache this run was trained on (a fast-mode run; full mode: ``evaluate``)."""
        from mdmf_cache.store.runs import check_identity, run_cache

        if self.config.get("mode") == "full":
            raise ValueError(f"{self.path} is a full-mode run: its splits are extracted with its backbone by "
                             "mdmf_cache.evaluate(target=run.path)")
        cache = run_cache(self.path, self.config, None)
        check_identity(self.config.get("cache_identity"), cache, f"run {self.path}")
        return load_split(cache, split, device)

    def score(self, split: Any = "test", shot: int | None = None, episodes: int = 1000, way: int = EvalConfig.way,
              seed: int = EvalConfig.seed, keep_logits: bool = False):
        """Accuracy on a seeded episode list (:class:`~mdmf_cache.evaluation.scoring.EvalResult`: ``.mean``, ``.ci95``,
        ``.episode_acc``, ``.summary(classes)``). ``split``: a name of the run's cache or a FeatureSplit."""
        from mdmf_cache.evaluation.scoring import score

        feats = self.split(split) if isinstance(split, str) else split
        shot = shot or int(self.config.get("shot", 5))
        eps = episode_list(feats, way=way, shot=shot, episodes=episodes, seed=seed)
        return score(self.method, feats, eps, self.head, seed, keep_logits=keep_logits)


def load_run(path: str | Path, device: str = "cpu") -> Run:
    """A finished run from its directory (``best.pt``, ``config.json``)."""
    from mdmf_cache.heads.factory import load_head

    head, cfg = load_head(path, device)
    return Run(Path(path), cfg, head)

