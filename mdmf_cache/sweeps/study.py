"""Hyperparameter sweeps of fast-mode training on cached features, on Optuna: the config and the study.

A trial is one fast-mode training run (``pipelines.train.run``, which the sweep recipe hands to the workers),
scored by its best accuracy on the run's fixed, seeded val episode list; the test split is never
loaded. Every fast-mode option can be fixed or swept under its ``train`` name (``lr``, ``lambda``,
``dropout``, ``episodes``, ``method``, ...); the names come from the ``TrainConfig`` dataclass and
the head fields of ``MDMFConfig``, so a new field is sweepable without changes here.

The recipe (``pipelines/sweep.py``), top to bottom:
    1. parse and check the space and the fixed options, the cache and the storage (a bad value stops
       here, before anything is written to the study);
    2. create or load the study (``OUT/study.db`` SQLite by default, any Optuna storage URL with
       ``storage``) and record the sweep's settings in it, so that a worker joining with other
       settings is refused;
    3. run trials (:mod:`mdmf_cache.sweeps.workers`) in this process (``jobs=1``) or in ``jobs`` worker
       processes that share one copy of the train and val features, read once by this process into
       shared memory (:mod:`mdmf_cache.store.shared`; ``share_features=False``: each worker loads
       its own); every worker stops when the study holds ``trials`` finished (complete or pruned)
       trials, whoever ran them; a heartbeat marks a killed worker's trial failed and requeues it;
    4. write ``trials.csv``, ``trials.md``, ``best.json`` (for ``mdmf-cache train --config``) and
       the figures (:mod:`mdmf_cache.sweeps.summary`; also what ``mdmf-cache sweep show`` does).

This module imports neither torch nor Optuna at import time (the CLI reads ``SweepConfig``'s defaults).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.fileio import atomic_write_json
from mdmf_cache.heads.spec import OptionError
from mdmf_cache.sweeps.space import (Dim, Option, check_fixed, default_space, method_of, option_of_field, parse_space,
                                     sweep_options, trial_config)

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class SweepConfig:
    """One sweep; saved as ``sweep.json`` in ``out`` (the storage URL without its password)."""

    cache: str = ""
    out: str = "sweeps/sweep"
    study: str | None = None  # default: the name of ``out``
    storage: str | None = None  # default: sqlite:///OUT/study.db
    trials: int = 100  # finished (complete + pruned) trials of the study, all workers together
    jobs: int = 1  # worker processes on this machine
    space: dict[str, str] = field(default_factory=dict)  # name -> LOW:HIGH[:log] | A|B|C; {} = DEFAULT_SPACE
    fixed: dict[str, Any] = field(default_factory=dict)  # name -> value, as `train` options
    prune: bool = True
    pruner: str = "median"  # median | halving
    prune_startup: int = 5  # finished trials before the median pruner stops anything
    prune_below: float | None = None  # also stop a trial whose val accuracy (%) falls below this (e.g. chance)
    seed: int = 0  # the sampler's; every trial trains with the fixed `seed` option (default 0)
    resume: bool = False
    heartbeat: int = 30  # seconds; a trial silent for 2x this is failed and requeued
    keep_last: bool = False  # keep each trial's last.pt (resumable state); best.pt is always kept
    share_features: bool = True  # jobs > 1: the workers map one copy of the features (False: one copy each)

    @property
    def study_name(self) -> str:
        return self.study or Path(self.out).name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    def validate(self) -> None:
        problems = []
        if self.trials < 1:
            problems.append("--trials must be >= 1")
        if self.jobs < 1:
            problems.append("--jobs must be >= 1")
        if self.pruner not in ("median", "halving"):
            problems.append(f"--pruner {self.pruner!r}: choose median or halving")
        if self.heartbeat < 1:
            problems.append("--heartbeat must be >= 1 second")
        if self.prune_startup < 0:
            problems.append(f"--prune-startup {self.prune_startup}: must be >= 0 (finished trials before pruning)")
        if self.prune_below is not None and not math.isfinite(self.prune_below):
            problems.append(f"--prune-below {self.prune_below}: must be a number (a val accuracy in %)")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--sampler-seed {self.seed}: must be in [0, 2^32)")
        if not self.cache:
            problems.append("name a cache (mdmf-cache sweep CACHE ...)")
        if problems:
            raise ConfigError("; ".join(problems))


def _masked(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by the storage itself
        return url


@dataclass
class Plan:
    """What every trial of a sweep shares: checked options, space and base config."""

    opts: dict[str, Option]
    dims: list[Dim]
    fixed: dict[str, Any]
    base: dict[str, Any]  # TrainConfig fields (cache set, out per trial)
    fingerprint: str

    def settings(self) -> dict[str, Any]:
        """What must match for a worker to join the study."""
        fixed = {k: v for k, v in self.fixed.items() if k != "device"}  # machines may differ there
        return {"space": {d.name: asdict(d) for d in self.dims}, "fixed": fixed, "cache": self.fingerprint}


def plan(cfg: SweepConfig) -> Plan:
    """Check the options, the space and the cache; nothing is written."""
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache import heads
    from mdmf_cache.heads.spec import DataInfo
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.tokens import token_info

    cfg.validate()
    method = method_of(cfg.fixed)
    opts = sweep_options(method)
    fixed = check_fixed(cfg.fixed, opts)
    if "method" in cfg.space:
        raise ConfigError("a sweep tunes one head: fix it with --method NAME (compare heads with mdmf-cache compare)")
    given_space = dict(cfg.space) if cfg.space else {k: v for k, v in default_space(method).items() if k in opts}
    both = sorted(set(given_space) & set(fixed))
    if both and cfg.space:
        raise ConfigError(f"{', '.join(both)} both swept (--space) and fixed (--{both[0]}); drop one")
    dims = parse_space({k: v for k, v in given_space.items() if k not in fixed}, opts)
    if not dims:
        raise ConfigError("nothing left to sweep: every parameter of the space is fixed; name some with --space")
    # the cache: complete, and its shape for checking head options
    store = CacheStore(cfg.cache)
    for split in ("train", "val"):
        if split not in store.splits:
            raise CacheError(f"{cfg.cache} has no {split} split (has: {', '.join(store.splits) or 'none'})")
    if not store.is_complete():
        raise CacheError(f"{cfg.cache} is not complete; rerun the same 'mdmf-cache extract' command to finish it")
    _, _, num_frames, dim = store.root["train"]["features"].shape
    num_classes = len(store.root["train"].attrs.get("classes", []))
    spec_tokens = heads.get(method).tokens
    tokens = token_info(store, "train", spec_tokens) if spec_tokens else None  # a token head: the cache has them
    fingerprint = hashlib.sha256(json.dumps(store.fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    base = asdict(TrainConfig(cache=str(cfg.cache)))
    # every corner of the space must give a valid config, so no trial fails on a bad range
    for values in [{}] + [{d.name: v} for d in dims for v in d.corners()]:
        try:
            tcfg = trial_config(base, {**fixed, **values}, opts).resolved()
            tcfg.validate()
            heads.get(tcfg.method).make_options(tcfg.preset, tcfg.heads, DataInfo(
                dim=int(dim), num_frames=int(num_frames), num_classes=num_classes, shot=tcfg.shot, tokens=tokens))
        except OptionError as e:  # named as the sweep's options, --ffn-dim -5, not as train's --head-opt
            raise ConfigError(e.text(lambda name, value: _sweep_flag(name, value, opts, values))) from e
    return Plan(opts, dims, fixed, base, fingerprint)


def _sweep_flag(name: str, value: Any, opts: dict[str, Option], swept: dict[str, Any]) -> str:
    """A head option as a sweep names it: ``--ffn-dim -5``, or an end of its ``--space`` range."""
    from mdmf_cache.heads.spec import head_opt_flag

    cli = option_of_field(name, opts)
    if cli is None:
        return head_opt_flag(name, value)
    if cli in swept:
        return f"--space {cli}: its end {value}"
    return f"--{cli} {value}"


def open_storage(cfg: SweepConfig, create: bool = True):
    """The study's Optuna RDB storage with a heartbeat; an unreachable URL is a ConfigError."""
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    url = cfg.storage_url
    if url.startswith("postgresql://"):  # the driver this project installs (SQLAlchemy < 2.1 would pick psycopg2)
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///") and not create and not Path(url[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no study database at {url[len('sqlite:///'):]}")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}  # several worker processes share the file
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat is "experimental"; the retry callback is "deprecated"
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat,
                                  grace_period=2 * cfg.heartbeat,
                                  heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=3))
        except (IntegrityError, ProgrammingError, OperationalError) as e:
            # another process is creating the schema of a new database right now: a row, a table (SQLite: "table
            # study_directions already exists") or, on PostgreSQL, an enum type it just made; the next try finds them
            racing = isinstance(e, IntegrityError) or "already exists" in str(e)
            if not racing or attempt == 4:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"cannot open the study storage {_masked(url)}: {first}") from e
            time.sleep(0.5 + random.random())
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors of every kind mean the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot open the study storage {_masked(url)}: {first}") from e
    raise AssertionError("unreachable")


