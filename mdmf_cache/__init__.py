"""mdmf-cache: CLIP-MDMF few-shot action recognition, a CLIP feature cache plus a fast head trainer.

The Python API (docs/python-api.md), with the CLI's defaults::

    import mdmf_cache as mc

    cache = mc.extract(dataset="ucf101", root="~/data/UCF-101", model="RN50", pretrained="openai")
    run = mc.train(cache=cache, out="runs/ucf_rn50")
    run.score(shot=5, episodes=10000).summary()

``import mdmf_cache`` stays light: the functions load torch when first called.
"""

from __future__ import annotations

from mdmf_cache.configs import EvalConfig, ExtractConfig, FullModeConfig, PredictConfig, TrainConfig

_API = ("extract", "open_cache", "load_split", "episode_list", "train", "evaluate", "ablate", "compare", "sweep",
        "predict", "runs", "Run", "load_run", "list_heads")

__all__ = ["ExtractConfig", "TrainConfig", "FullModeConfig", "EvalConfig", "PredictConfig", *_API]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _API:
        from mdmf_cache import api

        return getattr(api, name)
    raise AttributeError(f"module 'mdmf_cache' has no attribute {name!r}")
