"""Recipe ``mdmf-cache compare``: several heads on one cache, identical seeded test episodes, the paper's Tables 1-2.

Top to bottom:
    1. the config (:class:`CompareConfig`): every method known, every training config checked, the cache
       complete, every episode possible (:func:`check_episodes`: the test split for every shot, the train and
       val splits for every trained method and shot); nothing is written before that;
    2. per shot, the saved seeded test episode list (``episodes_{N}way_{K}shot.npz``), the same for every
       method; a transductive head whose released test episodes have another number of queries per class
       (``SPEC.test_queries(K)``, not 1) gets its own list with that many (``episodes_{N}way_{K}shot_{Q}queries.npz``);
    3. per trainable (method, shot) and training seed: a fast-mode run in ``OUT/runs/<method>_<K>shot`` (with
       ``seeds`` N > 1: ``OUT/runs/<method>_<K>shot_seed<i>``, trained with seed ``seed + i``, i < N) with the
       head's released defaults (its preset, training shot and queries for K; CLIP-FSAR trains on 1-shot
       episodes for a 5-shot run) and the training options given here (the same for every method); a finished
       run is reused, an interrupted one resumed. With ``sweep`` N: instead an N-trial sweep on val
       (:mod:`mdmf_cache.sweeps.study`) in ``OUT/sweeps/<method>_<K>shot`` over the head's default space, the
       method, the shot and the training options given here fixed; the best trial's run (its ``best.pt``
       chosen on val) is the method's run (its seed 0; the other seeds train the best trial's config again).
       A finished sweep is reused, an unfinished one resumed. With ``test_selected`` every run keeps the
       heads of each validation (``keep_checkpoints``);
    4. per (method, shot, seed): per-episode accuracies of ``best.pt`` on that list (``scores/<run>.npy``;
       heads without parameters and baselines scored once, as they are), and with ``test_selected`` those of
       every kept checkpoint (``scores/checkpoints/<run>/ep*.npy``); reused when present;
    5. ``table.csv`` / ``table.md`` (one row per method, columns per shot: mean +- 95% CI over the episodes,
       the spread over the training seeds, the paired difference to the reference method (per seed and
       their mean), the accuracy the papers report for that method and dataset with the backbone it was
       measured on; with ``sweep``, the best trial's parameters; with ``test_selected``, the accuracy the
       checkpoint best on test would claim and its gap to the val-selected one; transductive heads marked)
       and ``table.png``.

Killed at any point, the same command does only what is missing. A rerun with other settings into the
same ``--out`` is refused (its runs and scores would not be the ones asked for).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.choices import BASELINES
from mdmf_cache.configs import TrainConfig
from mdmf_cache.errors import ConfigError
from mdmf_cache.progress import make_progress
from mdmf_cache.report.compare_tables import (list_name, markdown_table, table_notes, table_rows, test_queries,
                                             write_tables)

log = logging.getLogger(__name__)

#: ``--test-episodes`` at most: 100 times the papers' 10,000 (a 95% CI of a few hundredths of a point already).
MAX_TEST_EPISODES = 1_000_000


@dataclass
class CompareConfig:
    """One comparison; saved as ``compare_config.json`` in ``out``."""

    cache: str = ""
    out: str = "results/compare"
    methods: tuple[str, ...] = ()  # registered heads and baselines; () = every head of the cached features
    shots: tuple[int, ...] = (1, 5)
    reference: str = "mdmf"  # the paired differences are to this method
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for every trained method (episodes, lr, ...)
    way: int = 5
    test_episodes: int = 10000
    split: str = "test"
    seed: int = 0  # the test episodes' and the PPS draws'; training seed i of a trained method is seed + i
    device: str = "auto"
    sweep: int = 0  # trials of a val sweep per trained (method, shot), its best trial scored; 0: the defaults trained
    seeds: int = 1  # training seeds per trained (method, shot), each run scored on the same episodes
    test_selected: bool = False  # keep every validation's heads; report what the checkpoint best on TEST would claim
    preset: dict[str, str] = field(default_factory=dict)  # per trained method its preset (train's --preset); absent: the head's default
    train_shot: int | None = None  # K of every trained method's training episodes; None: each head's released choice
    head_opts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per trained method its head options (train's --head-opt)

    def __post_init__(self) -> None:
        if not self.methods:
            from mdmf_cache import heads

            self.methods = heads.FEATURE_METHODS

    def validate(self) -> None:
        from mdmf_cache import heads

        problems = []
        known = (*heads.METHODS, *BASELINES)
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            problems.append(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            problems.append("--methods: name each method once")
        if self.reference not in self.methods:
            problems.append(f"--reference {self.reference}: not among --methods")
        if not self.shots or min(self.shots) < 1 or len(set(self.shots)) != len(self.shots):
            problems.append("--shot: distinct values >= 1, e.g. 1,3,5")
        if self.way < 2:
            problems.append(f"--way {self.way}: an episode needs at least 2 classes")
        if self.seed < 0:
            problems.append(f"--seed {self.seed}: must be >= 0")
        if self.test_episodes < 1:
            problems.append(f"--test-episodes {self.test_episodes}: must be >= 1")
        elif self.test_episodes > MAX_TEST_EPISODES:
            shot = max(self.shots, default=1)
            # per episode: support, query, labels and their views (int64), and the sampler's keys (float64)
            gib = self.test_episodes * max(self.way, 1) * 8 * (3 * (shot + 1) + 1) / 2**30
            problems.append(f"--test-episodes {self.test_episodes}: at most {MAX_TEST_EPISODES:,} (the episode list "
                            f"alone would take about {gib:,.0f} GiB of memory per shot)")
        if self.sweep < 0:
            problems.append(f"--sweep {self.sweep}: a number of trials, >= 0 (0: no sweep)")
        if self.seeds < 1:
            problems.append(f"--seeds {self.seeds}: a number of training seeds, >= 1")
        for name in ("cache", "out", "method", "shot", "resume", "mode", "full", "way", "seed", "device",
                     "keep_checkpoints"):
            if name in self.train:
                problems.append(f"training option {name!r} is set by compare itself")
        for name, own in (("preset", "preset"), ("train_shot", "train_shot"), ("heads", "head_opts")):
            if name in self.train:
                problems.append(f"training option {name!r}: give it as compare's own {own}")
        if self.train_shot is not None and self.train_shot < 1:
            problems.append(f"--train-shot {self.train_shot}: must be >= 1")
        for what, per in (("--preset", self.preset), ("--head-opt", self.head_opts)):
            for method in per:
                if method not in self.methods:
                    problems.append(f"{what} {method}:...: {method} is not among --methods")
                elif not _trained(method):
                    problems.append(f"{what} {method}:...: {method} is not trained here (no parameters); compare "
                                    "scores it as released")
        unknown = sorted(set(self.train) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown training option(s) {', '.join(unknown)}")
        if problems:
            raise ConfigError("; ".join(problems))


def check_episodes(cfg: CompareConfig, tcfgs: dict[tuple, Any]) -> None:
    """Every episode the comparison will sample can be drawn from the cache, checked before anything is written:
    the test episodes of every shot, and for every trained (method, shot) its training episodes (train split, the
    head's training shot and queries) and validation episodes (val split). Only the labels are read.

    Raises:
        ConfigError: a split with too few classes of enough videos for one of them (named).
    """
    from mdmf_cache.data.episodes import EpisodeSampler
    from mdmf_cache.store.read import split_labels

    samplers: dict[str, EpisodeSampler] = {}

    def check(split: str, shot: int, queries: int, what: str) -> None:
        if split not in samplers:
            samplers[split] = EpisodeSampler(*split_labels(cfg.cache, split))
        try:
            samplers[split].check(cfg.way, shot, queries, split=split)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from e

    for shot in cfg.shots:
        check(cfg.split, shot, 1, f"--shot {shot} test episodes")
    for (method, shot, *_), tcfg in tcfgs.items():  # (method, shot, seed index): the seeds train alike
        t = tcfg.resolved()
        check("train", t.train_shot, t.train_queries, f"{method} --shot {shot} training episodes")
        check("val", t.shot, t.val_queries, f"{method} --shot {shot} validation episodes")


def _trained(method: str) -> bool:
    from mdmf_cache import heads

    return method in heads.REGISTRY and heads.REGISTRY[method].parametric


def run_name(method: str, shot: int, seed_index: int, seeds: int) -> str:
    """A trained run's directory name under ``OUT/runs`` (and its scores' under ``OUT/scores``): ``mdmf_5shot``, or
    with several training seeds ``mdmf_5shot_seed1``."""
    return f"{method}_{shot}shot" if seeds == 1 else f"{method}_{shot}shot_seed{seed_index}"


def _finished(run: Path, episodes: int) -> bool:
    from mdmf_cache.store.runs import read_run_file

    if not ((run / "best.pt").is_file() and (run / "metrics.jsonl").is_file()):
        return False
    lines = read_run_file(run / "metrics.jsonl")  # a damaged file is named, not a traceback
    return bool(lines) and lines[-1]["episodes"] >= episodes


def sweep_config(cfg: CompareConfig, method: str, shot: int):
    """The sweep ``--sweep`` runs for one trained (method, shot): the head's default space, the rest fixed."""
    from mdmf_cache.sweeps.study import SweepConfig

    fixed = {"method": method, "shot": shot, "way": cfg.way, "seed": cfg.seed, "device": cfg.device,
             **{k.replace("_", "-"): v for k, v in cfg.train.items()},
             **({"keep-checkpoints": True} if cfg.test_selected else {}),
             **({"preset": cfg.preset[method]} if method in cfg.preset else {}),
             **({"train-shot": cfg.train_shot} if cfg.train_shot is not None else {}),
             **{k.replace("_", "-"): v for k, v in cfg.head_opts.get(method, {}).items()}}
    return SweepConfig(cache=cfg.cache, out=str(Path(cfg.out) / "sweeps" / f"{method}_{shot}shot"), trials=cfg.sweep,
                       fixed=fixed, seed=cfg.seed)


