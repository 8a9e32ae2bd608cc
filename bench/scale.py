"""The cache store at dataset scale: memory of a split load and an export, an extract rerun with nothing to
do, ``info`` and ``verify``.

A cache of N train rows (V views) plus val and test splits of SSv2-Full's sizes (1,926 / 2,857 videos, one
view) is written through ``CacheStore`` in a temporary folder (random float16 features, no video decoded,
no backbone), over a tree of zero-byte placeholder files named like the rows, with split files listing them:

- ``load_peak_over_features``: a fresh process loads the train split (``load_split_features``); its peak
  resident memory above what it held after the imports (``/proc/self/status`` VmHWM, reset after the
  imports through ``/proc/self/clear_refs``), over the bytes of the features it returns;
- ``extract_rerun_s``: ``run_extract`` on the placeholder tree with a stub backbone (nothing to decode, so
  it returns where it would start decoding): split files, the tree scan, the fingerprint, the cache's lock,
  damage checks, row sync, text, each file's size and mtime against the rows'; ``extract_first_rerun_s`` is
  the first such rerun after the build (nothing was verified yet: it reads every feature chunk, then records
  them), ``extract_rerun_s`` the one after it (it reads the chunks changed since: none);
- ``info_s`` / ``verify_s``: ``mdmf-cache info`` and ``mdmf-cache verify`` (every chunk read), in process,
  their tables printed to nowhere;
- ``export_peak_over_array``: a fresh process runs ``export --format h5``; its peak resident memory above
  the baseline over the bytes of the largest array (the train features);
- ``eval_peak_rss_gb``: a fresh process scores 10,000 5-way 5-shot test episodes with MDMF (random init,
  the per-video path): its peak resident memory in total (``eval_above_start_gb``: above what it held
  with the model and the test features loaded), and the seconds;
- ``sweep_jobs2_over_one_copy``: a fresh process runs a ``sweep --jobs 2`` of two short MDMF trials (5-way
  1-shot, 8 episodes, one validation of 10 episodes) on the cache; the peak over the sweep of the summed
  proportional set size (PSS, ``/proc/PID/smaps_rollup``, sampled every 0.1 s; with ``--quick`` every 0.5 s:
  reading a torch process's PSS takes ~16 ms, so at 0.1 s the sampling was a quarter of the short sweep's CPU)
  of that process and all its descendants (the two workers, multiprocessing's resource tracker), over the
  bytes of one copy of the train and val features (``sweep_one_copy_gb``). PSS divides each shared page between
  the processes mapping it, so the one shared copy counts once, where RSS (or a sum of VmHWM) would count it
  once per worker. Without ``--quick`` the same sweep with ``share_features=False`` (each worker its own copy)
  gives ``sweep_jobs2_separate_over_one_copy``.

    python bench/scale.py --rows 67013 --views 4 --dim 1024
    python bench/scale.py --rows 67013 --views 4 --dim 1024 --only sweep   # the sweep's figures alone
    python bench/scale.py --quick          # 2,000 rows, D = 64, small val/test: seconds

Prints one JSON line last (``{"bench": "scale", ...}``), measured in this one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

SSV2 = {"train": (64, None), "val": (12, 1926), "test": (24, 2857)}  # classes, rows (train: --rows)
STUB_MODEL = "bench-stub"


class StubBackbone:
    """What ``run_extract`` needs of a backbone when nothing is left to decode: width, device, weights, text."""

    def __init__(self, dim: int):
        self.dim, self.device, self.weights = dim, "cpu", "bench-stub"

    def encode_texts(self, prompts):
        import torch

        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), self.dim, generator=g)


def _tree(base: Path, sizes: dict[str, int]) -> tuple[Path, Path]:
    """Zero-byte placeholder videos root/<class>/<id>.mp4 and split files listing them."""
    root, lists = base / "videos", base / "lists"
    lists.mkdir(parents=True)
    for split, n in sizes.items():
        classes = SSV2[split][0]
        ids = [f"{split}{i % classes:02d}/{split}_{i:06d}" for i in range(n)]
        for c in range(classes):
            (root / f"{split}{c:02d}").mkdir(parents=True)
        for v in ids:
            (root / f"{v}.mp4").touch()
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root, lists


def _config(root: Path, lists: Path, cache_dir: Path, views: int, frames: int, chunk_rows: int):
    from mdmf_cache.configs import ExtractConfig

    return ExtractConfig(dataset="folder", root=str(root), splits_dir=str(lists), cache_dir=str(cache_dir),
                         model=STUB_MODEL, pretrained=None, train_views=views, num_frames=frames, workers=0,
                         progress=False, chunk_rows=chunk_rows, way=1)


def build(cfg, dim: int, seed: int = 0) -> Path:
    """The cache ``run_extract(cfg)`` would make, written through the store API with random features."""
    from mdmf_cache.data.datasets import load_splits
    from mdmf_cache.extraction.embed import find_videos, fingerprint, prompts_for
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.layout import group_name

    splits = load_splits("folder", Path(cfg.splits_dir), Path(cfg.root))
    find_videos(cfg, splits)
    path = Path(cfg.cache_dir) / group_name(cfg.cache_name, cfg.model, "random")
    store = CacheStore.open_for_writing(path, fingerprint(cfg, "bench-stub", {s: sp.source_hash for s, sp in splits.items()}))
    rng = np.random.default_rng(seed)
    T = cfg.num_frames
    pool = rng.standard_normal(1 << 22, dtype=np.float32).astype(np.float16)  # sliced at random offsets: fast
    pool[pool == 0] = 1
    stub = StubBackbone(dim)
    for name, split in splits.items():
        views = cfg.train_views if name == "train" else 1
        present = np.array([p is not None for p in split.paths])
        store.sync_rows(name, split.video_ids, split.labels, present, split.classes, split.class_names, views=views,
                        num_frames=T, dim=dim, chunk_rows=cfg.chunk_rows)
        n, cr = store.num_rows(name), store.chunk_rows(name)
        g = store.root[name]
        stats = "file_size" in g  # a store that records each video's size and mtime
        paths = [split.paths[i] for i in range(len(split.paths))]
        per_row = views * T * dim
        for lo in range(0, n, cr):
            rows = np.arange(lo, min(n, lo + cr))
            k = len(rows)
            off = int(rng.integers(0, len(pool) - k * per_row)) if len(pool) > k * per_row else 0
            feats = np.resize(pool[off:off + k * per_row], k * per_row).reshape(k, views, T, dim)
            vals = {"features": feats,
                    "frame_indices": np.tile(np.arange(T, dtype=np.int32), (k, views, 1)),
                    "num_frames": np.full(k, 32, np.int32), "failed": np.zeros(k, bool),
                    "errors": np.array([""] * k)}
            if stats:
                st = [os.stat(paths[r]) for r in rows]
                vals["file_size"] = np.array([s.st_size for s in st], np.int64)
                vals["file_mtime"] = np.array([s.st_mtime_ns for s in st], np.int64)
            store.write_rows(name, rows, vals)
        prompts = prompts_for(split, cfg)
        store.write_text(name, stub.encode_texts(prompts).numpy(), prompts, cfg.prompt_template,
                         class_names=split.class_names)
    store.mark_ready()
    return path


def rerun(cfg, dim: int) -> tuple[float, int]:
    """Seconds of ``run_extract`` with a stub backbone; returns (seconds, rows it would decode)."""
    import mdmf_cache.clip.backbone as backbone
    from mdmf_cache.extraction.build import run_extract

    real = backbone.load_backbone
    backbone.load_backbone = lambda *a, **kw: StubBackbone(dim)
    try:
        t0 = time.perf_counter()
        _, results = run_extract(cfg)
        seconds = time.perf_counter() - t0
    finally:
        backbone.load_backbone = real
    return seconds, sum(r.extracted + r.failed for r in results)


# ---- fresh processes: peak memory --------------------------------------------------------------------
CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np, torch, h5py, zarr
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import export_h5, load_split_features
from mdmf_cache.process import skip_the_exit_collection
skip_the_exit_collection()  # at exit, after the figures: ~1 s of CPU not spent walking torch's objects

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:  # reset the high-water mark to the current resident size
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS") if reset else status("VmHWM")
what, path = sys.argv[2], sys.argv[3]
if what == "load":
    fs = load_split_features(path, "train")
    nbytes = fs.features.numel() * fs.features.element_size()
elif what == "eval":  # eval's own path for MDMF (random init) on the test split, from a fresh process
    from mdmf_cache.evaluation.scoring import episode_list, score
    from mdmf_cache.heads.factory import build_model
    import time as _time
    test = load_split_features(path, "test")
    torch.manual_seed(0)
    model = build_model("paper", test.features.shape[-1], test.features.shape[2], {}, "mdmf").eval()
    eps = episode_list(test, 5, 5, 1, int(sys.argv[4]), 0)
    before = status("VmRSS")
    t0 = _time.perf_counter()
    res = score("mdmf", test, eps, model, 0)
    print(json.dumps({"peak_gb": status("VmHWM") / 1e9, "above_gb": (status("VmHWM") - before) / 1e9,
                      "seconds": _time.perf_counter() - t0, "fused": res.fused, "episodes": len(eps)}))
    sys.exit(0)
else:
    export_h5(path, sys.argv[4])
    nbytes = CacheStore(path).root["train"]["features"].nbytes
print(json.dumps({"peak": status("VmHWM") - base, "bytes": int(nbytes), "reset": reset}))
"""


