"""Benchmark of ``extract`` on synthetic UCF101-sized videos (not a test).

Writes N synthetic videos (AVI MPEG-4 with B-frames and MP4 H.264, 320x240, 64 frames, like
UCF101's) and measures, in one run, on the same videos (the test split: T=8 tsn middle frames,
centre crop, one view):

* decode-only videos/s: the extractor's own ``ClipSource`` through the same ``DataLoader``
  (``--workers`` processes, ``--batch-videos``), no model;
* encode-only videos/s: ``preprocess_clips`` + ``encode_images`` + the float16 copy to the host,
  on clips decoded beforehand (no decoding), after one warm-up batch;
* full videos/s: ``run_extract`` into a fresh cache, timed over the split loop (``SplitResult.seconds``,
  like the two above: worker start-up included, model loading not); the wall time of the whole
  call (model load, text, cache creation) is reported too;

and the ratio full / min(decode, encode). Goal: >= 0.85, i.e. decoding and encoding overlap and the
pipeline runs at the speed of its slower half. On a machine whose decoder workers and model share
the same few CPU cores the two halves compete and the ratio is lower by nature; the goal is meant
for a GPU encoder fed by CPU decoders.

The main process's OpenMP threads spin while they wait unless ``OMP_WAIT_POLICY=PASSIVE`` (which
``mdmf-cache extract`` sets before torch loads); on a few shared cores the spinning takes CPU from
the decoders. ``--omp-wait compare`` runs the whole benchmark once per policy (PASSIVE, and
torch's default), each in a fresh process on the same videos, and prints the full-extract ratio.

    python bench/extract.py                                            # mdmf-tiny-rn, 48 videos
    python bench/extract.py --quick                                    # seconds: a check that it runs, not a measurement
    python bench/extract.py --omp-wait compare                         # PASSIVE vs OpenMP's default
    python bench/extract.py --model RN50 --pretrained none --videos 16 # real-size RN50, random weights
    python bench/extract.py --model ViT-B-16 --pretrained openai --device cuda --videos 256

Prints a table and one JSON line (``{"bench": "extract", ...}``).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

FRAMES, SIZE = 64, (320, 240)  # UCF101: 320x240, ~7 s at 25 fps (median ~170 frames; 64 keeps setup short)
#: The measured run's sizes, and --quick's (seconds on a CPU: the same code paths, tiny sizes).
FULL = {"videos": 48, "workers": 2, "batch_videos": 8, "video_frames": FRAMES, "size": SIZE}
QUICK = {"videos": 4, "workers": 1, "batch_videos": 2, "video_frames": 16, "size": (96, 72)}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "model", "videos", "device", "decode_vps", "encode_vps", "full_vps", "full_wall_s", "ratio",
        "serial_vps", "ratio_vs_serial", "quick")


def make_videos(root: Path, n: int, seed: int = 0, frames: int = FRAMES, size: tuple[int, int] = SIZE) -> list[str]:
    """n synthetic videos (``frames`` long, ``size`` = (width, height)), alternating AVI and MP4; returns their
    ``class/video`` ids. Kept under ``root`` and reused by a later call with the same settings."""
    from mdmf_cache.data.synthetic import make_action_dataset

    classes = min(48, max(3, -(-n // 4)))
    per_class = -(-n // classes)
    marker = root / f".bench-{n}-{classes}-{per_class}-{seed}-{frames}-{size[0]}x{size[1]}"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_action_dataset(root, num_classes=classes, videos_per_class=per_class, num_frames=frames, size=size,
                            seed=seed, formats=(".avi", ".mp4"))
        marker.write_text("ok\n")
    ids = sorted(f"{p.parent.name}/{p.stem}" for p in root.glob("*/*") if p.suffix in (".avi", ".mp4"))
    # interleave classes so a prefix mixes both containers and all classes
    ids.sort(key=lambda v: (int(v.rsplit("_v", 1)[1]), v))
    return ids[:n]


def write_split_lists(folder: Path, ids: list[str]) -> Path:
    """All videos in the test list; train/val hold one video each (not extracted: --split test)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.txt").write_text("\n".join(ids) + "\n")
    (folder / "train.txt").write_text(ids[0] + "\n")
    (folder / "val.txt").write_text(ids[0] + "\n")
    return folder


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_only(cfg, split, device) -> tuple[float, list[dict]]:
    """Seconds to decode every video of the split through the extractor's own source and loader; the items."""
    from mdmf_cache.extraction.embed import ClipSource, clip_loader

    ids, paths, _ = split.found()
    source = ClipSource(np.arange(len(ids)), ids, paths, False, 1, cfg)
    t0 = time.perf_counter()
    items = [item for batch in clip_loader(source, cfg, device) for item in batch]
    seconds = time.perf_counter() - t0
    bad = [it for it in items if "error" in it]
    if bad:
        raise SystemExit(f"decoding failed: {bad[0]['error']}")
    return seconds, items


