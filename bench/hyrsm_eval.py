"""Evaluation cost of the heads without a per-video path (HyRSM, HyRSM++), not a test.

These heads score every episode through ``forward`` (the direct path of ``evaluation.score``), which the
evaluation hands ``--batch-size`` episodes at a time (500 by default); in eval mode the head runs them in
chunks of about ``EVAL_ELEMENTS`` elements per intermediate. Measured in one run, on random float16
features of a test split (``--classes`` x ``--per-class`` videos, T = 8, width D), 5-way, 1 query per class:

* seconds (elapsed and this process's CPU time) for ``--episodes`` episodes at ``--shot``;
* the process's peak resident memory above what it held before scoring (``ru_maxrss``);
* ``--eval-elements``: the head's chunk size (0: chunking off, all of a batch in one pass), for comparison
  (run each in its own process: the peak is per process).

    python bench/hyrsm_eval.py                         # hyrsm, D=1024, 1000 5-way 5-shot episodes
    python bench/hyrsm_eval.py --eval-elements 0       # the same, 500 episodes per pass
    python bench/hyrsm_eval.py --method hyrsm++ --shot 1

Prints one JSON line (``{"bench": "hyrsm_eval", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from mdmf_cache.evaluation import episode_list, score  # noqa: E402
from mdmf_cache.heads import hyrsm  # noqa: E402
from mdmf_cache.runs import build_model  # noqa: E402
from train_fast import synthetic_split  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="hyrsm", choices=["hyrsm", "hyrsm++"])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500, help="episodes the evaluation hands the head at once")
    p.add_argument("--classes", type=int, default=24)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--eval-elements", type=int, default=hyrsm.EVAL_ELEMENTS,
                   help="the head's eval chunk (elements per intermediate); 0: no chunking")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hyrsm.EVAL_ELEMENTS = args.eval_elements or 1 << 62
    split = synthetic_split(args.classes, args.per_class, 8, args.dim, torch.device("cpu"), 0)
    torch.manual_seed(0)
    model = build_model(None, args.dim, 8, {}, args.method, num_classes=64, shot=args.shot).eval()
    eps = episode_list(split, 5, args.shot, 1, args.episodes, seed=0)
    before = peak_rss_mb()
    w0, c0 = time.perf_counter(), time.process_time()
    res = score(args.method, split, eps, model, batch_size=args.batch_size, path="direct")
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    out = {"bench": "hyrsm_eval", "method": args.method, "form": model.options.form, "dim": args.dim,
           "shot": args.shot, "episodes": args.episodes, "batch_size": args.batch_size, "eval_elements": args.eval_elements,
           "threads": torch.get_num_threads(), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "episodes_per_s": round(args.episodes / wall, 1), "rss_before_mb": round(before),
           "peak_rss_above_mb": round(peak_rss_mb() - before), "accuracy": round(res.mean * 100, 2),
           "loadavg": os.getloadavg()[0]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