def open_study(cfg: SweepConfig, p: Plan, storage, sampler_seed: int):
    import optuna

    pruner: optuna.pruners.BasePruner
    if not cfg.prune:
        pruner = optuna.pruners.NopPruner()
    elif cfg.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner()
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup, n_warmup_steps=0)
    if cfg.prune and cfg.prune_below is not None:
        pruner = _any_of(pruner, optuna.pruners.ThresholdPruner(lower=cfg.prune_below))
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
    return optuna.load_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner)


def _any_of(*pruners):
    """A pruner that stops a trial when any of ``pruners`` would."""
    import optuna

    class AnyOf(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return any(p.prune(study, trial) for p in pruners)

    return AnyOf()


def count_trials(study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return sum(s in FINISHED for s in states), states.count("RUNNING")


def interrupt_hint(cfg: SweepConfig) -> str:
    """What a Ctrl-C kept and how to go on: the finished trials of the study, and --resume."""
    try:
        import optuna

        study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg, create=False))
        finished, _ = count_trials(study)
    except Exception:  # noqa: BLE001 - no study yet (stopped while checking), or the storage is gone
        return "no trial was finished; rerun the same command"
    return (f"{finished} of {cfg.trials} trials finished (kept in the study {_masked(cfg.storage_url)}); rerun the same "
            "command with --resume to run the rest (the interrupted trial is run again)")


