"""The token reader at UCF101's size, not a test: how fast rows come off the cache, what a token head's training
loses by reading them there instead of from memory, and what the process holds against the reader's budget.

A synthetic token cache is built once (``--dir``, kept; rebuilt with ``--rebuild``): a train split of ``--rows``
rows (UCF101's 13,320 by default) with one token array ``(N, V, T, P, Dt)`` float16, one row per chunk (the store's
own layout, made by ``CacheStore.ensure_tokens``), random values. The default P x Dt is ViT-B/16's ``last@7x7``
(P = 50, Dt = 512: 0.41 MB a row, 5.5 GB in all); ``--patches 197`` is ``last`` unpooled (1.6 MB a row, 21 GB).
Measured, one torch thread:

* rows/s through :class:`~mdmf_cache.store.tokens.TokenReader` ``read`` of ``--read-rows`` random rows: ``cold``
  (the chunk files dropped from the page cache first with ``posix_fadvise(DONTNEED)``: from the disk), ``warm``
  (the same rows again through a fresh reader: page cache, decode and copy only) and ``lru`` (the same reader
  again: every row a hit);
* a token head's training updates (``--updates`` of ``--episodes-per-step`` 5-way 1-shot episodes, 5 queries
  per class; the head projects every token through a ``Dt x Dt`` linear layer, mean-pools and scores prototypes:
  :class:`BenchHead`) in episodes/s with the tokens from memory (a pool of rows already decoded, as if the
  split fit), and through the reader without and with prefetch (the next update's rows read while the head
  computes, as fast-mode training does), from a cold page cache each; the ratios to memory;
* the peak resident memory (``VmHWM``) of each training mode, run in a fresh process (``--quick``: in this one),
  above the process's before its first update, against the budget (``--budget-mb``), and the LRU's own peak.

    python bench/tokens.py                      # 13,320 rows at last@7x7, 1 GiB budget
    python bench/tokens.py --patches 197        # last unpooled (21 GB on disk)
    python bench/tokens.py --quick

Prints, last, one JSON line (``{"bench": "tokens", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mdmf_cache.data.episodes import EpisodeSampler  # noqa: E402
from mdmf_cache.heads.base import FewShotHead, class_means, episode_ce  # noqa: E402
from mdmf_cache.store.cache import CacheStore  # noqa: E402
from mdmf_cache.store.layout import TOKENS_DONE  # noqa: E402
from mdmf_cache.store.tokens import TokenReader, episode_rows, episode_tokens  # noqa: E402
from mdmf_cache.tokens import TokenInfo, array_name  # noqa: E402

#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "rows", "patches", "token_dim", "row_mb", "budget_mb", "cold_rows_per_s", "warm_rows_per_s",
        "lru_rows_per_s", "memory_episodes_per_s", "reader_episodes_per_s", "prefetch_episodes_per_s",
        "reader_ratio", "prefetch_ratio", "peak_rss_above_mb", "lru_peak_mb", "quick")

WAY, SHOT, QUERIES = 5, 1, 5  # the training episodes: 5-way 1-shot, 5 queries per class
CLASSES = 101


class BenchHead(FewShotHead):
    """A stand-in token head: every token through a ``Dt x Dt`` linear layer (the cost of a light token head),
    mean-pooled over frames, layers and tokens, then negative squared distances to the class prototypes."""

    method = "bench-tokens"

    def __init__(self, dt: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dt, dt)

    def forward(self, support, query, text, support_tokens=None, query_tokens=None, **_):
        n = text.shape[1]
        s = self.proj(support_tokens).mean(dim=(2, 3, 4))  # (E, S, T, L, P, Dt) -> (E, S, Dt)
        q = self.proj(query_tokens).mean(dim=(2, 3, 4))  # (E, Q, Dt)
        return {"logits": -((q[:, :, None] - class_means(s, n)[:, None]) ** 2).sum(-1)}  # (E, Q, N)


def build(path: Path, rows: int, frames: int, patches: int, dt: int) -> float:
    """The synthetic cache (train split only); returns the seconds it took."""
    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    fp = {"video": {"dataset": "bench", "model": "bench", "weights": "none", "num_frames": frames}, "text": {}}
    store = CacheStore.open_for_writing(path, fp)
    classes_n = max(WAY, min(CLASSES, rows // (SHOT + QUERIES)))  # UCF101's 101, fewer in a small --quick split
    labels = (np.arange(rows) % classes_n).astype(np.int32)
    ids = [f"c{c}/v{i}" for i, c in enumerate(labels)]
    classes = [f"c{c}" for c in range(int(labels.max()) + 1)]
    store.sync_rows("train", ids, labels, np.ones(rows, dtype=bool), classes, classes, views=1, num_frames=frames,
                    dim=8, chunk_rows=64)
    grid = int(round((patches - 1) ** 0.5))
    info = TokenInfo(f"last@{grid}x{grid}", ("last",), (grid, grid), True, dt)
    assert info.patches == patches, f"--patches {patches}: must be 1 + h*h"
    store.ensure_tokens("train", info, frames)
    g = store.root["train"]
    arr = g[array_name("last")]
    pool = np.random.default_rng(0).standard_normal((16, 1, frames, patches, dt)).astype(np.float16)
    for r in range(rows):  # one chunk file per row, as extract writes them
        arr[r] = pool[r % 16] + np.float16(r % 251 / 251)
    g["done"][:rows] = True
    g[TOKENS_DONE][:rows] = True
    return time.perf_counter() - t0


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop this cache's files from the page cache (the next read comes from the disk)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def status(field: str) -> int:
    """``VmHWM`` or ``VmRSS`` of this process in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the high-water mark to the resident size where Linux allows; returns the base to measure above."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status("VmRSS")


