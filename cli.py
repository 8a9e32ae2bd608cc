"""mdmf-cache: a thin typer CLI. Options are parsed here; the work happens in ``pipelines/``.

Every default comes from the configs (:mod:`mdmf_cache.configs`, the recipes' config dataclasses) and
every fixed set of choices from where it is declared (:mod:`mdmf_cache.choices`, the head registry
:mod:`mdmf_cache.heads`, MDMF's switches in :mod:`mdmf_cache.heads.mdmf_config`, the datasets). None of
these imports torch, and torch and open_clip are imported inside the commands, so ``mdmf-cache
--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mdmf_cache import heads
from mdmf_cache.choices import (BASELINES, BN_MODES, DECODERS, EVAL_PATHS, MODES, NORMALIZATIONS, PPS_TEST_RULES,
                                SAMPLERS)
from mdmf_cache.configs import (EVAL_QUERIES, EvalConfig, ExtractConfig, FullModeConfig, PredictConfig, TrainConfig, VideoOptions,
                                default_workers)
from mdmf_cache.data.datasets import DATASET_NAMES
from mdmf_cache.heads.mdmf_config import PRESET_DATA, _CHOICES as MDMF_CHOICES
from pipelines.ablate import AblateConfig
from pipelines.compare import CompareConfig
from mdmf_cache.sweeps.study import SweepConfig
from pipelines.demo import DemoConfig
from pipelines.runs import RunsConfig

app = typer.Typer(
    name="mdmf-cache",
    help="CLIP-MDMF few-shot action recognition: a CLIP feature cache plus a fast head trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG = {"on": False}
# What an interrupt keeps and how to go on; each command sets its own before it starts work (a text, or a
# function that says it when the interrupt comes).
INTERRUPT_HINT: dict[str, Any] = {"text": "nothing was finished; rerun the same command"}


def _on_interrupt(text: str | Any) -> None:
    INTERRUPT_HINT["text"] = text


def _interrupt_text() -> str:
    text = INTERRUPT_HINT["text"]
    if callable(text):
        try:
            return text()
        except Exception:  # noqa: BLE001 - the hint must not hide the interrupt
            return "rerun the same command"
    return text


def _choices(values) -> str:
    return " | ".join(str(v) for v in values)


def _enum(name: str, values) -> type[Enum]:
    """A str Enum of declared values (typer shows and checks them)."""
    return Enum(name, {str(v).replace("-", "_"): str(v) for v in values}, type=str)


Dataset = _enum("Dataset", DATASET_NAMES)
Mode = _enum("Mode", MODES)
DataPreset = _enum("DataPreset", PRESET_DATA)

_T, _X, _E = TrainConfig, ExtractConfig, EvalConfig  # defaults below are these classes' field defaults
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where cache groups live.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (a GPU when there is one) | cpu | cuda | cuda:N.")]

# ---- the video and backbone options shared by extract and train --mode full, declared once ----------------------
VIDEO = "Videos and backbone (extract; train --mode full)"
RootOpt = Annotated[Optional[Path], typer.Option(help="The video tree (files or JPEG frame folders).", rich_help_panel=VIDEO)]
SplitsOpt = Annotated[Optional[Path], typer.Option(help="Split-file folder (default: the split files shipped with mdmf-cache; "
                                                        "folder datasets: your own lists, optional).", rich_help_panel=VIDEO)]
LabelsOpt = Annotated[Optional[Path], typer.Option(help="SSv2-Full labels.json (default: labels.json, labels/labels.json or "
                                                        "something-something-v2-labels.json in --root or its parent).",
                                                   rich_help_panel=VIDEO)]
ModelOpt = Annotated[str, typer.Option(help="open_clip model name: RN50, ViT-B-16, mdmf-tiny-vit, ...", rich_help_panel=VIDEO)]
PretrainedOpt = Annotated[str, typer.Option(help="open_clip tag, checkpoint path, or 'none' (random init).", rich_help_panel=VIDEO)]
NumFramesOpt = Annotated[int, typer.Option(help="T frames per video.", rich_help_panel=VIDEO)]
SamplerOpt = Annotated[Optional[str], typer.Option(help=f"{_choices(SAMPLERS)} (default: the preset's).", rich_help_panel=VIDEO)]
NormalizeOpt = Annotated[Optional[str], typer.Option(help=f"{_choices(NORMALIZATIONS)} (default: the preset's).", rich_help_panel=VIDEO)]
FlipOpt = Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips of training videos (on for every "
                                       "dataset, SSv2 included, as the paper and the released code; --no-flip for SSv2 "
                                       "research runs: left/right classes).", rich_help_panel=VIDEO)]
PromptOpt = Annotated[str, typer.Option(help="Prompt template.", rich_help_panel=VIDEO)]
CleanNamesOpt = Annotated[bool, typer.Option(help="Clean class names for prompts: split CamelCase, underscores to spaces, "
                                                  "drop \\[brackets].", rich_help_panel=VIDEO)]
DecoderOpt = Annotated[str, typer.Option(help=f"{_choices(DECODERS)}. auto picks a correct backend per container.",
                                         rich_help_panel=VIDEO)]
WorkersOpt = Annotated[int, typer.Option(help="Decoder processes (default: half the cores, at most 8; each also runs decord's "
                                              "decode thread).", rich_help_panel=VIDEO)]


def _video(root, splits, labels, model, pretrained, num_frames, sampler, normalize, flip, prompt, clean_names, decoder,
           workers, dataset: str) -> dict[str, Any]:
    """The :class:`VideoOptions` fields from the shared options above."""
    values = dict(dataset=dataset, root=str(root) if root else None, splits_dir=str(splits) if splits else None,
                  labels=str(labels) if labels else None, model=model,
                  pretrained=None if pretrained.lower() in ("none", "") else pretrained, num_frames=num_frames,
                  sampler=sampler, normalize=normalize, flip=flip, prompt_template=prompt, clean_names=clean_names,
                  decoder=decoder, workers=workers)
    assert set(values) == {f.name for f in dataclasses.fields(VideoOptions)}
    return values


# CLI names of the shared video options, and the VideoOptions field each sets
VIDEO_OPTS = {"root": "root", "splits": "splits_dir", "labels": "labels", "model": "model", "pretrained": "pretrained",
              "num_frames": "num_frames", "sampler": "sampler", "normalize": "normalize", "flip": "flip",
              "prompt": "prompt_template", "clean_names": "clean_names", "decoder": "decoder", "workers": "workers"}


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


@app.command(epilog="Examples:\n\n  mdmf-cache extract ucf101 --root ~/data/UCF-101 --model RN50 --pretrained openai\n\n"
             "  torchrun --nproc-per-node 4 -m cli extract ssv2-full --root ~/data/ssv2 --train-views 4   (from the repository root)")
def extract(
    dataset: Annotated[Dataset, typer.Argument(help="Built-in dataset, or 'folder' for root/class/video.ext.")],
    root: RootOpt = None,
    splits: SplitsOpt = None,
    labels: LabelsOpt = None,
    cache_dir: CacheDirOpt = Path(_X.cache_dir),
    name: Annotated[Optional[str], typer.Option(help="Cache group name instead of the dataset's.")] = None,
    model: ModelOpt = _X.model,
    pretrained: PretrainedOpt = _X.pretrained,
    preset: Annotated[DataPreset, typer.Option(help="paper: tsn + CLIP normalisation; reference: linspace + [0,1] pixels.")] = _X.preset,
    sampler: SamplerOpt = None,
    normalize: NormalizeOpt = None,
    num_frames: NumFramesOpt = _X.num_frames,
    train_views: Annotated[int, typer.Option(help="V random augmented views per train video.")] = _X.train_views,
    flip: FlipOpt = _X.flip,
    seed: int = _X.seed,
    prompt: PromptOpt = _X.prompt_template,
    clean_names: CleanNamesOpt = _X.clean_names,
    decoder: DecoderOpt = _X.decoder,
    workers: WorkersOpt = default_workers(),
    batch_videos: Annotated[int, typer.Option(help="Videos per encoder batch.")] = _X.batch_videos,
    chunk_rows: Annotated[int, typer.Option(help="Videos per Zarr chunk (the unit a writer owns).")] = _X.chunk_rows,
    device: DeviceOpt = _X.device,
    split: Annotated[Optional[list[str]], typer.Option(help="Only these splits (repeatable).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="This process's rank (default: torchrun/SLURM env).")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="Number of processes (default: torchrun/SLURM env).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a cache made with other settings.")] = _X.overwrite,
    strict: Annotated[bool, typer.Option(help="Missing or undecodable videos are an error.")] = _X.strict,
    verify_deep: Annotated[bool, typer.Option(help="Read every feature chunk for damage first (default: only those changed since the last clean verify).")] = _X.verify_deep,
    retry_failed: Annotated[bool, typer.Option(help="Decode videos that failed before again, even if their files did not change.")] = _X.retry_failed,
    tokens: Annotated[Optional[str], typer.Option(help="Also store per-frame token arrays: SPEC = last, blocks 4,8,12 (ViT), map (ResNet), optionally @HxW (pooled grid). A finished cache is extended in place (its features kept); default: the tokens the cache has.")] = _X.tokens,
    debug: DebugOpt = False,
) -> None:
    """Decode T frames per video, encode them with CLIP, and store them with the prompt embeddings."""
    import os

    # Decoder processes share the cores with this one: its OpenMP threads must sleep, not spin, while
    # they wait (bench/extract.py --omp-wait compare). Read when torch loads, so set before; yours wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _setup_logging(debug)
    _on_interrupt("the videos finished so far are in the cache; rerun the same command to extract the rest")
    from mdmf_cache.extraction.embed import distributed_env
    from pipelines.extract import run

    env_rank, env_world, _ = distributed_env()
    cfg = ExtractConfig(
        **_video(root, splits, labels, model, pretrained, num_frames, sampler, normalize, flip, prompt, clean_names,
                 decoder, workers, dataset.value),
        preset=preset.value, cache_dir=str(cache_dir), name=name, train_views=train_views, seed=seed,
        batch_videos=batch_videos, chunk_rows=chunk_rows, device=device,
        splits=tuple(split) if split else _X.splits, overwrite=overwrite, strict=strict, verify_deep=verify_deep,
        retry_failed=retry_failed, tokens=tokens,
        rank=env_rank if rank is None else rank, world_size=env_world if world_size is None else world_size,
    )
    run(cfg)


@app.command(epilog="Example:\n\n  mdmf-cache info cache/ucf101__RN50__openai.zarr")
def info(cache: Annotated[Path, typer.Argument(help="A cache group (*.zarr).")], debug: DebugOpt = False) -> None:
    """Print splits, counts, completeness, failures and the fingerprint of a cache."""
    _setup_logging(debug)
    from mdmf_cache.report.tables import print_info

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
    from mdmf_cache.store.read import export_h5

    path = export_h5(cache, out, overwrite=overwrite)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command(epilog="Example:\n\n  mdmf-cache verify cache/ucf101__RN50__openai.zarr")
def verify(cache: Annotated[Path, typer.Argument(help="A cache group (*.zarr).")], debug: DebugOpt = False) -> None:
    """Read every chunk of a cache: name each damaged split, array, rows and file (exit 2 if any)."""
    _setup_logging(debug)
    _on_interrupt("nothing was changed; rerun the same command")
    from mdmf_cache.report.tables import print_verify

    print_verify(cache)


# ---- head options: MDMF's switches by name, any head's options by --head-opt KEY=VALUE ------------------------------
MDMF_PANEL = "MDMF switches (--method mdmf)"
METHOD_HELP = f"The head: {_choices(heads.METHODS)}."
NoPpsOpt = Annotated[bool, typer.Option("--no-pps", help="Turn the Probability Prompt Selector off.", rich_help_panel=MDMF_PANEL)]
NoDistillOpt = Annotated[bool, typer.Option("--no-distill", help="Turn mutual distillation off.", rich_help_panel=MDMF_PANEL)]
ViewOpt = Annotated[Optional[str], typer.Option("--view", help=f"Single view: {_choices(MDMF_CHOICES['views'][1:])}.",
                                                rich_help_panel=MDMF_PANEL)]
ConditionOpt = Annotated[Optional[str], typer.Option("--condition", help=f"Reliability: {_choices(MDMF_CHOICES['condition'])}.",
                                                     rich_help_panel=MDMF_PANEL)]
DirectionOpt = Annotated[Optional[str], typer.Option("--direction", help=f"{_choices(MDMF_CHOICES['direction'])}.",
                                                     rich_help_panel=MDMF_PANEL)]
HeadOptOpt = Annotated[Optional[list[str]], typer.Option(
    "--head-opt", metavar="KEY=VALUE", help="Any option of the head, e.g. merge_before=true (repeatable; "
    "mdmf-cache heads NAME lists them).")]


def _head_opts(items: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise typer.BadParameter(f"{item!r}: write KEY=VALUE, e.g. merge_before=true", param_hint="--head-opt")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _head_overrides(no_pps: bool, no_distill: bool, view: Optional[str], condition: Optional[str],
                    direction: Optional[str], extra: dict) -> dict:
    heads_ = {k: v for k, v in extra.items() if v is not None}
    if no_pps:
        heads_["pps"] = False
    if no_distill:
        heads_["distill"] = False
    if view:
        heads_["views"] = view
    if condition:
        heads_["condition"] = condition
    if direction:
        heads_["direction"] = direction
    return heads_


def _typed_head_options(method: str, overrides: dict[str, Any], dropout: Optional[float]) -> dict[str, Any]:
    """Head overrides with ``--head-opt`` strings parsed by the head's option types and ``--dropout`` set on every
    dropout the head has (the head module is imported here, at run time)."""
    from mdmf_cache.errors import ConfigError
    from mdmf_cache.sweeps.space import sweep_options

    opts = sweep_options(method)
    by_field = {o.targets[0][len("heads."):]: o for o in opts.values() if len(o.targets) == 1
                and o.targets[0].startswith("heads.") and not o.invert}
    typed = {}
    for key, value in overrides.items():
        if key in by_field:
            typed[key] = by_field[key].parse(value)
        elif isinstance(value, str) and key not in by_field:
            raise ConfigError(f"unknown {method} option {key!r}; {method} takes: "
                              f"{', '.join(sorted(by_field))}")
        else:
            typed[key] = value
    if dropout is not None:
        if "dropout" not in opts:
            raise ConfigError(f"--dropout: {method} has no dropout")
        typed.update({t[len("heads."):]: dropout for t in opts["dropout"].targets})
    return typed


FULL = "Full mode (--mode full)"


@app.command(epilog="Examples:\n\n  mdmf-cache train cache/ucf101__RN50__openai.zarr --out runs/ucf_rn50 --shot 5\n\n"
             "  mdmf-cache train CACHE --out runs/ref --preset reference --lr 3e-4 --episodes 20000\n\n"
             "  mdmf-cache train CACHE --out runs/ucf_fsar --method clip-fsar --shot 5   # trains on 1-shot episodes, as released\n\n"
             "  mdmf-cache train CACHE --out runs/ucf_rn50 --resume\n\n"
             "  mdmf-cache train --config sweeps/ucf/best.json --out runs/ucf_best   # a sweep's best trial\n\n"
             "  mdmf-cache train --mode full ucf101 --root ~/data/UCF-101 --model RN50 --pretrained openai --out runs/ucf_full\n\n"
             "  torchrun --nproc-per-node 8 -m cli train --mode full ssv2-small --root ~/data/ssv2 --model ViT-B-16 "
             "--pretrained openai --out runs/ssv2_full   (from the repository root)")
def train(
    ctx: typer.Context,
    target: Annotated[Optional[str], typer.Argument(
        metavar="CACHE|DATASET",
        help="Fast mode: a complete cache group (*.zarr). Full mode: a dataset (" + ", ".join(DATASET_NAMES) + "). "
             "Optional with --config.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Start from a run's config.json or a sweep's best.json; "
                                                        "options given on the command line override it.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: config.json, metrics.jsonl, best.pt, last.pt (full mode: backbone.pt).")] = Path(_T.out),
    mode: Annotated[Mode, typer.Option(help="fast: heads on cached features (CLIP frozen). full: CLIP fine-tuned with the heads, from the videos.")] = _T.mode,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = _T.method,
    preset: Annotated[Optional[str], typer.Option(help="The head's named options (mdmf: paper | reference; the rivals: "
                                                       "released). Default: the head's first.")] = None,
    way: int = _T.way,
    shot: Annotated[int, typer.Option(help="K the run is for: its validation episodes and eval's default.")] = _T.shot,
    train_shot: Annotated[Optional[int], typer.Option(help="K of the training episodes (default: the head's released "
                                                           "choice for --shot; CLIP-FSAR trains on 1-shot).")] = None,
    train_queries: Annotated[Optional[int], typer.Option(help="Queries per class in training episodes (default: the "
                                                              "head's released choice).")] = None,
    episodes: Annotated[int, typer.Option(help="Training episodes in total.")] = _T.episodes,
    episodes_per_step: Annotated[int, typer.Option(help="Episodes per optimiser step (full mode: accumulated, split between ranks; the paper's 16).")] = _T.episodes_per_step,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default: fast mode 1e-4, full mode 1e-5 as the paper).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Adam's (coupled L2) weight decay; the released FSAR loop uses 1e-3.")] = _T.weight_decay,
    head_opt: HeadOptOpt = None,
    dropout: Annotated[Optional[float], typer.Option(help="One value for every dropout of the head.")] = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Distillation weight (preset: 1).", rich_help_panel=MDMF_PANEL)] = None,
    alpha_ltc: Annotated[Optional[float], typer.Option(help="Weight of the local view's distance.", rich_help_panel=MDMF_PANEL)] = None,
    alpha_gtc: Annotated[Optional[float], typer.Option(help="Weight of the global view's distance.", rich_help_panel=MDMF_PANEL)] = None,
    pps_temperature: Annotated[Optional[float], typer.Option(help="PPS softmax temperature (0.005).", rich_help_panel=MDMF_PANEL)] = None,
    no_pps: NoPpsOpt = False,
    no_distill: NoDistillOpt = False,
    view: ViewOpt = None,
    condition: ConditionOpt = None,
    direction: DirectionOpt = None,
    ltce: Annotated[Optional[str], typer.Option(help=f"Local extractor: {_choices(MDMF_CHOICES['ltce'])} (paper: bn).", rich_help_panel=MDMF_PANEL)] = None,
    pos_embed: Annotated[Optional[bool], typer.Option("--pos-embed/--no-pos-embed", help="MMFE position embeddings.", rich_help_panel=MDMF_PANEL)] = None,
    pps_score: Annotated[Optional[str], typer.Option(help=f"PPS score: {_choices(MDMF_CHOICES['pps_score'])} (paper: mean).", rich_help_panel=MDMF_PANEL)] = None,
    pps_test: Annotated[Optional[str], typer.Option(help=f"PPS at test: {_choices(PPS_TEST_RULES)} (both presets: sample, seeded).", rich_help_panel=MDMF_PANEL)] = None,
    text_pos: Annotated[Optional[int], typer.Option(help="Text-compare position: 0 (paper) | 1 (reference).", rich_help_panel=MDMF_PANEL)] = None,
    cos_eps: Annotated[Optional[float], typer.Option(help="Cosine eps on the norm product (reference 0.01).")] = None,
    otam_one_way: Annotated[bool, typer.Option("--otam-one-way", help="OTAM(D) only (released Kinetics 1-shot config).")] = False,
    val_every: Annotated[int, typer.Option(help="Validate every this many episodes.")] = _T.val_every,
    val_episodes: Annotated[int, typer.Option(help="Fixed val episode list size.")] = _T.val_episodes,
    save_every: Annotated[int, typer.Option(help="Also save last.pt every this many episodes between validations (0: at validations only).")] = _T.save_every,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Also keep the heads of every validation as checkpoints/ep{episodes:07d}.pt (best.pt's format; fast mode).")] = _T.keep_checkpoints,
    seed: int = _T.seed,
    device: DeviceOpt = _T.device,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from last.pt.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write metrics.jsonl's numbers as TensorBoard "
                                              "events in OUT/tensorboard/ (pip install 'mdmf-cache[tensorboard]').")] = _T.tensorboard,
    token_cache_mb: Annotated[int, typer.Option(help="A token head's: MiB of token rows kept in memory per split read "
                                                     "(train, val), whatever the split's size.")] = _T.token_cache_mb,
    root: RootOpt = None,
    splits: SplitsOpt = None,
    labels: LabelsOpt = None,
    model: ModelOpt = VideoOptions.model,
    pretrained: PretrainedOpt = VideoOptions.pretrained,
    num_frames: NumFramesOpt = VideoOptions.num_frames,
    sampler: SamplerOpt = None,
    normalize: NormalizeOpt = None,
    flip: FlipOpt = VideoOptions.flip,
    prompt: PromptOpt = VideoOptions.prompt_template,
    clean_names: CleanNamesOpt = VideoOptions.clean_names,
    decoder: DecoderOpt = VideoOptions.decoder,
    workers: WorkersOpt = default_workers(),
    backbone_lr: Annotated[Optional[float], typer.Option(help="The backbone's learning rate (default --lr).", rich_help_panel=FULL)] = None,
    train_text: Annotated[bool, typer.Option(help="Train the text tower too (the released code never does).", rich_help_panel=FULL)] = FullModeConfig.train_text,
    train_last_blocks: Annotated[Optional[int], typer.Option(help="Fine-tune only the last N blocks of the visual encoder (default: all).", rich_help_panel=FULL)] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="Keep the visual encoder frozen (= --train-last-blocks 0; fresh augmentation every episode).", rich_help_panel=FULL)] = False,
    backbone_bn: Annotated[str, typer.Option(help=f"RN backbones' BatchNorm: {_choices(BN_MODES)} (per-episode batch statistics, or running ones).", rich_help_panel=FULL)] = FullModeConfig.backbone_bn,
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward (less GPU memory).", rich_help_panel=FULL)] = FullModeConfig.grad_checkpointing,
    episodes_per_forward: Annotated[int, typer.Option(help="Episodes per forward pass (the paper: 1).", rich_help_panel=FULL)] = FullModeConfig.episodes_per_forward,
    init_heads: Annotated[Optional[Path], typer.Option(help="Start from this run's heads (best.pt), e.g. a fast-mode run on the same backbone's cache.", rich_help_panel=FULL)] = None,
    debug: DebugOpt = False,
) -> None:
    """Train a head from a cache (fast mode) or fine-tune CLIP with it from the videos (full mode), keeping the
    best checkpoint by val accuracy."""
    _setup_logging(debug)
    _on_interrupt(f"{out}/last.pt holds the run up to its last validation; rerun the same command with --resume "
                  "to continue it")
    from pipelines.train import run

    extra = {"lam": lambda_, "alpha_ltc": alpha_ltc, "alpha_gtc": alpha_gtc, "pps_temperature": pps_temperature,
             "ltce": ltce, "pos_embed": pos_embed, "pps_score": pps_score, "pps_test": pps_test, "text_pos": text_pos,
             "cos_eps": cos_eps, "otam_bidirectional": False if otam_one_way else None, **_head_opts(head_opt)}
    head_overrides = _typed_head_options(method, _head_overrides(no_pps, no_distill, view, condition, direction, extra),
                                         dropout)
    full_only = (*VIDEO_OPTS, "backbone_lr", "train_text", "train_last_blocks", "freeze_backbone", "backbone_bn",
                 "grad_checkpointing", "episodes_per_forward", "init_heads")
    full = {}
    if mode.value == "full":
        full = dataclasses.asdict(FullModeConfig(
            **_video(root, splits, labels, model, pretrained, num_frames, sampler, normalize, flip, prompt, clean_names,
                     decoder, workers, target or ""),
            backbone_lr=backbone_lr, train_text=train_text, train_last_blocks=0 if freeze_backbone else train_last_blocks,
            backbone_bn=backbone_bn, grad_checkpointing=grad_checkpointing, episodes_per_forward=episodes_per_forward,
            init_heads=str(init_heads) if init_heads else None))
    else:
        given = [f"--{n.replace('_', '-')}" for n in full_only
                 if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]
        if given:
            raise typer.BadParameter(f"{', '.join(given)}: video and backbone options are for --mode full; fast mode "
                                     "reads a cache", param_hint="--mode")
    cfg = TrainConfig(
        cache=str(target or "") if mode.value == "fast" else "", out=str(out), mode=mode.value, method=method,
        preset=preset, heads=head_overrides, way=way, shot=shot, train_shot=train_shot, train_queries=train_queries,
        episodes=episodes, episodes_per_step=episodes_per_step, lr=lr, weight_decay=weight_decay, val_every=val_every,
        val_episodes=val_episodes,
        save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed, device=device, resume=resume,
        tensorboard=tensorboard, token_cache_mb=token_cache_mb, full=full,
    )
    if config is not None:
        cfg = _merge_config(ctx, config, cfg)
    elif target is None:
        raise typer.BadParameter("name a CACHE (fast mode), a DATASET (--mode full), or --config FILE",
                                 param_hint="CACHE|DATASET")
    run(cfg)


def _merge_config(ctx: typer.Context, path: Path, cli_cfg: TrainConfig) -> TrainConfig:
    """The config in ``path``, with the options given on the command line (not their defaults) on top."""
    from mdmf_cache.configs import load_config

    cfg = load_config(path)
    given = {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
    given |= {"cache"} if "target" in given else set()
    for f in dataclasses.fields(cfg):
        if f.name == "heads":
            cfg.heads = {**cfg.heads, **cli_cfg.heads}  # head options default to None: all of these were given
        elif f.name == "full" and cli_cfg.full:  # full mode's options given on the command line, by field
            renamed = {**VIDEO_OPTS, "target": "dataset", "freeze_backbone": "train_last_blocks"}
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


def _eval_methods() -> str:
    return _choices(("run", *heads.METHODS, *BASELINES))


@app.command("eval", epilog="Examples:\n\n  mdmf-cache eval runs/ucf_rn50 --episodes 10000\n\n"
             "  mdmf-cache eval runs/ucf_rn50 --shot 1,3,5\n\n"
             "  mdmf-cache eval runs/ucf_fsar   # a CLIP-FSAR run: the same episodes for the same --seed\n\n"
             "  mdmf-cache eval cache/ucf101__RN50__openai.zarr --method otam   # heads without parameters, baselines\n\n"
             "  mdmf-cache eval runs/ucf_full --shot 1,3,5   # a full-mode run: its test split extracted with backbone.pt once")
def eval_(
    target: Annotated[Path, typer.Argument(help="A run directory (its trained head) or a cache (*.zarr: heads without "
                                                "parameters and baselines).")],
    method: Annotated[str, typer.Option(help=f"{_eval_methods()} (run: the head the run was trained with).")] = _E.method,
    split: str = _E.split,
    episodes: int = _E.episodes,
    shot: Annotated[Optional[str], typer.Option(help="Shots, comma-separated (default: the run's shot; a cache: 1,3,5).")] = None,
    way: int = _E.way,
    queries_per_class: Annotated[Optional[int], typer.Option(
        help="Queries per class of every episode (default: a transductive head's released test queries, "
             f"SPEC.test_queries(K), shown by mdmf-cache heads NAME; any other method {EVAL_QUERIES}).")] = _E.queries_per_class,
    seed: int = _E.seed,
    out: Annotated[Optional[Path], typer.Option(help="Results directory.")] = None,
    path: Annotated[str, typer.Option(help=f"{_choices(EVAL_PATHS)}: per-video (each video once, where the head allows "
                                           "it) or direct (every episode through the head: the reference, same logits).")] = _E.path,
    pps_test: Annotated[Optional[str], typer.Option(help=f"MDMF: PPS rule at test for this evaluation: {_choices(PPS_TEST_RULES)} (default: the run's).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="The run's cache, if it moved (checked against the run's record).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="A full-mode run's video tree, if it moved.")] = None,
    eval_cache: Annotated[Optional[Path], typer.Option(help="Where a full-mode run's split is extracted with its "
                                                            "backbone (default RUN/eval_cache), e.g. when the run is "
                                                            "on read-only storage.")] = None,
    token_cache_mb: Annotated[int, typer.Option(help="A token head's: MiB of the split's token rows kept in memory.")] = _E.token_cache_mb,
    device: DeviceOpt = _E.device,
    debug: DebugOpt = False,
) -> None:
    """Accuracy +- 1.96 std/sqrt(n) on a seeded, saved episode list, per shot, with per-class accuracy."""
    _setup_logging(debug)
    _on_interrupt("no results were written; rerun the same command (the episode list is the same)")
    from pipelines.evaluate import run

    run(EvalConfig(target=str(target), method=method, split=split, way=way, shots=_shots(shot) if shot else None,
                   episodes=episodes, queries_per_class=queries_per_class, seed=seed, out=str(out) if out else None,
                   device=device, path=path, pps_test=pps_test, cache=str(cache) if cache else None,
                   root=str(root) if root else None, eval_cache=str(eval_cache) if eval_cache else None,
                   token_cache_mb=token_cache_mb))


_P = PredictConfig


@app.command(epilog="Examples:\n\n  mdmf-cache predict runs/ucf_rn50 --support my_actions/ --query unlabelled/\n\n"
             "  mdmf-cache predict runs/ucf_rn50 --support my_actions/ --query clips/*.mp4 --out predictions/\n\n"
             "  mdmf-cache predict runs/ucf_full --support my_actions/ --query unlabelled/   # a full-mode run: its backbone.pt")
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory of mdmf-cache train (fast or full mode).")],
    more: Annotated[Optional[list[Path]], typer.Argument(help="More query videos or folders (e.g. the rest of a shell "
                                                              "glob after --query).", show_default=False)] = None,
    support: Annotated[Optional[Path], typer.Option(help="SUPPORT/<class>/<video>: a few labelled videos (files or JPEG "
                                                         "frame folders) per class.", show_default=False)] = None,
    query: Annotated[Optional[list[Path]], typer.Option(help="Videos to label: a folder (searched recursively) or "
                                                             "files; repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where predictions.csv goes (default: RUN/predict).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="The videos' features (default: "
                                                                          "RUN/predict_cache).")] = None,
    shot: Annotated[Optional[int], typer.Option(help="K supports per class and pass (default: the smallest class's "
                                                     "count).")] = _P.shot,
    subsets: Annotated[int, typer.Option(help="K-subsets averaged when a class has more than K supports.")] = _P.subsets,
    pps_test: Annotated[str, typer.Option(help=f"MDMF's prompt selector: {_choices(PPS_TEST_RULES)} (sample: a draw "
                                               "seeded per query).")] = _P.pps_test,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and of the PPS draws.")] = _P.seed,
    batch_size: Annotated[int, typer.Option(help="Queries per forward pass.")] = _P.batch_size,
    token_cache_mb: Annotated[int, typer.Option(help="A token head's: MiB of the videos' token rows kept in memory.")] = _P.token_cache_mb,
    weights: Annotated[Optional[Path], typer.Option(help="The backbone checkpoint of a fast run, if the recorded one "
                                                         "moved (checked by its sha256).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="A fast run's cache, if it moved.")] = None,
    workers: Annotated[int, typer.Option(help="Decoder processes (default: half the cores, at most 8).")] = default_workers(),
    show: Annotated[int, typer.Option(help="Queries shown in the table.")] = _P.show,
    device: DeviceOpt = _P.device,
    debug: DebugOpt = False,
) -> None:
    """Label videos with a trained run: support videos per class in, predictions.csv (class + probabilities) out."""
    _setup_logging(debug)
    _on_interrupt("predictions.csv was not written; the videos extracted so far are cached: rerun the same command")
    from pipelines.predict import run as run_predict

    queries = tuple(str(q) for q in [*(query or []), *(more or [])])
    run_predict(PredictConfig(run=str(run), support=str(support) if support else "", query=queries,
                              out=str(out) if out else None, cache_dir=str(cache_dir) if cache_dir else None,
                              shot=shot, subsets=subsets, pps_test=pps_test, seed=seed, batch_size=batch_size,
                              token_cache_mb=token_cache_mb,
                              weights=str(weights) if weights else None, cache=str(cache) if cache else None,
                              workers=workers, show=show, device=device))


_A = AblateConfig


@app.command(epilog="Examples:\n\n  mdmf-cache ablate CACHE --no-pps\n\n  mdmf-cache ablate CACHE --view gtc --episodes 5000\n\n"
             "  mdmf-cache ablate CACHE --method clip-fsar   # MDMF vs CLIP-FSAR on identical episodes\n\n"
             "  mdmf-cache ablate CACHE --table 5 --out runs/table5\n\n  mdmf-cache ablate CACHE --lambda 0,0.25,0.5,1,1.5,2 --out runs/lambda")
def ablate(
    cache: Annotated[Path, typer.Argument(help="A complete cache group (*.zarr).")],
    method: Annotated[Optional[str], typer.Option(help=f"Compare the full MDMF with this head: {_choices(heads.METHODS[1:])}.")] = None,
    no_pps: NoPpsOpt = False,
    no_distill: NoDistillOpt = False,
    view: ViewOpt = None,
    condition: ConditionOpt = None,
    direction: DirectionOpt = None,
    table: Annotated[Optional[int], typer.Option(help="Run the paper's ablation grid 3, 4 or 5.")] = None,
    lambdas: Annotated[Optional[str], typer.Option("--lambda", help="A grid over the distillation weight, e.g. "
                                                   "0.25,0.5,1,2 (accuracy vs lambda, the paper's Fig. 4).")] = None,
    out: Annotated[Path, typer.Option(help="Study directory (one run per arm).")] = Path(_A.out),
    preset: Annotated[str, typer.Option(help="MDMF's preset: paper | reference.")] = _A.preset,
    episodes: Annotated[int, typer.Option(help="Training episodes per arm.")] = _T.episodes,
    episodes_per_step: int = _T.episodes_per_step,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default: fast mode's 1e-4).")] = None,
    val_every: int = _T.val_every,
    test_episodes: Annotated[int, typer.Option(help="Test episodes (the same list for every arm).")] = _A.test_episodes,
    way: int = _A.way,
    shot: int = _A.shot,
    seed: int = _A.seed,
    device: DeviceOpt = _A.device,
    debug: DebugOpt = False,
) -> None:
    """Train the full model and a variant (or a paper table's grid); score all on identical episodes."""
    _setup_logging(debug)
    _on_interrupt(f"finished arms are kept in {out}; rerun the same command: they are reused and the "
                  "interrupted arm resumes")
    from pipelines.ablate import run

    train_opts = {"episodes": episodes, "episodes_per_step": episodes_per_step, "val_every": val_every,
                  **({"lr": lr} if lr is not None else {})}
    cfg = AblateConfig(
        cache=str(cache), out=str(out), preset=preset, table=table, lambdas=_floats(lambdas, "--lambda"),
        variant=_head_overrides(no_pps, no_distill, view, condition, direction,
                                {"method": method if method and method != "mdmf" else None}),
        train=train_opts, way=way, shot=shot, test_episodes=test_episodes, seed=seed, device=device,
    )
    run(cfg)


def _sweep_epilog() -> str:
    from mdmf_cache.sweeps.space import DEFAULT_SPACE

    space = ", ".join(f"{k}={v}" for k, v in DEFAULT_SPACE.items())
    return f"""Examples:

  mdmf-cache sweep cache/ucf101__RN50__openai.zarr --out sweeps/ucf --trials 100 --shot 5

  mdmf-cache sweep CACHE --out sweeps/ucf --space lr=1e-5:1e-2:log,lambda=0.1:2,dropout=0:0.5,pps-temperature=0.001:0.1:log

  mdmf-cache sweep CACHE --out sweeps/ucf_fsar --method clip-fsar          # tune another head (one per sweep)

  mdmf-cache sweep CACHE --out sweeps/ucf --jobs 4                      # 4 concurrent trials on this machine

  mdmf-cache sweep CACHE --study ucf --storage postgresql://user@db/sweeps   # the same line on every machine

  mdmf-cache sweep CACHE --out sweeps/ucf --resume                      # continue after a crash

  mdmf-cache sweep show sweeps/ucf                                       # trials table, best.json, figures

Fixed options: any fast-mode option of 'train', written as there (--episodes 2000, --shot 1, --preset reference,
--no-pps, --view gtc, --method clip-fsar, ...), and any option of the head by its field name (--merge-before, --no-merge-before, --heads 4);
a fixed option leaves the default space.

Default space (without --space): {space}, plus the head's own (mdmf: lambda=0.1:2, alpha-ltc=0.25:2,
alpha-gtc=0.25:2, pps-temperature=0.001:0.1:log).
--space syntax: NAME=LOW:HIGH (uniform), NAME=LOW:HIGH:log, NAME=A|B|C (listed values), comma-separated.
"""


_S = SweepConfig


@app.command(epilog=_sweep_epilog(), context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="A complete cache group (*.zarr); or 'show' followed by a sweep directory.")],
    out: Annotated[Optional[Path], typer.Option(help="Sweep directory (study.db, trials/, tables, figures); "
                                                     "default sweeps/STUDY.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the name of --out).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///OUT/study.db), e.g. "
                                                        "postgresql://user@db/sweeps for several machines.")] = None,
    trials: Annotated[int, typer.Option(help="Finished trials of the study, all workers together.")] = _S.trials,
    jobs: Annotated[int, typer.Option(help="Concurrent trials (worker processes) on this machine.")] = _S.jobs,
    share_features: Annotated[bool, typer.Option("--share-features/--no-share-features",
                                                 help="With --jobs: the workers map one copy of the train and val "
                                                      "features in shared memory (off: one copy each).")] = _S.share_features,
    space: Annotated[Optional[str], typer.Option(help="Swept parameters, e.g. lr=1e-5:1e-2:log,lambda=0.1:2 "
                                                      "(default: see below).")] = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Stop bad trials early at a validation.")] = _S.prune,
    pruner: Annotated[str, typer.Option(help="median | halving (successive halving).")] = _S.pruner,
    prune_startup: Annotated[int, typer.Option(help="Finished trials before the median pruner acts.")] = _S.prune_startup,
    prune_below: Annotated[Optional[float], typer.Option(help="Also stop a trial whose val accuracy (%) falls "
                                                              "below this at a validation, e.g. chance level.")] = None,
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="Seed of the TPE sampler.")] = _S.seed,
    resume: Annotated[bool, typer.Option(help="Continue the study in --out to --trials finished trials.")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between a trial's heartbeats; a trial silent for twice "
                                                "this is failed and requeued.")] = _S.heartbeat,
    debug: DebugOpt = False,
) -> None:
    """Tune fast-mode training on a cache with Optuna: each trial trains the heads and is scored on val (never test)."""
    _setup_logging(debug)
    from mdmf_cache.sweeps.space import parse_fixed, parse_space_text
    from mdmf_cache.sweeps.study import interrupt_hint
    from pipelines.sweep import run, show

    if cache == "show":
        if len(ctx.args) != 1 or ctx.args[0].startswith("-"):
            raise typer.BadParameter("write: mdmf-cache sweep show SWEEP_DIR [--storage URL]", param_hint="show")
        show(ctx.args[0], storage)
        return
    cfg = SweepConfig(cache=cache, study=study, storage=storage, trials=trials, jobs=jobs,
                      space=parse_space_text(space) if space else {}, fixed=parse_fixed(ctx.args), prune=prune,
                      pruner=pruner, prune_startup=prune_startup, prune_below=prune_below, seed=sampler_seed,
                      resume=resume, heartbeat=heartbeat, share_features=share_features)
    cfg.out = str(out) if out else f"sweeps/{study or Path(cache).name.split('__')[0].removesuffix('.zarr')}"
    _on_interrupt(lambda: interrupt_hint(cfg))
    run(cfg)