def encode_only(cfg, backbone, items: list[dict]) -> float:
    """Seconds to preprocess + encode pre-decoded clips (``encode_clips``: the float16 copy to the host
    included), in the extractor's batches, after one warm-up batch."""
    from mdmf_cache.extraction.embed import encode_clips

    batches = [items[i : i + cfg.batch_videos] for i in range(0, len(items), cfg.batch_videos)]
    encode_clips(batches[0], backbone, cfg, 1)  # warm-up (allocator, kernels)
    _sync(backbone.device)
    t0 = time.perf_counter()
    for batch in batches:
        encode_clips(batch, backbone, cfg, 1)
    _sync(backbone.device)
    return time.perf_counter() - t0


POLICIES = {"passive": "PASSIVE", "default": None}  # --omp-wait value -> OMP_WAIT_POLICY (None = unset)


def workdir(args: argparse.Namespace) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """``--workdir`` (created), or a temporary directory the caller cleans up."""
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_extract_")
        return tmp, Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return None, args.workdir


def compare_policies(argv: list[str], args: argparse.Namespace) -> dict:
    """Run this benchmark once per OpenMP wait policy, each in a fresh process, on the same videos."""
    import subprocess

    tmp, work = workdir(args)
    rest, skip = [], False  # argv without --omp-wait and --workdir (and their values)
    for a in argv:
        if skip:
            skip = False
        elif a in ("--omp-wait", "--workdir"):
            skip = True
        elif not a.startswith(("--omp-wait=", "--workdir=")):
            rest.append(a)
    runs = {}
    try:
        for name, value in POLICIES.items():
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if value is not None:
                env["OMP_WAIT_POLICY"] = value
            cmd = [sys.executable, __file__, *rest, "--omp-wait", name, "--workdir", str(work)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            print(out.rstrip())
            runs[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    p, d = runs["passive"], runs["default"]
    res = {"bench": "extract_omp_wait", "passive": p, "default": d,
           "full_passive_over_default": round(p["full_vps"] / d["full_vps"], 3)}
    print(f"\nOMP_WAIT_POLICY=PASSIVE: full {p['full_vps']:.2f} videos/s (full / serial {p['ratio_vs_serial']:.3f}); "
          f"unset: {d['full_vps']:.2f} videos/s (full / serial {d['ratio_vs_serial']:.3f}); "
          f"PASSIVE / unset = {res['full_passive_over_default']:.3f}")
    print(json.dumps({k: v for k, v in res.items() if k not in POLICIES}))
    return res


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mdmf-tiny-rn", help="open_clip model (default mdmf-tiny-rn)")
    ap.add_argument("--pretrained", default="none", help="tag, checkpoint path, or 'none' (random init)")
    ap.add_argument("--workers", type=int, default=None, help=f"decoder processes (default {FULL['workers']})")
    ap.add_argument("--videos", type=int, default=None, help=f"number of synthetic videos (default {FULL['videos']})")
    ap.add_argument("--batch-videos", type=int, default=None, help=f"default {FULL['batch_videos']}")
    ap.add_argument("--video-frames", type=int, default=None, help=f"frames per synthetic video (default {FRAMES})")
    ap.add_argument("--size", type=lambda v: tuple(int(x) for x in v.split("x")), default=None,
                    help=f"WIDTHxHEIGHT of the synthetic videos (default {SIZE[0]}x{SIZE[1]})")
    ap.add_argument("--quick", action="store_true",
                    help=f"seconds, not a measurement: {QUICK['videos']} small videos, 1 worker (the same code paths)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="keep videos here and reuse them (default: temp dir)")
    ap.add_argument("--omp-wait", choices=[*POLICIES, "compare"], default="passive",
                    help="OpenMP wait policy of this process: passive (as mdmf-cache extract), default "
                         "(unset), or compare (both, each in a fresh process)")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.omp_wait == "compare":
        return compare_policies(argv, args)
    if "torch" in sys.modules:
        raise SystemExit("torch is already imported: OMP_WAIT_POLICY cannot take effect (run as a script)")
    if POLICIES[args.omp_wait] is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = POLICIES[args.omp_wait]

    from mdmf_cache.clip.backbone import load_backbone
    from mdmf_cache.device import resolve_device
    from mdmf_cache.data.datasets import load_splits, resolve_paths
    from mdmf_cache.extraction.build import run_extract
    from mdmf_cache.configs import ExtractConfig

    pretrained = None if args.pretrained.lower() in ("none", "") else args.pretrained
    device = resolve_device(args.device)
    tmp, work = workdir(args)
    try:
        t0 = time.perf_counter()
        ids = make_videos(work / "videos", args.videos, frames=args.video_frames, size=args.size)
        made = time.perf_counter() - t0
        lists = write_split_lists(work / "lists", ids)
        cfg = ExtractConfig(dataset="folder", root=str(work / "videos"), splits_dir=str(lists),
                            cache_dir=str(work / "cache"), name="bench", model=args.model, pretrained=pretrained,
                            workers=args.workers, batch_videos=args.batch_videos, device=args.device,
                            splits=("test",), progress=False, overwrite=True)
        cfg.validate()
        split = load_splits("folder", lists, work / "videos")["test"]
        assert not resolve_paths(split, work / "videos")
        n = len(split)

        dec_s, items = decode_only(cfg, split, device)
        backbone = load_backbone(args.model, pretrained, args.device)
        enc_s = encode_only(cfg, backbone, items)
        del items, backbone

        shutil.rmtree(work / "cache", ignore_errors=True)
        t0 = time.perf_counter()
        path, results = run_extract(cfg)
        wall = time.perf_counter() - t0
        full_s = results[0].seconds
        assert results[0].extracted == n and results[0].failed == 0, results[0]
    finally:
        if tmp is not None:
            tmp.cleanup()

    dec, enc, full = n / dec_s, n / enc_s, n / full_s
    res = {
        "bench": "extract", "model": args.model, "pretrained": args.pretrained, "videos": n,
        "frames": args.video_frames, "size": list(args.size), "workers": args.workers,
        "batch_videos": args.batch_videos, "device": str(device),
        "cpu_cores": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_avg": round(os.getloadavg()[0], 2), "decode_vps": round(dec, 2), "encode_vps": round(enc, 2),
        "full_vps": round(full, 2), "full_wall_vps": round(n / wall, 2), "full_wall_s": round(wall, 2),
        "ratio": round(full / min(dec, enc), 3), "goal": 0.85,
        # when decoders and encoder share the same CPU cores they cannot overlap: the best is then
        # the serial rate 1 / (1/decode + 1/encode)
        "serial_vps": round(1 / (1 / dec + 1 / enc), 2), "ratio_vs_serial": round(full * (1 / dec + 1 / enc), 3),
        "setup_videos_s": round(made, 1), "quick": args.quick,
    }
    rows = [("decode only", dec_s, dec), ("encode only", enc_s, enc), ("full (split loop)", full_s, full),
            ("full (wall, incl. model load)", wall, n / wall)]
    print(f"\nextract benchmark{' (--quick: not a measurement)' if args.quick else ''}: {n} videos "
          f"{args.size[0]}x{args.size[1]}x{args.video_frames} (AVI+MP4), {args.model} "
          f"({args.pretrained}), {res['device']}, {args.workers} workers, {os.cpu_count()} CPU cores, "
          f"OMP_WAIT_POLICY {res['omp_wait_policy']}, load average {res['load_avg']}")
    print(f"{'stage':32s} {'seconds':>9s} {'videos/s':>9s}")
    for name, s, r in rows:
        print(f"{name:32s} {s:9.2f} {r:9.2f}")
    print(f"ratio full / min(decode, encode) = {res['ratio']:.3f} (goal >= 0.85); "
          f"full / serial rate {res['serial_vps']:.2f} = {res['ratio_vs_serial']:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
