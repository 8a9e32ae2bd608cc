"""Benchmark of every registered head on synthetic in-memory features (not a test).

For each head of ``mdmf_cache.heads.METHODS``, at width D, 5-way K-shot (``--shot``, default 5):

* training episodes/s: E = 16 episodes (5 queries per class) per forward/backward/Adam step, the
  head's own loss, float32 on a CPU (bf16 autocast on CUDA, as ``train`` runs); heads without
  parameters are not trained;
* the time of 10,000 test episodes (1 query per class) on the head's evaluation path (``eval``'s
  default: per video where the head declares it, else the direct path batched over episodes),
  measured on ``--test-measured`` episodes and scaled to 10,000 when fewer are measured (said in the
  table), and the sequences the per-video stage computed.

The features are random: a test split of 24 classes x 100 videos, T = 8, float16 as in the cache.
Accuracy is meaningless here, only time is measured. The heads that read cached tokens (``SPEC.tokens``:
``emp-net``, ``molo``, ``strm``) take tokens, not these features: the table names them and leaves them out
(docs/measurements.md has their cost per episode; ``bench/tokens.py`` measures the reader that feeds them).

    python bench/heads.py                       # D = 1024, the whole table (GPU if there is one)
    python bench/heads.py --test-measured 1000  # a CPU-sized run (the rest extrapolated)
    python bench/heads.py --quick               # seconds: every head, tiny sizes (the tests run it)

Prints a table and, last, one JSON line (``{"bench": "heads", ...}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdmf_cache import heads  # noqa: E402
from mdmf_cache.device import heads_autocast, resolve_device  # noqa: E402
from mdmf_cache.data.episodes import EpisodeSampler, gather  # noqa: E402
from mdmf_cache.evaluation.scoring import score  # noqa: E402
from mdmf_cache.heads.spec import DataInfo  # noqa: E402
from mdmf_cache.heads.factory import build_head  # noqa: E402
from mdmf_cache.store.read import FeatureSplit  # noqa: E402

FULL_TEST = 10_000

#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "dim", "device", "threads", "rows", "quick")


def synthetic_split(classes: int, per_class: int, frames: int, dim: int, device: torch.device) -> FeatureSplit:
    g = torch.Generator().manual_seed(0)
    n = classes * per_class
    labels = torch.arange(classes).repeat_interleave(per_class)
    text = torch.randn(classes, dim, generator=g)
    feats = (0.2 * text[labels][:, None, None] + torch.randn(n, 1, frames, dim, generator=g)).half()
    names = [f"c{i}" for i in range(classes)]
    return FeatureSplit(feats.to(device), labels.to(device), [f"v{i}" for i in range(n)], names, names,
                        text.to(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_head(method: str, train: FeatureSplit, test: FeatureSplit, args, device: torch.device) -> dict:
    spec = heads.get(method)
    _, _, t, d = train.features.shape
    torch.manual_seed(0)
    info = DataInfo(dim=d, num_frames=t, num_classes=train.num_classes, shot=args.shot)
    model = build_head(method, None, {}, info).to(device)
    row: dict = {"method": method, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if spec.parametric:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        sampler = EpisodeSampler(train.labels.cpu().numpy(), train.num_classes)
        rng = np.random.default_rng(0)
        model.train()

        def step() -> None:
            ep = sampler.sample(args.episodes_per_step, 5, args.shot, args.queries, rng)
            support, query, text, labels = gather(train.features, train.text, ep)
            classes = torch.as_tensor(ep.classes, device=device)
            with heads_autocast(device):
                out = model(support, query, text, classes=classes, class_text=train.text)
                loss, _ = model.loss(out, labels, classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        row["train_eps_per_s"] = args.steps * args.episodes_per_step / (time.perf_counter() - t0)
    model.eval()
    eps = EpisodeSampler(test.labels.cpu().numpy(), test.num_classes).sample(args.test_measured, 5, args.shot, 1,
                                                                            np.random.default_rng(1))
    sync(device)
    t0 = time.perf_counter()
    res = score(method, test, eps, model, seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    row.update(eval_path="per-video" if spec.per_video else "direct", test_measured=len(eps),
               test_10k_s=seconds * FULL_TEST / len(eps), extrapolated=len(eps) < FULL_TEST, fused=res.fused)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per head")
    ap.add_argument("--episodes-per-step", type=int, default=16)
    ap.add_argument("--test-measured", type=int, default=FULL_TEST, help="test episodes actually scored")
    ap.add_argument("--methods", default=",".join(heads.METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--queries", type=int, default=5, help="training queries per class")
    ap.add_argument("--quick", action="store_true",
                    help="seconds: D=32, 2-shot, 1 step of E=2 with 1 query per class, 20 test episodes")
    args = ap.parse_args()
    if args.quick:  # 2 shots keep the K > 1 paths (CLIP-FSAR's merge before its transformer, prototypes)
        args.dim, args.steps, args.episodes_per_step, args.test_measured = 32, 1, 2, 20
        args.shot, args.queries = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    per_class = 10 if args.quick else 100
    train = synthetic_split(24, per_class, 8, args.dim, device)
    test = synthetic_split(24, per_class, 8, args.dim, device)
    asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    token_heads = [m for m in asked if heads.get(m).tokens]
    rows = [bench_head(m, train, test, args, device) for m in asked if m not in token_heads]
    print(f"heads at D = {args.dim}, 5-way {args.shot}-shot, {device} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"{'method':<11} {'params (M)':>10} {'train eps/s (E=%d)' % args.episodes_per_step:>20} "
          f"{'10k test eps (s)':>17} {'path':>10} {'fused':>8}")
    for r in rows:
        train_rate = f"{r['train_eps_per_s']:.2f}" if "train_eps_per_s" in r else "-"
        note = f" (from {r['test_measured']})" if r["extrapolated"] else ""
        print(f"{r['method']:<11} {r['params_m']:>10.2f} {train_rate:>20} {r['test_10k_s']:>17.1f} "
              f"{r['eval_path']:>10} {str(r['fused']):>8}{note}")
    if token_heads:
        print(f"not here: {', '.join(token_heads)} (they read cached tokens, not these features)")
    print(json.dumps({"bench": "heads", "dim": args.dim, "shot": args.shot, "device": str(device),
                      "threads": torch.get_num_threads(), "rows": rows, "token_heads": token_heads,
                      "quick": args.quick}))


if __name__ == "__main__":
    main()
