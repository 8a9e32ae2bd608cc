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

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.choices import BASELINES
from mdmf_cache.configs import TrainConfig
from mdmf_cache.errors import ConfigError

log = logging.getLogger(__name__)

#: ``--test-episodes`` at most: 100 times the papers' 10,000 (a 95% CI of a few hundredths of a point already).
MAX_TEST_EPISODES = 1_000_000


@dataclass
class CompareConfig:
    """One comparison; saved as ``compare_config.json`` in ``out``."""

    cache: str = ""
    out: str = "results/compare"
    methods: tuple[str, ...] = ()  # registered heads and baselines; () = every registered head
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

    def __post_init__(self) -> None:
        if not self.methods:
            from mdmf_cache import heads

            self.methods = heads.METHODS

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
        for name in ("cache", "out", "method", "shot", "resume", "heads", "mode", "full", "way", "seed", "device",
                     "keep_checkpoints"):
            if name in self.train:
                problems.append(f"training option {name!r} is set by compare itself")
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


def transductive(method: str) -> bool:
    """A registered head whose logits of a query depend on the episode's other queries (``SPEC.transductive``)."""
    from mdmf_cache import heads

    return method in heads.REGISTRY and heads.get(method).transductive


def test_queries(method: str, shot: int) -> int:
    """Queries per class of the test episodes ``method`` is scored on at ``shot``: 1 (compare's list), or, for a
    transductive head, its released test episodes' (``SPEC.test_queries(K)``), on which its accuracy depends."""
    from mdmf_cache import heads

    if method in heads.REGISTRY:
        spec = heads.get(method)
        if spec.transductive and spec.test_queries is not None:
            return int(spec.test_queries(shot))
    return 1


def run_name(method: str, shot: int, seed_index: int, seeds: int) -> str:
    """A trained run's directory name under ``OUT/runs`` (and its scores' under ``OUT/scores``): ``mdmf_5shot``, or
    with several training seeds ``mdmf_5shot_seed1``."""
    return f"{method}_{shot}shot" if seeds == 1 else f"{method}_{shot}shot_seed{seed_index}"


def _list_name(way: int, shot: int, queries: int) -> str:
    return f"episodes_{way}way_{shot}shot" + (f"_{queries}queries" if queries != 1 else "") + ".npz"


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
             **({"keep-checkpoints": True} if cfg.test_selected else {})}
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