def peak_over(what: str, path: Path, *extra: str) -> float:
    res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), what, str(path), *extra], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise RuntimeError(f"{what} child failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["peak"] / out["bytes"]


def measure_eval(path: Path, episodes: int) -> dict:
    """Eval's peak resident memory for ``episodes`` 5-way 5-shot test episodes (MDMF, per-video path), in a
    fresh process: in total (torch, the model and the features included) and above what it held before."""
    res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), "eval", str(path), str(episodes)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise RuntimeError(f"eval child failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"eval_episodes": out["episodes"], "eval_peak_rss_gb": round(out["peak_gb"], 3),
            "eval_above_start_gb": round(out["above_gb"], 3), "eval_s": round(out["seconds"], 1),
            "eval_fused": out["fused"]}


def quiet(fn, *a):
    """Run a report function with its rich console writing to a string; returns seconds."""
    from rich.console import Console

    import mdmf_cache.report.tables as report

    real = report.console
    report.console = Console(file=io.StringIO(), width=120)
    try:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0
    finally:
        report.console = real


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=67013, help="train rows (SSv2-Full: 67,013)")
    p.add_argument("--views", type=int, default=1, help="train views V")
    p.add_argument("--dim", type=int, default=1024, help="feature width D")
    p.add_argument("--frames", type=int, default=8, help="T")
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="2,000 train rows, D = 64, val/test of 200/300 rows")
    p.add_argument("--dir", default=None, help="where to build (default: a temporary folder)")
    p.add_argument("--only", default="store,eval,sweep", help="figures to measure, comma-separated: store,eval,sweep")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if args.quick:
        args.rows, args.dim = 2000, 64
    sizes = {"train": args.rows, "val": 200 if args.quick else SSV2["val"][1],
             "test": 300 if args.quick else SSV2["test"][1]}
    import logging

    logging.disable(logging.WARNING)  # the folder split's few-class warnings
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        root, lists = _tree(base, sizes)
        cfg = _config(root, lists, base / "cache", args.views, args.frames, args.chunk_rows)
        t0 = time.perf_counter()
        path = build(cfg, args.dim)
        build_s = time.perf_counter() - t0
        out = {"bench": "scale", "rows": args.rows, "views": args.views, "dim": args.dim, "frames": args.frames,
               "val_rows": sizes["val"], "test_rows": sizes["test"],
               "features_gb": round(args.rows * args.views * args.frames * args.dim * 2 / 1e9, 3),
               "build_s": round(build_s, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
        if "store" in only:
            out.update(measure_store(cfg, path, args.dim, base))
        if "eval" in only:
            out.update(measure_eval(path, 200 if args.quick else 10_000))
        if "sweep" in only:
            out.update(measure_sweep(path, base, separate=not args.quick, every=0.5 if args.quick else 0.1))
        # further figures on the same cache join ``out`` here (one function each, returning its fields)
    print(json.dumps(out))
    return out


def measure_store(cfg, path: Path, dim: int, base: Path) -> dict:
    """The store's figures on a built cache: extract reruns, info, verify, load and export memory."""
    from mdmf_cache.report.tables import print_info, print_verify

    first_s, todo1 = rerun(cfg, dim)
    rerun_s, todo2 = rerun(cfg, dim)
    assert todo1 == todo2 == 0, "the rerun found work: the bench cache does not match its tree"
    return {
        "load_peak_over_features": round(peak_over("load", path), 3),
        "extract_first_rerun_s": round(first_s, 2), "extract_rerun_s": round(rerun_s, 2),
        "info_s": round(quiet(print_info, path), 2), "verify_s": round(quiet(print_verify, path), 2),
        "export_peak_over_array": round(peak_over("export", path, str(base / "export.h5")), 3),
    }


# ---- a sweep's memory with --jobs 2 -------------------------------------------------------------------
SWEEP_CHILD = r"""
import logging, sys
sys.path.insert(0, sys.argv[1])
from mdmf_cache.sweeps.study import SweepConfig
from mdmf_cache.process import skip_the_exit_collection
from pipelines.sweep import run as run_sweep
skip_the_exit_collection()  # at exit, after the sweep: ~1 s of CPU not spent walking torch's objects
logging.disable(logging.WARNING)
fixed = {"shot": 1, "episodes": 8, "episodes-per-step": 4, "val-every": 8, "val-episodes": 10, "device": "cpu"}
cfg = SweepConfig(cache=sys.argv[2], out=sys.argv[3], trials=2, jobs=2, prune=False, space={"lr": "1e-4:1e-2:log"},
                  fixed=fixed, share_features=sys.argv[4] == "1")
res = run_sweep(cfg, progress=False, show=False)
assert [r["state"] for r in res["rows"]] == ["COMPLETE"] * 2, res["rows"]
"""


def _tree_of(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sweep_peak_pss(path: Path, out: Path, share: bool, every: float = 0.1) -> tuple[int, float]:
    """(peak summed PSS in bytes, seconds) of a ``--jobs 2`` sweep in a fresh process and its descendants, sampled
    every ``every`` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_CHILD, str(REPO), str(path), str(out), "1" if share else "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_pss(p) for p in _tree_of(proc.pid)))
        time.sleep(every)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"sweep child failed: {err[-2000:]}")
    return peak, time.perf_counter() - t0


def measure_sweep(path: Path, base: Path, separate: bool, every: float = 0.1) -> dict:
    """A ``--jobs 2`` sweep's peak memory (summed PSS, sampled every ``every`` seconds) over one copy of the train
    and val features; ``separate``: also with a copy per worker."""
    from mdmf_cache.store.cache import CacheStore

    store = CacheStore(path)
    one_copy = sum(int(store.root[s]["features"].nbytes) for s in ("train", "val"))  # every bench row is usable
    peak, seconds = sweep_peak_pss(path, base / "sweep_shared", share=True, every=every)
    res = {"sweep_one_copy_gb": round(one_copy / 1e9, 3), "sweep_jobs2_peak_pss_gb": round(peak / 1e9, 3),
           "sweep_jobs2_over_one_copy": round(peak / one_copy, 3), "sweep_jobs2_s": round(seconds, 1)}
    if separate:
        peak, seconds = sweep_peak_pss(path, base / "sweep_separate", share=False, every=every)
        res.update({"sweep_jobs2_separate_peak_pss_gb": round(peak / 1e9, 3),
                    "sweep_jobs2_separate_over_one_copy": round(peak / one_copy, 3),
                    "sweep_jobs2_separate_s": round(seconds, 1)})
    return res


if __name__ == "__main__":
    from mdmf_cache.process import skip_the_exit_collection

    skip_the_exit_collection()  # at exit, after the JSON line: ~1 s of CPU not spent walking torch's objects
    main()
