"""Ablations: train the full model and its variants on one cache, score all on identical episodes.

Recipe, top to bottom:
    1. list the arms: ``full`` plus one named variant (flags), or a whole paper table (``--table``);
    2. train each arm with the same seed and schedule (a finished arm with the same config is reused);
    3. score every arm on the same seeded test episode list; for variants, the paired difference to
       ``full`` with its own CI (same episodes, so the CI of the difference is tight);
    4. write ``ablation.csv`` and ``ablation.md`` (beside the paper's numbers for tables 3-5).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from mdmf_cache.data.episodes import mean_ci
from mdmf_cache.errors import ConfigError

log = logging.getLogger(__name__)

# docs/method.md §11, CLIP-RN50, 5-way 5-shot, as (K100, SSv2-Small, HMDB).
PAPER_TABLES: dict[int, list[tuple[str, dict[str, Any], tuple[float, float, float]]]] = {
    3: [
        ("GTC", {"views": "gtc", "pps": False}, (92.0, 58.1, 82.4)),
        ("GTC+PPS", {"views": "gtc", "pps": True}, (93.2, 58.6, 82.4)),
        ("LTC", {"views": "ltc", "pps": False}, (91.9, 56.2, 82.1)),
        ("LTC+PPS", {"views": "ltc", "pps": True}, (92.9, 57.2, 82.3)),
        ("NTC", {"views": "ntc", "pps": False}, (91.4, 56.0, 81.7)),
        ("NTC+PPS", {"views": "ntc", "pps": True}, (92.0, 56.5, 82.2)),
    ],
    4: [
        ("distill", {"distill": True, "pps": False}, (92.3, 57.1, 82.4)),
        ("distill+PPS", {"distill": True, "pps": True}, (93.5, 60.4, 83.0)),
        ("neither", {"distill": False, "pps": False}, (92.2, 56.6, 82.1)),
        ("PPS only", {"distill": False, "pps": True}, (93.1, 59.1, 82.5)),
    ],
    5: [
        (f"{cname} {dname}", {"pps": True, "condition": cond, "direction": dirn}, paper)
        for (dname, dirn), rows in (
            (("bi", "bidirectional"), ((93.5, 60.4, 83.0), (93.0, 59.2, 82.6), (93.1, 59.7, 82.3), (93.0, 58.9, 82.3))),
            (("up->down", "up-down"), ((93.2, 59.1, 82.6), (93.1, 58.8, 82.3), (93.0, 58.9, 82.4), (92.7, 58.4, 82.2))),
            (("down->up", "down-up"), ((93.1, 58.9, 82.5), (93.1, 58.0, 82.3), (92.9, 59.3, 82.1), (92.7, 58.6, 82.1))),
        )
        for (cname, cond), paper in zip((("t+v", "both"), ("t", "text"), ("v", "visual"), ("none", "none")), rows)
    ],
}


@dataclass
class AblateConfig:
    """One ablation study; saved as ``ablate_config.json`` in ``out``."""

    cache: str = ""
    out: str = "runs/ablate"
    preset: str = "paper"
    variant: dict[str, Any] = field(default_factory=dict)  # head overrides of the named variant
    table: int | None = None  # 3, 4 or 5: the paper's grid instead of one variant
    lambdas: tuple[float, ...] = ()  # a grid over the distillation weight instead (the paper's Fig. 4)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of every arm (heads: under its switches)
    way: int = 5
    shot: int = 5
    test_episodes: int = 10000
    split: str = "test"
    seed: int = 0
    device: str = "auto"

    def arms(self) -> list[tuple[str, dict[str, Any], tuple[float, float, float] | None]]:
        if self.table is not None:
            if self.table not in PAPER_TABLES:
                raise ConfigError(f"--table {self.table}: choose one of {', '.join(map(str, PAPER_TABLES))}")
            return list(PAPER_TABLES[self.table])
        if self.lambdas:
            if len(self.lambdas) < 2 or min(self.lambdas) < 0:
                raise ConfigError("--lambda takes two or more values >= 0, e.g. 0.25,0.5,1,2")
            return [(f"lambda={lam:g}", {**self.variant, "lam": float(lam)}, None) for lam in self.lambdas]
        if not self.variant:
            raise ConfigError("name a variant (--no-pps, --no-distill, --view, --condition, --direction) or --table 3|4|5")
        name = ",".join(f"{k}={v}" for k, v in sorted(self.variant.items()))
        return [("full", {}, None), (name, dict(self.variant), None)]


def _arm_dir(out: Path, name: str) -> Path:
    return out / ("arm_" + "".join(c if c.isalnum() or c in "-_=." else "_" for c in name))


def run(cfg: AblateConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Train and score every arm (with ``show``, print the table); returns the rows written to ``ablation.csv``."""
    from mdmf_cache.evaluation.scoring import TokenSplits, episode_list, score
    from mdmf_cache.device import resolve_device
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.heads.factory import load_head
    from mdmf_cache.store.runs import read_run_file
    from pipelines import train as train_recipe
    from mdmf_cache.store.read import load_split_features

    from mdmf_cache.data.episodes import EpisodeSampler
    from mdmf_cache.fileio import atomic_write_json

    arms = cfg.arms()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    # 1. every option and every arm checked before any training (a bad --view fails now, not after an arm)
    if cfg.test_episodes < 1:
        raise ConfigError(f"--test-episodes {cfg.test_episodes}: must be >= 1")
    unknown = sorted(set(cfg.train) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}")
    shared = dict(cfg.train)
    shared_heads = shared.pop("heads", None) or {}  # head options of every arm; an arm's own switches win
    tcfgs = {}
    for name, heads, _ in arms:
        switches = dict(heads)  # an arm's "method" (MDMF vs a rival) is the run's, the rest are head switches
        method = switches.pop("method", "mdmf")
        tcfgs[name] = TrainConfig(cache=cfg.cache, out=str(_arm_dir(out, name)),
                                  preset=cfg.preset if method == "mdmf" else None,  # a rival runs as released
                                  method=method, heads={**shared_heads, **switches},
                                  way=cfg.way, shot=cfg.shot, seed=cfg.seed, device=cfg.device, **shared)
        tcfgs[name].validate()
    split = load_split_features(cfg.cache, cfg.split, device=str(device))
    EpisodeSampler(split.labels.cpu().numpy(), split.num_classes).check(cfg.way, cfg.shot, 1, split=cfg.split)
    _check_same_study(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablate_config.json", asdict(cfg))
    # 2. train
    runs = {}
    for name, heads, _ in arms:
        tcfg = tcfgs[name]
        run = Path(tcfg.out)
        if (run / "best.pt").is_file() and (run / "metrics.jsonl").is_file():
            last = read_run_file(run / "metrics.jsonl")
            if last and last[-1]["episodes"] >= tcfg.episodes:
                log.info("arm %s: reusing finished run %s", name, run)
                runs[name] = run
                continue
            tcfg.resume = True
        log.info("arm %s: training (%s)", name, heads or "preset defaults")
        train_recipe.run(tcfg, progress=progress, show=False)
        runs[name] = run
    # 3. score on one episode list
    eps = episode_list(split, cfg.way, cfg.shot, 1, cfg.test_episodes, cfg.seed)
    eps.save(out / f"episodes_{cfg.way}way_{cfg.shot}shot.npz")
    accs = {}
    with TokenSplits(split, cfg.cache, cfg.split) as splits:  # an arm of a token head reads its tokens
        for name, _, _ in arms:
            model, _ = load_head(runs[name], str(device))
            accs[name] = score(model.method, splits(model.method), eps, model, cfg.seed).episode_acc * 100
    # 4. tables
    base = accs.get("full")
    rows = []
    for name, heads, paper in arms:
        mean, ci = mean_ci(accs[name])
        row = {"arm": name, "accuracy": mean, "ci95": ci, "episodes": len(eps)}
        if base is not None and name != "full":
            row["diff_vs_full"], row["diff_ci95"] = mean_ci(accs[name] - base)
        if paper is not None:
            row.update({"paper_k100": paper[0], "paper_ssv2_small": paper[1], "paper_hmdb": paper[2]})
        rows.append(row)
    _write_tables(out, rows)
    from mdmf_cache.report.plots import ablate_figures, plot_safely
    from mdmf_cache.report.tables import console, print_comparison

    plot_safely(ablate_figures, out)
    if show:
        print_comparison(rows, f"ablation, {cfg.way}-way {cfg.shot}-shot, {cfg.test_episodes} identical test episodes")
        console.print(f"tables: {out}/ablation.csv, ablation.md")
    return {"rows": rows, "out": str(out)}


def _check_same_study(cfg: AblateConfig, out: Path) -> None:
    """Refuse an ``out`` that holds an ablation made with other settings: its arms were trained with them, and
    reusing them would put them in a table that claims these (the differing fields named)."""
    import json

    from mdmf_cache.store.runs import read_run_file

    old = out / "ablate_config.json"
    if not old.is_file():
        return
    before = read_run_file(old, fix="restore it or choose another --out")
    saved = json.loads(json.dumps(asdict(cfg)))
    diff = sorted(k for k in saved if k != "device" and before.get(k) != saved[k])
    if diff:
        raise ConfigError(f"{out} holds an ablation made with other {', '.join(diff)}; rerun it as it was (it goes on "
                          "where it stopped) or choose another --out")


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    from mdmf_cache.fileio import atomic_write_csv, atomic_write_text

    atomic_write_csv(out / "ablation.csv", rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