def prepare(cfg: SweepConfig) -> Plan:
    """Steps 1-2: check everything, then create or join the study and record its settings."""
    import optuna

    p = plan(cfg)
    out = Path(cfg.out)
    db = Path(cfg.storage_url[len("sqlite:///"):]) if cfg.storage_url.startswith("sqlite:///") else None
    if cfg.storage is None and db is not None and db.is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
    if cfg.resume and db is not None and not db.is_file():
        raise ConfigError(f"--resume: no study at {db}; start the sweep without --resume")
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(cfg)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize", load_if_exists=True)
    settings = json.loads(json.dumps(p.settings()))
    old = study.user_attrs.get("mdmf_sweep")
    if old is None:
        study.set_user_attr("mdmf_sweep", settings)
    elif old != settings:
        diff = [k for k in settings if old.get(k) != settings[k]]
        raise ConfigError(f"study {cfg.study_name!r} was started with a different {', '.join(diff)}; "
                          "run the same command line, or use another --study/--out")
    out.mkdir(parents=True, exist_ok=True)
    saved = {**asdict(cfg), "storage": _masked(cfg.storage) if cfg.storage else None}
    atomic_write_json(out / "sweep.json", saved)
    return p


def finished_trials(cfg: SweepConfig) -> int | None:
    """Finished (complete and pruned) trials of the sweep's study; None when it has none yet (no database, or no
    study in it)."""
    import optuna

    if cfg.storage is None and not Path(cfg.storage_url[len("sqlite:///"):]).is_file():
        return None
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg, create=False))
    except KeyError:  # the database, but no study in it yet (stopped while creating it)
        return None
    return count_trials(study)[0]


class SweepBar:
    """The sweep's progress bar: finished trials, the best val accuracy so far, the pruned count."""

    def __init__(self, total: int):
        from rich.progress import TextColumn

        from mdmf_cache.progress import make_progress

        self.progress = make_progress("trials", TextColumn("best val {task.fields[best]:.1f}%"),
                                      TextColumn("pruned {task.fields[pruned]}"))
        self.task = self.progress.add_task("sweep", total=total, best=float("nan"), pruned=0)
        self.progress.start()

    def refresh_from(self, study) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name == "COMPLETE"]
        best = max((t.value for t in done), default=float("nan"))
        self.progress.update(self.task, completed=sum(t.state.name in FINISHED for t in trials), best=best,
                             pruned=sum(t.state.name == "PRUNED" for t in trials))

    def stop(self) -> None:
        self.progress.stop()


def load_sweep(path: Path | str, storage: str | None = None) -> SweepConfig:
    """The SweepConfig saved in ``PATH/sweep.json`` (``storage`` replaces a saved URL, e.g. one with a password)."""
    path = Path(path)
    if not (path / "sweep.json").is_file():
        raise ConfigError(f"{path} holds no sweep (no sweep.json); run 'mdmf-cache sweep CACHE --out {path}' first")
    saved = json.loads((path / "sweep.json").read_text())
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    cfg = SweepConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.out = str(path)
    if storage:
        cfg.storage = storage
    elif cfg.storage and "***" in cfg.storage:
        raise ConfigError(f"the study of {path} is on {cfg.storage}; pass --storage with the password")
    return cfg


__all__ = ["SweepConfig", "Plan", "plan", "prepare", "open_storage", "open_study", "count_trials", "load_sweep",
           "interrupt_hint", "finished_trials", "SweepBar", "FINISHED"]
