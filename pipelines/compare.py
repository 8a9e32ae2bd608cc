"""Recipe ``mdmf-cache compare``: several heads on one cache, identical seeded test episodes, the paper's Tables 1-2.

Top to bottom:
    1. the config (:class:`CompareConfig`): every method known, every training config checked, the cache
       complete, every episode possible (:func:`check_episodes`: the test split for every shot, the train and
       val splits for every trained method and shot); nothing is written before that;
    2. per shot, the saved seeded test episode list (``episodes_{N}way_{K}shot.npz``), the same for every
       method;
    3. per trainable (method, shot): a fast-mode run in ``OUT/runs/<method>_<K>shot`` with the head's
       released defaults (its preset, training shot and queries for K; CLIP-FSAR trains on 1-shot episodes
       for a 5-shot run) and the training options given here (the same for every method); a finished run
       is reused, an interrupted one resumed. With ``sweep`` N: instead an N-trial sweep on val
       (:mod:`mdmf_cache.sweeps.study`) in ``OUT/sweeps/<method>_<K>shot`` over the head's default space, the
       method, the shot and the training options given here fixed; the best trial's run (its ``best.pt``
       chosen on val) is the method's run. A finished sweep is reused, an unfinished one resumed;
    4. per (method, shot): per-episode accuracies on that list (``scores/<method>_<K>shot.npy``; heads
       without parameters and baselines scored as they are), reused when present;
    5. ``table.csv`` / ``table.md`` (one row per method, columns per shot: mean +- 95% CI, the paired
       difference to the reference method with its CI, and the accuracy the papers report for that
       method and dataset with the backbone it was measured on; with ``sweep``, the best trial's parameters)
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
    seed: int = 0
    device: str = "auto"
    sweep: int = 0  # trials of a val sweep per trained (method, shot), its best trial scored; 0: the defaults trained

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
        for name in ("cache", "out", "method", "shot", "resume", "heads", "mode", "full", "way", "seed", "device"):
            if name in self.train:
                problems.append(f"training option {name!r} is set by compare itself")
        unknown = sorted(set(self.train) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown training option(s) {', '.join(unknown)}")
        if problems:
            raise ConfigError("; ".join(problems))


def check_episodes(cfg: CompareConfig, tcfgs: dict[tuple[str, int], Any]) -> None:
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
    for (method, shot), tcfg in tcfgs.items():
        t = tcfg.resolved()
        check("train", t.train_shot, t.train_queries, f"{method} --shot {shot} training episodes")
        check("val", t.shot, t.val_queries, f"{method} --shot {shot} validation episodes")


def _trained(method: str) -> bool:
    from mdmf_cache import heads

    return method in heads.REGISTRY and heads.REGISTRY[method].parametric


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
             **{k.replace("_", "-"): v for k, v in cfg.train.items()}}
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
    from pipelines import train as train_recipe

    # 1. everything checked before anything is written
    cfg.validate()
    out = Path(cfg.out)
    store = CacheStore(cfg.cache)
    if not store.is_complete():
        raise ConfigError(f"{cfg.cache} is not complete; rerun the same 'mdmf-cache extract' command to finish it")
    tcfgs = {}
    for method in filter(_trained, cfg.methods):
        for shot in cfg.shots:
            tcfgs[method, shot] = TrainConfig(cache=cfg.cache, out=str(out / "runs" / f"{method}_{shot}shot"),
                                              method=method, way=cfg.way, shot=shot, seed=cfg.seed, device=cfg.device,
                                              **cfg.train)
            tcfgs[method, shot].validate()
    scfgs = {key: sweep_config(cfg, *key) for key in tcfgs} if cfg.sweep else {}
    for scfg in scfgs.values():
        plan(scfg)  # the head's default space, every corner of it a valid config; nothing written
    saved = json.loads(json.dumps(asdict(cfg)))
    old = out / "compare_config.json"
    if old.is_file():
        before = json.loads(old.read_text())
        added = {"sweep": 0}  # fields newer than some saved comparisons: absent means their default
        diff = sorted(k for k in saved if k not in ("device",) and before.get(k, added.get(k)) != saved[k])
        if diff:
            raise ConfigError(f"{out} holds a comparison made with other {', '.join(diff)}; rerun it as it was "
                              "(it goes on where it stopped) or choose another --out")
    check_episodes(cfg, tcfgs)
    device = resolve_device(cfg.device)
    split = load_split_features(cfg.cache, cfg.split, device=str(device))
    sampler = EpisodeSampler(split.labels.cpu().numpy(), split.num_classes)
    for shot in cfg.shots:
        sampler.check(cfg.way, shot, 1, split=cfg.split)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(old, saved)
    (out / "scores").mkdir(exist_ok=True)

    # 2. one seeded episode list per shot
    lists = {}
    for shot in cfg.shots:
        eps = episode_list(split, cfg.way, shot, 1, cfg.test_episodes, cfg.seed)
        path = out / f"episodes_{cfg.way}way_{shot}shot.npz"
        if path.is_file():
            kept = Episodes.load(path)
            if not all(np.array_equal(getattr(kept, f), getattr(eps, f)) for f in Episodes.__dataclass_fields__):
                raise ConfigError(f"{path} is not this cache's episode list any more (the test split changed); "
                                  "use another --out")
        else:
            _save_episodes(eps, path)
        lists[shot] = eps

    # 3. train (or tune on val) what is not finished; resume what was interrupted
    runs = {key: tcfg.out for key, tcfg in tcfgs.items()}
    tuned: dict[tuple[str, int], dict[str, Any]] = {}
    for (method, shot), tcfg in tcfgs.items():
        if cfg.sweep:
            tuned[method, shot] = _tune(scfgs[method, shot], progress)
            runs[method, shot] = tuned[method, shot]["run"]
            continue
        run = Path(tcfg.out)
        if _finished(run, tcfg.episodes):
            log.info("%s %d-shot: reusing %s", method, shot, run)
            continue
        tcfg.resume = (run / "last.pt").is_file()
        log.info("%s %d-shot: training %s", method, shot, run)
        train_recipe.run(tcfg, progress=progress, show=False)

    # 4. scores on the saved lists
    accs: dict[tuple[str, int], np.ndarray] = {}
    for method in cfg.methods:
        for shot in cfg.shots:
            path = out / "scores" / f"{method}_{shot}shot.npy"
            if path.is_file():
                accs[method, shot] = np.load(path)
                continue
            model = load_run(runs[method, shot], str(device))[0] if (method, shot) in runs else None
            res = score(method, split, lists[shot], model, cfg.seed)
            accs[method, shot] = res.episode_acc * 100
            _save_scores(accs[method, shot], path)

    # 5. tables and the figure
    fp = store.fingerprint.get("video") or {}
    rows = table_rows(cfg, accs, fp.get("dataset", ""), fp.get("model", ""), tuned)
    write_tables(out, rows, cfg.shots, sweep=cfg.sweep)
    from mdmf_cache.report.plots import compare_figure, plot_safely
    from mdmf_cache.report.tables import console, print_compare

    plot_safely(compare_figure, rows, cfg.shots, out / "table.png",
                f"{fp.get('dataset', '')} {fp.get('model', '')}: {cfg.way}-way, {cfg.test_episodes} identical test "
                "episodes per shot")
    if show:
        print_compare(rows, cfg.shots, f"{cfg.way}-way, {cfg.test_episodes} identical test episodes per shot")
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


def table_rows(cfg: CompareConfig, accs: dict[tuple[str, int], np.ndarray], dataset: str, model: str,
               tuned: dict[tuple[str, int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per method: per shot its mean and CI, the paired difference to the reference, the reported number,
    and for a tuned method its best trial's parameters and val accuracy."""
    from mdmf_cache.data.episodes import mean_ci
    from mdmf_cache.paper import backbone_of, reported

    rows = []
    for method in cfg.methods:
        row: dict[str, Any] = {"method": method, "backbone": backbone_of(model) if model else ""}
        for shot in cfg.shots:
            acc = accs[method, shot]
            row[f"{shot}shot"], row[f"{shot}shot_ci95"] = mean_ci(acc)
            if method != cfg.reference:
                row[f"{shot}shot_diff"], row[f"{shot}shot_diff_ci95"] = mean_ci(acc - accs[cfg.reference, shot])
            paper = reported(method, dataset, shot, model)
            if paper is not None:
                row[f"{shot}shot_reported"], row[f"{shot}shot_reported_backbone"] = paper
            best = (tuned or {}).get((method, shot))
            if best is not None:
                row[f"{shot}shot_tuned"] = params_text(best["params"])
                row[f"{shot}shot_tuned_val"] = best["val_acc"]
        rows.append(row)
    return rows