def run(cfg: CompareConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Train (or tune) what is missing, score every method on the same episodes per shot, write the tables (and, with
    ``show``, print the table)."""
    from mdmf_cache.device import resolve_device
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.data.episodes import EpisodeSampler, Episodes
    from mdmf_cache.evaluation.scoring import episode_list, score
    from mdmf_cache.fileio import atomic_write_json
    from mdmf_cache.heads.factory import load_run
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.read import load_split_features
    from mdmf_cache.sweeps.study import plan

    # 1. everything checked before anything is written
    cfg.validate()
    out = Path(cfg.out)
    store = CacheStore(cfg.cache)
    if not store.is_complete():
        raise ConfigError(f"{cfg.cache} is not complete; rerun the same 'mdmf-cache extract' command to finish it")
    trained = [m for m in cfg.methods if _trained(m)]
    tcfgs = {}  # (method, shot, seed index) -> its run's config (with a sweep: seeds >= 1 only, made after it)
    for method in trained:
        for shot in cfg.shots:
            for i in range(cfg.seeds):
                name = run_name(method, shot, i, cfg.seeds)
                tcfg = TrainConfig(cache=cfg.cache, out=str(out / "runs" / name), method=method, way=cfg.way,
                                   shot=shot, seed=cfg.seed + i, device=cfg.device,
                                   keep_checkpoints=cfg.test_selected, **cfg.train)
                tcfg.validate()
                if not cfg.sweep:
                    tcfgs[method, shot, i] = tcfg
    scfgs = {(m, k): sweep_config(cfg, m, k) for m in trained for k in cfg.shots} if cfg.sweep else {}
    for scfg in scfgs.values():
        plan(scfg)  # the head's default space, every corner of it a valid config; nothing written
    queries = {(m, k): test_queries(m, k) for m in cfg.methods for k in cfg.shots}
    saved = json.loads(json.dumps(asdict(cfg)))
    old = out / "compare_config.json"
    if old.is_file():
        before = json.loads(old.read_text())
        added = {"sweep": 0, "seeds": 1, "test_selected": False}  # fields newer than some saved comparisons
        diff = sorted(k for k in saved if k not in ("device",) and before.get(k, added.get(k)) != saved[k])
        if diff:
            raise ConfigError(f"{out} holds a comparison made with other {', '.join(diff)}; rerun it as it was "
                              "(it goes on where it stopped) or choose another --out")
    check_episodes(cfg, tcfgs)
    device = resolve_device(cfg.device)
    split = load_split_features(cfg.cache, cfg.split, device=str(device))
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    for shot, q in sorted({(k, q) for (_, k), q in queries.items()}):
        sampler.check(cfg.way, shot, q, split=cfg.split)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(old, saved)
    (out / "scores").mkdir(exist_ok=True)

    # 2. one seeded episode list per shot (and per other number of queries a transductive head is tested with)
    lists = {}
    for shot, q in sorted({(k, q) for (_, k), q in queries.items()}):
        eps = episode_list(split, cfg.way, shot, q, cfg.test_episodes, cfg.seed)
        path = out / _list_name(cfg.way, shot, q)
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
                                                      out / "runs" / run_name(method, shot, i, cfg.seeds),
                                                      cfg.seed + i, cfg.device)
                    runs[method, shot, i] = tcfgs[method, shot, i].out
            for i in range(cfg.seeds):
                if (method, shot, i) in tcfgs:
                    _train_or_reuse(tcfgs[method, shot, i], f"{method} {shot}-shot seed {cfg.seed + i}", progress)

    # 4. scores on the saved lists: best.pt (chosen on val) of every run, and with test_selected every checkpoint
    accs: dict[tuple[str, int], np.ndarray] = {}  # (seeds or 1, E) per (method, shot)
    selected: dict[tuple[str, int], list[dict[int, float]]] = {}  # per seed: episodes -> test accuracy %

    def scored(path: Path, method: str, eps, run_dir: str | None, checkpoint: str = "best.pt") -> np.ndarray:
        if path.is_file():
            return np.load(path)
        model = load_run(run_dir, str(device), checkpoint=checkpoint)[0] if run_dir is not None else None
        acc = score(method, split, eps, model, cfg.seed).episode_acc * 100
        _save_scores(acc, path)
        return acc

    for method in cfg.methods:
        for shot in cfg.shots:
            q = queries[method, shot]
            eps, suffix = lists[shot, q], (f"_{q}queries" if q != 1 else "")
            if method not in trained:
                path = out / "scores" / f"{method}_{shot}shot{suffix}.npy"
                accs[method, shot] = scored(path, method, eps, None)[None]  # (1, E): no training seed
                continue
            per_seed = []
            for i in range(cfg.seeds):
                name = run_name(method, shot, i, cfg.seeds) + suffix
                per_seed.append(scored(out / "scores" / f"{name}.npy", method, eps, runs[method, shot, i]))
                if cfg.test_selected:
                    folder = out / "scores" / "checkpoints" / name
                    folder.mkdir(parents=True, exist_ok=True)
                    selected.setdefault((method, shot), []).append(
                        {e: float(scored(folder / f"ep{e:07d}.npy", method, eps, runs[method, shot, i], ckpt).mean())
                         for e, ckpt in kept_checkpoints(runs[method, shot, i])})
            accs[method, shot] = np.stack(per_seed)

    # 5. tables and the figure
    fp = store.fingerprint.get("video") or {}
    rows = table_rows(cfg, accs, fp.get("dataset", ""), fp.get("model", ""), tuned, selected)
    notes = table_notes(cfg, rows)
    write_tables(out, rows, cfg.shots, sweep=cfg.sweep, seeds=cfg.seeds, test_selected=cfg.test_selected, notes=notes)
    from mdmf_cache.report.plots import compare_figure, plot_safely
    from mdmf_cache.report.tables import console, print_compare

    title = f"{cfg.way}-way, {cfg.test_episodes} identical test episodes per shot"
    title += f", {cfg.seeds} training seeds" if cfg.seeds > 1 else ""
    plot_safely(compare_figure, rows, cfg.shots, out / "table.png", f"{fp.get('dataset', '')} {fp.get('model', '')}: "
                + title)
    if show:
        print_compare(rows, cfg.shots, title, seeds=cfg.seeds, sweep=0, test_selected=cfg.test_selected)
        from rich.markup import escape

        for note in notes:
            console.print(escape(note))
        console.print(f"tables: {out}/table.md, table.csv, table.png")
    return {"rows": rows, "out": str(out)}


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


def _spread(values: list[float]) -> dict[str, float]:
    """The spread of per-seed numbers: the sample standard deviation (n - 1), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return {"std": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max())}