def _tune(scfg, progress: bool) -> dict[str, Any]:
    """Run, resume or reuse one sweep; returns its best trial (``summarize``'s ``best``)."""
    from mdmf_cache.sweeps.summary import summarize
    from mdmf_cache.sweeps.study import finished_trials
    from pipelines import sweep as sweep_recipe

    done = finished_trials(scfg)
    if done is not None and done >= scfg.trials:
        log.info("%s: reusing the finished sweep", scfg.out)
        res = summarize(scfg, figures=False)
    else:
        scfg.resume = (Path(scfg.out) / "study.db").is_file()
        log.info("%s: %s (%d trials on val)", scfg.out, "resuming the sweep" if scfg.resume else "sweeping",
                 scfg.trials)
        res = sweep_recipe.run(scfg, progress=progress, show=False)
    if res["best"] is None:
        raise ConfigError(f"{scfg.out}: no trial of the sweep completed (pruned or failed; see trials.md); "
                          "rerun with a larger --sweep")
    return res["best"]


def _retrain(best_run: str, out: Path, seed: int, device: str):
    """The TrainConfig of a sweep's best trial (its ``config.json``) with another training seed, into ``out``."""
    import dataclasses

    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.store.runs import read_run_config

    rec = read_run_config(Path(best_run))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in rec.items() if k in names}, "out": str(out), "seed": seed,
                          "device": device, "resume": False})


