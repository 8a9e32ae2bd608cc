"""Benchmark of the heads' training speed against this machine's matmul limit (not a test).

Measures, in one run, at width D (default 1024 = CLIP RN50), 5-way 5-shot, 5 train queries per
class, T = 8, E = 16 episodes per step, paper preset, random features:

* the matmul limit: GFLOP/s of the heads' own large GEMM shapes (the MMFE feed-forward and the
  temporal convolutions' matmuls, each as forward, input-gradient and weight-gradient products);
* the FLOPs of one training step (forward + backward, counted by ``torch.utils.flop_counter``);
* ``train_eps_batched``: training episodes/s with the project's layers (``bench/train_fast.py``'s
  ``train_rate``), and the same with the channels-first ``Conv1d`` layers they replaced
  (``tests/reference_temporal.py``, same parameters);
* the limit in episodes/s (GFLOP/s / GFLOP per episode) and the fraction of it reached;
* forward + backward seconds of each temporal extractor alone, old and new, at the training batch;
* eval-mode forward episodes/s (no gradients) of the same E episodes, old and new;
* the same for ``old-ltce``: the old Conv1d LTCE with the new pruned GTCE (oneDNN's conv1d can beat
  the BLAS matmul on some CPUs).

The measurements run in rounds (limit, new layers, old layers), and the best of the rounds is kept
for each, so that on a shared machine all of them are compared under the same (best) load.

Goal: training at D = 1024 on a CPU >= 0.85 of the measured matmul limit.

By default one thread and its CPU time are measured: on a machine shared with other jobs, elapsed
time mostly measures the others, while the CPU time of a single-threaded process is the time it
actually ran (with more threads it would include OpenMP's spinning).

    python bench/heads_cpu.py                                   # D=1024, 1 thread, CPU time
    python bench/heads_cpu.py --threads 0 --clock wall          # all cores, elapsed time (a quiet machine)
    python bench/heads_cpu.py --dim 64 --steps 20      # the demo's width
    python bench/heads_cpu.py --quick                  # seconds: a check that it runs, not a measurement

Prints a table and one JSON line (``{"bench": "heads_cpu", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the reference (old) layers
sys.path.insert(0, str(ROOT / "bench"))

from mdmf_cache.data.episodes import EpisodeSampler, gather  # noqa: E402
from mdmf_cache.heads.mdmf_losses import total_loss  # noqa: E402
from mdmf_cache.heads.factory import build_model  # noqa: E402
from reference_temporal import RefGTCE, RefLTCE  # noqa: E402
from train_fast import synthetic_split, train_rate  # noqa: E402

#: The measured run's sizes, and --quick's (seconds: the same code paths, tiny sizes); options given explicitly win.
FULL = {"dim": 1024, "episodes_per_step": 16, "rounds": 2, "classes": 64, "videos_per_class": 100}
QUICK = {"dim": 32, "episodes_per_step": 2, "rounds": 1, "classes": 8, "videos_per_class": 10}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "dim", "matmul_gflops", "train_eps_batched", "limit_eps", "of_limit", "gflop_per_episode",
        "eval_fwd_eps", "old_train_eps_batched", "speedup", "quick")


def matmul_limit(m: int, dim: int, ffn: int, m_conv: int, kernel: int, repeats: int = 1) -> float:
    """Best-of-``repeats`` GFLOP/s over the heads' GEMM shapes (forward, grad-input, grad-weight)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(m, dim, ffn), (m, ffn, dim), (m_conv, kernel * dim, dim)]  # (rows, in, out) of F.linear
    best = 0.0
    for _ in range(repeats):
        flops, seconds = 0.0, 0.0
        for rows, k, n in shapes:
            x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
            gy = torch.randn(rows, n, generator=g)
            t0 = time.perf_counter()
            F.linear(x, w)  # forward
            gy @ w  # input gradient
            gy.t() @ x  # weight gradient
            seconds += time.perf_counter() - t0
            flops += 3 * 2 * rows * k * n
        best = max(best, flops / seconds / 1e9)
    return best