@app.command(epilog="Examples:\n\n  mdmf-cache plot runs/ucf_rn50\n\n  mdmf-cache plot sweeps/ucf\n\n"
             "  mdmf-cache plot runs/ucf_rn50/eval_mdmf_test\n\n  mdmf-cache plot runs/ablate")
def plot(
    target: Annotated[Path, typer.Argument(help="A run, eval, ablation or sweep directory.")],
    storage: Annotated[Optional[str], typer.Option(help="A sweep's storage URL, when sweep.json hides its password.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Redraw the figures of a run (curves), an evaluation, an ablation or a sweep."""
    _setup_logging(debug)
    from mdmf_cache.report.plots import redraw

    paths = []
    if (target / "sweep.json").is_file():  # a sweep's figures come from its study
        from mdmf_cache.sweeps.summary import summarize
        from mdmf_cache.sweeps.study import load_sweep

        paths += summarize(load_sweep(target, storage))["figures"]
    paths += redraw(target, allow_empty=(target / "sweep.json").is_file())
    for p in paths:
        typer.echo(f"wrote {p}")


_C = CompareConfig


def _compare_presets(items: Optional[list[str]], methods: tuple[str, ...]) -> dict[str, str]:
    """``--preset NAME`` (every trained method) or ``--preset METHOD:NAME`` (repeatable) as {method: preset}."""
    from pipelines.compare import trained_methods

    out: dict[str, str] = {}
    for item in items or []:
        method, colon, name = item.rpartition(":")
        if not name.strip():
            raise typer.BadParameter(f"{item!r}: write NAME or METHOD:NAME, e.g. mdmf:reference", param_hint="--preset")
        for m in ([method.strip()] if colon else trained_methods(methods)):
            out[m] = name.strip()
    return out


def _compare_head_opts(items: Optional[list[str]], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--head-opt METHOD:KEY=VALUE`` (repeatable) as {method: {key: value}}, each value parsed by that head's
    option types as train's ``--head-opt``."""
    per: dict[str, list[str]] = {}
    for item in items or []:
        method, colon, rest = item.partition(":")
        if not colon or not method.strip() or "=" in method:
            raise typer.BadParameter(f"{item!r}: write METHOD:KEY=VALUE, e.g. mdmf:merge_before=true",
                                     param_hint="--head-opt")
        per.setdefault(method.strip(), []).append(rest)
    from pipelines.compare import trained_methods

    trained = trained_methods(methods)
    for method in per:  # one line before a head's options are read: a method compare does not train
        if method not in methods:
            raise typer.BadParameter(f"{method}: not among --methods ({','.join(methods)})", param_hint="--head-opt")
        if method not in trained:
            raise typer.BadParameter(f"{method}: not trained here (no parameters); compare scores it as released",
                                     param_hint="--head-opt")
    return {m: _typed_head_options(m, _head_opts(opts), None) for m, opts in per.items()}


@app.command(context_settings={"allow_extra_args": True},
             epilog="Examples:\n\n  mdmf-cache compare CACHE --methods mdmf,clip-fsar,protonet --shot 1,3,5 --out results/ucf_rn50\n\n"
             "  mdmf-cache compare CACHE --methods mdmf,clip-fsar --shot 5 --episodes 20000 --lr 3e-4 --out results/ucf_5shot\n\n"
             "  mdmf-cache compare CACHE --methods mdmf,clip-fsar,otam --shot 1,5 --sweep 50 --out results/ucf_tuned   # each tuned on val first\n\n"
             "  mdmf-cache compare CACHE --methods mdmf,team,otam --seeds 3 --test-selected --out results/ucf_protocol   # seed spread; test-selection bias\n\n"
             "  mdmf-cache compare CACHE --methods mdmf,otam --preset mdmf:reference --head-opt mdmf:heads=4 --out results/ucf_ref\n\n"
             "  mdmf-cache compare CACHE --methods mdmf,clip-fsar,protonet,trx --shot 1,3,5 --out results/ucf_rn50   # a finished comparison extended: only trx is trained\n\n"
             "  mdmf-cache compare show results/ucf_rn50                         # the table again, from the files\n\n"
             "A rerun into the same --out does only what is missing, and may add methods, shots, training seeds (--seeds) "
             "or change --reference; other settings (way, test episodes, seed, training options, a finished method's "
             "preset or head options) and another cache (other prompts, backbone, classes: its identity) are refused, "
             "named. --out may be spelled differently or moved: it is the folder that holds compare_config.json. "
             "Writes table.md, table.tex (booktabs), table.csv, table.png.")
def compare(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="A complete cache group (*.zarr); or 'show' followed by a compare --out.")],
    methods: Annotated[str, typer.Option(help=f"Comma-separated: {_choices((*heads.METHODS, *BASELINES))} "
                                              "(default: every registered head of the cached features; name a token head, e.g. strm, to add it).")] = ",".join(heads.FEATURE_METHODS),
    shot: Annotated[str, typer.Option(help="Shots, comma-separated: one column each, one trained run per method and shot.")] = ",".join(map(str, _C.shots)),
    reference: Annotated[str, typer.Option(help="Paired differences are to this method.")] = _C.reference,
    out: Annotated[Path, typer.Option(help="Results directory: runs/, scores/, episode lists, table.csv, table.md, table.png.")] = Path(_C.out),
    episodes: Annotated[int, typer.Option(help="Training episodes of every trained method.")] = _T.episodes,
    episodes_per_step: int = _T.episodes_per_step,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of every trained method (default: fast mode's 1e-4).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Adam's weight decay of every trained method.")] = _T.weight_decay,
    train_queries: Annotated[Optional[int], typer.Option(help="Queries per class in training (default: each head's released choice).")] = None,
    val_every: int = _T.val_every,
    val_episodes: int = _T.val_episodes,
    test_episodes: Annotated[int, typer.Option(help="Test episodes per shot (the same list for every method).")] = _C.test_episodes,
    sweep: Annotated[int, typer.Option(help="Tune each trained method per shot first: an N-trial sweep on val over its "
                                            "default space (the options above fixed) in OUT/sweeps; its best trial's "
                                            "run is scored. 0: train with the defaults.")] = _C.sweep,
    seeds: Annotated[int, typer.Option(help="Train each trained method this many times per shot, with training seeds "
                                            "--seed + i, all scored on the same episodes: the table gives the mean, its "
                                            "spread over seeds and the per-seed paired differences.")] = _C.seeds,
    test_selected: Annotated[bool, typer.Option("--test-selected", help="Keep every validation's heads and score each "
                                                "on test: beside the val-selected accuracy, what keeping the "
                                                "checkpoint best ON TEST would claim, and the gap.")] = _C.test_selected,
    preset: Annotated[Optional[list[str]], typer.Option(
        metavar="[METHOD:]NAME", help="A trained head's named options, as train's --preset: METHOD:NAME for one method, "
        "NAME for every trained method (repeatable; default: each head's first).")] = None,
    train_shot: Annotated[Optional[int], typer.Option(help="K of every trained method's training episodes (default: "
                                                           "each head's released choice for the shot).")] = _C.train_shot,
    head_opt: Annotated[Optional[list[str]], typer.Option(
        "--head-opt", metavar="METHOD:KEY=VALUE", help="An option of one trained head, as train's --head-opt, e.g. "
        "mdmf:merge_before=true (repeatable; mdmf-cache heads NAME lists them).")] = None,
    way: int = _C.way,
    seed: int = _C.seed,
    device: DeviceOpt = _C.device,
    debug: DebugOpt = False,
) -> None:
    """Several heads on one cache: each trained with its released defaults, all scored on identical seeded test
    episodes per shot, in the layout of the paper's Tables 1-2 with paired CIs and the numbers the papers report."""
    _setup_logging(debug)
    from pipelines.compare import run, show

    if str(cache) == "show":
        if len(ctx.args) != 1 or ctx.args[0].startswith("-"):
            raise typer.BadParameter("write: mdmf-cache compare show OUT", param_hint="show")
        show(ctx.args[0])
        return
    if ctx.args:
        raise typer.BadParameter(f"unexpected argument(s) {' '.join(ctx.args)}", param_hint="CACHE")
    _on_interrupt(f"finished runs, sweep trials and scores are kept in {out}; rerun the same command: it does only "
                  "what is missing")
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not method_list:  # an empty --methods is a mistake, not "every head" (that is the option's default)
        raise typer.BadParameter(f"{methods!r}: name at least one method", param_hint="--methods")

    train = {"episodes": episodes, "episodes_per_step": episodes_per_step, "val_every": val_every,
             "val_episodes": val_episodes, "weight_decay": weight_decay, **({"lr": lr} if lr is not None else {}),
             **({"train_queries": train_queries} if train_queries is not None else {})}
    cfg = CompareConfig(cache=str(cache), out=str(out), methods=method_list,
                        shots=_shots(shot), reference=reference, train=train, way=way, test_episodes=test_episodes,
                        seed=seed, device=device, sweep=sweep, seeds=seeds, test_selected=test_selected,
                        preset=_compare_presets(preset, method_list), train_shot=train_shot,
                        head_opts=_compare_head_opts(head_opt, method_list))
    run(cfg)


@app.command("heads", epilog="Examples:\n\n  mdmf-cache heads\n\n  mdmf-cache heads clip-fsar")
def heads_(
    name: Annotated[Optional[str], typer.Argument(help="A registered head: its options and defaults.")] = None,
    debug: DebugOpt = False,
) -> None:
    """List the registered heads, or one head's options with their defaults (what --head-opt sets)."""
    _setup_logging(debug)
    from mdmf_cache.report.tables import print_heads

    print_heads(name)


_R = RunsConfig


@app.command(epilog="Examples:\n\n  mdmf-cache runs              # everything under the current folder\n\n"
             "  mdmf-cache runs results --all   # with the runs inside each comparison, ablation and sweep\n\n"
             "  mdmf-cache runs runs --json | jq -r 'select(.complete | not) | .path'   # what is unfinished")
def runs(
    dir: Annotated[Path, typer.Argument(help="The folder searched (recursively).")] = Path(_R.dir),
    all: Annotated[bool, typer.Option("--all", help="Also the runs inside comparisons, ablations and sweeps.")] = _R.nested,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of the table.")] = _R.json,
    debug: DebugOpt = False,
) -> None:
    """List the runs, evaluations, comparisons, ablations and sweeps under a folder: their cache (marked moved when
    it is not there any more), method, shot, when, best numbers, and whether each is complete."""
    _setup_logging(debug)
    from pipelines.runs import run

    run(RunsConfig(dir=str(dir), nested=all, json=json))


_D = DemoConfig


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the synthetic videos, cache and runs go.")] = Path(_D.out),
    model: Annotated[str, typer.Option(help="Tiny backbone.")] = _D.model,
    workers: int = _D.workers,
    full: Annotated[bool, typer.Option("--full", help="Add a short full-mode stage (the tiny CLIP fine-tuned with the heads from the videos).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Synthetic action videos -> cache -> fast-mode heads -> evaluation against baselines, on a CPU in a few
    minutes (--full: a full-mode stage too)."""
    _setup_logging(debug)
    _on_interrupt(f"finished stages are kept in {out}; rerun the same command to go on")
    from pipelines.demo import run

    run(DemoConfig(out=str(out), model=model, workers=workers, full=full))


def _click_exceptions() -> tuple[type, ...]:
    """ClickException classes: typer >= 0.24 vendors click (``typer._click``), older typer uses click."""
    classes = {c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"}
    try:
        import click

        classes.add(click.ClickException)
    except ImportError:
        pass
    return tuple(classes)


def _os_error_line(err: BaseException) -> str | None:
    """One line for an OSError naming a file (the error itself or its cause): the path, what went wrong and what to
    do; None for anything else."""
    import errno
    import shutil

    chain = []
    while err is not None and len(chain) < 6:
        chain.append(err)
        err = err.__cause__ or err.__context__
    os_errors = [e for e in chain if isinstance(e, OSError)]
    err = next((e for e in os_errors if e.filename), None)
    if err is None:
        full = next((e for e in os_errors if e.errno in (errno.ENOSPC, errno.EDQUOT)), None)  # a write names no file
        if full is not None:
            return f"disk full ({full.strerror}); free some space and rerun the same command (finished work is kept)"
        return None
    path = Path(err.filename)
    what = err.strerror or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free / 1e6:.0f} MB free; "
        except OSError:
            free = ""
        return (f"disk full while writing {path} ({free}{what}); free some space and rerun the same command "
                "(finished work is kept)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot access {path} ({what}): fix its permissions, or put the output on writable storage "
                "(--out, --cache-dir, --eval-cache)")
    return f"{path}: {what}"


def _as_written(e: Exception) -> str:
    """An error's line; bad head options named as this command line gives them (``--lambda -1.0``, ``--dropout 2.0``),
    else as ``--head-opt NAME=VALUE``."""
    from mdmf_cache.heads.spec import OptionError, head_opt_flag

    if not isinstance(e, OptionError):
        return str(e)
    from mdmf_cache.sweeps.space import method_of, option_of_field, sweep_options

    args = sys.argv[1:]
    opts = sweep_options(method_of(args))

    def flag(name: str, value: Any) -> str:
        given = option_of_field(name, opts)
        if given and any(a == f"--{given}" or a.startswith(f"--{given}=") for a in args):
            return f"--{given} {value}"
        return head_opt_flag(name, value)

    return e.text(flag)


def main() -> None:
    """Console entry: one clear line for known errors, the traceback only with --debug."""
    from mdmf_cache.process import keep_ctrl_c, skip_the_exit_collection

    keep_ctrl_c()
    skip_the_exit_collection()
    _run_app()


def _run_app() -> None:
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
        typer.secho(f"error: {_as_written(e)}", fg="red", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {_interrupt_text()}", fg="yellow", err=True)
        sys.exit(130)
    except Exception as e:
        if isinstance(e, _click_exceptions()):  # usage errors: click's own message, exit code 2
            e.show()
            sys.exit(e.exit_code)
        if DEBUG["on"]:
            raise
        line = _os_error_line(e)
        if line:  # a file that could not be read or written: its path and what to do
            typer.secho(f"error: {line}", fg="red", err=True)
            sys.exit(2)
        typer.secho(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
