"""Benchmark of full-mode training (CLIP fine-tuned from the videos): the data pipeline's cost, and GPU memory.

Measures, in one run:

* **compute only**: episodes/s of the full-mode model (backbone + heads, forward, backward, Adam) on
  pixels decoded and preprocessed beforehand, with the trainer's micro-batching;
* **full mode**: episodes/s of ``run_train(mode="full")`` itself (decoding in DataLoader workers,
  preprocessing, the same model), for each ``--workers`` count; and the ratio full / compute-only.
  Goal: >= 0.9 with enough workers (then decoding is hidden behind the model); the smallest worker
  count that reaches it is reported;
* **random-pixel updates** (CUDA; on a CPU only with ``--quick`` or ``--memory-models`` given): episodes/s
  and peak GPU memory (``torch.cuda.max_memory_allocated``, the weights and Adam's state included) of
  full-mode updates for each ``--memory-models`` x 5-way ``--memory-shots`` x gradient checkpointing
  off/on (``--memory-checkpointing``; 5 queries per class, as in training), on random pixels: one episode per
  forward/backward, 4 accumulated per Adam step (``--memory-accumulate``), after a warm-up update.

The videos are synthetic (moving shapes, MP4/AVI as UCF101), 320x240 and ``--video-frames`` long.
Accuracy is meaningless here, only time and memory are measured.

    python bench/train_full.py                                      # tiny ViT on this machine
    python bench/train_full.py --model RN50 --episodes 8 --workers 0,2
    python bench/train_full.py --model ViT-B-16 --workers 2,4,8 --memory-models RN50,ViT-B-16   # on a GPU
    python bench/train_full.py --quick          # seconds: a check that it runs (tiny sizes), not a measurement

Prints a table and one JSON line (``{"bench": "train_full", ...}``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdmf_cache.device import heads_autocast, resolve_device  # noqa: E402
from mdmf_cache.configs import TrainConfig  # noqa: E402
from mdmf_cache.distributed import World  # noqa: E402
from mdmf_cache.heads.mdmf_losses import total_loss  # noqa: E402
from mdmf_cache.heads.factory import build_model  # noqa: E402
from mdmf_cache.training.data import FullData  # noqa: E402
from pipelines.train import run as run_train  # noqa: E402
from mdmf_cache.data.video_episodes import episode_pixels  # noqa: E402

#: The measured run's sizes, and --quick's (seconds on a CPU: the same code paths, tiny sizes); options
#: given explicitly win. memory_models None: RN50,ViT-B-16 on CUDA, none on a CPU.
FULL = {"model": "mdmf-tiny-vit", "way": 5, "episodes": 16, "episodes_per_step": 8, "workers": "0,1,2",
        "video_frames": 48, "classes": 25, "videos_per_class": 4, "size": (320, 240), "memory_models": None,
        "memory_shots": "1,5", "memory_queries": 5, "memory_accumulate": 4, "memory_checkpointing": "off,on", "frames": 8}
QUICK = {"model": "mdmf-tiny-vit", "way": 2, "episodes": 2, "episodes_per_step": 2, "workers": "1",
         "video_frames": 12, "classes": 10, "videos_per_class": 3, "size": (64, 48), "memory_models": "mdmf-tiny-vit",
         "memory_shots": "1", "memory_queries": 1, "memory_accumulate": 1, "memory_checkpointing": "on", "frames": 4}
#: The keys of the JSON line (tests/test_bench.py checks them).
KEYS = ("bench", "device", "model", "compute_only_eps", "full_eps", "ratio", "workers_needed", "pixel_updates",
        "memory_gib", "quick")


def config(root: Path, out: Path, *, model: str, way: int, shot: int, queries: int, episodes: int,
           episodes_per_step: int, episodes_per_forward: int, workers: int, device: str,
           checkpointing: bool = False, frames: int = 8) -> TrainConfig:
    """A full-mode TrainConfig on the synthetic folder dataset ``root`` (random init, one validation at the end)."""
    return TrainConfig(
        mode="full", out=str(out), way=way, shot=shot, train_queries=queries, episodes=episodes,
        episodes_per_step=episodes_per_step, val_every=episodes, val_episodes=5, lr=1e-5, device=device, seed=0,
        full={"dataset": "folder", "root": str(root), "model": model, "pretrained": None, "workers": workers,
              "flip": True, "episodes_per_forward": episodes_per_forward, "grad_checkpointing": checkpointing,
              "num_frames": frames})


def _config(args, root: Path, out: Path, workers: int) -> TrainConfig:
    return config(root, out, model=args.model, way=args.way, shot=args.shot, queries=args.queries,
                  episodes=args.episodes, episodes_per_step=args.episodes_per_step,
                  episodes_per_forward=args.episodes_per_forward, workers=workers, device=args.device,
                  frames=args.frames)


def _adam(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over what trains (the trainer's learning rates do not change the cost of a step)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_only(cfg: TrainConfig, device: torch.device) -> float:
    """Episodes/s of forward + backward + Adam on pre-decoded, pre-processed pixels (the same episodes)."""
    data = FullData(cfg, device, World())
    torch.manual_seed(0)
    head = build_model(cfg.preset, data.dim, data.num_frames, {}, cfg.method)
    model = data.wrap(head).to(device)
    opt = _adam(cfg, model)
    m = cfg.full_mode.episodes_per_forward
    micro = []
    for lo in range(0, cfg.episodes, m):  # everything decoded and on the device before the clock starts
        items = [data.episodes[i] for i in range(lo, min(lo + m, cfg.episodes))]
        s, q, c, labels, noise = episode_pixels(items, device, data.ecfg.normalize)
        micro.append(((s, q, data.text["train"][c], None, noise), labels))

    def update(batch):
        opt.zero_grad(set_to_none=True)
        for inputs, labels in batch:
            with heads_autocast(device):
                loss, _ = total_loss(model(*inputs), labels, head.cfg)
            loss.backward()
        opt.step()

    per = max(1, cfg.episodes_per_step // m)
    update(micro[:per])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for lo in range(0, len(micro), per):
        update(micro[lo:lo + per])
    sync(device)
    return cfg.episodes / (time.perf_counter() - t0)


def random_pixel_updates(root: Path, model: str, way: int, shot: int, queries: int, checkpointing: bool,
                         device: torch.device, updates: int = 1, accumulate: int = 4, frames: int = 8) -> dict:
    """Full-mode updates on random pixels: ``updates`` timed updates of ``accumulate`` one-episode forward/backward
    passes and one Adam step each, after a warm-up update.

    Returns ``{"eps_per_s", "peak_gib", "oom"}``: episodes/s, and on CUDA the peak of
    ``torch.cuda.max_memory_allocated`` from just before the first update (the model and its inputs
    included; None on a CPU); out of GPU memory: ``oom`` True and the rates None.
    """
    # the data only gives the backbone, its width and the text: a 1-shot 1-query config fits any synthetic tree
    cfg = config(root, root.parent / "pixel_updates", model=model, way=way, shot=1, queries=1,
                 episodes=accumulate, episodes_per_step=accumulate, episodes_per_forward=1, workers=0,
                 device=str(device), checkpointing=checkpointing, frames=frames)
    data = FullData(cfg, device, World())
    torch.manual_seed(0)
    head = build_model(cfg.preset, data.dim, data.num_frames, {}, cfg.method)
    net = data.wrap(head).to(device)
    opt = _adam(cfg, net)
    t, size = cfg.full_mode.num_frames, 224
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(1, way * shot, t, 3, size, size, device=device, generator=g)  # (E=1, S, T, 3, H, W)
    q = torch.randn(1, way * queries, t, 3, size, size, device=device, generator=g)  # (E=1, Q, T, 3, H, W)
    text = torch.randn(1, way, data.dim, device=device, generator=g)  # (E=1, N, D)
    labels = torch.arange(way, device=device).repeat_interleave(queries)[None]  # (E=1, Q)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    try:
        for i in range(1 + updates):  # a warm-up update, then the timed ones
            if i == 1:
                sync(device)
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for _ in range(accumulate):
                with heads_autocast(device):
                    loss, _ = total_loss(net(s, q, text), labels, head.cfg)
                (loss / accumulate).backward()
            opt.step()
        sync(device)
        eps = updates * accumulate / (time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"eps_per_s": eps, "peak_gib": peak, "oom": False}
    except torch.cuda.OutOfMemoryError:
        return {"eps_per_s": None, "peak_gib": None, "oom": True}
    finally:
        del net, opt, s, q, data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help=f"open_clip model ({FULL['model']})")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--way", type=int, help="(5)")
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--queries", type=int, default=1, help="train queries per class")
    ap.add_argument("--episodes", type=int, help="episodes timed per measurement (16)")
    ap.add_argument("--episodes-per-step", type=int, help="(8)")
    ap.add_argument("--episodes-per-forward", type=int, default=1)
    ap.add_argument("--frames", type=int, help="T frames per video the model sees (8)")
    ap.add_argument("--workers", help="comma-separated decoder worker counts (0,1,2)")
    ap.add_argument("--video-frames", type=int, help="frames per synthetic video (48)")
    ap.add_argument("--classes", type=int, help="classes of the synthetic dataset (25)")
    ap.add_argument("--videos-per-class", type=int, help="(4)")
    ap.add_argument("--size", type=lambda v: tuple(int(x) for x in v.split("x")), help="WIDTHxHEIGHT (320x240)")
    ap.add_argument("--memory-models", help="random-pixel updates of these backbones (default: RN50,ViT-B-16 on "
                                            "CUDA, none on a CPU)")
    ap.add_argument("--memory-shots", help="(1,5)")
    ap.add_argument("--memory-queries", type=int, help="queries per class of the random-pixel updates (5)")
    ap.add_argument("--memory-checkpointing", help="gradient checkpointing of the random-pixel updates: off,on "
                                                   "(--quick: on; off is compute only's path)")
    ap.add_argument("--memory-accumulate", type=int, help="one-episode passes per Adam step of the random-pixel updates (4)")
    ap.add_argument("--quick", action="store_true", help="seconds, not a measurement: 2-way, 2 episodes, tiny "
                                                         "videos, 1 decoder worker, the tiny ViT's random-pixel updates "
                                                         "(the same code paths)")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    if args.memory_models is None:
        args.memory_models = "RN50,ViT-B-16" if device.type == "cuda" else ""

    tmp = Path(tempfile.mkdtemp(prefix="bench_full_"))
    try:
        return _run(args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, device: torch.device, tmp: Path) -> dict:
    from mdmf_cache.data.synthetic import make_action_dataset

    root = tmp / "videos"
    make_action_dataset(root, num_classes=args.classes, videos_per_class=args.videos_per_class,
                        num_frames=args.video_frames, size=args.size)
    out = {"bench": "train_full", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({os.cpu_count()} cores)", "model": args.model, "way": args.way, "shot": args.shot,
           "queries": args.queries, "frames": args.frames, "episodes_per_forward": args.episodes_per_forward,
           "quick": args.quick}
    if args.quick:
        print("train_full --quick: not a measurement (tiny sizes)")
    out["compute_only_eps"] = compute_only(_config(args, root, tmp / "c", 0), device)
    print(f"compute only (pre-decoded pixels): {out['compute_only_eps']:.2f} episodes/s")
    out["full_eps"], out["ratio"] = {}, {}
    for w in (int(x) for x in args.workers.split(",")):
        res = run_train(_config(args, root, tmp / f"w{w}", w), progress=False, show=False)
        out["full_eps"][w] = res["episodes_per_s"]
        out["ratio"][w] = res["episodes_per_s"] / out["compute_only_eps"]
        wait = json.loads((tmp / f"w{w}" / "metrics.jsonl").read_text().splitlines()[-1])["loader_wait_s"]
        print(f"full mode, {w} decoder workers: {res['episodes_per_s']:.2f} episodes/s = "
              f"{out['ratio'][w]:.2f} of compute only (data wait {wait:.3f} s per update)")
    enough = [w for w, r in out["ratio"].items() if r >= 0.9]
    out["workers_needed"] = min(enough) if enough else None
    print(f"workers for >= 0.9 of compute only: {out['workers_needed'] if enough else 'not reached in ' + args.workers}")
    out["pixel_updates"], out["memory_gib"] = {}, {}
    for model in filter(None, args.memory_models.split(",")):
        for shot in (int(x) for x in args.memory_shots.split(",")):
            for ckpt in (v == "on" for v in args.memory_checkpointing.split(",")):
                r = random_pixel_updates(root, model, args.way, shot, args.memory_queries, ckpt, device,
                                         accumulate=args.memory_accumulate, frames=args.frames)
                key = f"{model} {shot}-shot{' ckpt' if ckpt else ''}"
                out["pixel_updates"][key] = r
                out["memory_gib"][key] = r["peak_gib"]
                rate = "out of memory" if r["oom"] else f"{r['eps_per_s']:.2f} episodes/s"
                mem = f", peak GPU memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
                print(f"random pixels, {model} {args.way}-way {shot}-shot, {args.memory_queries} queries, grad "
                      f"checkpointing {ckpt}: {rate}{mem}")
    if not args.memory_models:
        print("random-pixel updates and peak GPU memory: not measured (no GPU; --memory-models to run them on a CPU)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