def read_rate(reader: TokenReader, rows: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(rows), batch):
        reader.read(rows[lo:lo + batch], np.zeros(min(batch, len(rows) - lo), dtype=np.int64))
    return len(rows) / (time.perf_counter() - t0)


def train(mode: str, path: Path, episodes: list, budget: int, dt: int, frames: int, patches: int) -> dict:
    """Updates of :class:`BenchHead` (Adam) with the tokens from ``memory`` or through the reader (``reader``, or
    ``prefetch``: the next update's rows told to it, as fast-mode training does)."""
    torch.manual_seed(0)
    head = BenchHead(dt)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    pool = torch.from_numpy(np.random.default_rng(1).standard_normal((64, frames, 1, patches, dt)).astype(np.float32))
    text = torch.zeros(episodes[0].support.shape[0], WAY, 8)
    drop_page_cache(path)
    base = reset_peak()
    reader = TokenReader(path, "train", budget, prefetch=mode == "prefetch") if mode != "memory" else None
    try:
        t0 = time.perf_counter()
        read_s = 0.0  # the main thread's time getting the tokens (from the pool, or through the reader)
        for i, ep in enumerate(episodes):
            t1 = time.perf_counter()
            if reader is None:  # the same shapes from rows already in memory
                st = pool[torch.as_tensor(ep.support % 64)]
                qt = pool[torch.as_tensor(ep.query % 64)]
            else:
                st, qt = episode_tokens(reader, ep)  # (E,S,T,L,P,Dt) (E,Q,T,L,P,Dt)
                if i + 1 < len(episodes):
                    reader.prefetch(episode_rows(episodes[i + 1]))
            read_s += time.perf_counter() - t1
            out = head(None, None, text, support_tokens=st, query_tokens=qt)
            opt.zero_grad()
            episode_ce(out["logits"], torch.as_tensor(ep.query_labels)).backward()
            opt.step()
        seconds = time.perf_counter() - t0
        res = {"episodes_per_s": len(episodes) * len(episodes[0]) / seconds, "seconds": seconds, "read_s": read_s,
               "peak_rss_above_mb": (status("VmHWM") - base) / 2 ** 20}
        if reader is not None:
            res |= {"lru_peak_mb": reader.peak_bytes / 2 ** 20, "wait_s": reader.wait_s, "hits": reader.hits,
                    "misses": reader.misses}
        return res
    finally:
        if reader is not None:
            reader.close()


