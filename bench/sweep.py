"""Benchmark of ``mdmf-cache sweep`` (not a test): trials per hour with --jobs 1 and 2, and how much of a
trial's time is spent outside training.

Measured in one run on one cache (the demo's synthetic cache by default, built on first use, or
``--cache``, or a random-feature cache of width ``--synthetic-dim`` for the D = 1024 GPU goal):

* for each ``--jobs`` value: a fresh SQLite study of ``--trials`` trials (no pruning, so every trial
  trains the same number of episodes); wall time -> trials/hour;
* per trial (from the study): its wall time, the part inside ``run_train``, and, by measuring the
  training step and one validation on their own, the split of a trial into training steps,
  validations, set-up (loading, model, checkpoints, figures) and storage (Optuna, heartbeat).

    python bench/sweep.py                                   # demo cache, --jobs 1,2, 6 trials of 200 episodes
    python bench/sweep.py --synthetic-dim 1024 --episodes 2000 --trials 20 --jobs 1,2,4   # on a GPU
    python bench/sweep.py --quick       # seconds: a check that it runs (tiny random cache, temp dir), not a measurement

Prints a table and one JSON line (``{"bench": "sweep", ...}``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))


def demo_cache(work: Path) -> Path:
    """The demo's synthetic cache (same settings as ``mdmf-cache demo``), built once under ``work``."""
    from mdmf_cache.data.synthetic import make_action_dataset
    from pipelines.demo import DemoConfig
    from pipelines.extract import run as run_extract
    from mdmf_cache.configs import ExtractConfig

    d = DemoConfig()
    cache = work / "cache" / f"demo__{d.model}__random.zarr"
    if (cache / "zarr.json").is_file():
        return cache
    make_action_dataset(work / "videos", num_classes=d.num_classes, videos_per_class=d.videos_per_class,
                        num_frames=d.num_frames, seed=d.seed)
    path, _ = run_extract(ExtractConfig(dataset="folder", root=str(work / "videos"), cache_dir=str(work / "cache"),
                                        name="demo", model=d.model, pretrained=None, train_views=d.train_views,
                                        workers=d.workers, seed=d.seed, clean_names=True, chunk_rows=16, flip=False,
                                        progress=False), show=False)
    return path


def synthetic_cache(work: Path, dim: int, frames: int = 8, classes: tuple[int, int, int] = (64, 16, 16),
                    per_class: int = 20, signal: float = 0.0) -> Path:
    """A complete cache of float16 features: ``classes`` (train, val, test) classes of ``per_class`` videos each.

    ``signal`` 0: random features (only time can be measured). ``signal`` > 0: every frame (and every class's
    text) is ``a * centre + noise`` with a random centre per class and ``a = signal * sqrt(1024 / dim)``, so
    classes can be told apart (a ProtoNet on 5-way 5-shot val episodes scores ~57% at ``signal`` 0.05) and val
    accuracy means something.
    """
    from mdmf_cache.store.cache import CacheStore

    tag = f"_c{'-'.join(map(str, classes))}x{per_class}" if (classes, per_class) != ((64, 16, 16), 20) else ""
    path = work / f"synthetic_d{dim}{tag}{f'_s{signal:g}' if signal else ''}.zarr"
    if (path / "zarr.json").is_file():
        return path
    rng = np.random.default_rng(0)
    a = signal * (1024 / dim) ** 0.5
    store = CacheStore.open_for_writing(path, {"video": {"synthetic": True, "dim": dim, "frames": frames,
                                                         "signal": signal}, "text": {}}, overwrite=True)
    for split, c in zip(("train", "val", "test"), classes):
        n = c * per_class
        labels = np.repeat(np.arange(c), per_class)
        centre = rng.standard_normal((c, dim)) * a  # (C, D); zero when signal is 0
        names = [f"{split} class {k}" for k in range(c)]
        store.sync_rows(split, [f"{names[k]}/{split}{i}" for i, k in enumerate(labels)], labels, np.ones(n, bool),
                        names, names, views=1, num_frames=frames, dim=dim, chunk_rows=n)
        store.write_rows(split, np.arange(n), {
            "features": (centre[labels, None, None] + rng.standard_normal((n, 1, frames, dim))).astype(np.float16),
            "frame_indices": np.tile(np.arange(frames, dtype=np.int32), (n, 1, 1)),
            "num_frames": np.full(n, frames, np.int32), "failed": np.zeros(n, bool), "errors": np.array([""] * n)})
        store.write_text(split, (centre + rng.standard_normal((c, dim))).astype(np.float32), names, "{}")
    store.mark_ready()
    return path