def table_rows(cfg: CompareConfig, accs: dict[tuple[str, int], np.ndarray], dataset: str, model: str,
               tuned: dict[tuple[str, int], dict[str, Any]] | None = None,
               selected: dict[tuple[str, int], list[dict[int, float]]] | None = None) -> list[dict[str, Any]]:
    """One row per method: per shot its mean and CI, the spread over training seeds, the paired difference to the
    reference (per seed and overall), the reported number, for a tuned method its best trial's parameters and val
    accuracy, and with ``selected`` what its checkpoint best on test would claim.

    Args:
        accs: per (method, shot) the per-episode accuracies (%), ``(E,)`` or ``(S, E)``: one row per training seed
            (a method without parameters: one row whatever the seeds).
        selected: per (method, shot) and seed, each kept checkpoint's mean test accuracy (%) by its episodes.
    """
    from mdmf_cache.data.episodes import mean_ci
    from mdmf_cache.paper import backbone_of, reported

    def seeds_of(a) -> np.ndarray:
        return np.atleast_2d(np.asarray(a, dtype=np.float64))  # (S, E)

    def pick(a: np.ndarray, i: int) -> np.ndarray:
        return a[i if len(a) > 1 else 0]

    rows = []
    for method in cfg.methods:
        row: dict[str, Any] = {"method": method, "backbone": backbone_of(model) if model else "",
                               "transductive": transductive(method)}
        if method != cfg.reference:
            row["vs_ref_transductive_inductive"] = transductive(method) != transductive(cfg.reference)
        for shot in cfg.shots:
            acc = seeds_of(accs[method, shot])
            q = test_queries(method, shot)
            if q != 1:
                row[f"{shot}shot_test_queries"] = q
            row[f"{shot}shot"], row[f"{shot}shot_ci95"] = mean_ci(acc.mean(axis=0))
            if len(acc) > 1:
                for i, a in enumerate(acc):
                    row[f"{shot}shot_seed{i}"] = float(a.mean())
                row.update({f"{shot}shot_seed_{k}": v for k, v in _spread(acc.mean(axis=1).tolist()).items()})
            if method != cfg.reference:
                ref = seeds_of(accs[cfg.reference, shot])
                paired = q == test_queries(cfg.reference, shot)  # the same episodes; else a difference of means
                n = max(len(acc), len(ref))
                diffs = []
                for i in range(n):
                    a, r = pick(acc, i), pick(ref, i)
                    d = (mean_ci(a - r) if paired
                         else (float(a.mean() - r.mean()), float(np.hypot(mean_ci(a)[1], mean_ci(r)[1]))))
                    diffs.append(d)
                    if n > 1:
                        row[f"{shot}shot_diff_seed{i}"], row[f"{shot}shot_diff_seed{i}_ci95"] = float(d[0]), d[1]
                a, r = acc.mean(axis=0), ref.mean(axis=0)
                ci = mean_ci(a - r)[1] if paired else float(np.hypot(mean_ci(a)[1], mean_ci(r)[1]))
                row[f"{shot}shot_diff"], row[f"{shot}shot_diff_ci95"] = float(np.mean([d[0] for d in diffs])), ci
                row[f"{shot}shot_diff_paired"] = paired
                if n > 1:
                    row.update({f"{shot}shot_diff_seed_{k}": v for k, v in _spread([d[0] for d in diffs]).items()})
            paper = reported(method, dataset, shot, model)
            if paper is not None:
                row[f"{shot}shot_reported"], row[f"{shot}shot_reported_backbone"] = paper
            best = (tuned or {}).get((method, shot))
            if best is not None:
                row[f"{shot}shot_tuned"] = params_text(best["params"])
                row[f"{shot}shot_tuned_val"] = best["val_acc"]
            kept = (selected or {}).get((method, shot))
            if kept:
                top = [max(k.items(), key=lambda item: item[1]) for k in kept]  # per seed (episodes, test accuracy)
                gaps = [t - float(a.mean()) for (_, t), a in zip(top, acc)]
                row[f"{shot}shot_test_selected"] = float(np.mean([t for _, t in top]))
                row[f"{shot}shot_test_selected_gap"] = float(np.mean(gaps))
                row[f"{shot}shot_test_selected_at"] = ";".join(str(e) for e, _ in top)  # episodes, per seed
                if len(kept) > 1:
                    for i, ((_, t), g) in enumerate(zip(top, gaps)):
                        row[f"{shot}shot_test_selected_seed{i}"], row[f"{shot}shot_test_selected_gap_seed{i}"] = t, g
        rows.append(row)
    return rows