def _train_or_reuse(tcfg, label: str, progress: bool) -> None:
    from pipelines import train as train_recipe

    run = Path(tcfg.out)
    if _finished(run, tcfg.episodes):
        log.info("%s: reusing %s", label, run)
        return
    tcfg.resume = (run / "last.pt").is_file()
    log.info("%s: training %s", label, run)
    train_recipe.run(tcfg, progress=progress, show=False)


def kept_checkpoints(run: Path | str) -> list[tuple[int, str]]:
    """(episodes, path inside the run) of every validation's heads a ``keep_checkpoints`` run kept, in order.

    Raises:
        ConfigError: a validation of the run's ``metrics.jsonl`` has no checkpoint (trained without them).
    """
    from mdmf_cache.store.runs import read_run_file
    from mdmf_cache.training.loop import CHECKPOINTS

    run = Path(run)
    kept = [(h["episodes"], f"{CHECKPOINTS}/ep{h['episodes']:07d}.pt") for h in read_run_file(run / "metrics.jsonl")]
    missing = [p for _, p in kept if not (run / p).is_file()]
    if missing or not kept:
        raise ConfigError(f"{run}: no {missing[0] if missing else CHECKPOINTS + '/'}: --test-selected needs every "
                          "validation's heads (train --keep-checkpoints); use another --out")
    return kept


