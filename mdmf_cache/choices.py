"""The fixed sets of values that options take, declared once (the CLI builds its choices from these).

Head switches (views, conditions, directions, ...) are MDMF's options and live with them in
:mod:`mdmf_cache.heads.mdmf_config`; the trainable methods are the head registry's
(:mod:`mdmf_cache.heads`); the datasets are :data:`mdmf_cache.data.datasets.DATASET_NAMES`.
Nothing here imports torch.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
SAMPLERS = ("tsn", "linspace")  # method.md §3: TSN segments (paper), the released code's linspace
NORMALIZATIONS = ("clip", "none")  # CLIP mean/std (paper), raw [0, 1] pixels (released code)
DECODERS = ("auto", "decord", "pyav", "jpeg")  # auto: a backend that returns the frames asked for, per container
BN_MODES = ("episode", "frozen")  # full mode, RN backbones: per-episode batch statistics, or running ones
MODES = ("fast", "full")  # fast: heads on a cache (CLIP frozen); full: CLIP fine-tuned from the videos
EVAL_PATHS = ("per-video", "direct")
PPS_TEST_RULES = ("sample", "argmax")
BASELINES = ("zero-shot", "protonet")  # training-free baselines scored on a cache (mdmf_cache.baselines); the
# parameter-free heads (otam, tsn) are scored on a cache too: they are registered heads (mdmf_cache.heads)
