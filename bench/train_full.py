"""Benchmark of full-mode training (CLIP fine-tuned from the videos): the data pipeline's cost, and GPU memory.

Measures, in one run:

* **compute only**: episodes/s of the full-mode model (backbone + heads, forward, backward, Adam) on
  pixels decoded and preprocessed beforehand, with the trainer's micro-batching;
* **full mode**: episodes/s of ``run_train(mode="full")`` itself (decoding in DataLoader workers,
  preprocessing, the same model), for each ``--workers`` count; and the ratio full / compute-only.
  Goal: >= 0.9 with enough workers (then decoding is hidden behind the model); the smallest worker
  count that reaches it is reported;
* **peak GPU memory** (CUDA only) of one update for each ``--memory-models`` x 5-way {1, 5}-shot x
  gradient checkpointing off/on (5 queries per class, as in training), on random pixels.

The videos are synthetic (moving shapes, MP4/AVI as UCF101), 320x240 and ``--video-frames`` long.
Accuracy is meaningless here, only time and memory are measured.

    python bench/train_full.py                                      # tiny ViT on this machine
    python bench/train_full.py --model RN50 --episodes 8 --workers 0,2
    python bench/train_full.py --model ViT-B-16 --workers 2,4,8 --memory-models RN50,ViT-B-16   # on a GPU

Prints a table and one JSON line (``{"bench": "train_full", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mdmf_cache.backbone import heads_autocast  # noqa: E402
from mdmf_cache.distributed import World  # noqa: E402
from mdmf_cache.losses import total_loss  # noqa: E402
from mdmf_cache.video_episodes import episode_pixels  # noqa: E402
from mdmf_cache.backbone import resolve_device
from mdmf_cache.configs import TrainConfig
from mdmf_cache.runs import build_model
from mdmf_cache.train_data import FullData
from mdmf_cache.training import _optimizer, run_train  # noqa: E402


def config(args, root: Path, out: Path, workers: int, model: str | None = None, shot: int | None = None,
           checkpointing: bool = False) -> TrainConfig:
    return TrainConfig(
        mode="full", out=str(out), way=args.way, shot=shot or args.shot, train_queries=args.queries,
        episodes=args.episodes, episodes_per_step=args.episodes_per_step, val_every=args.episodes, val_episodes=5,
        lr=1e-5, device=args.device, seed=0,
        full={"dataset": "folder", "root": str(root), "model": model or args.model, "pretrained": None,
              "workers": workers, "flip": True, "episodes_per_forward": args.episodes_per_forward,
              "grad_checkpointing": checkpointing})


def compute_only(cfg: TrainConfig, device: torch.device) -> float:
    """Episodes/s of forward + backward + Adam on pre-decoded, pre-processed pixels (the same episodes)."""
    data = FullData(cfg, device, World())
    torch.manual_seed(0)
    head = build_model(cfg.preset, data.dim, data.num_frames, {}, cfg.method)
    model = data.wrap(head).to(device)
    opt = _optimizer(cfg, model)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(args, root: Path, model: str, shot: int, checkpointing: bool, device: torch.device) -> float:
    """Peak GPU memory (GiB) of one full-mode update of ``episodes_per_forward`` episodes on random pixels."""
    cfg = config(args, root, Path(tempfile.mkdtemp()), 0, model=model, shot=shot, checkpointing=checkpointing)
    cfg.train_queries = 5
    data = FullData(cfg, device, World())
    head = build_model(cfg.preset, data.dim, data.num_frames, {}, cfg.method)
    net = data.wrap(head).to(device)
    opt = _optimizer(cfg, net)
    e, n, t = cfg.full_mode.episodes_per_forward, cfg.way, cfg.full_mode.num_frames
    torch.cuda.reset_peak_memory_stats(device)
    s = torch.randn(e, n * shot, t, 3, 224, 224, device=device)
    q = torch.randn(e, n * 5, t, 3, 224, 224, device=device)
    text = torch.randn(e, n, data.dim, device=device)
    labels = torch.arange(n, device=device).repeat_interleave(5).expand(e, -1)
    try:
        with heads_autocast(device):
            loss, _ = total_loss(net(s, q, text), labels, head.cfg)
        loss.backward()
        opt.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        return float("inf")
    finally:
        del net, opt, s, q
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mdmf-tiny-vit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--queries", type=int, default=1, help="train queries per class")
    ap.add_argument("--episodes", type=int, default=16, help="episodes timed per measurement")
    ap.add_argument("--episodes-per-step", type=int, default=8)
    ap.add_argument("--episodes-per-forward", type=int, default=1)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated decoder worker counts")
    ap.add_argument("--video-frames", type=int, default=48)
    ap.add_argument("--memory-models", default="RN50,ViT-B-16", help="CUDA only")
    args = ap.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    from mdmf_cache.synthetic import make_action_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_full_"))
    root = tmp / "videos"
    make_action_dataset(root, num_classes=25, videos_per_class=4, num_frames=args.video_frames, size=(320, 240))
    out = {"bench": "train_full", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({os.cpu_count()} cores)", "model": args.model, "way": args.way, "shot": args.shot,
           "queries": args.queries, "episodes_per_forward": args.episodes_per_forward}
    out["compute_only_eps"] = compute_only(config(args, root, tmp / "c", 0), device)
    print(f"compute only (pre-decoded pixels): {out['compute_only_eps']:.2f} episodes/s")
    out["full_eps"], out["ratio"] = {}, {}
    for w in (int(x) for x in args.workers.split(",")):
        res = run_train(config(args, root, tmp / f"w{w}", w), progress=False)
        out["full_eps"][w] = res["episodes_per_s"]
        out["ratio"][w] = res["episodes_per_s"] / out["compute_only_eps"]
        wait = json.loads((tmp / f"w{w}" / "metrics.jsonl").read_text().splitlines()[-1])["loader_wait_s"]
        print(f"full mode, {w} decoder workers: {res['episodes_per_s']:.2f} episodes/s = "
              f"{out['ratio'][w]:.2f} of compute only (data wait {wait:.3f} s per update)")
    enough = [w for w, r in out["ratio"].items() if r >= 0.9]
    out["workers_needed"] = min(enough) if enough else None
    print(f"workers for >= 0.9 of compute only: {out['workers_needed'] if enough else 'not reached in ' + args.workers}")
    out["memory_gib"] = {}
    if device.type == "cuda":
        for model in args.memory_models.split(","):
            for shot in (1, 5):
                for ckpt in (False, True):
                    gib = peak_memory(args, root, model, shot, ckpt, device)
                    out["memory_gib"][f"{model} {shot}-shot{' ckpt' if ckpt else ''}"] = gib
                    print(f"peak GPU memory {model} 5-way {shot}-shot, 5 queries, grad checkpointing {ckpt}: {gib:.1f} GiB")
    else:
        print("peak GPU memory: not measured (no GPU)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
