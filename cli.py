"""mdmf-cache: a thin typer CLI. Options are parsed here; the work happens in ``pipelines/``.

torch and open_clip are imported inside the commands so ``mdmf-cache --help`` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="mdmf-cache",
    help="CLIP-MDMF few-shot action recognition: a CLIP feature cache plus a fast head trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG = {"on": False}
# What an interrupt keeps and how to go on; each command sets its own before it starts work.
INTERRUPT_HINT = {"text": "nothing was finished; rerun the same command"}


def _on_interrupt(text: str) -> None:
    INTERRUPT_HINT["text"] = text


class Dataset(str, Enum):
    ucf101 = "ucf101"
    hmdb51 = "hmdb51"
    kinetics100 = "kinetics100"
    ssv2_small = "ssv2-small"
    ssv2_full = "ssv2-full"
    folder = "folder"


class Preset(str, Enum):
    paper = "paper"
    reference = "reference"



CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where cache groups live.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _default_splits() -> Path | None:
    for cand in (Path("../shared/splits"), Path(__file__).resolve().parent.parent / "shared" / "splits"):
        if cand.is_dir():
            return cand
    return None


def _setup_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    DEBUG["on"] = debug
    handler = RichHandler(show_path=False, show_time=False)
    if not debug:
        # open_clip logs "no pretrained weights" on the root logger itself. Filter only that
        # logger's chatter: raising the root level would also hide the project's own warnings.
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.ERROR)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(epilog="Examples:\n\n  mdmf-cache extract ucf101 --root ~/data/UCF-101 --splits ../shared/splits --model RN50 --pretrained openai\n\n"
             "  torchrun --nproc-per-node 4 -m cli extract ssv2-full --root ~/data/ssv2 --train-views 4   (from the repository root)")
def extract(
    dataset: Annotated[Dataset, typer.Argument(help="Built-in dataset, or 'folder' for root/class/video.ext.")],
    root: Annotated[Path, typer.Option(help="Video tree (files or JPEG frame folders).")] = Path("data"),
    splits: Annotated[Optional[Path], typer.Option(help="Split-file folder (holds ucf_ARN/, ...). Folder datasets: optional.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="SSv2 labels.json (default: labels.json, labels/labels.json or something-something-v2-labels.json in --root or its parent).")] = None,
    cache_dir: CacheDirOpt = Path("cache"),
    name: Annotated[Optional[str], typer.Option(help="Cache group name instead of the dataset's.")] = None,
    model: Annotated[str, typer.Option(help="open_clip model name: RN50, ViT-B-16, mdmf-tiny-vit, ...")] = "RN50",
    pretrained: Annotated[str, typer.Option(help="open_clip tag, checkpoint path, or 'none' (random init).")] = "openai",
    preset: Annotated[Preset, typer.Option(help="paper: tsn + CLIP normalisation; reference: linspace + [0,1] pixels.")] = Preset.paper,
    sampler: Annotated[Optional[str], typer.Option(help="tsn | linspace (overrides the preset).")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="clip | none (overrides the preset).")] = None,
    num_frames: Annotated[int, typer.Option(help="T frames per video.")] = 8,
    train_views: Annotated[int, typer.Option(help="V random augmented views per train video.")] = 1,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips of train views (on for every dataset, SSv2 included, as the paper and the released code; --no-flip for SSv2 research runs: left/right classes).")] = True,
    seed: int = 0,
    prompt: Annotated[str, typer.Option(help="Prompt template.")] = "a photo of {}",
    clean_names: Annotated[bool, typer.Option(help="Clean class names for prompts: split CamelCase, underscores to spaces, drop \\[brackets].")] = False,
    decoder: Annotated[str, typer.Option(help="auto | decord | pyav | jpeg. auto picks a correct backend per container.")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoder processes (default: half the cores, at most 8; each also runs decord's decode thread).")] = max(1, min(8, (os.cpu_count() or 2) // 2)),
    batch_videos: Annotated[int, typer.Option(help="Videos per encoder batch.")] = 8,
    chunk_rows: Annotated[int, typer.Option(help="Videos per Zarr chunk (the unit a writer owns).")] = 64,
    device: str = "auto",
    split: Annotated[Optional[list[str]], typer.Option(help="Only these splits (repeatable).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="This process's rank (default: torchrun/SLURM env).")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="Number of processes (default: torchrun/SLURM env).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a cache made with other settings.")] = False,
    strict: Annotated[bool, typer.Option(help="Missing or undecodable videos are an error.")] = False,
    verify_deep: Annotated[bool, typer.Option(help="Read every feature chunk for damage first (default: only those changed since the last clean verify).")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Decode videos that failed before again, even if their files did not change.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Decode T frames per video, encode them with CLIP, and store them with the prompt embeddings."""
    # Decoder processes share the cores with this one: its OpenMP threads must sleep, not spin, while
    # they wait (bench/extract.py --omp-wait compare). Read when torch loads, so set before; yours wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _setup_logging(debug)
    _on_interrupt("the videos finished so far are in the cache; rerun the same command to extract the rest")
    from mdmf_cache.configs import ExtractConfig
    from mdmf_cache.extraction import distributed_env
    from pipelines.extract import run

    env_rank, env_world, _ = distributed_env()
    cfg = ExtractConfig(
        dataset=dataset.value, root=str(root), labels=str(labels) if labels else None, splits_dir=str(splits) if splits else (str(_default_splits()) if dataset != Dataset.folder and _default_splits() else None),
        cache_dir=str(cache_dir), name=name, model=model,
        pretrained=None if pretrained.lower() in ("none", "") else pretrained,
        num_frames=num_frames, preset=preset.value, sampler=sampler, normalize=normalize, train_views=train_views, flip=flip,
        seed=seed, prompt_template=prompt, clean_names=clean_names, decoder=decoder, workers=workers,
        batch_videos=batch_videos, chunk_rows=chunk_rows, device=device,
        splits=tuple(split) if split else ("train", "val", "test"), overwrite=overwrite, strict=strict, verify_deep=verify_deep, retry_failed=retry_failed,
        rank=env_rank if rank is None else rank, world_size=env_world if world_size is None else world_size,
    )
    run(cfg)


