"""What damage checks cost: the cheap check readers run before loading, and the full ``verify`` (which
an extract rerun runs too), against reading the features.

A synthetic cache is written through ``CacheStore`` (random float16 features, no decoding), then:
``load`` (load_split_features, the check included), ``check`` (the cheap part alone), ``verify``
(every chunk read) and ``read`` (the features array read once with zarr).

    python bench/verify.py --rows 10000 --dim 512
    python bench/verify.py --quick              # seconds: a check that it runs, not a measurement

Prints a table and one JSON line (``{"bench": "verify", ...}``) with seconds and ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdmf_cache.store.cache import CacheStore  # noqa: E402
from mdmf_cache.store.read import load_split_features

#: The measured run's sizes, and --quick's (the same code paths, tiny sizes); options given explicitly win.
FULL = {"rows": 10000, "dim": 512}
QUICK = {"rows": 256, "dim": 32}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "rows", "cache_mb", "read_s", "load_s", "check_s", "verify_s", "check_over_load", "verify_over_read",
        "quick")


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="(10000)")
    p.add_argument("--dim", type=int, help="(512)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="seconds, not a measurement: 256 rows, D=32")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    n, T, D = args.rows, args.frames, args.dim
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        store = CacheStore.open_for_writing(path, {"video": {"bench": 1}, "text": {}})
        classes = [f"c{i}" for i in range(20)]
        ids = [f"c{i % 20}/v{i}" for i in range(n)]
        store.sync_rows("test", ids, np.arange(n) % 20, np.ones(n, bool), classes, classes, views=1, num_frames=T,
                        dim=D, chunk_rows=args.chunk_rows)
        rng = np.random.default_rng(0)
        for lo in range(0, n, args.chunk_rows):
            rows = np.arange(lo, min(n, lo + args.chunk_rows))
            store.write_rows("test", rows, {
                "features": rng.standard_normal((len(rows), 1, T, D)).astype(np.float16),
                "frame_indices": np.tile(np.arange(T, dtype=np.int32), (len(rows), 1, 1)),
                "num_frames": np.full(len(rows), 32, np.int32), "failed": np.zeros(len(rows), bool),
                "errors": np.array([""] * len(rows))})
        store.write_text("test", rng.standard_normal((20, D)).astype(np.float32), classes, "{}")
        store.mark_ready()
        mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        reader = CacheStore(path)
        out = {
            "read": timed(lambda: np.asarray(reader.root["test"]["features"][:])),
            "load": timed(lambda: load_split_features(path, "test")),
            # a fresh reader each time: a reader keeps the small arrays it read
            "check": timed(lambda: CacheStore(path).check(["test"])),
            "verify": timed(lambda: CacheStore(path).verify()),
        }
    res = {"bench": "verify", "rows": n, "T": T, "D": D, "cache_mb": round(mb, 1),
           **{f"{k}_s": round(v, 3) for k, v in out.items()},
           "check_over_load": round(out["check"] / out["load"], 3), "verify_over_read": round(out["verify"] / out["read"], 2),
           "quick": args.quick}
    print(f"verify{' (--quick: not a measurement)' if args.quick else ''}: a synthetic {n}-row cache, T={T}, D={D}, "
          f"{res['cache_mb']} MB, best of 3")
    what = {"read": "zarr read of the features", "load": "load_split_features (check included)",
            "check": "the cheap check alone", "verify": "full verify (every chunk)"}
    for k, v in out.items():
        print(f"  {what[k]:<40} {v:8.3f} s")
    print(f"  check / load {res['check_over_load']:.3f}, verify / read {res['verify_over_read']:.2f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