def step_and_val_cost(cache: Path, fixed: dict, steps: int) -> tuple[float, float]:
    """Seconds per training episode (optimiser steps only) and per validation, with the trials' settings."""
    import torch

    from mdmf_cache.data.episodes import EpisodeSampler
    from mdmf_cache.store.read import load_split_features
    from mdmf_cache.device import resolve_device
    from mdmf_cache.configs import TrainConfig
    from mdmf_cache.heads.factory import build_model
    from mdmf_cache.evaluation.scoring import validate
    from train_fast import train_rate  # bench/train_fast.py: the trainer's step, timed on its own

    cfg = TrainConfig(cache=str(cache), **{k.replace("-", "_"): v for k, v in fixed.items()})
    device = resolve_device(cfg.device)
    train = load_split_features(cache, "train", device=str(device))
    val = load_split_features(cache, "val", device=str(device))
    views, frames, dim = train.features.shape[1:]
    torch.manual_seed(0)
    model = build_model(cfg.preset, dim, frames, {}).to(device)
    sampler = EpisodeSampler(train.labels.cpu().numpy(), train.num_classes, views=views)
    args = argparse.Namespace(episodes_per_step=cfg.episodes_per_step, way=cfg.way, shot=cfg.shot,
                              train_queries=cfg.train_queries)
    rate = train_rate(model, train, sampler, args, np.random.default_rng(0), cfg.episodes_per_step, steps, device)
    val_eps = EpisodeSampler(val.labels.cpu().numpy(), val.num_classes).sample(
        cfg.val_episodes, cfg.way, cfg.shot, cfg.val_queries, np.random.default_rng(1))
    validate(model, val, val_eps, 0)  # warm-up
    t0 = time.perf_counter()
    validate(model, val, val_eps, 0)
    return 1.0 / rate["episodes_per_s"], time.perf_counter() - t0


