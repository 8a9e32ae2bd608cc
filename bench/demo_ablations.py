"""Accuracy effects of two test/augmentation choices, measured on the demo (not a test, not a timing).

1. PPS at test: the paper preset draws the query token from the selector distribution at test as
   in training (seeded); ``--pps-test argmax`` takes the most likely class instead. The same trained
   heads are scored both ways on the same saved episodes.
2. Horizontal flips of training views: the demo's classes include left/right motions (as SSv2's
   "from left to right"), so a flip turns a video into another class. The train split is extracted
   a second time with flips, a second run is trained on it with the same schedule, and both runs are
   scored on the same test episodes.

    python bench/demo_ablations.py            # reuses demo_out/ (runs `mdmf-cache demo` first if needed)

Prints a table and one JSON line (``{"bench": "demo_ablations", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.demo import DemoConfig, run_demo  # noqa: E402
from mdmf_cache.configs import EvalConfig
from mdmf_cache.evaluation import run_eval  # noqa: E402
from mdmf_cache.cache_build import run_extract
from mdmf_cache.configs import ExtractConfig  # noqa: E402
from mdmf_cache.configs import TrainConfig
from mdmf_cache.training import run_train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--episodes", type=int, default=1000, help="test episodes per shot")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = DemoConfig(out=str(out))
    run = out / "runs" / "demo"
    if not (run / "best.pt").is_file():
        run_demo(cfg)
    shots = cfg.shots
    record: dict = {"bench": "demo_ablations", "episodes": args.episodes}

    # 1. PPS rule at test: same heads, same episodes
    for rule in ("sample", "argmax"):
        res = run_eval(EvalConfig(target=str(run), shots=shots, episodes=args.episodes, pps_test=rule,
                                  out=str(out / "eval" / f"pps_{rule}")), progress=False)
        for shot, r in res["shots"].items():
            record[f"pps_{rule}_{shot}shot"] = [round(r["accuracy"], 2), round(r["ci95"], 2)]

    # 2. flips of the training views: a flipped train split, the same schedule
    flipped, _ = run_extract(ExtractConfig(dataset="folder", root=str(out / "videos"), cache_dir=str(out / "cache"),
                                           name="demo_flip", model=cfg.model, pretrained=None,
                                           train_views=cfg.train_views, workers=cfg.workers, seed=cfg.seed,
                                           clean_names=True, chunk_rows=16, flip=True, progress=False))
    flip_run = out / "runs" / "demo_flip"
    run_train(TrainConfig(cache=str(flipped), out=str(flip_run), episodes=cfg.train_episodes, lr=cfg.lr,
                          val_every=200, val_episodes=300, seed=cfg.seed, resume=(flip_run / "last.pt").is_file()),
              progress=False)
    for name, target in (("no_flip", run), ("flip", flip_run)):
        res = run_eval(EvalConfig(target=str(target), shots=shots, episodes=args.episodes,
                                  out=str(out / "eval" / f"train_{name}")), progress=False)
        for shot, r in res["shots"].items():
            record[f"train_{name}_{shot}shot"] = [round(r["accuracy"], 2), round(r["ci95"], 2)]

    print(f"demo ({cfg.model}), 5-way, {args.episodes} identical test episodes per shot; accuracy % ± 95% CI")
    for key, (acc, ci) in ((k, v) for k, v in record.items() if isinstance(v, list)):
        print(f"  {key:<24} {acc:6.2f} ± {ci:.2f}")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
