"""Every GPU path once, in under 8 minutes on one GPU (not a test): one JSON line of what it measured.

Parts (each in its own try: a part that fails records its error and the others still run):

* ``extract``: ``bench/extract.py`` in a fresh process (its OpenMP setting needs one) for ViT-B-16 and
  RN50 (random init: nothing is downloaded) on the same synthetic UCF101-sized videos, with bf16
  autocast (``Backbone.encode_images`` on CUDA) and decoder workers feeding pinned batches: videos/s of
  decode only, encode only, the full extract, and full / min(decode, encode) (goal >= 0.85);
* ``fast_train``: fast-mode training at D = 1024 (5-way 5-shot, 5 train queries per class, E = 16
  episodes per step) on a synthetic cache whose classes can be told apart, twice from the same
  initialisation on the same episodes: in bf16 autocast (``heads_autocast``, what the trainer runs)
  and in float32 (``train_fast.float32_context``: autocast off, TF32 off). Episodes/s of both, and
  the val accuracy (± 95% CI) of both on the same 500 val episodes, scored as the trainer scores
  (per-video path on the GPU, bf16) and in float32 on the CPU (the same scorer, no autocast there), so
  the two differ only in the training precision; a ProtoNet on the same episodes for scale;
* ``eval_10k``: 10,000 5-way 5-shot test episodes on the per-video path (seconds; goal < 1 s), the
  direct path on 200 of them (extrapolated), and their largest logit difference (``train_fast.eval_time``);
* ``full_mode``: full-mode updates (backbone + heads, forward, backward, Adam; one episode per
  forward, 4 per step) on random pixels for RN50 and ViT-B-16 (random init), 5-way 1- and 5-shot with
  5 queries per class, gradient checkpointing off and on: episodes/s and peak memory
  (``torch.cuda.max_memory_allocated``; ``train_full.random_pixel_updates``);
* ``torchrun``: ``python -m torch.distributed.run --standalone --nproc-per-node P -m cli train --mode
  full ...`` on synthetic videos with the tiny ResNet (P = 2 where there are 2 GPUs, else 1: a process
  torchrun launches joins an NCCL process group even alone, so DDP, the all-reduces and the BatchNorm
  merge run as in a larger job).

Budgets: the whole run stops starting new work at 7 min 30 s (``--budget``); each part has its own cap and
a part that would start too late is recorded as skipped.

    python bench/gpu.py                 # on a CUDA machine (make bench-gpu)
    python bench/gpu.py --quick         # tiny sizes on the GPU: every path in about a minute
    python bench/gpu.py --allow-cpu     # no GPU: the tiny version on the CPU (checks the script, measures nothing)

Without CUDA (and without ``--allow-cpu``) it stops at its device check with exit status 3. Progress goes
to stderr; stdout gets one JSON line (``{"bench": "gpu", ...}``). Exit status 1 when a part failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import open_clip  # noqa: E402, F401  (imported here so that a missing package fails before the device check)
import torch  # noqa: E402

from mdmf_cache.device import resolve_device  # noqa: E402
from mdmf_cache.configs import default_workers  # noqa: E402
from mdmf_cache.data.episodes import EpisodeSampler  # noqa: E402
from mdmf_cache.evaluation.scoring import score  # noqa: E402
from mdmf_cache.heads.factory import build_model  # noqa: E402
from mdmf_cache.store.read import load_split_features  # noqa: E402
from mdmf_cache.data.synthetic import make_action_dataset  # noqa: E402
from sweep import synthetic_cache  # noqa: E402
from train_fast import eval_time, synthetic_split, train_rate  # noqa: E402
from train_full import random_pixel_updates  # noqa: E402

#: Exit status of the device check (no CUDA and no --allow-cpu).
NO_DEVICE = 3
#: The keys of the JSON line (tests/test_bench.py checks them where a GPU is present).
KEYS = ("bench", "device", "quick", "seconds", "errors", "extract", "fast_train", "eval_10k", "full_mode", "torchrun")

#: Sizes of the real run and of the tiny one (--quick, or any run on a CPU).
FULL = {
    "extract_models": ("ViT-B-16", "RN50"), "extract_videos": 160, "extract_batch": 16, "extract_frames": 64,
    "extract_size": "320x240",
    "dim": 1024, "classes": (64, 16, 16), "per_class": 20, "signal": 0.05, "episodes_per_step": 16,
    "train_seconds": 20.0, "probe_steps": 3, "max_steps": 400, "val_episodes": 500,
    "test_episodes": 10_000, "direct_episodes": 200, "test_classes": 24, "test_per_class": 100,
    "full_models": ("RN50", "ViT-B-16"), "full_way": 5, "full_shots": (1, 5), "full_queries": 5, "full_updates": 2,
    "videos": (25, 3, 16, (64, 48)), "torchrun_episodes": 32, "torchrun_way": 5, "torchrun_workers": 4,
}
QUICK = {
    "extract_models": ("mdmf-tiny-rn",), "extract_videos": 4, "extract_batch": 2, "extract_frames": 16,
    "extract_size": "96x72",
    "dim": 32, "classes": (5, 5, 5), "per_class": 10, "signal": 0.05, "episodes_per_step": 2,
    "train_seconds": 1.0, "probe_steps": 1, "max_steps": 2, "val_episodes": 10,
    "test_episodes": 20, "direct_episodes": 4, "test_classes": 5, "test_per_class": 10,
    "full_models": ("mdmf-tiny-rn", "mdmf-tiny-vit"), "full_way": 2, "full_shots": (1,), "full_queries": 1,
    "full_updates": 1, "videos": (10, 3, 12, (64, 48)), "torchrun_episodes": 4, "torchrun_way": 2,
    "torchrun_workers": 1,
}
#: Seconds each part may take at most (its subprocess timeout; loops stop starting configs after it).
CAPS = {"extract": 170, "fast_train": 100, "eval_10k": 60, "full_mode": 150, "torchrun": 120}


def log(msg: str) -> None:
    print(f"[gpu {time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


class Budget:
    """The run's deadline and each part's cap."""

    def __init__(self, total: float) -> None:
        self.end = T0 + total

    def left(self) -> float:
        return self.end - time.perf_counter()

    def part(self, name: str) -> float:
        """Seconds the part may take (its cap, or what is left of the run)."""
        return max(0.0, min(CAPS[name], self.left()))


def finite(x):
    """JSON-safe: non-finite floats become None (json would write Infinity / NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return finite(x.item())
    return x


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_subprocess(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root; its stderr tail in the error when it fails or runs out of time."""
    log(f"{what}: {' '.join(cmd)}")
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise RuntimeError(f"{what}: no result within {timeout:.0f} s (the part's budget); stderr tail: {tail}") from e
    if r.returncode != 0:
        raise RuntimeError(f"{what}: exit status {r.returncode}; stderr tail: {r.stderr[-2000:]}")
    return r


# ---------------------------------------------------------------------------------------------- parts


def part_extract(sizes: dict, device: torch.device, work: Path, budget: Budget) -> dict:
    """bench/extract.py per model on the same videos (made by the first run, reused by the next)."""
    out, start = {}, time.perf_counter()
    workers = default_workers() if device.type == "cuda" else 1
    for model in sizes["extract_models"]:
        left = budget.part("extract") - (time.perf_counter() - start)
        if out and left < 40:
            out[model] = {"error": f"skipped: {left:.0f} s left of the part's budget"}
            continue
        cmd = [sys.executable, str(REPO / "bench" / "extract.py"), "--model", model, "--pretrained", "none",
               "--device", str(device), "--videos", str(sizes["extract_videos"]), "--workers", str(workers),
               "--batch-videos", str(sizes["extract_batch"]), "--video-frames", str(sizes["extract_frames"]),
               "--size", sizes["extract_size"], "--workdir", str(work / "extract")]
        try:
            r = run_subprocess(cmd, left, f"extract {model}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(r.stdout.rstrip(), file=sys.stderr)  # its table, for the reader
            out[model] = {k: res.get(k) for k in ("videos", "workers", "batch_videos", "decode_vps", "encode_vps",
                                                  "full_vps", "full_wall_s", "ratio", "setup_videos_s")}
        except Exception as e:  # noqa: BLE001 - the next model still runs
            out[model] = {"error": f"{type(e).__name__}: {e}"}
    return out


METHOD = "mdmf"  # the head fast_train and eval_10k build and score


def _accuracy(model, split, episodes, seed: int) -> list[float]:
    """[mean %, 95% CI %] of the trained head on ``episodes`` (per-video path, as the trainer validates)."""
    model.eval()
    r = score(METHOD, split, episodes, model, seed)
    model.train()
    return [round(r.mean * 100, 2), round(r.ci95 * 100, 2)]


def _baseline(split, episodes, seed: int) -> list[float]:
    r = score("protonet", split, episodes, seed=seed)
    return [round(r.mean * 100, 2), round(r.ci95 * 100, 2)]


def part_fast_train(sizes: dict, device: torch.device, work: Path, budget: Budget, seed: int = 0) -> dict:
    """bf16 against float32 training: the same initialisation, the same episodes, the same val episodes."""
    cache = synthetic_cache(work, sizes["dim"], classes=sizes["classes"], per_class=sizes["per_class"],
                            signal=sizes["signal"])
    train = load_split_features(cache, "train", device=str(device))
    val = load_split_features(cache, "val", device=str(device))
    val_cpu = load_split_features(cache, "val", device="cpu")
    views, frames, dim = train.features.shape[1:]
    args = argparse.Namespace(episodes_per_step=sizes["episodes_per_step"], way=5, shot=5, train_queries=5)
    sampler = EpisodeSampler(train.labels.cpu().numpy(), train.num_classes, views=views)
    sampler.check(args.way, args.shot, args.train_queries, split="train")
    val_eps = EpisodeSampler(val.labels.cpu().numpy(), val.num_classes).sample(
        sizes["val_episodes"], args.way, args.shot, 1, np.random.default_rng([seed, 1]))
    e = args.episodes_per_step

    def fresh():
        torch.manual_seed(seed)  # every device's generator: the same initialisation and dropout draws
        return build_model("paper", dim, frames, {}, METHOD).to(device)

    # steps: what bf16 runs in ~train_seconds (from a short probe), the same for both precisions
    probe = train_rate(fresh(), train, sampler, args, np.random.default_rng([seed, 9]), e, sizes["probe_steps"], device,
                       amp=True)
    steps = int(min(sizes["max_steps"], max(sizes["probe_steps"], probe["episodes_per_s"] * sizes["train_seconds"] / e)))
    log(f"fast_train: probe {probe['episodes_per_s']:.0f} episodes/s in bf16; {steps} steps of {e} episodes each")
    out = {"dim": dim, "episodes_per_step": e, "steps": steps, "episodes": steps * e, "val_episodes": len(val_eps),
           "protonet_val": _baseline(val, val_eps, seed)}
    for name, amp in (("bf16", True), ("float32", False)):
        if budget.part("fast_train") < 5:
            out[name] = {"error": "skipped: time budget"}
            continue
        model = fresh()
        rate = train_rate(model, train, sampler, args, np.random.default_rng([seed, 0]), e, steps, device, amp=amp)
        out[name] = {"episodes_per_s": round(rate["episodes_per_s"], 1), "seconds": round(rate["seconds"], 2),
                     "val_acc": _accuracy(model, val, val_eps, seed),  # the trainer's scoring (bf16 on CUDA)
                     "val_acc_cpu_float32": _accuracy(copy.deepcopy(model).cpu(), val_cpu, val_eps, seed)}
        log(f"fast_train {name}: {out[name]}")
    if "val_acc" in out.get("bf16", {}) and "val_acc" in out.get("float32", {}):
        out["val_acc_diff_cpu_float32"] = round(out["bf16"]["val_acc_cpu_float32"][0]
                                                - out["float32"]["val_acc_cpu_float32"][0], 2)
    return out


def part_eval_10k(sizes: dict, device: torch.device, seed: int = 0) -> dict:
    split = synthetic_split(sizes["test_classes"], sizes["test_per_class"], 8, sizes["dim"], device, seed)
    args = argparse.Namespace(test_episodes=sizes["test_episodes"], direct_episodes=sizes["direct_episodes"],
                              way=5, shot=5, seed=seed, method=METHOD, eval_batch=500)
    torch.manual_seed(seed)
    model = build_model("paper", sizes["dim"], 8, {}, METHOD).to(device)
    ev = eval_time(model, split, args, device)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in ev.items()}


def part_full_mode(sizes: dict, device: torch.device, root: Path, budget: Budget) -> dict:
    out, start = {}, time.perf_counter()
    for model in sizes["full_models"]:
        for shot in sizes["full_shots"]:
            for ckpt in (False, True):
                key = f"{model} {sizes['full_way']}-way {shot}-shot{' ckpt' if ckpt else ''}"
                if time.perf_counter() - start > budget.part("full_mode"):
                    out[key] = {"error": "skipped: time budget"}
                    continue
                try:
                    r = random_pixel_updates(root, model, sizes["full_way"], shot, sizes["full_queries"], ckpt, device,
                                             updates=sizes["full_updates"])
                    out[key] = {"episodes_per_s": r["eps_per_s"], "peak_gib": r["peak_gib"], "oom": r["oom"]}
                except Exception as e:  # noqa: BLE001 - the next configuration still runs
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
                log(f"full_mode {key}: {out[key]}")
    return out


def part_torchrun(sizes: dict, device: torch.device, root: Path, work: Path, budget: Budget) -> dict:
    procs = min(2, torch.cuda.device_count()) if device.type == "cuda" else 1
    run = work / "torchrun_run"
    e = sizes["torchrun_episodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "cli", "train", "--mode", "full", "folder", "--root", str(root), "--model", "mdmf-tiny-rn",
           "--pretrained", "none", "--way", str(sizes["torchrun_way"]), "--shot", "1", "--train-queries", "1",
           "--episodes", str(e), "--episodes-per-step", str(max(2, e // 2)), "--val-every", str(e),
           "--val-episodes", "20", "--workers", str(sizes["torchrun_workers"]), "--out", str(run),
           "--device", "auto" if device.type == "cuda" else "cpu"]
    run_subprocess(cmd, budget.part("torchrun"), "torchrun")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    cfg = json.loads((run / "config.json").read_text())
    return {"processes": procs, "nccl": device.type == "cuda",
            "episodes": last["episodes"], "episodes_per_s": last["episodes_per_s"], "val_acc": last["val_acc"],
            "loader_wait_s": last.get("loader_wait_s"), "device": cfg.get("resolved_data", {}).get("device")}


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ... (cpu only with --allow-cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every path in about a minute, measures nothing")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run the tiny version on the CPU instead of stopping (implies --quick)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which no new work starts (450)")
    p.add_argument("--parts", default=",".join(CAPS), help=f"comma-separated subset of {','.join(CAPS)}")
    p.add_argument("--workdir", type=Path, default=None, help="keep the synthetic data here (default: a temp dir)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(CAPS)
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(CAPS)}")
    return args


def device_check(args: argparse.Namespace) -> torch.device:
    """The CUDA device, or the CPU with --allow-cpu; otherwise a clear message and exit status NO_DEVICE."""
    if torch.cuda.is_available() and args.device != "cpu":
        return resolve_device(args.device)
    if args.allow_cpu:
        log("no CUDA device (or --device cpu): the tiny version on the CPU (--allow-cpu); nothing here is a measurement")
        return torch.device("cpu")
    if torch.cuda.is_available():
        print("bench/gpu.py: --device cpu measures nothing of the GPU paths; add --allow-cpu to run the tiny CPU "
              "version anyway", file=sys.stderr)
        raise SystemExit(NO_DEVICE)
    print(f"bench/gpu.py: imports and arguments OK; no CUDA device here (torch {torch.__version__}, CUDA build "
          f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it on "
          "a GPU machine (make bench-gpu), or pass --allow-cpu for the tiny CPU version.", file=sys.stderr)
    raise SystemExit(NO_DEVICE)


def describe(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
        try:
            v = torch.cuda.nccl.version()  # a tuple (2, 21, 5) or, in older builds, an int
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        except Exception as e:  # noqa: BLE001 - a build without NCCL
            info["nccl"] = f"unavailable ({type(e).__name__})"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_check(args)
    quick = args.quick or device.type == "cpu"
    sizes = QUICK if quick else FULL
    budget = Budget(args.budget)
    record: dict = {"bench": "gpu", **describe(device), "quick": quick, "errors": []}
    parts = args.parts.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = work / "videos"
        if {"full_mode", "torchrun"} & set(parts) and not (root / ".complete").is_file():
            classes, per_class, frames, size = sizes["videos"]
            make_action_dataset(root, num_classes=classes, videos_per_class=per_class, num_frames=frames, size=size)
            (root / ".complete").write_text("ok\n")
        steps = {"extract": lambda: part_extract(sizes, device, work, budget),
                 "fast_train": lambda: part_fast_train(sizes, device, work, budget),
                 "eval_10k": lambda: part_eval_10k(sizes, device),
                 "full_mode": lambda: part_full_mode(sizes, device, root, budget),
                 "torchrun": lambda: part_torchrun(sizes, device, root, work, budget)}
        for name, fn in steps.items():
            if name not in parts:
                record[name] = {"error": "not run (--parts)"}
                continue
            if budget.left() < 10:
                record[name] = {"error": f"skipped: the run's budget ({args.budget:.0f} s) is spent"}
                record["errors"].append(name)
                continue
            log(f"{name}: start ({budget.part(name):.0f} s budget)")
            t = time.perf_counter()
            try:
                record[name] = {**fn(), "part_seconds": round(time.perf_counter() - t, 1)}
            except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
                record[name] = {"error": f"{type(e).__name__}: {e}", "part_seconds": round(time.perf_counter() - t, 1)}
                traceback.print_exc(file=sys.stderr)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            sub_errors = [k for k, v in record[name].items() if isinstance(v, dict) and "error" in v]
            if "error" in record[name] or sub_errors:
                record["errors"].append(name if "error" in record[name] else f"{name}: {', '.join(sub_errors)}")
            log(f"{name}: done in {time.perf_counter() - t:.1f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    record["seconds"] = round(time.perf_counter() - T0, 1)
    summary(record)
    print(json.dumps(finite(record)), flush=True)
    return 1 if record["errors"] else 0


def summary(r: dict) -> None:
    """A short human-readable table (stdout, before the JSON line)."""
    print(f"bench/gpu.py: {r['device']}, torch {r['torch']}, CUDA {r['cuda']}, {r['seconds']} s"
          f"{' (quick: not a measurement)' if r['quick'] else ''}")
    for name in CAPS:
        part = r.get(name, {})
        if "error" in part:
            print(f"  {name:<11} FAILED / skipped: {part['error'][:200]}")
            continue
        if name == "extract":
            for model, m in part.items():
                if isinstance(m, dict):
                    print(f"  extract     {model}: " + (m.get("error") or f"decode {m['decode_vps']} encode "
                          f"{m['encode_vps']} full {m['full_vps']} videos/s, full / min {m['ratio']}"))
        elif name == "fast_train":
            for prec in ("bf16", "float32"):
                m = part.get(prec, {})
                print(f"  fast_train  {prec}: " + (m.get("error") or f"{m['episodes_per_s']} episodes/s, val "
                      f"{m['val_acc'][0]} ± {m['val_acc'][1]} % (CPU float32 scoring {m['val_acc_cpu_float32'][0]} %)"))
        elif name == "eval_10k":
            print(f"  eval_10k    {part.get('eval_10k_s')} s per 10,000 episodes (direct path "
                  f"{part.get('eval_10k_s_direct')} s), max logit difference {part.get('max_logit_diff')}")
        elif name == "full_mode":
            for key, m in part.items():
                if isinstance(m, dict):
                    mem = f", peak {m['peak_gib']:.1f} GiB" if m.get("peak_gib") is not None else ""
                    rate = "out of memory" if m.get("oom") else f"{m.get('episodes_per_s') or 0:.2f} episodes/s"
                    print(f"  full_mode   {key}: " + (m.get("error") or rate + mem))
        elif name == "torchrun":
            print(f"  torchrun    {part.get('processes')} process(es), NCCL {part.get('nccl')}: "
                  f"{part.get('episodes_per_s')} episodes/s, val {part.get('val_acc')} %")


if __name__ == "__main__":
    sys.exit(main())