@app.command(epilog="Example:\n\n  mdmf-cache info cache/ucf101__RN50__openai.zarr")
def info(cache: Annotated[Path, typer.Argument(help="A cache group (*.zarr).")], debug: DebugOpt = False) -> None:
    """Print splits, counts, completeness, failures and the fingerprint of a cache."""
    _setup_logging(debug)
    from mdmf_cache.report import print_info

    print_info(cache)


class ExportFormat(str, Enum):
    h5 = "h5"


@app.command(epilog="Example:\n\n  mdmf-cache export cache/ucf101__RN50__openai.zarr --format h5 ucf101_rn50.h5")
def export(
    cache: Annotated[Path, typer.Argument(help="A cache group (*.zarr).")],
    out: Annotated[Path, typer.Argument(help="Output file.")],
    format: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.h5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a cache's arrays and attributes to HDF5 (written whole, then renamed: never half a file)."""
    _setup_logging(debug)
    _on_interrupt(f"nothing was written to {out}; rerun the same command")
    from mdmf_cache.store import export_h5

    path = export_h5(cache, out, overwrite=overwrite)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command(epilog="Example:\n\n  mdmf-cache verify cache/ucf101__RN50__openai.zarr")
def verify(cache: Annotated[Path, typer.Argument(help="A cache group (*.zarr).")], debug: DebugOpt = False) -> None:
    """Read every chunk of a cache: name each damaged split, array, rows and file (exit 2 if any)."""
    _setup_logging(debug)
    _on_interrupt("nothing was changed; rerun the same command")
    from mdmf_cache.report import print_verify

    print_verify(cache)


class Mode(str, Enum):
    fast = "fast"
    full = "full"


class Method(str, Enum):
    mdmf = "mdmf"
    clip_fsar = "clip-fsar"


def _head_overrides(no_pps: bool, no_distill: bool, view: Optional[str], condition: Optional[str],
                    direction: Optional[str], extra: dict) -> dict:
    heads = {k: v for k, v in extra.items() if v is not None}
    if no_pps:
        heads["pps"] = False
    if no_distill:
        heads["distill"] = False
    if view:
        heads["views"] = view
    if condition:
        heads["condition"] = condition
    if direction:
        heads["direction"] = direction
    return heads


NoPpsOpt = Annotated[bool, typer.Option("--no-pps", help="Turn the Probability Prompt Selector off.")]
NoDistillOpt = Annotated[bool, typer.Option("--no-distill", help="Turn mutual distillation off.")]
ViewOpt = Annotated[Optional[str], typer.Option("--view", help="Single view: gtc | ltc | ntc.")]
ConditionOpt = Annotated[Optional[str], typer.Option("--condition", help="Reliability: both | text | visual | none.")]
DirectionOpt = Annotated[Optional[str], typer.Option("--direction", help="bidirectional | up-down | down-up.")]


@app.command(epilog="Examples:\n\n  mdmf-cache train cache/ucf101__RN50__openai.zarr --out runs/ucf_rn50 --shot 5\n\n"
             "  mdmf-cache train CACHE --out runs/ref --preset reference --lr 3e-4 --episodes 20000\n\n"
             "  mdmf-cache train CACHE --out runs/ucf_rn50 --resume\n\n"
             "  mdmf-cache train --config sweeps/ucf/best.json --out runs/ucf_best   # a sweep's best trial\n\n"
             "  mdmf-cache train --mode full ucf101 --root ~/data/UCF-101 --model RN50 --pretrained openai --out runs/ucf_full\n\n"
             "  torchrun --nproc-per-node 8 -m cli train --mode full ssv2-small --root ~/data/ssv2 --model ViT-B-16 "
             "--pretrained openai --out runs/ssv2_full   (from the repository root)")
def train(
    ctx: typer.Context,
    target: Annotated[Optional[str], typer.Argument(
        metavar="CACHE|DATASET",
        help="Fast mode: a complete cache group (*.zarr). Full mode: a dataset (ucf101, hmdb51, kinetics100, "
             "ssv2-small, ssv2-full, folder). Optional with --config.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Start from a run's config.json or a sweep's best.json; "
                                                        "options given on the command line override it.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: config.json, metrics.jsonl, best.pt, last.pt (full mode: backbone.pt).")] = Path("runs/fast"),
    mode: Annotated[Mode, typer.Option(help="fast: heads on cached features (CLIP frozen). full: CLIP fine-tuned with the heads, from the videos.")] = Mode.fast,
    method: Annotated[Method, typer.Option(help="mdmf | clip-fsar (the paper's main rival, same trainer).")] = Method.mdmf,
    preset: Annotated[Preset, typer.Option(help="paper | reference (SPEC section 9).")] = Preset.paper,
    way: int = 5,
    shot: int = 5,
    train_queries: Annotated[int, typer.Option(help="Queries per class in training episodes.")] = 5,
    episodes: Annotated[int, typer.Option(help="Training episodes in total.")] = 10000,
    episodes_per_step: Annotated[int, typer.Option(help="Episodes per optimiser step (full mode: accumulated, split between ranks; the paper's 16).")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default: fast 1e-4, full 1e-5 as the paper).")] = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Distillation weight (preset: 1).")] = None,
    alpha_ltc: Annotated[Optional[float], typer.Option(help="Weight of the local view's distance.")] = None,
    alpha_gtc: Annotated[Optional[float], typer.Option(help="Weight of the global view's distance.")] = None,
    pps_temperature: Annotated[Optional[float], typer.Option(help="PPS softmax temperature (0.005).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="One value for every head dropout.")] = None,
    no_pps: NoPpsOpt = False,
    no_distill: NoDistillOpt = False,
    view: ViewOpt = None,
    condition: ConditionOpt = None,
    direction: DirectionOpt = None,
    ltce: Annotated[Optional[str], typer.Option(help="Local extractor: bn (paper) | linear (reference).")] = None,
    pos_embed: Annotated[Optional[bool], typer.Option("--pos-embed/--no-pos-embed", help="MMFE position embeddings.")] = None,
    pps_score: Annotated[Optional[str], typer.Option(help="PPS score: mean (paper) | top4 (reference).")] = None,
    pps_test: Annotated[Optional[str], typer.Option(help="PPS at test: sample (both presets, seeded) | argmax.")] = None,
    text_pos: Annotated[Optional[int], typer.Option(help="Text-compare position: 0 (paper) | 1 (reference).")] = None,
    cos_eps: Annotated[Optional[float], typer.Option(help="Cosine eps on the norm product (reference 0.01).")] = None,
    otam_one_way: Annotated[bool, typer.Option("--otam-one-way", help="OTAM(D) only (released Kinetics 1-shot config).")] = False,
    val_every: Annotated[int, typer.Option(help="Validate every this many episodes.")] = 1000,
    val_episodes: Annotated[int, typer.Option(help="Fixed val episode list size.")] = 500,
    save_every: Annotated[int, typer.Option(help="Also save last.pt every this many episodes between validations (0: at validations only).")] = 0,
    seed: int = 0,
    device: str = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from last.pt.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Full mode: the video tree, as for extract.", rich_help_panel="Full mode")] = None,
    splits: Annotated[Optional[Path], typer.Option(help="Full mode: split-file folder (default ../shared/splits).", rich_help_panel="Full mode")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Full mode: SSv2 labels.json.", rich_help_panel="Full mode")] = None,
    model: Annotated[str, typer.Option(help="Full mode: open_clip model (RN50, ViT-B-16, mdmf-tiny-vit, ...).", rich_help_panel="Full mode")] = "RN50",
    pretrained: Annotated[str, typer.Option(help="Full mode: open_clip tag, checkpoint path, or 'none'.", rich_help_panel="Full mode")] = "openai",
    num_frames: Annotated[int, typer.Option(help="Full mode: T frames per video.", rich_help_panel="Full mode")] = 8,
    sampler: Annotated[Optional[str], typer.Option(help="Full mode: tsn | linspace (overrides the preset).", rich_help_panel="Full mode")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="Full mode: clip | none (overrides the preset).", rich_help_panel="Full mode")] = None,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Full mode: random horizontal flips (--no-flip for SSv2 research runs).", rich_help_panel="Full mode")] = True,
    prompt: Annotated[str, typer.Option(help="Full mode: prompt template.", rich_help_panel="Full mode")] = "a photo of {}",
    clean_names: Annotated[bool, typer.Option(help="Full mode: clean class names for prompts.", rich_help_panel="Full mode")] = False,
    decoder: Annotated[str, typer.Option(help="Full mode: auto | decord | pyav | jpeg.", rich_help_panel="Full mode")] = "auto",
    workers: Annotated[int, typer.Option(help="Full mode: decoder processes per rank.", rich_help_panel="Full mode")] = max(1, min(8, (os.cpu_count() or 2) // 2)),
    backbone_lr: Annotated[Optional[float], typer.Option(help="Full mode: the backbone's learning rate (default --lr).", rich_help_panel="Full mode")] = None,
    train_text: Annotated[bool, typer.Option(help="Full mode: train the text tower too (the released code never does).", rich_help_panel="Full mode")] = False,
    train_last_blocks: Annotated[Optional[int], typer.Option(help="Full mode: fine-tune only the last N blocks of the visual encoder (default: all).", rich_help_panel="Full mode")] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="Full mode: keep the visual encoder frozen (= --train-last-blocks 0; fresh augmentation every episode).", rich_help_panel="Full mode")] = False,
    backbone_bn: Annotated[str, typer.Option(help="Full mode, RN backbones: episode (batch statistics per episode) | frozen (running statistics).", rich_help_panel="Full mode")] = "episode",
    grad_checkpointing: Annotated[bool, typer.Option(help="Full mode: recompute activations in backward (less GPU memory).", rich_help_panel="Full mode")] = False,
    episodes_per_forward: Annotated[int, typer.Option(help="Full mode: episodes per forward pass (the paper: 1).", rich_help_panel="Full mode")] = 1,
    init_heads: Annotated[Optional[Path], typer.Option(help="Full mode: start from this run's heads (best.pt), e.g. a fast-mode run on the same backbone's cache.", rich_help_panel="Full mode")] = None,
    debug: DebugOpt = False,
) -> None:
    """Train the CLIP-MDMF heads from a cache (fast mode) or fine-tune CLIP with them from the videos (full
    mode), keeping the best checkpoint by val accuracy."""
    _setup_logging(debug)
    _on_interrupt(f"{out}/last.pt holds the run up to its last validation; rerun the same command with --resume "
                  "to continue it")
    import dataclasses

    from mdmf_cache.configs import FullModeConfig, TrainConfig
    from pipelines.train import run

    extra = {"lam": lambda_, "alpha_ltc": alpha_ltc, "alpha_gtc": alpha_gtc, "pps_temperature": pps_temperature,
             "ltce": ltce, "pos_embed": pos_embed, "pps_score": pps_score, "pps_test": pps_test, "text_pos": text_pos,
             "cos_eps": cos_eps, "otam_bidirectional": False if otam_one_way else None}
    if dropout is not None:
        extra.update(mmfe_dropout=dropout, ffn_dropout=dropout, tcn_dropout=dropout)
    full_opts = ("root", "splits", "labels", "model", "pretrained", "num_frames", "sampler", "normalize", "flip",
                 "prompt", "clean_names", "decoder", "workers", "backbone_lr", "train_text", "train_last_blocks",
                 "freeze_backbone", "backbone_bn", "grad_checkpointing", "episodes_per_forward", "init_heads")
    full = {}
    if mode == Mode.full:
        full = dataclasses.asdict(FullModeConfig(
            dataset=target or "", root=str(root) if root else None,
            splits_dir=str(splits) if splits else (str(_default_splits()) if target != "folder" and _default_splits() else None),
            labels=str(labels) if labels else None, model=model,
            pretrained=None if pretrained.lower() in ("none", "") else pretrained, num_frames=num_frames,
            sampler=sampler, normalize=normalize, flip=flip, prompt_template=prompt, clean_names=clean_names,
            decoder=decoder, workers=workers, backbone_lr=backbone_lr, train_text=train_text,
            train_last_blocks=0 if freeze_backbone else train_last_blocks, backbone_bn=backbone_bn,
            grad_checkpointing=grad_checkpointing, episodes_per_forward=episodes_per_forward,
            init_heads=str(init_heads) if init_heads else None))
    else:
        given = [f"--{n.replace('_', '-')}" for n in full_opts
                 if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]
        if given:
            raise typer.BadParameter(f"{', '.join(given)}: video and backbone options are for --mode full; fast mode "
                                     "reads a cache", param_hint="--mode")
    cfg = TrainConfig(
        cache=str(target or "") if mode == Mode.fast else "", out=str(out), mode=mode.value, method=method.value,
        preset=preset.value, heads=_head_overrides(no_pps, no_distill, view, condition, direction, extra),
        way=way, shot=shot, train_queries=train_queries, episodes=episodes, episodes_per_step=episodes_per_step,
        lr=lr, val_every=val_every,
        val_episodes=val_episodes, save_every=save_every, seed=seed, device=device, resume=resume, full=full,
    )
    if config is not None:
        cfg = _merge_config(ctx, config, cfg)
    elif target is None:
        raise typer.BadParameter("name a CACHE (fast mode), a DATASET (--mode full), or --config FILE",
                                 param_hint="CACHE|DATASET")
    run(cfg)


def _merge_config(ctx: typer.Context, path: Path, cli_cfg):
    """The config in ``path``, with the options given on the command line (not their defaults) on top."""
    import dataclasses

    from mdmf_cache.runs import load_config

    cfg = load_config(path)
    given = {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
    given |= {"cache"} if "target" in given else set()
    for f in dataclasses.fields(cfg):
        if f.name == "heads":
            cfg.heads = {**cfg.heads, **cli_cfg.heads}  # head options default to None: all of these were given
        elif f.name == "full" and cli_cfg.full:  # full mode's options given on the command line, by field
            renamed = {"target": "dataset", "splits": "splits_dir", "prompt": "prompt_template",
                       "freeze_backbone": "train_last_blocks"}
            fields = {renamed.get(n, n) for n in given} & set(cli_cfg.full)
            cfg.full = {**cfg.full, **{k: cli_cfg.full[k] for k in fields}}
        elif f.name in given:
            setattr(cfg, f.name, getattr(cli_cfg, f.name))
    return cfg


def _shots(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise typer.BadParameter(f"--shot takes comma-separated integers like 1,3,5, got {value!r}") from e


def _floats(value: Optional[str], option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in (value or "").split(",") if v.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{option} takes comma-separated numbers like 0.5,1,2, got {value!r}") from e


@app.command("eval", epilog="Examples:\n\n  mdmf-cache eval runs/ucf_rn50 --episodes 10000\n\n"
             "  mdmf-cache eval runs/ucf_rn50 --shot 1,3,5\n\n"
             "  mdmf-cache eval runs/ucf_fsar --method clip-fsar   # same --seed: the same episodes as the mdmf run\n\n"
             "  mdmf-cache eval cache/ucf101__RN50__openai.zarr --method protonet\n\n"
             "  mdmf-cache eval runs/ucf_full --shot 1,3,5   # a full-mode run: its test split extracted with backbone.pt once")
def eval_(
    target: Annotated[Path, typer.Argument(help="A run directory (its trained head) or a cache (*.zarr, baselines).")],
    method: Annotated[str, typer.Option(help="run (the head the run was trained with) | mdmf | clip-fsar | zero-shot | protonet | otam.")] = "run",
    split: str = "test",
    episodes: int = 10000,
    shot: Annotated[Optional[str], typer.Option(help="Shots, comma-separated (default: the run's training shot; baselines 1,3,5).")] = None,
    way: int = 5,
    queries_per_class: int = 1,
    seed: int = 0,
    out: Annotated[Optional[Path], typer.Option(help="Results directory.")] = None,
    path: Annotated[str, typer.Option(help="Trained heads: per-video (fast) | direct (the reference path, same logits).")] = "per-video",
    pps_test: Annotated[Optional[str], typer.Option(help="MDMF: PPS rule at test for this evaluation: sample | argmax (default: the run's).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="The run's cache, if it moved (checked against the run's record).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="A full-mode run's video tree, if it moved.")] = None,
    device: str = "auto",
    debug: DebugOpt = False,
) -> None:
    """Accuracy +- 1.96 std/sqrt(n) on a seeded, saved episode list, per shot, with per-class accuracy."""
    _setup_logging(debug)
    _on_interrupt("no results were written; rerun the same command (the episode list is the same)")
    from mdmf_cache.configs import EvalConfig
    from pipelines.evaluate import run

    run(EvalConfig(target=str(target), method=method, split=split, way=way, shots=_shots(shot) if shot else None,
                              episodes=episodes, queries_per_class=queries_per_class, seed=seed,
                              out=str(out) if out else None, device=device, path=path,
                              pps_test=pps_test, cache=str(cache) if cache else None,
                              root=str(root) if root else None))


@app.command(epilog="Examples:\n\n  mdmf-cache ablate CACHE --no-pps\n\n  mdmf-cache ablate CACHE --view gtc --episodes 5000\n\n"
             "  mdmf-cache ablate CACHE --method clip-fsar   # MDMF vs CLIP-FSAR on identical episodes\n\n"
             "  mdmf-cache ablate CACHE --table 5 --out runs/table5\n\n  mdmf-cache ablate CACHE --lambda 0,0.25,0.5,1,1.5,2 --out runs/lambda")
def ablate(
    cache: Annotated[Path, typer.Argument(help="A complete cache group (*.zarr).")],
    method: Annotated[Optional[Method], typer.Option(help="Compare the full MDMF with this method (clip-fsar).")] = None,
    no_pps: NoPpsOpt = False,
    no_distill: NoDistillOpt = False,
    view: ViewOpt = None,
    condition: ConditionOpt = None,
    direction: DirectionOpt = None,
    table: Annotated[Optional[int], typer.Option(help="Run the paper's ablation grid 3, 4 or 5.")] = None,
    lambdas: Annotated[Optional[str], typer.Option("--lambda", help="A grid over the distillation weight, e.g. "
                                                   "0.25,0.5,1,2 (accuracy vs lambda, the paper's Fig. 4).")] = None,
    out: Annotated[Path, typer.Option(help="Study directory (one run per arm).")] = Path("runs/ablate"),
    preset: Annotated[Preset, typer.Option()] = Preset.paper,
    episodes: Annotated[int, typer.Option(help="Training episodes per arm.")] = 10000,
    episodes_per_step: int = 16,
    lr: float = 1e-4,
    val_every: int = 1000,
    test_episodes: Annotated[int, typer.Option(help="Test episodes (the same list for every arm).")] = 10000,
    way: int = 5,
    shot: int = 5,
    seed: int = 0,
    device: str = "auto",
    debug: DebugOpt = False,
) -> None:
    """Train the full model and a variant (or a paper table's grid); score all on identical episodes."""
    _setup_logging(debug)
    _on_interrupt(f"finished arms are kept in {out}; rerun the same command: they are reused and the "
                  "interrupted arm resumes")
    from pipelines.ablate import AblateConfig, run_ablate
    from mdmf_cache.report import print_comparison

    cfg = AblateConfig(
        cache=str(cache), out=str(out), preset=preset.value, table=table, lambdas=_floats(lambdas, "--lambda"),
        variant=_head_overrides(no_pps, no_distill, view, condition, direction,
                                {"method": method.value if method and method != Method.mdmf else None}),
        train={"episodes": episodes, "episodes_per_step": episodes_per_step, "lr": lr, "val_every": val_every},
        way=way, shot=shot, test_episodes=test_episodes, seed=seed, device=device,
    )
    res = run_ablate(cfg)
    print_comparison(res["rows"], f"ablation, {way}-way {shot}-shot, {test_episodes} identical test episodes")
    typer.echo(f"tables: {res['out']}/ablation.csv, ablation.md")


SWEEP_EPILOG = """Examples:

  mdmf-cache sweep cache/ucf101__RN50__openai.zarr --out sweeps/ucf --trials 100 --shot 5

  mdmf-cache sweep CACHE --out sweeps/ucf --space lr=1e-5:1e-2:log,lambda=0.1:2,dropout=0:0.5,pps-temperature=0.001:0.1:log

  mdmf-cache sweep CACHE --out sweeps/ucf --jobs 4                      # 4 concurrent trials on this machine

  mdmf-cache sweep CACHE --study ucf --storage postgresql://user@db/sweeps   # the same line on every machine

  mdmf-cache sweep CACHE --out sweeps/ucf --resume                      # continue after a crash

  mdmf-cache sweep show sweeps/ucf                                       # trials table, best.json, figures

Fixed options: any fast-mode option of 'train', written as there (--episodes 2000, --shot 1, --preset reference,
--no-pps, --view gtc, --method clip-fsar, ...); a fixed option leaves the default space.

Default space (without --space): lr=1e-5:1e-2:log, lambda=0.1:2, alpha-ltc=0.25:2, alpha-gtc=0.25:2,
dropout=0:0.5, pps-temperature=0.001:0.1:log, episodes-per-step=4|8|16|32, episodes=1000:10000:log.
--space syntax: NAME=LOW:HIGH (uniform), NAME=LOW:HIGH:log, NAME=A|B|C (listed values), comma-separated.
"""


@app.command(epilog=SWEEP_EPILOG, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="A complete cache group (*.zarr); or 'show' followed by a sweep directory.")],
    out: Annotated[Optional[Path], typer.Option(help="Sweep directory (study.db, trials/, tables, figures); "
                                                     "default sweeps/STUDY.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the name of --out).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///OUT/study.db), e.g. "
                                                        "postgresql://user@db/sweeps for several machines.")] = None,
    trials: Annotated[int, typer.Option(help="Finished trials of the study, all workers together.")] = 100,
    jobs: Annotated[int, typer.Option(help="Concurrent trials (worker processes) on this machine.")] = 1,
    space: Annotated[Optional[str], typer.Option(help="Swept parameters, e.g. lr=1e-5:1e-2:log,lambda=0.1:2 "
                                                      "(default: see below).")] = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Stop bad trials early at a validation.")] = True,
    pruner: Annotated[str, typer.Option(help="median | halving (successive halving).")] = "median",
    prune_startup: Annotated[int, typer.Option(help="Finished trials before the median pruner acts.")] = 5,
    prune_below: Annotated[Optional[float], typer.Option(help="Also stop a trial whose val accuracy (%) falls "
                                                              "below this at a validation, e.g. chance level.")] = None,
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="Seed of the TPE sampler.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the study in --out to --trials finished trials.")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between a trial's heartbeats; a trial silent for twice "
                                                "this is failed and requeued.")] = 30,
    debug: DebugOpt = False,
) -> None:
    """Tune fast-mode training on a cache with Optuna: each trial trains the heads and is scored on val (never test)."""
    _setup_logging(debug)
    from pipelines.sweep import SweepConfig, load_sweep, parse_fixed, parse_space_text, run_sweep, summarize

    if cache == "show":
        if len(ctx.args) != 1 or ctx.args[0].startswith("-"):
            raise typer.BadParameter("write: mdmf-cache sweep show SWEEP_DIR [--storage URL]", param_hint="show")
        res = summarize(load_sweep(ctx.args[0], storage))
    else:
        cfg = SweepConfig(cache=cache, study=study, storage=storage, trials=trials, jobs=jobs,
                          space=parse_space_text(space) if space else {}, fixed=parse_fixed(ctx.args), prune=prune,
                          pruner=pruner, prune_startup=prune_startup, prune_below=prune_below, seed=sampler_seed, resume=resume,
                          heartbeat=heartbeat)
        cfg.out = str(out) if out else f"sweeps/{study or Path(cache).name.split('__')[0].removesuffix('.zarr')}"
        res = run_sweep(cfg)
    from mdmf_cache.report import print_sweep

    print_sweep(res)


