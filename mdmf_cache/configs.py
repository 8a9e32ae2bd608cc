"""The configs of extraction, training and evaluation: every default is defined here, once.

One dataclass per task, saved beside its outputs (the cache's ``config`` attribute, a run's
``config.json``, an evaluation's ``eval_config.json``). The CLI reads its defaults from these
classes and this module imports neither torch nor open_clip, so ``mdmf-cache --help`` stays instant.

:class:`VideoOptions` holds what ``extract`` and ``train --mode full`` share (the videos and how
they become frame embeddings), under the same names in both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdmf_cache.choices import (BASELINES, BN_MODES, DECODERS, EVAL_PATHS, MODES, NORMALIZATIONS, PPS_TEST_RULES,
                                SAMPLERS, SPLITS)
from mdmf_cache import heads
from mdmf_cache.data.datasets import DATASET_NAMES, DATASETS
from mdmf_cache.errors import ConfigError
from mdmf_cache.heads.mdmf_config import PRESET_DATA
from mdmf_cache.heads.spec import DataInfo
from mdmf_cache.tokens import TokenInfo, TokenSpec

__all__ = ["VideoOptions", "ExtractConfig", "FullModeConfig", "TrainConfig", "EvalConfig", "PredictConfig",
           "default_workers", "FAST_LR", "FULL_LR", "EVAL_QUERIES", "TOKEN_CACHE_MB"]

#: Adam's learning rate when none is given. Fast mode trains the heads alone, which want far more than the
#: paper's 1e-5 (docs/measurements.md); full mode fine-tunes CLIP with them at the paper's value.
FAST_LR = 1e-4
FULL_LR = 1e-5

#: ``eval``'s queries per class when ``--queries-per-class`` is not given and the head is not transductive (a
#: transductive head is scored with its released test queries, ``SPEC.test_queries(K)``: docs/evaluation.md).
EVAL_QUERIES = 1

#: A token head's token reader (:mod:`mdmf_cache.store.tokens`): MiB of decoded token rows it keeps per split it
#: reads (``--token-cache-mb``), whatever the split's size. 1 GiB holds ~650 ViT-B/16 ``last`` rows of T = 8 frames.
TOKEN_CACHE_MB = 1024


def default_workers() -> int:
    """Decoder processes by default: half the cores, at most 8 (each also runs decord's decode thread)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class VideoOptions:
    """The videos and how they become frame embeddings (``extract`` and ``train --mode full``)."""

    dataset: str = "ucf101"  # ucf101 | hmdb51 | kinetics100 | ssv2-small | ssv2-full | folder
    root: str | None = None  # the video tree
    splits_dir: str | None = None  # split-file folder; None: the split files shipped with the package
    labels: str | None = None  # SSv2-Full labels.json (default: looked for beside root)
    model: str = "RN50"  # open_clip name
    pretrained: str | None = "openai"  # tag, checkpoint path, or None (seeded random init)
    num_frames: int = 8  # T
    sampler: str | None = None  # tsn | linspace; None: the preset's
    normalize: str | None = None  # clip | none; None: the preset's
    flip: bool = True  # train views / episodes: every dataset, SSv2 included, as the paper and the released code
    prompt_template: str = "a photo of {}"
    clean_names: bool = False
    decoder: str = "auto"
    workers: int = field(default_factory=default_workers)  # decoder processes (per rank)

    def video_problems(self) -> list[str]:
        """What is wrong with these options (empty when nothing is)."""
        problems = []
        if self.sampler is not None and self.sampler not in SAMPLERS:
            problems.append(f"--sampler {self.sampler!r} (choose {', '.join(SAMPLERS)})")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            problems.append(f"--normalize {self.normalize!r} (choose {', '.join(NORMALIZATIONS)})")
        if self.decoder not in DECODERS:
            problems.append(f"--decoder {self.decoder!r} (choose {', '.join(DECODERS)})")
        if self.num_frames < 1:
            problems.append(f"--num-frames {self.num_frames}: must be >= 1")
        if self.workers < 0:
            problems.append(f"--workers {self.workers}: must be >= 0 (0 decodes in this process)")
        if "{}" not in self.prompt_template:
            problems.append(f"--prompt {self.prompt_template!r} needs a '{{}}' for the class name")
        if self.labels and not (DATASETS.get(self.dataset) and DATASETS[self.dataset].numeric_labels):
            problems.append("--labels names SSv2-Full's label ids; other datasets take names from the split files")
        return problems


@dataclass
class ExtractConfig(VideoOptions):
    """Everything that decides what ``extract`` computes (saved in the cache's attributes).

    ``sampler`` and ``normalize`` left at None take the ``preset``'s (docs/method.md §9), so a saved config
    always names the values used.
    """

    preset: str = "paper"  # paper: TSN + CLIP mean/std; reference: linspace + [0, 1] pixels
    cache_dir: str = "cache"
    name: str | None = None  # cache group dataset name (default: dataset, or the folder's name)
    train_views: int = 1  # V for the train split
    seed: int = 0
    batch_videos: int = 8
    chunk_rows: int = 64
    flush_seconds: float = 30.0
    device: str = "auto"
    splits: tuple[str, ...] = SPLITS
    overwrite: bool = False
    strict: bool = False
    verify_deep: bool = False  # read every feature chunk before extracting (default: those changed since the last clean verify)
    retry_failed: bool = False  # decode failed videos again even if their files did not change
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    way: int = 5  # a folder split with fewer val/test classes than this is warned about
    # token arrays (mdmf_cache.tokens): a SPEC such as last, 4,8,12, map or last@7x7; None: those the cache has
    tokens: str | None = None

    def __post_init__(self) -> None:
        data = PRESET_DATA.get(self.preset)
        if data is not None:
            self.sampler = self.sampler or data["sampler"]
            self.normalize = self.normalize or data["normalize"]

    def validate(self) -> None:
        problems = self.video_problems()
        if self.preset not in PRESET_DATA:
            problems.append(f"--preset {self.preset!r} (choose {', '.join(PRESET_DATA)})")
        if self.train_views < 1 or self.batch_videos < 1 or self.chunk_rows < 1:
            problems.append("--train-views, --batch-videos and --chunk-rows must be >= 1")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            problems.append(f"--split {bad[0]!r} (choose {', '.join(SPLITS)})")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank {self.rank} outside world size {self.world_size}")
        if self.seed < 0:
            problems.append(f"--seed {self.seed}: must be >= 0")
        if self.root is None:
            problems.append("--root DIR (the video tree) is required")
        if self.tokens is not None:
            try:
                TokenSpec.parse(self.tokens)
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("bad options: " + "; ".join(problems))

    @property
    def cache_name(self) -> str:
        if self.name:
            return self.name
        if self.dataset == "folder" and self.root:
            return Path(self.root).resolve().name
        return self.dataset


@dataclass
class FullModeConfig(VideoOptions):
    """Full mode's data and backbone (``TrainConfig.full``); the data options keep ``extract``'s names."""

    backbone_lr: float | None = None  # None: TrainConfig.lr (the paper: 1e-5 for all)
    train_text: bool = False  # the released code never trains the text tower
    train_last_blocks: int | None = None  # None: the whole visual tower; 0: frozen; N: the last N blocks
    backbone_bn: str = "episode"  # RN BatchNorm: episode (per-episode batch statistics) | frozen
    grad_checkpointing: bool = False
    episodes_per_forward: int = 1  # episodes in one forward pass (the paper: 1)
    init_heads: str | None = None  # a run (fast or full) whose best.pt heads start this one (linear probe, then fine-tune)

    def validate(self) -> list[str]:
        problems = self.video_problems()
        if self.dataset not in DATASET_NAMES:
            path = Path(self.dataset)
            if self.dataset.endswith(".zarr") or (path / "zarr.json").is_file():
                problems.append(f"{self.dataset} is a cache: full mode fine-tunes CLIP on the videos, so it takes a "
                                f"dataset ({', '.join(DATASET_NAMES)}) and --root; train on a cache with --mode fast")
            else:
                problems.append(f"full mode: unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
        if not self.root:
            problems.append("full mode needs --root DIR (the video tree)")
        if self.episodes_per_forward < 1:
            problems.append("--episodes-per-forward must be >= 1")
        if self.backbone_bn not in BN_MODES:
            problems.append(f"--backbone-bn {self.backbone_bn!r}: choose {' or '.join(BN_MODES)}")
        if self.backbone_lr is not None and not (math.isfinite(self.backbone_lr) and self.backbone_lr > 0):
            problems.append(f"--backbone-lr {self.backbone_lr}: must be a finite number > 0")
        if self.init_heads and not (Path(self.init_heads) / "best.pt").is_file():
            problems.append(f"--init-heads {self.init_heads}: no best.pt there (a run directory of mdmf-cache train)")
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            problems.append(f"--train-last-blocks {self.train_last_blocks}: must be >= 0 (0 freezes the backbone)")
        return problems

    def extract_config(self, preset: str, seed: int, device: str, **overrides: Any) -> ExtractConfig:
        """The :class:`ExtractConfig` of these videos (decoding, sampling, pixels, prompts), with ``overrides``
        (e.g. ``pretrained=run/backbone.pt``) applied."""
        video = {f.name: getattr(self, f.name) for f in dataclasses.fields(VideoOptions)}
        return ExtractConfig(**{**video, "preset": preset if preset in PRESET_DATA else "paper", "seed": seed,
                                "device": device, **overrides})


#: What ``--tensorboard`` says when the optional ``tensorboard`` package is not installed.
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package, an optional extra: pip install "
                       "'mdmf-cache[tensorboard]'")


def tensorboard_installed() -> bool:
    """Whether ``tensorboard`` imports (``torch.utils.tensorboard`` writes its event files with it)."""
    try:
        import tensorboard  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def assumed_tokens(spec: str | None, width: int) -> TokenInfo | None:
    """What a head's released SPEC gives on ViT-B/16 (its layers, a 14x14 grid unless the SPEC pools, a class
    token unless ``map``, width D): what a token head's options are checked against before any cache is read.
    None for a head of pooled features."""
    if not spec:
        return None
    parsed = TokenSpec.parse(spec)
    return TokenInfo(parsed.text, parsed.layers, parsed.grid or (14, 14), "map" not in parsed.layers, width)


@dataclass
class TrainConfig:
    """Training, both modes; saved as ``config.json`` beside the checkpoints."""

    cache: str = ""  # fast mode's input
    out: str = "runs/fast"
    mode: str = "fast"  # fast (CLIP frozen, cache) | full (CLIP fine-tuned, videos: see ``full``)
    method: str = "mdmf"  # a registered head (mdmf_cache.heads): mdmf, clip-fsar, ...
    preset: str | None = None  # the head's named option set; None: its default (mdmf: paper)
    heads: dict[str, Any] = field(default_factory=dict)  # the head's option overrides (ablation switches)
    way: int = 5
    shot: int = 5  # K the run is for: validation episodes, best.pt, eval's default
    train_shot: int | None = None  # K of the training episodes; None: the head's released choice (CLIP-FSAR: 1)
    train_queries: int | None = None  # per class in training episodes; None: the head's released choice (5 mostly)
    episodes: int = 10000  # training episodes in total
    episodes_per_step: int = 16  # E per optimiser step (full mode: accumulated, split between ranks)
    lr: float | None = None  # Adam; None: FAST_LR in fast mode, FULL_LR (the paper's) in full mode
    weight_decay: float = 0.0
    val_every: int = 1000  # episodes
    val_episodes: int = 500
    val_queries: int = 1
    save_every: int = 0  # episodes between extra last.pt saves (0: at validations only; full mode's steps are slow)
    keep_checkpoints: bool = False  # also keep the heads of every validation: checkpoints/ep{episodes:07d}.pt (fast mode)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    tensorboard: bool = False  # also write metrics.jsonl's scalars as TensorBoard events in OUT/tensorboard/
    token_cache_mb: int = TOKEN_CACHE_MB  # a token head's: MiB of token rows kept in memory per split (train, val)
    full: dict[str, Any] = field(default_factory=dict)  # FullModeConfig fields (mode=full)

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = FULL_LR if self.mode == "full" else FAST_LR

    @property
    def full_mode(self) -> FullModeConfig:
        return FullModeConfig(**self.full)

    def resolved(self) -> "TrainConfig":
        """A copy with the head's defaults filled in: its preset, training shot and queries for ``shot``.

        Raises:
            ConfigError: an unknown method (the registered ones listed).
        """
        spec = heads.get(self.method)
        return dataclasses.replace(
            self, preset=self.preset or spec.default_preset,
            train_shot=self.train_shot if self.train_shot is not None else spec.train_shot(self.shot),
            train_queries=self.train_queries if self.train_queries is not None else spec.train_queries(self.shot))

    def validate(self) -> None:
        """Every option checked, the head's included, before any work (nothing is read or written)."""
        r = self.resolved()
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: choose fast (heads on a cache) or full (CLIP fine-tuned)")
        for name in ("shot", "train_shot", "train_queries", "episodes", "episodes_per_step", "val_every", "val_episodes",
                     "val_queries"):
            if getattr(r, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.save_every < 0:
            problems.append("--save-every must be >= 0 (0: save at validations only)")
        if self.seed < 0:
            problems.append(f"--seed {self.seed}: must be >= 0")
        if self.way < 2:
            problems.append(f"--way {self.way}: an episode needs at least 2 classes")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr {self.lr}: must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay {self.weight_decay}: must be a finite number >= 0")
        if self.mode == "full":
            unknown = sorted(set(self.full) - {f.name for f in dataclasses.fields(FullModeConfig)})
            if unknown:
                problems.append(f"unknown full-mode field(s) {', '.join(unknown)}")
            else:
                problems += self.full_mode.validate()
        elif self.full:
            problems.append("video and backbone options (--root, --model, --backbone-lr, ...) are for --mode full; "
                            "fast mode reads a cache")
        if self.mode == "full" and self.keep_checkpoints:
            problems.append("--keep-checkpoints keeps the heads of every validation, which a full-mode run's heads "
                            "cannot be scored without (their backbone is fine-tuned with them): fast mode only")
        if self.mode == "fast" and not heads.REGISTRY[self.method].parametric:
            problems.append(f"{self.method} has no trainable parameters: nothing to train on a frozen cache; score it "
                            f"with mdmf-cache eval CACHE --method {self.method}, or fine-tune CLIP with it (--mode full)")
        if self.tensorboard and not tensorboard_installed():
            problems.append(TENSORBOARD_MISSING)
        if self.token_cache_mb < 0:
            problems.append(f"--token-cache-mb {self.token_cache_mb}: must be >= 0 (MiB of token rows kept in memory)")
        spec = heads.get(self.method)
        if self.mode == "full" and spec.tokens:
            problems.append(f"{self.method} reads cached tokens with CLIP frozen (as released): train it in fast mode "
                            f"on a cache with token arrays (mdmf-cache extract ... --tokens {spec.tokens}; mdmf-cache "
                            "train CACHE)")
        if problems:
            raise ConfigError("; ".join(problems))
        # every head switch, before any work (an ablation arm's bad --view fails here, not after training);
        # the width is the cache's, unknown here: any multiple of the attention heads checks the rest
        attn = self.heads.get("heads", 8)
        width = 64 * attn if isinstance(attn, int) and attn > 0 else 512
        spec.make_options(r.preset, self.heads, DataInfo(dim=width, shot=self.shot, tokens=assumed_tokens(spec.tokens, width)))


@dataclass
class EvalConfig:
    """Evaluation settings; saved as ``eval_config.json`` beside the results."""

    target: str = ""  # a run directory (its trained head) or a cache group (baselines)
    method: str = "run"  # run = the head the run was trained with; or a baseline
    split: str = "test"
    way: int = 5
    shots: tuple[int, ...] | None = None  # default: the run's training shot; baselines 1, 3, 5
    episodes: int = 10000
    queries_per_class: int | None = None  # None: a transductive head's released test queries (SPEC.test_queries(K)), else EVAL_QUERIES
    seed: int = 0
    batch_size: int = 500
    out: str | None = None  # default: <run>/eval_<method>_<split> or <cache-parent>/eval_<cache>_<method>_<split>
    device: str = "auto"
    path: str = "per-video"  # trained heads: per-video (fast) or direct (the reference path)
    pps_test: str | None = None  # MDMF: override the run's PPS rule at test (sample | argmax)
    cache: str | None = None  # a run's cache at another path (moved); checked against the run's record
    root: str | None = None  # a full-mode run's video tree at another path (moved)
    eval_cache: str | None = None  # where a full-mode run's split is extracted with its backbone (default RUN/eval_cache)
    token_cache_mb: int = TOKEN_CACHE_MB  # a token head's: MiB of the split's token rows kept in memory

    def validate(self) -> None:
        METHODS = ("run", *heads.METHODS, *BASELINES)  # what eval scores: a run's head, a registered head, a baseline

        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.split not in SPLITS:
            raise ConfigError(f"--split {self.split!r}: choose {', '.join(SPLITS)}")
        if (self.shots is not None and (not self.shots or min(self.shots) < 1)) or self.episodes < 1 \
                or self.way < 2 or (self.queries_per_class is not None and self.queries_per_class < 1):
            raise ConfigError("--shot values, --episodes and --queries-per-class must be >= 1 and --way >= 2")
        if self.path not in EVAL_PATHS:
            raise ConfigError(f"--path {self.path!r}: choose {' or '.join(EVAL_PATHS)}")
        if self.token_cache_mb < 0:
            raise ConfigError(f"--token-cache-mb {self.token_cache_mb}: must be >= 0 (MiB of token rows kept in memory)")
        if self.pps_test not in (None, *PPS_TEST_RULES):
            raise ConfigError(f"--pps-test {self.pps_test!r}: choose {' or '.join(PPS_TEST_RULES)}")
        if self.seed < 0 or self.batch_size < 1:
            raise ConfigError(f"--seed {self.seed} must be >= 0 and the batch size {self.batch_size} >= 1")

    def queries_for(self, method: str, shot: int) -> int:
        """The queries per class of ``method``'s K-shot episodes (the one place this is decided): ``--queries-per-class``
        when given; else a transductive head's released test queries (``SPEC.test_queries(shot)``: its query's logits
        depend on the episode's other queries, so its accuracy depends on how many there are); else
        :data:`EVAL_QUERIES`. ``method`` is what is scored (a run's own head, not ``run``)."""
        if self.queries_per_class is not None:
            return self.queries_per_class
        if method in heads.METHODS:
            spec = heads.get(method)
            if spec.transductive and spec.test_queries is not None:
                return int(spec.test_queries(shot))
        return EVAL_QUERIES


@dataclass
class PredictConfig:
    """``mdmf-cache predict``: label new videos with a trained run and a few labelled supports per class;
    saved as ``predict_config.json`` beside ``predictions.csv`` (docs/predict.md)."""

    run: str = ""  # a run directory of mdmf-cache train (fast or full mode)
    support: str = ""  # SUPPORT/<class>/<video>: videos or JPEG frame folders, a few per class
    query: tuple[str, ...] = ()  # folders (searched recursively) and/or video files to label
    out: str | None = None  # default: RUN/predict
    cache_dir: str | None = None  # the features of support and query videos; default: RUN/predict_cache
    shot: int | None = None  # K supports per class and pass; None: the smallest class's count
    subsets: int = 10  # K-subsets averaged when some class has more than K supports (seeded)
    pps_test: str = "argmax"  # MDMF's prompt selector at prediction: argmax | sample (a draw seeded per query)
    seed: int = 0  # the subsets and the PPS draws
    batch_size: int = 128  # queries scored per forward pass
    token_cache_mb: int = TOKEN_CACHE_MB  # a token head's: MiB of the videos' token rows kept in memory
    weights: str | None = None  # the backbone checkpoint, if the recorded one moved (checked by its sha256)
    cache: str | None = None  # a fast run's cache, if it moved (only its fingerprint is read)
    workers: int = field(default_factory=default_workers)  # decoder processes
    device: str = "auto"
    show: int = 10  # queries shown in the printed table

    def validate(self) -> None:
        problems = []
        if not self.run:
            problems.append("RUN (a run directory) is required")
        if not self.support:
            problems.append("--support DIR is required")
        if not self.query:
            problems.append("--query DIR_OR_FILE is required (repeatable)")
        if self.shot is not None and self.shot < 1:
            problems.append(f"--shot {self.shot}: must be >= 1")
        if self.subsets < 1 or self.batch_size < 1:
            problems.append("--subsets and --batch-size must be >= 1")
        if self.token_cache_mb < 0:
            problems.append(f"--token-cache-mb {self.token_cache_mb}: must be >= 0 (MiB of token rows kept in memory)")
        if self.workers < 0:
            problems.append(f"--workers {self.workers}: must be >= 0 (0 decodes in this process)")
        if self.pps_test not in PPS_TEST_RULES:
            problems.append(f"--pps-test {self.pps_test!r}: choose {' or '.join(PPS_TEST_RULES)}")
        if self.show < 0:
            problems.append(f"--show {self.show}: must be >= 0")
        if problems:
            raise ConfigError("bad options: " + "; ".join(problems))


def load_config(path: Path | str) -> TrainConfig:
    """A TrainConfig from a run's ``config.json`` or a sweep's ``best.json`` (``mdmf-cache train --config``).

    Raises:
        ConfigError: the file is not JSON, or a field is unknown or of the wrong type (named).
    """
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: cannot read a JSON config ({e})") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path}: a JSON object of TrainConfig fields is expected, not a {type(saved).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known - {"resolved_heads", "sweep", "cache_abs", "cache_identity", "backbone_weights",
                                           "resolved_data", "video_identity"})  # notes
    if unknown:
        raise ConfigError(f"--config {path}: unknown TrainConfig field(s) {', '.join(unknown)}")
    values = {k: v for k, v in saved.items() if k in known}
    problems = field_type_problems(TrainConfig, values)
    if isinstance(values.get("full"), dict):
        problems += [f"full.{p}" for p in field_type_problems(FullModeConfig, values["full"])]
    if problems:
        raise ConfigError(f"--config {path}: {'; '.join(problems)}")
    return TrainConfig(**values)


def _allowed_types(hint: Any) -> list[type]:
    """The plain types a type hint allows (``int | None`` -> [int, NoneType]; ``dict[str, Any]`` -> [dict])."""
    import types
    from typing import Union, get_args, get_origin

    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return [t for a in get_args(hint) for t in _allowed_types(a)]
    return [origin or hint]


def field_type_problems(cls: type, values: dict[str, Any]) -> list[str]:
    """``field 'name' must be T, got V`` for each value that does not fit its dataclass field's type
    (an int is a float too; a bool is neither an int nor a float; a JSON list is a tuple)."""
    from typing import get_type_hints

    hints = get_type_hints(cls)
    accepts = {int: (int,), float: (int, float), tuple: (list, tuple), list: (list, tuple)}
    out = []
    for name, value in values.items():
        if name not in hints:
            continue
        allowed = _allowed_types(hints[name])
        if Any in allowed or object in allowed:
            continue
        ok = any(isinstance(value, accepts.get(t, (t,))) for t in allowed)
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        if not ok:
            want = " or ".join(getattr(t, "__name__", str(t)).replace("NoneType", "null") for t in allowed)
            out.append(f"field {name!r} must be {want}, got {json.dumps(value)}")
    return out