def in_child(mode: str, folder: Path, argv: list[str] | None) -> dict:
    """One training mode in a fresh process (the cache already built in ``folder``): a phase's peak resident
    memory is not hidden by what an earlier phase freed but the allocator kept."""
    import subprocess

    given = list(sys.argv[1:] if argv is None else argv)
    given = [a for a in given if a != "--rebuild"]
    cmd = [sys.executable, str(Path(__file__).resolve()), *given, "--dir", str(folder), "--mode", mode]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{mode} child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=13320, help="train rows (UCF101: 13,320)")
    p.add_argument("--frames", type=int, default=8, help="T")
    p.add_argument("--patches", type=int, default=50, help="P = 1 + h*h (50: last@7x7; 197: ViT-B/16 last)")
    p.add_argument("--token-dim", type=int, default=512, help="Dt (ViT-B/16 after the projection: 512)")
    p.add_argument("--budget-mb", type=int, default=1024, help="the reader's LRU budget (--token-cache-mb)")
    p.add_argument("--updates", type=int, default=12, help="training updates per mode")
    p.add_argument("--episodes-per-step", type=int, default=16)
    p.add_argument("--read-rows", type=int, default=2000, help="random rows read for the rows/s figures")
    p.add_argument("--dir", default=None, help="where the cache is built and kept (default: a temporary folder)")
    p.add_argument("--rebuild", action="store_true", help="build the cache again even if --dir holds one")
    p.add_argument("--quick", action="store_true", help="seconds: 300 rows, T=4, P=5, Dt=16, 3 updates of 2 "
                                                         "(the modes in this process)")
    p.add_argument("--mode", choices=("memory", "reader", "prefetch"), help=argparse.SUPPRESS)  # a child's one mode
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.frames, args.patches, args.token_dim, args.updates = 300, 4, 5, 16, 3
        args.episodes_per_step, args.read_rows, args.budget_mb = 2, 100, 1
    torch.set_num_threads(1)
    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_tokens_")
    base = Path(args.dir or tmp)
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"tokens_{args.rows}_{args.frames}_{args.patches}_{args.token_dim}.zarr"
    try:
        built = None
        if args.rebuild or not (path / "zarr.json").is_file():
            built = build(path, args.rows, args.frames, args.patches, args.token_dim)
        budget = args.budget_mb << 20
        rng = np.random.default_rng(0)
        rows = rng.choice(args.rows, size=min(args.read_rows, args.rows), replace=False)
        batch = 480  # one default update's rows (16 episodes x 30 videos)
        if not args.mode:
            drop_page_cache(path)
            with TokenReader(path, "train", budget, prefetch=False) as r:
                cold = read_rate(r, rows, batch)
                row_bytes = r.row_bytes
            with TokenReader(path, "train", budget, prefetch=False) as r:
                warm = read_rate(r, rows, batch)
                lru_rows = rows[: max(1, budget // row_bytes)]
                read_rate(r, lru_rows, batch)
                lru = read_rate(r, lru_rows, batch)
        store = CacheStore(path)
        labels = store._rows("train", "labels").astype(np.int64)
        sampler = EpisodeSampler(labels, int(labels.max()) + 1)
        erng = np.random.default_rng([0, 0])
        episodes = [sampler.sample(args.episodes_per_step, WAY, SHOT, QUERIES, erng) for _ in range(args.updates)]
        if args.mode:  # one mode, in this (fresh) process: its peak RSS is its own
            res = train(args.mode, path, episodes, budget, args.token_dim, args.frames, args.patches)
            print(json.dumps(res))
            return res
        modes = {m: (train(m, path, episodes, budget, args.token_dim, args.frames, args.patches) if args.quick
                     else in_child(m, path.parent, argv)) for m in ("memory", "reader", "prefetch")}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    mem = modes["memory"]["episodes_per_s"]
    row_mb = row_bytes / 2 ** 20
    out = {"bench": "tokens", "rows": args.rows, "frames": args.frames, "patches": args.patches,
           "token_dim": args.token_dim, "row_mb": round(row_mb, 3), "cache_gb": round(args.rows * row_bytes / 1e9, 2),
           "built_s": round(built, 1) if built is not None else None, "budget_mb": args.budget_mb,
           "cold_rows_per_s": round(cold, 1), "warm_rows_per_s": round(warm, 1), "lru_rows_per_s": round(lru, 1),
           "cold_mb_per_s": round(cold * row_mb, 1), "updates": args.updates,
           "episodes_per_step": args.episodes_per_step,
           "memory_episodes_per_s": round(mem, 2),
           "reader_episodes_per_s": round(modes["reader"]["episodes_per_s"], 2),
           "prefetch_episodes_per_s": round(modes["prefetch"]["episodes_per_s"], 2),
           "reader_ratio": round(modes["reader"]["episodes_per_s"] / mem, 3),
           "prefetch_ratio": round(modes["prefetch"]["episodes_per_s"] / mem, 3),
           "prefetch_wait_s": round(modes["prefetch"]["wait_s"], 2),
           "seconds": {m: round(v["seconds"], 1) for m, v in modes.items()},
           "read_s": {m: round(v["read_s"], 1) for m, v in modes.items()},
           "peak_rss_above_mb": {m: round(v["peak_rss_above_mb"]) for m, v in modes.items()},
           "lru_peak_mb": round(max(modes["reader"]["lru_peak_mb"], modes["prefetch"]["lru_peak_mb"]), 1),
           "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0], "quick": args.quick}
    print(f"tokens{' (--quick: not a measurement)' if args.quick else ''}: {args.rows} rows of T={args.frames} "
          f"P={args.patches} Dt={args.token_dim} ({row_mb:.2f} MB a row, {out['cache_gb']} GB), budget "
          f"{args.budget_mb} MiB")
    print(f"  read: cold {cold:.0f} rows/s ({out['cold_mb_per_s']} MB/s), warm {warm:.0f}, LRU hits {lru:.0f}")
    for m in ("memory", "reader", "prefetch"):
        v = modes[m]
        print(f"  {m:9s} {v['episodes_per_s']:7.2f} episodes/s ({v['episodes_per_s'] / mem:.2f} x memory), "
              f"{v['read_s']:.1f} of {v['seconds']:.1f} s getting tokens, peak RSS "
              f"+{v['peak_rss_above_mb']:.0f} MB" + (f", LRU peak {v['lru_peak_mb']:.0f} MB, waited "
                                                     f"{v['wait_s']:.1f} s" if m != "memory" else ""))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