def trial_rows_of(out: Path) -> list[dict[str, float]]:
    """Per complete trial, in trial order: wall time, time in run_train, and its training loop's time."""
    import optuna

    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    rows = []
    for t in sorted(study.get_trials(), key=lambda t: t.number):
        if t.state.name != "COMPLETE":
            continue
        last = json.loads((Path(t.user_attrs["config"]["out"]) / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({"trial_s": (t.datetime_complete - t.datetime_start).total_seconds(),
                     "run_train_s": t.user_attrs["train_s"], "loop_s": last["episodes"] / last["episodes_per_s"]})
    return rows


#: --quick's sizes (seconds: a tiny random cache in a temporary directory; the sweep, its worker processes and
#: the cost split run as in the measured run); options given explicitly win.
QUICK = {"synthetic_dim": 32, "jobs": "1", "trials": 1, "episodes": 4, "val_every": 4, "val_episodes": 5}
QUICK_FIXED = {"shot": 1, "train-queries": 1, "episodes-per-step": 4}  # 4 videos per class suffice
FULL = {"jobs": "1,2", "trials": 6, "episodes": 200, "val_every": 100, "val_episodes": 300}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "device", "cache", "trials", "results", "trial_parts_s", "outside_training_s",
        "outside_training_frac", "first_trial_setup_s", "quick")  # speedup_jobs: with several --jobs values


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="where the cache and the studies go (default /tmp/mdmf_bench_sweep; "
                                                "--quick: a temporary directory, removed)")
    p.add_argument("--cache", default=None, help="a complete cache (default: the demo cache, built on first use)")
    p.add_argument("--synthetic-dim", type=int, default=None, help="use a random-feature cache of this width D")
    p.add_argument("--jobs", help="comma-separated --jobs values to compare (1,2; --quick: 1, tests/test_sweep.py "
                                  "runs several workers)")
    p.add_argument("--trials", type=int, help="(6)")
    p.add_argument("--episodes", type=int, help="training episodes per trial (200)")
    p.add_argument("--val-every", type=int, help="(100)")
    p.add_argument("--val-episodes", type=int, help="(300)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="seconds, not a measurement: a tiny random cache (D=32), "
                                                        "1 trial of 4 episodes, --jobs 1")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.work is not None or not args.quick:
        return _run(args, Path(args.work or "/tmp/mdmf_bench_sweep"))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from mdmf_cache.sweeps.study import SweepConfig
    from pipelines.sweep import run as run_sweep

    work.mkdir(parents=True, exist_ok=True)
    small = {"classes": (6, 5, 5), "per_class": 4} if args.quick else {}
    cache = Path(args.cache) if args.cache else (synthetic_cache(work, args.synthetic_dim, **small)
                                                  if args.synthetic_dim else demo_cache(work))
    fixed = {"episodes": args.episodes, "val-every": args.val_every, "val-episodes": args.val_episodes,
             "device": args.device, **(QUICK_FIXED if args.quick else {})}
    results = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        out = work / f"sweep_jobs{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = SweepConfig(cache=str(cache), out=str(out), trials=args.trials, jobs=jobs, prune=False,
                          space={"lr": "1e-4:1e-2:log", "lambda": "0.1:2"}, fixed=dict(fixed))
        t0 = time.perf_counter()
        res = run_sweep(cfg, progress=False, show=False)
        wall = time.perf_counter() - t0
        done = [r for r in res["rows"] if r["state"] == "COMPLETE"]
        results.append({"jobs": jobs, "wall_s": wall, "trials": len(done), "trials_per_hour": len(done) / wall * 3600,
                        "trial_s": float(np.mean([r["seconds"] for r in done])),
                        "run_train_s": float(np.mean([r["train_s"] for r in done])),
                        "best_val": max(r["value"] for r in done)})
    # one trial's parts. Inside the trial: its training loop (steps + validations) from its metrics.jsonl,
    # the rest of run_train (loading, model, checkpoints, curves.png) and the storage around it. The loop is
    # split into steps and validations by their cost ratio measured on their own, here, at the same time.
    s_per_ep, s_per_val = step_and_val_cost(cache, fixed, steps=1 if args.quick else max(3, min(20, args.episodes // 16)))
    n_val = -(-args.episodes // args.val_every)
    val_frac = n_val * s_per_val / (n_val * s_per_val + args.episodes * s_per_ep)
    one = results[0]
    rows = [r for r in trial_rows_of(work / f"sweep_jobs{one['jobs']}")]
    first, rest = rows[0], rows[1:] or rows[:1]
    mean = {k: float(np.mean([r[k] for r in rest])) for k in rest[0]}
    parts = {"training steps": mean["loop_s"] * (1 - val_frac), "validations": mean["loop_s"] * val_frac,
             "set-up, checkpoints, curves.png": mean["run_train_s"] - mean["loop_s"],
             "storage (Optuna, heartbeat)": mean["trial_s"] - mean["run_train_s"]}
    first_setup = first["run_train_s"] - first["loop_s"]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"sweep bench{' (--quick: not a measurement)' if args.quick else ''}: {dev}, cache {cache.name}, {args.trials} trials x {args.episodes} episodes "
          f"(val every {args.val_every}, {args.val_episodes} val episodes)")
    print(f"{'jobs':>4}  {'wall s':>7}  {'trials/hour':>11}  {'s per trial':>11}  {'in run_train':>12}")
    for r in results:
        print(f"{r['jobs']:>4}  {r['wall_s']:>7.1f}  {r['trials_per_hour']:>11.0f}  {r['trial_s']:>11.2f}  "
              f"{r['run_train_s']:>12.2f}")
    print(f"a trial (--jobs {one['jobs']}, mean of trials 2-{len(rows)}), {mean['trial_s']:.2f} s:")
    for k, v in parts.items():
        print(f"  {k:<32} {v:7.2f} s  {100 * v / mean['trial_s']:5.1f}%")
    outside = mean["trial_s"] - parts["training steps"]
    print(f"  outside training steps: {outside:.2f} s per trial ({100 * outside / mean['trial_s']:.1f}%); "
          f"outside training and validation: {outside - parts['validations']:.2f} s")
    print(f"  the first trial of a process also loads the cache and imports: set-up {first_setup:.2f} s")
    record = {"bench": "sweep", "device": dev, "cache": cache.name, "trials": args.trials, "episodes": args.episodes,
              "val_every": args.val_every, "val_episodes": args.val_episodes,
              "results": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in results],
              "trial_parts_s": {k: round(v, 3) for k, v in parts.items()},
              "outside_training_s": round(outside, 3), "outside_training_frac": round(outside / mean["trial_s"], 3),
              "outside_training_and_val_s": round(outside - parts["validations"], 3),
              "first_trial_setup_s": round(first_setup, 3), "quick": args.quick}
    if len(results) > 1:
        record["speedup_jobs"] = round(results[-1]["trials_per_hour"] / results[0]["trials_per_hour"], 3)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