#: Settings every row of a comparison depends on: a rerun into the same ``--out`` with another value is refused
#: (named). The methods, shots, ``reference`` and ``seeds`` may change: a rerun then trains and scores only what is new.
FIXED = ("way", "test_episodes", "seed", "split", "train", "sweep", "test_selected", "train_shot")
#: Per-method settings: refused for a method the saved comparison holds, free for a new one.
PER_METHOD = ("preset", "head_opts")
#: Fields newer than some saved comparisons, with the value they had before they existed.
_ADDED = {"sweep": 0, "seeds": 1, "test_selected": False, "preset": {}, "train_shot": None, "head_opts": {}}


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def identity_diff(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two cache identities (:func:`mdmf_cache.store.runs.cache_identity`), one item per field:
    ``text.prompt_template: 'a photo of {}' then, 'a video of {}' now``."""
    diff = []
    old_fp, new_fp = recorded.get("fingerprint") or {}, now.get("fingerprint") or {}
    for part in sorted(set(old_fp) | set(new_fp)):
        a, b = old_fp.get(part), new_fp.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{part}.{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(f"{part}: {a!r} then, {b!r} now")
    old_cls, new_cls = recorded.get("classes") or {}, now.get("classes") or {}
    diff += [f"{split} classes differ" for split in sorted(set(old_cls) & set(new_cls)) if old_cls[split] != new_cls[split]]
    return diff


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields of a saved comparison (``compare_config.json``) that ``now`` would change for its finished rows:
    :data:`FIXED`, and :data:`PER_METHOD` for the methods both hold (``preset of mdmf``)."""
    diff = [k for k in FIXED if before.get(k, _ADDED.get(k)) != now[k]]
    for k in PER_METHOD:
        old = before.get(k, _ADDED[k]) or {}
        diff += [f"{k} of {m}" for m in before.get("methods", ()) if m in now["methods"]
                 and old.get(m, {} if k == "head_opts" else None) != now[k].get(m, {} if k == "head_opts" else None)]
    return diff


def _run_changed(tcfg, ident: dict[str, Any]) -> list[str]:
    """The settings (and cache fields) of the run already in ``tcfg.out`` that differ from ``tcfg`` (a compare rerun
    reuses or resumes it); [] when there is no run yet."""
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.store.runs import read_run_file

    run = Path(tcfg.out)
    if not (run / "config.json").is_file():
        return []
    rec = read_run_file(run / "config.json")
    want = _json(asdict(tcfg.resolved()))
    defaults = _json(asdict(TrainConfig(method=rec.get("method", "mdmf"), shot=rec.get("shot", 5)).resolved()))
    free = ("resume", "device", "cache", "out", "tensorboard", "full", "mode")
    diff = [k for k in want if k not in free and rec.get(k, defaults.get(k)) != want[k]]
    return diff + identity_diff(rec.get("cache_identity") or {}, ident) if rec.get("cache_identity") else diff


def trained_methods(methods) -> list[str]:
    """The methods of ``methods`` compare trains (registered heads with parameters), in order."""
    return [m for m in methods if _trained(m)]


def _names(cfg: CompareConfig, out: Path, trained: list[str]) -> dict[tuple[str, int, int], str]:
    """Each trained (method, shot, seed index)'s run name (:func:`run_name`); seed 0 keeps the run an earlier
    comparison with another number of seeds trained (``mdmf_1shot`` or ``mdmf_1shot_seed0``)."""
    names = {}
    for method in trained:
        for shot in cfg.shots:
            for i in range(cfg.seeds):
                name = run_name(method, shot, i, cfg.seeds)
                other = run_name(method, shot, i, 1 if cfg.seeds > 1 else 2)
                if i == 0 and not (out / "runs" / name).exists() and (out / "runs" / other).exists():
                    name = other
                names[method, shot, i] = name
    return names


def _score_files(cfg: CompareConfig, out: Path, trained: list[str], names, kept) -> list[tuple[tuple, Path]]:
    """Every score file of the comparison, keyed (method, shot, seed index or None, checkpoint episodes or None):
    ``scores/<method>_<K>shot[_<Q>queries].npy`` of an untrained method, ``scores/<run>[...].npy`` of each trained
    run, and with ``test_selected`` ``scores/checkpoints/<run>/ep*.npy`` (``kept(method, shot, i)``: the runs'
    kept checkpoints as (episodes, path in the run))."""
    files = []
    for method in cfg.methods:
        for shot in cfg.shots:
            q = test_queries(method, shot)
            suffix = f"_{q}queries" if q != 1 else ""
            if method not in trained:
                files.append(((method, shot, None, None), out / "scores" / f"{method}_{shot}shot{suffix}.npy"))
                continue
            for i in range(cfg.seeds):
                name = names[method, shot, i] + suffix
                files.append(((method, shot, i, None), out / "scores" / f"{name}.npy"))
                if cfg.test_selected:
                    files += [((method, shot, i, e), out / "scores" / "checkpoints" / name / f"ep{e:07d}.npy")
                              for e, _ in kept(method, shot, i)]
    return files


def _assemble(cfg: CompareConfig, files, arrays: dict[Path, np.ndarray]):
    """The per-(method, shot) accuracies ``(S, E)`` and the test-selected numbers from the score files."""
    accs: dict[tuple[str, int], Any] = {}
    per_seed: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    selected: dict[tuple[str, int], list[dict[int, float]]] = {}
    for (method, shot, i, e), path in files:
        a = arrays[path]
        if i is None:
            accs[method, shot] = a[None]  # (1, E): no training seed
        elif e is None:
            per_seed.setdefault((method, shot), {})[i] = a
        else:
            selected.setdefault((method, shot), [{} for _ in range(cfg.seeds)])[i][e] = float(a.mean())
    accs.update({key: np.stack([v[i] for i in sorted(v)]) for key, v in per_seed.items()})
    return accs, selected


def _config_from(saved: dict[str, Any]) -> CompareConfig:
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    kw = {k: v for k, v in saved.items() if k in names}
    return CompareConfig(**{**kw, "methods": tuple(kw.get("methods", ())), "shots": tuple(kw.get("shots", ()))})


def run(cfg: CompareConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Train (or tune) what is missing, score every method on the same episodes per shot, write the tables (and, with
    ``show``, print the table)."""
    from mdmf_cache.clip.backbone import weights_id
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.data.episodes import EpisodeSampler, Episodes
    from mdmf_cache.device import resolve_device
    from mdmf_cache.evaluation.scoring import TokenSplits, episode_list, score
    from mdmf_cache.fileio import atomic_write_json, process_lock
    from mdmf_cache.heads.factory import load_head
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.read import load_split_features
    from mdmf_cache.store.runs import cache_identity
    from mdmf_cache import heads as heads_registry
    from mdmf_cache.store.tokens import token_info
    from mdmf_cache.sweeps.study import plan

    # 1. everything checked before anything is written
    cfg.validate()
    out = Path(cfg.out)
    store = CacheStore(cfg.cache)
    if not store.is_complete():
        raise ConfigError(f"{cfg.cache} is not complete; rerun the same 'mdmf-cache extract' command to finish it")
    ident = _json(cache_identity(cfg.cache))
    trained = trained_methods(cfg.methods)
    for method in trained:  # a token head's tokens in every split it reads (one line naming extract --tokens)
        if heads_registry.get(method).tokens:
            for split_name in dict.fromkeys(("train", "val", cfg.split)):
                token_info(store, split_name, heads_registry.get(method).tokens)
    names = _names(cfg, out, trained)
    tcfgs = {}  # (method, shot, seed index) -> its run's config (with a sweep: seeds >= 1 only, made after it)
    for method in trained:
        for shot in cfg.shots:
            for i in range(cfg.seeds):
                tcfg = TrainConfig(cache=cfg.cache, out=str(out / "runs" / names[method, shot, i]), method=method,
                                   way=cfg.way, shot=shot, seed=cfg.seed + i, device=cfg.device,
                                   keep_checkpoints=cfg.test_selected, preset=cfg.preset.get(method),
                                   train_shot=cfg.train_shot, heads=dict(cfg.head_opts.get(method, {})), **cfg.train)
                try:
                    tcfg.validate()
                except ConfigError as e:
                    raise ConfigError(f"{method}: {e}") from e
                if not cfg.sweep:
                    tcfgs[method, shot, i] = tcfg
    scfgs = {(m, k): sweep_config(cfg, m, k) for m in trained for k in cfg.shots} if cfg.sweep else {}
    for scfg in scfgs.values():
        plan(scfg)  # the head's default space, every corner of it a valid config; nothing written
    queries = {(m, k): test_queries(m, k) for m in cfg.methods for k in cfg.shots}
    saved = {**_json(asdict(cfg)), "cache_identity": ident}
    old = out / "compare_config.json"
    if old.is_file():
        try:
            before = json.loads(old.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{old} is damaged ({e}); restore it, or choose another --out") from e
        if before.get("cache_identity"):
            diff = identity_diff(before["cache_identity"], ident)
            if diff:
                raise ConfigError(f"{out} holds a comparison made on another cache ({'; '.join(diff)}); rerun it on "
                                  "the cache it was made with, or choose another --out")
        diff = changed_settings(before, saved)
        if diff:
            raise ConfigError(f"{out} holds a comparison made with other {', '.join(diff)}; rerun it with those "
                              "(another method, shot, seed count or --reference is added to it), or choose another --out")
    for (method, shot, i), tcfg in tcfgs.items():  # a run already there must be the one this comparison asks for
        diff = _run_changed(tcfg, ident)
        if diff:
            raise ConfigError(f"{out}: its {method} {shot}-shot run {tcfg.out} was trained with other "
                              f"{'; '.join(diff)}; rerun the comparison as it was, or choose another --out")
    check_episodes(cfg, tcfgs)
    device = resolve_device(cfg.device)
    split = load_split_features(cfg.cache, cfg.split, device=str(device))
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    for shot, q in sorted({(k, q) for (_, k), q in queries.items()}):
        sampler.check(cfg.way, shot, q, split=cfg.split)
    out.mkdir(parents=True, exist_ok=True)
    with process_lock(out / ".compare.lock",
                      busy=lambda holder: ConfigError(f"another compare ({holder}) is writing {out}; wait for it to "
                                                      "finish, then rerun the same command (it does only what is "
                                                      "missing), or choose another --out"),
                      unwritable=lambda e: ConfigError(f"cannot write {out} ({e.strerror}): choose an --out on "
                                                       "writable storage")):
        atomic_write_json(old, saved)
        (out / "scores").mkdir(exist_ok=True)

        # 2. one seeded episode list per shot (and per other number of queries a transductive head is tested with)
        lists = {}
        for shot, q in sorted({(k, q) for (_, k), q in queries.items()}):
            eps = episode_list(split, cfg.way, shot, q, cfg.test_episodes, cfg.seed)
            path = out / list_name(cfg.way, shot, q)
            if path.is_file():
                kept = Episodes.load(path)
                if not all(np.array_equal(getattr(kept, f), getattr(eps, f)) for f in Episodes.__dataclass_fields__):
                    raise ConfigError(f"{path} is not this cache's episode list any more (the test split changed); "
                                      "use another --out")
            else:
                _save_episodes(eps, path)
            lists[shot, q] = eps

        # 3. train (or tune on val) what is not finished; resume what was interrupted
        runs = {key: tcfg.out for key, tcfg in tcfgs.items()}
        tuned: dict[tuple[str, int], dict[str, Any]] = {}
        for method in trained:
            for shot in cfg.shots:
                if cfg.sweep:  # the best trial's run is seed 0; the others train its config again with their seeds
                    tuned[method, shot] = _tune(scfgs[method, shot], progress)
                    runs[method, shot, 0] = tuned[method, shot]["run"]
                    for i in range(1, cfg.seeds):
                        tcfgs[method, shot, i] = _retrain(tuned[method, shot]["run"],
                                                          out / "runs" / names[method, shot, i],
                                                          cfg.seed + i, cfg.device)
                        runs[method, shot, i] = tcfgs[method, shot, i].out
                for i in range(cfg.seeds):
                    if (method, shot, i) in tcfgs:
                        _train_or_reuse(tcfgs[method, shot, i], f"{method} {shot}-shot seed {cfg.seed + i}", progress)
        if cfg.sweep:
            atomic_write_json(out / "tuned.json", {f"{m}:{k}": _json(best) for (m, k), best in tuned.items()})

        # 4. scores on the saved lists: best.pt (chosen on val) of every run, and with test_selected every checkpoint;
        #    a score is reused only when its record (cache identity, list, seed, weights) is this comparison's
        files = _score_files(cfg, out, trained, names, lambda m, k, i: kept_checkpoints(runs[m, k, i]))
        ckpts = {(m, k, i): dict(kept_checkpoints(runs[m, k, i])) for m, k, i in runs} if cfg.test_selected else {}
        todo, arrays, records = [], {}, {}
        for (method, shot, i, e), path in files:
            q = queries[method, shot]
            run_dir = runs[method, shot, i] if i is not None else None
            ckpt = "best.pt" if e is None else ckpts[method, shot, i][e]
            records[path] = {"method": method, "episodes": list_name(cfg.way, shot, q), "seed": cfg.seed,
                             "run": Path(run_dir).name if run_dir else None, "checkpoint": ckpt if run_dir else None,
                             "weights": weights_id(str(Path(run_dir) / ckpt)) if run_dir else None,
                             "cache_identity": ident}
            rec = path.with_suffix(".json")
            if path.is_file() and rec.is_file() and _read_record(rec) == records[path]:
                arrays[path] = np.load(path)
            else:
                todo.append(((method, shot, i, e), path, run_dir, ckpt))
        bar = make_progress("episodes") if progress and todo else None
        task = bar.add_task("scoring", total=sum(len(lists[k, queries[m, k]]) for (m, k, _, _), *_ in todo)) \
            if bar else None
        if bar:
            bar.start()
        splits = TokenSplits(split, cfg.cache, cfg.split)  # a token head's episodes read their tokens
        try:
            for (method, shot, i, e), path, run_dir, ckpt in todo:
                if bar:
                    bar.update(task, description=f"scoring {method} {shot}-shot" + (f" seed {i}" if cfg.seeds > 1
                                                                                     and i is not None else ""))
                model = load_head(run_dir, str(device), checkpoint=ckpt)[0] if run_dir is not None else None
                acc = score(method, splits(method), lists[shot, queries[method, shot]], model, cfg.seed,
                            on_batch=(lambda n: bar.advance(task, n)) if bar else None).episode_acc * 100
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_scores(acc, path)
                atomic_write_json(path.with_suffix(".json"), records[path])  # after the scores: a kill between rescores
                arrays[path] = acc
        finally:
            splits.close()
            if bar:
                bar.stop()
        accs, selected = _assemble(cfg, files, arrays)

        # 5. tables and the figure
        fp = store.fingerprint.get("video") or {}
        rows = table_rows(cfg, accs, fp.get("dataset", ""), fp.get("model", ""), tuned, selected)
        notes = table_notes(cfg, rows)
        write_tables(out, rows, cfg.shots, sweep=cfg.sweep, seeds=cfg.seeds, test_selected=cfg.test_selected,
                     notes=notes)
        from mdmf_cache.report.plots import compare_figure, plot_safely

        plot_safely(compare_figure, rows, cfg.shots, out / "table.png",
                    f"{fp.get('dataset', '')} {fp.get('model', '')}: " + _title(cfg))
    if show:
        _print_table(cfg, rows, notes, out)
    return {"rows": rows, "out": str(out)}


def _read_record(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged record: the scores are made again


def _title(cfg: CompareConfig) -> str:
    title = f"{cfg.way}-way, {cfg.test_episodes} identical test episodes per shot"
    return title + (f", {cfg.seeds} training seeds" if cfg.seeds > 1 else "")


def _print_table(cfg: CompareConfig, rows: list[dict[str, Any]], notes: list[str], out: Path) -> None:
    from rich.markup import escape

    from mdmf_cache.report.tables import console, print_compare

    print_compare(rows, cfg.shots, _title(cfg), seeds=cfg.seeds, sweep=cfg.sweep, test_selected=cfg.test_selected)
    for note in notes:
        console.print(escape(note))
    console.print(f"tables: {out}/table.md, table.tex, table.csv, table.png")


def show(out: Path | str, show: bool = True) -> dict[str, Any]:
    """A finished comparison's table again, from its files (``compare_config.json``, the score files, ``tuned.json``):
    nothing is trained, scored or written, and neither the cache nor the original command line is needed.

    Returns:
        ``rows`` (as :func:`run` returned them), ``markdown`` (what ``table.md`` holds) and ``out``.

    Raises:
        ConfigError: ``out`` holds no comparison, or an unfinished one (a score file missing, named).
    """
    out = Path(out)
    path = out / "compare_config.json"
    if not path.is_file():
        raise ConfigError(f"{out} holds no comparison (no compare_config.json); write: mdmf-cache compare show OUT, "
                          "with OUT a compare --out")
    try:
        saved = json.loads(path.read_text())
        cfg = _config_from(saved)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); restore it, or rerun the comparison's command") from e
    trained = trained_methods(cfg.methods)
    names = {(m, k, i): n for (m, k, i), n in _names(cfg, out, trained).items()}

    def kept(method: str, shot: int, i: int) -> list[tuple[int, str]]:
        q = test_queries(method, shot)
        folder = out / "scores" / "checkpoints" / (names[method, shot, i] + (f"_{q}queries" if q != 1 else ""))
        return [(int(p.stem[2:]), p.name) for p in sorted(folder.glob("ep*.npy"))] or [(0, "")]

    files = _score_files(cfg, out, trained, names, kept)
    missing = [p for _, p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"{out} is not finished ({len(missing)} score file(s) missing, e.g. {missing[0]}); rerun its "
                          "compare command: it does only what is missing")
    accs, selected = _assemble(cfg, files, {p: np.load(p) for _, p in files})
    tuned = {}
    if cfg.sweep and (out / "tuned.json").is_file():
        tuned = {(m, int(k)): v for key, v in json.loads((out / "tuned.json").read_text()).items()
                 for m, k in [key.rsplit(":", 1)]}
    fp = ((saved.get("cache_identity") or {}).get("fingerprint") or {}).get("video") or {}
    rows = table_rows(cfg, accs, fp.get("dataset", ""), fp.get("model", ""), tuned, selected)
    notes = table_notes(cfg, rows)
    if show:
        _print_table(cfg, rows, notes, out)
    return {"rows": rows, "out": str(out), "markdown": markdown_table(rows, cfg.shots, sweep=cfg.sweep,
                                                                      seeds=cfg.seeds, test_selected=cfg.test_selected,
                                                                      notes=notes)}


def _save_episodes(eps, path: Path) -> None:
    from mdmf_cache.fileio import atomic_write_file

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to the temporary name
            eps.save(f)

    atomic_write_file(path, write)


def _save_scores(acc: np.ndarray, path: Path) -> None:
    from mdmf_cache.fileio import atomic_write_file

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, acc)

    atomic_write_file(path, write)


