"""Episode evaluation on in-memory features: accuracy per episode and per class.

The same function scores the trained heads and the training-free baselines, on the same
``Episodes``, so two methods are compared on identical episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .baselines import get_baseline
from .episodes import Episodes, gather, mean_ci
from .store import FeatureSplit

# (support (E,S,T,D), query (E,Q,T,D), text (E,N,D)) -> logits (E,Q,N)
LogitsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class EvalResult:
    """Accuracy over a list of episodes.

    Attributes:
        episode_acc: (E,) fraction of correct queries per episode.
        class_correct / class_total: (C,) per split class, over all queries.
    """

    episode_acc: np.ndarray
    class_correct: np.ndarray
    class_total: np.ndarray

    @property
    def mean(self) -> float:
        return mean_ci(self.episode_acc)[0]

    @property
    def ci95(self) -> float:
        return mean_ci(self.episode_acc)[1]

    def summary(self, classes: list[str] | None = None) -> dict:
        mean, ci = mean_ci(self.episode_acc * 100)
        out = {"accuracy": mean, "ci95": ci, "episodes": int(len(self.episode_acc))}
        if classes is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                per = self.class_correct / self.class_total * 100
            out["per_class"] = {c: (None if self.class_total[i] == 0 else float(per[i])) for i, c in enumerate(classes)}
        return out


@torch.no_grad()
def evaluate_episodes(
    logits_fn: LogitsFn,
    split: FeatureSplit,
    episodes: Episodes,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``episodes`` in batches of ``batch_size`` with ``logits_fn``.

    Args:
        logits_fn: the method, e.g. a model in eval mode wrapped to return its logits.
        split: features on the compute device.
        episodes: the fixed episode list.
        on_batch: called with the number of episodes just scored (progress bars).
    """
    accs: list[torch.Tensor] = []  # per-batch (E,) on the device; one copy to the host at the end
    c = split.num_classes
    correct_c = torch.zeros(c, dtype=torch.float64, device=split.features.device)
    total_c = torch.zeros(c, dtype=torch.float64, device=split.features.device)
    for lo in range(0, len(episodes), batch_size):
        ep = episodes[lo : lo + batch_size]
        support, query, text, labels = gather(split.features, split.text, ep)
        logits = logits_fn(support, query, text)  # (E, Q, N)
        correct = (logits.argmax(dim=-1) == labels).double()  # (E, Q)
        accs.append(correct.mean(dim=1))
        true_cls = torch.as_tensor(ep.classes, device=correct.device).gather(1, labels)  # (E, Q) split class
        correct_c.index_add_(0, true_cls.flatten(), correct.flatten())
        total_c.index_add_(0, true_cls.flatten(), torch.ones_like(correct.flatten()))
        if on_batch:
            on_batch(len(ep))
    acc = torch.cat(accs).cpu().numpy() if accs else np.empty(0, dtype=np.float64)
    return EvalResult(acc, correct_c.cpu().numpy(), total_c.cpu().numpy())


def method_logits(method: str, model=None) -> LogitsFn:
    """``mdmf`` (an eval-mode model's logits) or a baseline name, as a LogitsFn."""
    if method == "mdmf":
        if model is None:
            raise ValueError("method 'mdmf' needs a model")
        return lambda support, query, text: model(support, query, text)["logits"]
    return get_baseline(method)


def score(method: str, split: FeatureSplit, episodes: Episodes, model=None, seed: int = 0, batch_size: int = 500,
          on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Score one method on one episode list with the RNG forked and seeded.

    The reference preset draws PPS classes at test time: seeding makes its scores repeatable, and
    forking keeps a caller's training RNG stream untouched.
    """
    dev = split.features.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return evaluate_episodes(method_logits(method, model), split, episodes, batch_size, on_batch)
