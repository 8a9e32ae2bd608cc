"""Recipe ``mdmf-cache train``: the heads on a cache (fast mode) or CLIP fine-tuned with them (full mode).

Top to bottom:
    1. the config (:class:`~mdmf_cache.configs.TrainConfig`; ``--config FILE`` merged under the
       options given on the command line);
    2. train (:func:`mdmf_cache.training.run_train`): every input checked before anything is
       written, episodes E at a time, validation on a fixed seeded val list every ``val_every``
       episodes, ``best.pt`` by val accuracy (never test), ``last.pt`` to resume, ``metrics.jsonl``,
       ``curves.png``;
    3. print the best val accuracy and where the checkpoint is.
"""

from __future__ import annotations

from typing import Any

from mdmf_cache.configs import TrainConfig
from mdmf_cache.report import console
from mdmf_cache.training import run_train


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train and print the outcome (rank 0 of a torchrun job); returns :func:`run_train`'s result."""
    res = run_train(cfg)
    if res.get("rank", 0) == 0:
        console.print(f"best val accuracy {res['best_val']:.2f}% after {res['episodes']} episodes "
                      f"({res['episodes_per_s']:.1f} episodes/s); checkpoint {cfg.out}/best.pt")
    return res