def with_old_layers(model: torch.nn.Module, gtce: bool = True) -> torch.nn.Module:
    """The model with its extractors (or only its LTCE) replaced by the channels-first Conv1d layers."""
    cfg = model.cfg
    state = model.state_dict()
    if "ltc" in model.views:
        model.views["ltc"].extractor = RefLTCE(cfg.dim, norm=cfg.ltce == "bn")
    if "gtc" in model.views and gtce:
        model.views["gtc"].extractor = RefGTCE(cfg.dim, cfg.tcn_levels, cfg.tcn_kernel, cfg.tcn_dropout)
    model.load_state_dict(state)
    return model


def step_gflop_per_episode(model, split, sampler, args) -> float:
    """GFLOP of one training forward + backward, per episode (counted on 2 episodes)."""
    ep = sampler.sample(2, args.way, args.shot, args.train_queries, np.random.default_rng(1), random_view=True)
    support, query, text, labels = gather(split.features, split.text, ep)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = total_loss(model(support, query, text), labels, model.cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2 / 1e9


def extractor_seconds(extractor, batch: int, frames: int, dim: int, episodes: int) -> float:
    """Forward + backward seconds of one extractor on ``(batch, T, D)`` (after a warm-up pass)."""
    x = torch.randn(batch, frames, dim, requires_grad=True)
    extractor.train()
    extractor(x, episodes).sum().backward()
    t0 = time.perf_counter()
    extractor(x, episodes).sum().backward()
    return time.perf_counter() - t0


def eval_rate(model, split, sampler, args) -> float:
    """Episodes/s of one eval-mode forward over E training-shaped episodes (after a warm-up)."""
    e = args.episodes_per_step
    ep = sampler.sample(e, args.way, args.shot, args.train_queries, np.random.default_rng(2), random_view=True)
    support, query, text, _ = gather(split.features, split.text, ep)
    model.eval()
    with torch.no_grad():
        model(support, query, text)
        t0 = time.perf_counter()
        model(support, query, text)
        seconds = time.perf_counter() - t0
    model.train()
    return e / seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, help="(1024)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time (with --threads 1, the time it ran, not the time it "
                        "waited for a core on a shared machine); wall: elapsed time")
    p.add_argument("--episodes-per-step", type=int, help="(16)")
    p.add_argument("--steps", type=int, default=1, help="timed optimiser steps per variant and round (after 1 warm-up)")
    p.add_argument("--rounds", type=int,
                   help="(2) rounds of (matmul limit, each layer set); the best of the rounds is kept")
    p.add_argument("--preset", default="paper")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--train-queries", type=int, default=5)
    p.add_argument("--classes", type=int, help="(64)")
    p.add_argument("--videos-per-class", type=int, help="(100)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-old", action="store_true", help="time only the project's layers")
    p.add_argument("--quick", action="store_true", help="seconds, not a measurement: D=32, E=2, 1 round")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.clock == "cpu":  # every timing here and in train_fast.train_rate reads time.perf_counter
        time.perf_counter = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    e, n, t, d = args.episodes_per_step, args.way, args.frames, args.dim
    videos = n * (args.shot + args.train_queries)  # S + Q per episode
    split = synthetic_split(args.classes, args.videos_per_class, t, d, device, args.seed)
    sampler = EpisodeSampler(split.labels.numpy(), split.num_classes, views=1)
    sampler.check(args.way, args.shot, args.train_queries)

    def fresh(variant: str = "new"):
        torch.manual_seed(args.seed)
        model = build_model(args.preset, d, t, {})
        return model if variant == "new" else with_old_layers(model, gtce=variant == "old")

    probe = fresh()
    ffn = probe.cfg.ffn_dim
    limit_args = (e * videos * (t + 1), d, ffn, e * videos * t, probe.cfg.tcn_kernel, 1)
    load_before = os.getloadavg()[0]

    variants = ["new"] if args.skip_old else ["new", "old", "old-ltce"]
    models = {name: fresh(name) for name in variants}
    res: dict[str, dict] = {
        name: {"gflop_per_episode": step_gflop_per_episode(m, split, sampler, args), "eps": 0.0,
               "ltce_s": float("inf"), "gtce_s": float("inf"), "eval_eps": 0.0}
        for name, m in models.items()
    }
    # Rounds interleave the matmul limit and both layer sets, and the best of the rounds is kept for
    # each: on a shared machine load comes and goes, and this compares them under the same load.
    gflops_rounds = []
    for r in range(args.rounds):
        gflops_rounds.append(matmul_limit(*limit_args))
        for name, model in models.items():
            rate = train_rate(model, split, sampler, args, np.random.default_rng([args.seed, r]), e, args.steps, device)
            out = res[name]
            out["eps"] = max(out["eps"], rate["episodes_per_s"])
            out["ltce_s"] = min(out["ltce_s"], extractor_seconds(model.views["ltc"].extractor, e * videos, t, d, e))
            out["eval_eps"] = max(out["eval_eps"], eval_rate(model, split, sampler, args))
            out["gtce_s"] = min(out["gtce_s"], extractor_seconds(model.views["gtc"].extractor, e * videos, t, d, e))
    gflops_rounds.append(matmul_limit(*limit_args))
    load_after = os.getloadavg()[0]
    gflops = max(gflops_rounds)
    for r in res.values():
        r["limit_eps"] = gflops / r["gflop_per_episode"]
        r["of_limit"] = r["eps"] / r["limit_eps"]

    threads = torch.get_num_threads()
    print(f"heads_cpu{' (--quick: not a measurement)' if args.quick else ''}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, "
          f"torch {torch.__version__}, preset {args.preset}, D={d}, T={t}, {n}-way {args.shot}-shot, "
          f"{args.train_queries} queries/class, E={e}; {args.clock} clock; load average {load_before:.1f} -> "
          f"{load_after:.1f}")
    print(f"matmul limit: {' '.join(f'{g:.1f}' for g in gflops_rounds)} GFLOP/s per round (best {gflops:.1f})")
    print(f"{'layers':8s} {'GFLOP/ep':>9s} {'train eps/s':>12s} {'limit eps/s':>12s} {'of limit':>9s} "
          f"{'LTCE f+b s':>11s} {'GTCE f+b s':>11s} {'eval eps/s':>11s}")
    for name, r in res.items():
        print(f"{name:8s} {r['gflop_per_episode']:9.2f} {r['eps']:12.3f} {r['limit_eps']:12.3f} {r['of_limit']:9.3f} "
              f"{r['ltce_s']:11.3f} {r['gtce_s']:11.3f} {r['eval_eps']:11.2f}")
    record = {
        "bench": "heads_cpu", "cpu_cores": os.cpu_count(), "threads": threads, "clock": args.clock, "torch": torch.__version__,
        "preset": args.preset, "dim": d, "frames": t, "way": n, "shot": args.shot,
        "train_queries": args.train_queries, "episodes_per_step": e, "steps": args.steps,
        "load_avg": [round(load_before, 2), round(load_after, 2)],
        "matmul_gflops": round(gflops, 1), "matmul_gflops_rounds": [round(g, 1) for g in gflops_rounds],
        "train_eps_batched": round(res["new"]["eps"], 3),
        "limit_eps": round(res["new"]["limit_eps"], 3),
        "of_limit": round(res["new"]["of_limit"], 3), "goal": 0.85,
        "gflop_per_episode": round(res["new"]["gflop_per_episode"], 2),
        "ltce_fb_s": round(res["new"]["ltce_s"], 3), "gtce_fb_s": round(res["new"]["gtce_s"], 3),
        "eval_fwd_eps": round(res["new"]["eval_eps"], 2), "quick": args.quick,
    }
    if "old" in res:
        old = res["old"]
        record.update({
            "old_train_eps_batched": round(old["eps"], 3), "old_of_limit": round(old["of_limit"], 3),
            "old_gflop_per_episode": round(old["gflop_per_episode"], 2),
            "speedup": round(res["new"]["eps"] / old["eps"], 3),
            "old_ltce_fb_s": round(old["ltce_s"], 3), "old_gtce_fb_s": round(old["gtce_s"], 3),
            "old_eval_fwd_eps": round(old["eval_eps"], 2),
            "eval_speedup": round(res["new"]["eval_eps"] / old["eval_eps"], 3),
        })
        hybrid = res["old-ltce"]
        record.update({"oldltce_train_eps_batched": round(hybrid["eps"], 3),
                       "oldltce_eval_fwd_eps": round(hybrid["eval_eps"], 2)})
        print(f"speed-up new / old: training {record['speedup']:.2f}x, eval forward {record['eval_speedup']:.2f}x")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