def params_text(params: dict[str, Any]) -> str:
    """``lr=0.000312, lambda=0.84``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_tables(out: Path, rows: list[dict[str, Any]], shots: tuple[int, ...], sweep: int = 0) -> None:
    """``table.csv`` (every number) and ``table.md`` (the paper's layout: one row per method, a column per shot;
    after a ``sweep`` of that many trials, a column with each tuned method's best trial's parameters per shot)."""
    from mdmf_cache.fileio import atomic_write_csv, atomic_write_text

    atomic_write_csv(out / "table.csv", rows)
    head = ["method", *(f"{k}-shot" for k in shots), *(f"{k}-shot vs ref" for k in shots), "reported (backbone)"]
    head += ["tuned on val (best trial)"] if sweep else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        cells += [f"{r[f'{k}shot']:.2f} ± {r[f'{k}shot_ci95']:.2f}" for k in shots]
        cells += [f"{r[f'{k}shot_diff']:+.2f} ± {r[f'{k}shot_diff_ci95']:.2f}" if f"{k}shot_diff" in r else "(ref)"
                  for k in shots]
        paper = ["/".join(f"{r[f'{k}shot_reported']:.1f}" if f"{k}shot_reported" in r else "-" for k in shots)]
        backbones = {r[f"{k}shot_reported_backbone"] for k in shots if f"{k}shot_reported_backbone" in r}
        cells.append(f"{paper[0]} ({', '.join(sorted(backbones))})" if backbones else "-")
        if sweep:
            cells.append("; ".join(f"{k}-shot: {r[f'{k}shot_tuned']}" for k in shots if f"{k}shot_tuned" in r) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nAccuracy in %, mean ± 95% CI over the same seeded test episodes; 'vs ref' is the paired difference "
            "to the reference method. 'reported' is what the CLIP-MDMF paper's Tables 1-2 give for that method and "
            "dataset, on the backbone in parentheses: ResNet-50 (ImageNet) numbers are not CLIP results.\n")
    if sweep:
        note += (f"\nTuned on val: each trained method was tuned per shot by a {sweep}-trial sweep on val "
                 "(sweeps/METHOD_Kshot); its best trial's run is what is scored here, and the last column gives that "
                 "trial's parameters.\n")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n" + note)
