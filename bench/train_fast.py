"""Benchmark of fast-mode training and evaluation on synthetic in-memory features (not a test).

Measures, in one run, with the project's own sampler, ``gather``, MDMF heads, ``total_loss`` and
``score`` (both evaluation paths):

* training episodes/s with E episodes per forward/backward/Adam step (this project), versus one
  episode per forward/backward with the gradient accumulated over E episodes per Adam step (how the
  released code trains), and the ratio;
* seconds for 10,000 test episodes (5-way K-shot, 1 query per class, eval mode) on the per-video
  path (what ``eval`` runs), against the direct path (every episode through the whole head),
  extrapolated from ``--direct-episodes``; and the largest logit difference between the two on the
  same episodes (they must agree to float tolerance).

The features are random: a split of C=24 classes x 100 videos (a test split's size), V=1 view,
T=8 frames, width D, in float16 as in the cache. Accuracy is meaningless here, only time is measured.

    python bench/train_fast.py                      # GPU if there is one, D=1024
    python bench/train_fast.py --dim 1024 --steps 2                         # a CPU-sized run
    python bench/train_fast.py --dim 64             # the demo's tiny backbone width
    python bench/train_fast.py --quick              # seconds: a check that it runs, not a measurement

Prints a table and one JSON line (``{"bench": "train_fast", ...}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdmf_cache.data.episodes import EpisodeSampler, gather  # noqa: E402
from mdmf_cache.device import heads_autocast  # noqa: E402
from mdmf_cache.evaluation.scoring import score  # noqa: E402
from mdmf_cache.heads.mdmf_losses import mean_parts, total_loss  # noqa: E402
from mdmf_cache.store.read import FeatureSplit  # noqa: E402
from mdmf_cache.device import resolve_device  # noqa: E402
from mdmf_cache.heads.factory import build_model  # noqa: E402

FULL_TEST = 10_000
#: --quick's sizes (seconds on a CPU: the same code paths, tiny sizes); options given explicitly win.
QUICK = {"dim": 32, "steps": 1, "episodes_per_step": 2, "test_episodes": 20, "direct_episodes": 4, "eval_batch": 16,
         "classes": 5, "videos_per_class": 10}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "device", "dim", "train_eps_batched", "train_eps_single", "train_speedup", "eval_10k_s",
        "eval_10k_s_direct", "eval_speedup", "eval_max_logit_diff", "eval_same_predictions", "quick")


def synthetic_split(
    classes: int, per_class: int, frames: int, dim: int, device: torch.device, seed: int
) -> FeatureSplit:
    """A FeatureSplit of random float16 features (N, 1, T, D) and float32 text (C, D) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = torch.randn(n, 1, frames, dim, generator=g).half()
    text = torch.randn(classes, dim, generator=g)
    names = [f"class{c}" for c in range(classes)]
    return FeatureSplit(features.to(device), labels, [f"v{i}" for i in range(n)], names, names, text.to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def float32_context(device: torch.device):
    """Plain float32 on ``device``: no autocast, and no TF32 matmuls on CUDA (restored on exit).

    The trainer's :func:`~mdmf_cache.device.heads_autocast` turns TF32 on for CUDA as it enters bf16
    autocast; this is the float32 reference it is compared with.
    """
    @contextlib.contextmanager
    def ctx():
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return ctx()


def train_rate(model, split, sampler, args, rng, per_forward: int, steps: int, device, amp: bool = True,
               lr: float = 1e-4) -> dict:
    """Episodes/s of ``steps`` optimiser steps of ``args.episodes_per_step`` episodes each.

    ``per_forward`` = E: one forward/backward over all E episodes (this project's loop);
    ``per_forward`` = 1: E forward/backward passes of one episode, gradients accumulated (released code).
    ``amp``: the trainer's precision (``heads_autocast``: bf16 on CUDA); False: float32 (``float32_context``).
    """
    e = args.episodes_per_step
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    precision = (lambda: heads_autocast(device)) if amp else (lambda: float32_context(device))

    def step() -> dict:
        opt.zero_grad(set_to_none=True)
        ep_all = sampler.sample(e, args.way, args.shot, args.train_queries, rng, random_view=True)
        parts = None
        for lo in range(0, e, per_forward):
            ep = ep_all[lo : lo + per_forward]
            support, query, text, labels = gather(split.features, split.text, ep)
            with precision():  # amp: bf16 on CUDA, as the trainer
                loss, parts = total_loss(model(support, query, text), labels, model.cfg)
            (loss * (len(ep) / e)).backward()  # the mean over the E episodes, as one batched step
        opt.step()
        return parts

    step()  # warm-up (allocator, kernels, Adam state): not timed
    _sync(device)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    _sync(device)
    seconds = time.perf_counter() - t0
    mean_parts(losses)  # the one host copy the trainer makes per validation
    return {"episodes": steps * e, "seconds": seconds, "episodes_per_s": steps * e / seconds}


def eval_time(model, split, args, device) -> dict:
    """10,000 test episodes on the per-video path (measured), the direct path on a prefix (extrapolated), their logit gap."""
    n = args.test_episodes
    sampler = EpisodeSampler(split.labels.numpy(), split.num_classes)
    eps = sampler.sample(n, args.way, args.shot, 1, np.random.default_rng([args.seed, 2]))
    warm = sampler.sample(min(n, 10), args.way, args.shot, 1, np.random.default_rng([args.seed, 3]))
    model.eval()
    score(args.method, split, warm, model, args.seed, args.eval_batch)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    fast = score(args.method, split, eps, model, args.seed, args.eval_batch, keep_logits=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    # the direct path on the first m episodes of the same list: the same PPS uniforms (a prefix of the draw)
    m = min(args.direct_episodes, n)
    score(args.method, split, warm, model, args.seed, args.eval_batch, path="direct")  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    direct = score(args.method, split, eps[:m], model, args.seed, args.eval_batch, path="direct", keep_logits=True)
    _sync(device)
    direct_s = time.perf_counter() - t0
    videos = len(np.unique(np.concatenate([eps.support, eps.query], axis=1)))
    return {
        "episodes": n,
        "seconds": seconds,
        "eval_10k_s": seconds * FULL_TEST / n,
        "extrapolated": n < FULL_TEST,
        "direct_episodes": m,
        "direct_s": direct_s,
        "eval_10k_s_direct": direct_s * FULL_TEST / m,
        "max_logit_diff": float(np.abs(fast.logits[:m] - direct.logits).max()),
        "same_predictions": bool((fast.logits[:m].argmax(-1) == direct.logits.argmax(-1)).all()),
        "videos": videos,
        "fused": fast.fused,
        "accuracy": fast.mean * 100,
    }


FULL = {"dim": 1024, "steps": 20, "episodes_per_step": 16, "test_episodes": FULL_TEST, "direct_episodes": 200,
        "eval_batch": 500, "classes": 24, "videos_per_class": 100}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dim", type=int, help="feature width D (1024 = CLIP RN50, 64 = the demo's tiny backbone)")
    p.add_argument("--episodes-per-step", type=int, help="E episodes per optimiser step (16)")
    p.add_argument("--steps", type=int, help="timed optimiser steps per training variant, after 1 warm-up (20)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--test-episodes", type=int,
                   help="test episodes scored on the per-video path; fewer than 10000 are extrapolated to 10000")
    p.add_argument("--direct-episodes", type=int,
                   help="episodes scored on the direct (reference) path, extrapolated to 10000 (200)")
    p.add_argument("--method", default="mdmf", help="mdmf | clip-fsar")
    p.add_argument("--preset", default="paper", help="head preset (paper | reference)")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--train-queries", type=int, default=5, help="queries per class in training episodes")
    p.add_argument("--eval-batch", type=int, help="episodes per evaluation batch (500)")
    p.add_argument("--classes", type=int, help="classes of the synthetic split (a test split: 24)")
    p.add_argument("--videos-per-class", type=int, help="(100)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds, not a measurement: D=32, 1 step of 2 episodes, "
                                                        "20 test episodes (the same code paths)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("dim", "episodes_per_step", "steps", "test_episodes", "eval_batch", "direct_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    split = synthetic_split(args.classes, args.videos_per_class, args.frames, args.dim, device, args.seed)
    sampler = EpisodeSampler(split.labels.numpy(), split.num_classes, views=1)
    sampler.check(args.way, args.shot, args.train_queries)

    def fresh_model():
        torch.manual_seed(args.seed)
        return build_model(args.preset, args.dim, args.frames, {}, args.method).to(device)

    e = args.episodes_per_step
    rng = lambda: np.random.default_rng([args.seed, 0])  # noqa: E731
    batched = train_rate(fresh_model(), split, sampler, args, rng(), e, args.steps, device)
    single = train_rate(fresh_model(), split, sampler, args, rng(), 1, args.steps, device)
    ev = eval_time(fresh_model(), split, args, device)
    ratio = batched["episodes_per_s"] / single["episodes_per_s"]

    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    print(f"train_fast{' (--quick: not a measurement)' if args.quick else ''}: {name}, torch {torch.__version__}, preset {args.preset}, D={args.dim}, T={args.frames}, "
          f"{args.classes}x{args.videos_per_class} videos, {args.way}-way {args.shot}-shot")
    test_note = (f"extrapolated from {ev['episodes']} episodes ({ev['seconds']:.2f} s)" if ev["extrapolated"]
                 else f"measured ({FULL_TEST / ev['seconds']:.0f} episodes/s)")
    test_note += f", per-video path: {ev['videos']} videos, {ev['fused']} (video, token) pairs fused per view"
    rows = [
        (f"train, {e} episodes per step", f"{batched['episodes_per_s']:.2f} episodes/s",
         f"{batched['episodes']} episodes in {batched['seconds']:.2f} s"),
        (f"train, 1 episode per fwd/bwd (accum {e})", f"{single['episodes_per_s']:.2f} episodes/s",
         f"{single['episodes']} episodes in {single['seconds']:.2f} s"),
        ("speed-up (batched / single)", f"{ratio:.2f}x", ""),
        ("test, 10,000 episodes", f"{ev['eval_10k_s']:.1f} s", test_note),
        ("test, 10,000 episodes, direct path", f"{ev['eval_10k_s_direct']:.1f} s",
         f"extrapolated from {ev['direct_episodes']} episodes ({ev['direct_s']:.2f} s)"),
        ("speed-up (per-video / direct)", f"{ev['eval_10k_s_direct'] / ev['eval_10k_s']:.1f}x", ""),
        ("max |logit difference|, same episodes", f"{ev['max_logit_diff']:.2e}",
         "same predictions" if ev["same_predictions"] else "PREDICTIONS DIFFER"),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'measure':<{w0}}  {'value':>{w1}}  note")
    print(f"{'-' * w0}  {'-' * w1}  {'-' * 4}")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    record = {
        "bench": "train_fast", "device": name, "dim": args.dim, "method": args.method, "preset": args.preset,
        "torch": torch.__version__, "frames": args.frames, "way": args.way, "shot": args.shot,
        "train_queries": args.train_queries, "episodes_per_step": e, "steps": args.steps,
        "test_split": f"{args.classes}x{args.videos_per_class}",
        "train_eps_batched": round(batched["episodes_per_s"], 3),
        "train_eps_single": round(single["episodes_per_s"], 3),
        "train_speedup": round(ratio, 3),
        "eval_10k_s": round(ev["eval_10k_s"], 2), "eval_10k_extrapolated": ev["extrapolated"],
        "eval_10k_s_direct": round(ev["eval_10k_s_direct"], 2), "eval_direct_episodes": ev["direct_episodes"],
        "eval_speedup": round(ev["eval_10k_s_direct"] / ev["eval_10k_s"], 1),
        "eval_max_logit_diff": ev["max_logit_diff"], "eval_same_predictions": ev["same_predictions"],
        "eval_videos": ev["videos"], "eval_fused_pairs": ev["fused"], "quick": args.quick,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
