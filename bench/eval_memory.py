"""Evaluation's time and memory for one head on a test split of real size, not a test.

``eval``'s own path for the head (``evaluation.score``: per video where the head declares it, else the
direct path, ``--batch-size`` episodes at a time; HyRSM chunks each batch by ``hyrsm.EVAL_ELEMENTS``).
Measured in one run, on random float16 features of a test split (``--classes`` x ``--per-class`` videos,
T = 8, width D; the class signal ``--signal`` makes MDMF's prompt selector draw among several classes, as
on weak features), 5-way, 1 query per class:

* seconds (elapsed and this process's CPU time) for ``--episodes`` episodes at ``--shot``;
* the process's peak resident memory (``VmHWM``), in total and above what it held before scoring (the
  model, the features, torch itself);
* ``--eval-elements`` (HyRSM): the head's chunk size (0: chunking off), for comparison (each in its own
  process: the peak is per process).

    python bench/eval_memory.py --method mdmf --episodes 10000 --per-class 119   # SSv2-Full's 2,857 test videos
    python bench/eval_memory.py --method hyrsm                # 1000 5-way 5-shot episodes, D=1024
    python bench/eval_memory.py --method hyrsm --eval-elements 0
    python bench/eval_memory.py --quick

Prints, last, one JSON line (``{"bench": "eval_memory", ...}``).
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

from mdmf_cache import heads  # noqa: E402
from mdmf_cache.evaluation.scoring import episode_list, score  # noqa: E402
from mdmf_cache.heads import hyrsm  # noqa: E402
from mdmf_cache.heads.factory import build_model  # noqa: E402
from mdmf_cache.store.read import FeatureSplit  # noqa: E402

#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "method", "dim", "episodes", "path", "wall_s", "episodes_per_s", "peak_rss_above_mb", "accuracy",
        "quick")


def synthetic_split(classes: int, per_class: int, frames: int, dim: int, signal: float) -> FeatureSplit:
    """Random float16 features ``(N, 1, T, D)`` around each class's text direction (``signal`` x the text)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(per_class)
    text = torch.randn(classes, dim, generator=g)
    feats = (signal * text[labels][:, None, None] + torch.randn(len(labels), 1, frames, dim, generator=g)).half()
    names = [f"c{i}" for i in range(classes)]
    return FeatureSplit(feats, labels, [f"v{i}" for i in range(len(labels))], names, names, text)


def _status(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MB (Linux), else ``ru_maxrss``."""
    try:
        return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mdmf", choices=list(heads.METHODS))
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500, help="episodes the evaluation hands the head at once")
    p.add_argument("--classes", type=int, default=24)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--signal", type=float, default=0.02, help="class signal in the random features")
    p.add_argument("--quick", action="store_true", help="seconds: D=32, 40 episodes, 8 classes x 10 videos")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--eval-elements", type=int, default=hyrsm.EVAL_ELEMENTS,
                   help="the head's eval chunk (elements per intermediate); 0: no chunking")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.episodes, args.classes, args.per_class, args.batch_size = 32, 40, 8, 10, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    hyrsm.EVAL_ELEMENTS = args.eval_elements or 1 << 62
    split = synthetic_split(args.classes, args.per_class, 8, args.dim, args.signal)
    torch.manual_seed(0)
    model = build_model(None, args.dim, 8, {}, args.method, num_classes=64, shot=args.shot).eval()
    eps = episode_list(split, 5, args.shot, 1, args.episodes, seed=0)
    before = _status("VmRSS")
    w0, c0 = time.perf_counter(), time.process_time()
    res = score(args.method, split, eps, model, batch_size=args.batch_size)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = _status("VmHWM")
    out = {"bench": "eval_memory", "method": args.method, "dim": args.dim, "videos": args.classes * args.per_class,
           "shot": args.shot, "episodes": args.episodes, "batch_size": args.batch_size,
           "path": "per-video" if heads.get(args.method).per_video else "direct",
           "eval_elements": args.eval_elements if args.method.startswith("hyrsm") else None,
           "threads": torch.get_num_threads(), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "episodes_per_s": round(args.episodes / wall, 1), "rss_before_mb": round(before), "peak_rss_mb": round(peak),
           "peak_rss_above_mb": round(peak - before), "fused": res.fused, "accuracy": round(res.mean * 100, 2),
           "loadavg": os.getloadavg()[0], "quick": args.quick}
    print(f"eval_memory{' (--quick: not a measurement)' if args.quick else ''}: {args.method}, D={args.dim}, "
          f"{out['videos']} videos, {args.episodes} 5-way {args.shot}-shot episodes on the {out['path']} path: "
          f"{out['wall_s']} s ({out['episodes_per_s']} episodes/s), peak RSS +{out['peak_rss_above_mb']} MB")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
