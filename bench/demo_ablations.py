"""Accuracy effects of two test/augmentation choices, measured on the demo (not a test, not a timing).

1. PPS at test: the paper preset draws the query token from the selector distribution at test as
   in training (seeded); ``--pps-test argmax`` takes the most likely class instead. The same trained
   heads are scored both ways on the same saved episodes.
2. Horizontal flips of training views: the demo's classes include left/right motions (as SSv2's
   "from left to right"), so a flip turns a video into another class. The train split is extracted
   a second time with flips, a second run is trained on it with the same schedule, and both runs are
   scored on the same test episodes.

    python bench/demo_ablations.py            # reuses demo_out/ (runs `mdmf-cache demo` first if needed)
    python bench/demo_ablations.py --quick    # seconds, not a measurement: a 2-way mini demo in a temporary directory

``--quick`` does not run the demo (its 250 videos take minutes on a CPU): it makes a mini demo the same way
(10 classes x 2 tiny videos, the demo's extraction settings with T = 4, 4 training episodes, 2-way 1-shot) and
runs both ablations on it through the same calls.

Prints a table and one JSON line (``{"bench": "demo_ablations", ...}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.demo import DemoConfig, run as run_demo  # noqa: E402
from pipelines.extract import run as run_extract  # noqa: E402
from mdmf_cache.configs import EvalConfig, ExtractConfig, TrainConfig  # noqa: E402
from pipelines.evaluate import run as run_eval  # noqa: E402
from pipelines.train import run as run_train  # noqa: E402

#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "episodes", "pps_sample_1shot", "pps_argmax_1shot", "train_no_flip_1shot", "train_flip_1shot", "quick")


def full_demo(out: Path) -> tuple[DemoConfig, Path, dict]:
    """The demo in ``out`` (run first if it has no trained heads); its config, run and the settings of the ablations."""
    cfg = DemoConfig(out=str(out))
    run = out / "runs" / "demo"
    if not (run / "best.pt").is_file():
        run_demo(cfg)
    return cfg, run, {"extract": {}, "train": {"val_every": 200, "val_episodes": 300}, "eval": {}}


def mini_demo(out: Path) -> tuple[DemoConfig, Path, dict]:
    """A 2-way mini demo made the way ``run_demo`` makes it (videos, the demo's extraction settings, fast-mode heads)."""
    from mdmf_cache.data.synthetic import make_action_dataset

    cfg = DemoConfig(out=str(out), num_classes=10, videos_per_class=2, num_frames=8, train_views=1, workers=0,
                     train_episodes=4, shots=(1,))
    small = {"extract": {"num_frames": 4, "way": 2},
             "train": {"way": 2, "shot": 1, "train_queries": 1, "episodes_per_step": 2, "val_every": 4, "val_episodes": 10},
             "eval": {"way": 2}}
    make_action_dataset(out / "videos", num_classes=cfg.num_classes, videos_per_class=cfg.videos_per_class,
                        num_frames=cfg.num_frames, size=(64, 48), seed=cfg.seed)
    path, _ = run_extract(ExtractConfig(dataset="folder", root=str(out / "videos"), cache_dir=str(out / "cache"),
                                        name="demo", model=cfg.model, pretrained=None, train_views=cfg.train_views,
                                        workers=cfg.workers, seed=cfg.seed, clean_names=True, chunk_rows=16, flip=False,
                                        progress=False, **small["extract"]), show=False)
    run = out / "runs" / "demo"
    run_train(TrainConfig(cache=str(path), out=str(run), episodes=cfg.train_episodes, lr=cfg.lr, seed=cfg.seed,
                          **small["train"]), progress=False, show=False)
    return cfg, run, small


def ablations(out: Path, cfg: DemoConfig, run: Path, kw: dict, episodes: int) -> dict:
    """Both ablations on the demo in ``out``: the record of the JSON line (accuracy %, 95% CI per arm and shot)."""
    shots = cfg.shots
    record: dict = {"bench": "demo_ablations", "episodes": episodes}

    # 1. PPS rule at test: same heads, same episodes
    for rule in ("sample", "argmax"):
        res = run_eval(EvalConfig(target=str(run), shots=shots, episodes=episodes, pps_test=rule,
                                  out=str(out / "eval" / f"pps_{rule}"), **kw["eval"]), progress=False, show=False)
        for shot, r in res["shots"].items():
            record[f"pps_{rule}_{shot}shot"] = [round(r["accuracy"], 2), round(r["ci95"], 2)]

    # 2. flips of the training views: a flipped train split, the same schedule
    flipped, _ = run_extract(ExtractConfig(dataset="folder", root=str(out / "videos"), cache_dir=str(out / "cache"),
                                           name="demo_flip", model=cfg.model, pretrained=None,
                                           train_views=cfg.train_views, workers=cfg.workers, seed=cfg.seed,
                                           clean_names=True, chunk_rows=16, flip=True, progress=False, **kw["extract"]),
                             show=False)
    flip_run = out / "runs" / "demo_flip"
    run_train(TrainConfig(cache=str(flipped), out=str(flip_run), episodes=cfg.train_episodes, lr=cfg.lr,
                          seed=cfg.seed, resume=(flip_run / "last.pt").is_file(), **kw["train"]),
              progress=False, show=False)
    for name, target in (("no_flip", run), ("flip", flip_run)):
        res = run_eval(EvalConfig(target=str(target), shots=shots, episodes=episodes,
                                  out=str(out / "eval" / f"train_{name}"), **kw["eval"]), progress=False, show=False)
        for shot, r in res["shots"].items():
            record[f"train_{name}_{shot}shot"] = [round(r["accuracy"], 2), round(r["ci95"], 2)]
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="the demo's folder (default demo_out; --quick: a temporary directory)")
    p.add_argument("--episodes", type=int, default=None, help="test episodes per shot (1000; --quick: 20)")
    p.add_argument("--quick", action="store_true", help="seconds, not a measurement: a 2-way mini demo")
    args = p.parse_args(argv)
    episodes = args.episodes or (20 if args.quick else 1000)
    with tempfile.TemporaryDirectory(prefix="bench_ablations_") if args.quick and not args.out else \
            contextlib.nullcontext(args.out or "demo_out") as where:
        out = Path(where)
        cfg, run, kw = mini_demo(out) if args.quick else full_demo(out)
        record = {**ablations(out, cfg, run, kw, episodes), "quick": args.quick}
    way = kw["eval"].get("way", 5)
    print(f"demo ({cfg.model}){' --quick mini demo, not a measurement' if args.quick else ''}, {way}-way, "
          f"{episodes} identical test episodes per shot; accuracy % ± 95% CI")
    for key, (acc, ci) in ((k, v) for k, v in record.items() if isinstance(v, list)):
        print(f"  {key:<24} {acc:6.2f} ± {ci:.2f}")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