def params_text(params: dict[str, Any]) -> str:
    """``lr=0.000312, lambda=0.84``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table_notes(cfg: CompareConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The notes under the table that this comparison needs, beyond the reading of its columns: training seeds,
    transductive heads, heads scored on their own episode list, the test-selected column."""
    notes = []
    if cfg.seeds > 1:
        notes.append(
            f"Training seeds: each trained method was trained {cfg.seeds} times, with training seeds {cfg.seed} to "
            f"{cfg.seed + cfg.seeds - 1} (runs/METHOD_Kshot_seedI), every run on the same data and scored on the same "
            "episodes. Its accuracy is the mean over seeds ± the 95% CI over the episodes of the seed-averaged "
            "per-episode accuracy; 'seeds' gives the sample standard deviation over seeds of the per-seed means and "
            "their [min, max]. 'vs ref' is the mean of the per-seed paired differences (seed i against the "
            "reference's seed i; a method without parameters counts once for every seed) ± the episode CI of their "
            "average; 'per seed' lists them with their standard deviation. Heads without parameters and baselines "
            "have no training seed: one score, spread '-'.")
    if any(r["transductive"] for r in rows):
        notes.append("† transductive: uses the episode's other queries (a query's logits depend on the other "
                     "queries of its episode, which an inductive method never sees).")
        if any(r.get("vs_ref_transductive_inductive") for r in rows):
            notes.append("‡ a transductive method against an inductive one: the difference mixes the two settings.")
    own = sorted({(r["method"], k, r[f"{k}shot_test_queries"]) for r in rows for k in cfg.shots
                  if f"{k}shot_test_queries" in r})
    for method, shot, q in own:
        notes.append(f"{method} {shot}-shot: scored on its own list of {cfg.test_episodes} episodes with {q} queries "
                     f"per class ({_list_name(cfg.way, shot, q)}), its released test setting (SPEC.test_queries), "
                     "not the shared list with 1; its difference to the reference is unpaired (a difference of means, "
                     "their CIs combined in quadrature).")
    if cfg.test_selected:
        notes.append(
            "Test-selected: every trained run kept the heads of each validation (runs/.../checkpoints), and each was "
            "scored on these test episodes. The column gives the accuracy of the checkpoint best ON TEST, what a "
            "codebase that keeps the checkpoint best on the test split would report, and in parentheses its gap "
            "to the val-selected best.pt above (test-selected minus val-selected; means over seeds). It is biased "
            "upwards by construction and is shown only to measure by how much that selection flatters a number.")
    return notes


def write_tables(out: Path, rows: list[dict[str, Any]], shots: tuple[int, ...], sweep: int = 0, seeds: int = 1,
                 test_selected: bool = False, notes: list[str] | tuple[str, ...] = ()) -> None:
    """``table.csv`` (every number) and ``table.md`` (the paper's layout: one row per method, a column per shot;
    with several ``seeds`` the spread over seeds and the per-seed differences; after a ``sweep`` of that many
    trials, a column with each tuned method's best trial's parameters per shot; with ``test_selected`` the
    test-selected accuracy and its gap), then ``notes``."""
    from mdmf_cache.fileio import atomic_write_csv, atomic_write_text
    from mdmf_cache.report.tables import compare_layout

    atomic_write_csv(out / "table.csv", rows)
    head, body = compare_layout(rows, shots, digits=2, seeds=seeds, sweep=sweep, test_selected=test_selected)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = ("\nAccuracy in %, mean ± 95% CI over the same seeded test episodes; 'vs ref' is the paired difference "
            "to the reference method. 'reported' is what the CLIP-MDMF paper's Tables 1-2 give for that method and "
            "dataset, on the backbone in parentheses: ResNet-50 (ImageNet) numbers are not CLIP results.\n")
    if sweep:
        note += (f"\nTuned on val: each trained method was tuned per shot by a {sweep}-trial sweep on val "
                 "(sweeps/METHOD_Kshot); its best trial's run is what is scored here (with several seeds its seed 0; the "
                 "other seeds train its config again), and the column 'tuned on val' gives that trial's parameters.\n")
    note += "".join(f"\n{n}\n" for n in notes)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n" + note)
