"""Demo: synthetic action videos -> cache -> fast-mode heads -> evaluation against baselines, on a CPU.

Classes are coloured shapes moving in a direction (``a red circle moving left``), written with
PyAV as MP4 (H.264) and AVI (MPEG-4 with B-frames, like UCF101). The classes are split
class-disjointly (train/val/test) and extracted with a tiny open_clip backbone.

With ``full=True`` (``mdmf-cache demo --full``) a short full-mode stage follows: the same tiny
backbone fine-tuned with the heads straight from the videos, evaluated on the same test episodes
(its test split re-extracted with the fine-tuned backbone).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    model: str = "mdmf-tiny-vit"
    num_classes: int = 24
    videos_per_class: int = 10
    num_frames: int = 32
    train_views: int = 2
    workers: int = 2
    seed: int = 0
    train_episodes: int = 800
    lr: float = 1e-3
    eval_episodes: int = 1000
    shots: tuple[int, ...] = (1, 5)
    full: bool = False  # add a full-mode stage (CLIP fine-tuned from the videos)
    full_episodes: int = 96
    full_shot: int = 1  # full mode decodes every episode: 5-way 1-shot, 1 query per class keeps it short on a CPU


def run(cfg: DemoConfig, progress: bool = True, show: bool = True) -> dict:
    from mdmf_cache.data.synthetic import make_action_dataset
    from pipelines import extract as extract_recipe
    from mdmf_cache.configs import ExtractConfig
    from mdmf_cache.configs import EvalConfig
    from pipelines import evaluate as evaluate_recipe
    from mdmf_cache.report.tables import console, print_comparison, print_info
    from mdmf_cache.configs import TrainConfig
    from pipelines import train as train_recipe

    from mdmf_cache.clip.backbone import list_models
    from mdmf_cache.errors import ConfigError
    from mdmf_cache.fileio import atomic_write_json

    if cfg.model not in list_models():  # before 240 videos are written
        raise ConfigError(f"--model {cfg.model!r} is not an open_clip model; the demo runs on a tiny one "
                          "(mdmf-tiny-vit or mdmf-tiny-rn)")
    if cfg.workers < 0:
        raise ConfigError(f"--workers {cfg.workers}: must be >= 0 (0 decodes in this process)")
    out = Path(cfg.out)
    videos = out / "videos"
    stages = 5 if cfg.full else 4
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo_config.json", asdict(cfg))
    if not (videos / ".complete").is_file():
        console.print(f"[bold]1/{stages}[/] writing {cfg.num_classes * cfg.videos_per_class} synthetic videos to {videos}")
        make_action_dataset(videos, num_classes=cfg.num_classes, videos_per_class=cfg.videos_per_class,
                            num_frames=cfg.num_frames, seed=cfg.seed)
        (videos / ".complete").write_text("ok\n")
    console.print(f"[bold]2/{stages}[/] extracting with {cfg.model}")
    ecfg = ExtractConfig(dataset="folder", root=str(videos), cache_dir=str(out / "cache"), name="demo",
                         model=cfg.model, pretrained=None, train_views=cfg.train_views, workers=cfg.workers,
                         seed=cfg.seed, clean_names=True, chunk_rows=16,
                         flip=False)  # left/right are different classes here, as in SSv2
    path, results = extract_recipe.run(ecfg, show=show)
    summary = print_info(path)

    console.print(f"[bold]3/{stages}[/] training the heads for {cfg.train_episodes} episodes (fast mode, CLIP frozen)")
    run = out / "runs" / "demo"
    tcfg = TrainConfig(cache=str(path), out=str(run), episodes=cfg.train_episodes, lr=cfg.lr, val_every=200,
                       val_episodes=300, seed=cfg.seed, resume=(run / "last.pt").is_file())
    trained = train_recipe.run(tcfg, show=False)

    full_run = out / "runs" / "demo_full"
    if cfg.full:
        console.print(f"[bold]4/{stages}[/] full mode: fine-tuning {cfg.model} with the heads from the videos for "
                      f"{cfg.full_episodes} episodes (5-way {cfg.full_shot}-shot, fresh augmentation each)")
        fcfg = TrainConfig(mode="full", out=str(full_run), shot=cfg.full_shot, train_queries=1, episodes=cfg.full_episodes,
                           episodes_per_step=8, lr=cfg.lr, val_every=cfg.full_episodes // 2, val_episodes=300,
                           seed=cfg.seed, resume=(full_run / "last.pt").is_file(),
                           full={"dataset": "folder", "root": str(videos), "model": cfg.model, "pretrained": None,
                                 "clean_names": True, "flip": False, "workers": cfg.workers,
                                 "episodes_per_forward": 8})
        trained_full = train_recipe.run(fcfg, show=False)
    console.print(f"[bold]{stages}/{stages}[/] evaluating on {cfg.eval_episodes} identical test episodes per shot")
    rows = []
    # protonet, zero-shot: the baselines; otam: the released OTAM head, which has no parameters, scored on the cache
    for method in ("mdmf", *(("mdmf-full",) if cfg.full else ()), "protonet", "otam", "zero-shot"):
        target = {"mdmf": run, "mdmf-full": full_run}.get(method, path)
        res = evaluate_recipe.run(EvalConfig(target=str(target), method="run" if method == "mdmf-full" else method,
                                  shots=cfg.shots, episodes=cfg.eval_episodes, seed=cfg.seed,
                                  out=str(out / "eval" / method)), progress=False, show=False)
        row = {"method": {"mdmf": "mdmf (fast)", "mdmf-full": "mdmf (full)"}.get(method, method)}
        for shot, r in res["shots"].items():
            row[f"{shot}-shot %"] = r["accuracy"]
            row[f"{shot}-shot ±"] = r["ci95"]
        rows.append(row)
    print_comparison(rows, f"5-way test accuracy, synthetic demo ({cfg.model}, random init; chance 20%)")
    results = {"train": trained, "eval": rows, **({"train_full": trained_full} if cfg.full else {})}
    atomic_write_json(out / "demo_results.json", results)
    return {"cache": str(path), "info": summary, **results}