@app.command(epilog="Examples:\n\n  mdmf-cache plot runs/ucf_rn50\n\n  mdmf-cache plot sweeps/ucf\n\n"
             "  mdmf-cache plot runs/ucf_rn50/eval_mdmf_test\n\n  mdmf-cache plot runs/ablate")
def plot(
    target: Annotated[Path, typer.Argument(help="A run, eval, ablation or sweep directory.")],
    storage: Annotated[Optional[str], typer.Option(help="A sweep's storage URL, when sweep.json hides its password.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Redraw the figures of a run (curves), an evaluation, an ablation or a sweep."""
    _setup_logging(debug)
    from mdmf_cache.plots import redraw

    paths = []
    if (target / "sweep.json").is_file():  # a sweep's figures come from its study
        from pipelines.sweep import load_sweep, summarize

        paths += summarize(load_sweep(target, storage))["figures"]
    paths += redraw(target, allow_empty=bool(paths) or (target / "sweep.json").is_file())
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the synthetic videos, cache and runs go.")] = Path("demo_out"),
    model: Annotated[str, typer.Option(help="Tiny backbone.")] = "mdmf-tiny-vit",
    workers: int = 2,
    full: Annotated[bool, typer.Option("--full", help="Add a short full-mode stage (the tiny CLIP fine-tuned with the heads from the videos).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Synthetic action videos -> cache -> fast-mode heads -> evaluation against baselines, on a CPU in ~1 min
    (--full: a full-mode stage too)."""
    _setup_logging(debug)
    _on_interrupt(f"finished stages are kept in {out}; rerun the same command to go on")
    from pipelines.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=str(out), model=model, workers=workers, full=full))


def _click_exceptions() -> tuple[type, ...]:
    """ClickException classes: typer >= 0.24 vendors click (``typer._click``), older typer uses click."""
    classes = {c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"}
    try:
        import click

        classes.add(click.ClickException)
    except ImportError:
        pass
    return tuple(classes)


def main() -> None:
    """Console entry: one clear line for known errors, the traceback only with --debug."""
    from mdmf_cache.errors import MdmfError

    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a returned 130
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except MdmfError as e:
        if DEBUG["on"]:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {INTERRUPT_HINT['text']}", fg="yellow", err=True)
        sys.exit(130)
    except Exception as e:
        if isinstance(e, _click_exceptions()):  # usage errors: click's own message, exit code 2
            e.show()
            sys.exit(e.exit_code)
        if DEBUG["on"]:
            raise
        typer.secho(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
