"""The CLIP backbone of full mode: which parts train, per-episode BatchNorm, gradient checkpointing.

:class:`FrameEncoder` wraps a whole open_clip ``CLIP`` model (``self.clip``, so its ``state_dict()`` is a
complete CLIP checkpoint) and embeds the frames of a batch of videos, ``(B, T, 3, H, W) -> (B, T, D)``,
in front of the few-shot heads. Its switches:

- ``bn``: ``"episode"`` turns every ``BatchNorm2d`` of the visual tower into :class:`EpisodeBatchNorm2d`,
  so E episodes stacked in one forward pass are normalised with each episode's own statistics and the
  running statistics advance as E single-episode passes would (the paper runs one episode per
  iteration; docs/method.md §8, Batching). ``"frozen"`` keeps every BatchNorm in eval mode (running statistics
  used, never updated); its affine weights still train with their block.
- ``train_last_blocks``: ``None`` trains the whole visual tower, ``0`` freezes it, ``N`` trains the last N
  blocks (:func:`visual_blocks`) and everything after them (ViT: ``ln_post``, ``proj``; ResNet:
  ``attnpool``). Frozen parts have ``requires_grad=False`` and stay in eval mode.
- ``train_text``: the text tower is frozen (the released code never trains it) unless True;
  ``logit_scale`` is never trained (the heads do not use it).
- ``grad_checkpointing``: ViT blocks through open_clip's own switch; ModifiedResNet (where open_clip's
  switch is a no-op) by checkpointing each Bottleneck here. The recomputation in the backward pass
  does not update BatchNorm running statistics a second time.

ViT towers have no BatchNorm; ``bn`` changes nothing there. Under DistributedDataParallel each rank
updates BatchNorm running statistics from its own episodes; :func:`mdmf_cache.distributed.merge_running_stats` makes them
those of one process that ran all ranks' episodes in rank order.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mdmf_cache.device import heads_autocast
from mdmf_cache.errors import ConfigError
from mdmf_cache.fileio import atomic_torch_save
from mdmf_cache.layers.temporal import EpisodeRunningStats

__all__ = ["BN_MODES", "EpisodeBatchNorm2d", "CheckpointedStage", "FrameEncoder", "visual_blocks",
           "no_running_update"]

from mdmf_cache.choices import BN_MODES  # noqa: E402  (declared once)

_state = threading.local()  # per thread: the backward pass may run the recomputation on another thread


@contextlib.contextmanager
def no_running_update():
    """Within this context, :class:`EpisodeBatchNorm2d` normalises with batch statistics as in training
    but leaves its running statistics alone (used for checkpoint recomputation)."""
    previous = getattr(_state, "skip_running", False)
    _state.skip_running = True
    try:
        yield
    finally:
        _state.skip_running = previous


def _recompute_contexts():
    """``checkpoint``'s ``context_fn``: the forward updates running statistics, the recomputation does not."""
    return contextlib.nullcontext(), no_running_update()


class EpisodeBatchNorm2d(EpisodeRunningStats, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are each episode's, over that episode's (B, H, W).

    ``self.episodes`` (E, default 1) is an attribute, set by :class:`FrameEncoder` before a forward pass
    because open_clip's forward cannot pass it. In training mode the input ``(E*B, C, H, W)`` (episode
    major) is normalised per episode by the fused ``F.batch_norm`` kernel (one call per episode, so
    backward keeps one activation per layer, as ``nn.BatchNorm2d`` does) and the running statistics are
    updated exactly as E consecutive single-episode passes would (the closed form of
    :class:`~mdmf_cache.layers.temporal.EpisodeRunningStats`, shared with the heads' BatchNorm1d). With
    E = 1 it computes what ``nn.BatchNorm2d`` does, and in eval mode it is ``nn.BatchNorm2d``; parameters
    and buffers are the same, so state dicts are interchangeable.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.episodes = 1

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "EpisodeBatchNorm2d":
        """A new module holding ``bn``'s own parameter and buffer tensors (not copies)."""
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device="meta")
        for name, p in bn.named_parameters(recurse=False):
            setattr(new, name, p)
        for name, b in bn.named_buffers(recurse=False):
            setattr(new, name, b)
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``(E*B, C, H, W) -> (E*B, C, H, W)``, E = ``self.episodes``."""
        if not self.training and self.track_running_stats:
            return super().forward(x)  # eval: running statistics
        e = self.episodes
        if x.shape[0] % e:
            raise ValueError(f"batch of {x.shape[0]} is not {e} equal episodes")
        # Momentum 1 into zeroed scratch rows: the kernel writes each episode's mean and unbiased variance.
        # The checkpoint recomputation takes this same path (it must save the same tensors), without the update.
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.promote_types(x.dtype, torch.float32)
        stats = torch.zeros(2, e, self.num_features, dtype=dtype, device=x.device)  # (2, E, C)
        out = [F.batch_norm(c, stats[0, i], stats[1, i], self.weight, self.bias, True, 1.0, self.eps)
               for i, c in enumerate(x.split(x.shape[0] // e))]  # E x (B, C, H, W)
        if self.training and self.track_running_stats and not getattr(_state, "skip_running", False):
            self._update_running(stats[0], stats[1])
        if e == 1:
            return out[0]
        return torch.cat(out)  # (E*B, C, H, W)


def _set_episodes(module: nn.Module, episodes: int) -> None:
    """Set ``episodes`` on every :class:`EpisodeBatchNorm2d` and :class:`CheckpointedStage` in ``module``."""
    for m in module.modules():
        if isinstance(m, (EpisodeBatchNorm2d, CheckpointedStage)):
            m.episodes = episodes


class CheckpointedStage(nn.Sequential):
    """A ResNet stage (``nn.Sequential`` of Bottlenecks, same child names, so same state-dict keys) whose
    blocks run under non-reentrant ``torch.utils.checkpoint``.

    The recomputation sets the blocks' ``episodes`` to the value of the forward pass (another forward
    may have changed it before backward) and runs under :func:`no_running_update`, so running
    statistics advance once per forward.
    """

    episodes: int = 1

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C', H', W')``."""
        for block in self:
            trains = x.requires_grad or any(p.requires_grad for p in block.parameters())
            if torch.is_grad_enabled() and trains:
                x = checkpoint(self._run, block, self.episodes, x, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                x = block(x)
        return x

    @staticmethod
    def _run(block: nn.Module, episodes: int, x: Tensor) -> Tensor:
        _set_episodes(block, episodes)
        return block(x)


_RN_STAGES = ("layer1", "layer2", "layer3", "layer4")
# visual-tower parameters before the first block (trained only when the whole tower trains)
_RN_STEM = ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3.")
_VIT_STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patch_dropout.")


def _is_resnet(visual: nn.Module) -> bool:
    return all(hasattr(visual, s) for s in _RN_STAGES) and hasattr(visual, "attnpool")


def _is_vit(visual: nn.Module) -> bool:
    return hasattr(getattr(visual, "transformer", None), "resblocks")


def visual_blocks(visual: nn.Module) -> list[nn.Module]:
    """The blocks of an open_clip visual tower, input to output: ViT resblocks, or the Bottlenecks of
    a ModifiedResNet's layer1..layer4.

    Raises:
        ConfigError: a tower of another kind (timm, HF), which full mode does not fine-tune.
    """
    if _is_resnet(visual):
        return [block for stage in _RN_STAGES for block in getattr(visual, stage)]
    if _is_vit(visual):
        return list(visual.transformer.resblocks)
    raise ConfigError(f"full mode fine-tunes open_clip ViT and ModifiedResNet towers, not {type(visual).__name__}")


class FrameEncoder(nn.Module):
    """The CLIP backbone of full mode: frames in, float32 frame embeddings out.

    Like any ``nn.Module`` it starts in training mode (frozen parts in eval mode, see :meth:`train`).
    On CUDA the towers run under bf16 autocast (``heads_autocast``), on the CPU in float32; outputs
    are float32 either way.

    Args:
        clip: An open_clip ``CLIP`` model (e.g. ``load_backbone(...).model``); kept as ``self.clip``
            and modified in place (BatchNorm swap, ``requires_grad``, checkpointing).
        bn: ``"episode"`` (per-episode batch statistics) or ``"frozen"`` (running statistics, never
            updated); see the module docstring.
        train_last_blocks: None = the whole visual tower trains; 0 = frozen; N = the last N blocks
            and everything after them.
        train_text: Train the text tower too (frozen by default).
        grad_checkpointing: Recompute block activations in backward instead of keeping them.

    Raises:
        ConfigError: an unknown ``bn``, or ``train_last_blocks`` outside 0..number of blocks.
    """

    def __init__(self, clip: nn.Module, bn: str = "episode", train_last_blocks: int | None = None,
                 train_text: bool = False, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if bn not in BN_MODES:
            raise ConfigError(f"backbone BatchNorm mode {bn!r}: choose one of {', '.join(BN_MODES)}")
        visual = getattr(clip, "visual", None)
        if visual is None:
            raise ConfigError(f"{type(clip).__name__} has no visual tower to fine-tune")
        blocks = visual_blocks(visual)
        if train_last_blocks is not None and not 0 <= train_last_blocks <= len(blocks):
            raise ConfigError(f"--train-last-blocks {train_last_blocks}: this visual tower has {len(blocks)} "
                              f"blocks; give 0..{len(blocks)} (0 freezes it; leave it out to train it all)")
        self.clip = clip
        self.bn = bn
        self.train_last_blocks = train_last_blocks
        self.train_text = train_text
        if bn == "episode":
            self._swap_batchnorm(visual)
        self._set_requires_grad(visual_blocks(visual))
        self.grad_checkpointing = False
        self.set_grad_checkpointing(grad_checkpointing)
        self.train()

    @staticmethod
    def _swap_batchnorm(visual: nn.Module) -> None:
        """Replace every ``nn.BatchNorm2d`` of the tower by an :class:`EpisodeBatchNorm2d` on the same tensors."""
        for parent in list(visual.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.BatchNorm2d:
                    setattr(parent, name, EpisodeBatchNorm2d.from_batchnorm(child))

    def _set_requires_grad(self, blocks: list[nn.Module]) -> None:
        visual = self.clip.visual
        n = self.train_last_blocks
        for p in self.clip.parameters():
            p.requires_grad_(False)
        if n is None:
            visual.requires_grad_(True)
        elif n > 0:
            stem = _RN_STEM if _is_resnet(visual) else _VIT_STEM
            in_blocks = {id(p) for b in blocks for p in b.parameters()}
            for name, p in visual.named_parameters():  # everything after the blocks: pooling, projection
                if id(p) not in in_blocks and not name.startswith(stem):
                    p.requires_grad_(True)
            for b in blocks[-n:]:
                b.requires_grad_(True)
        if self.train_text:
            for name, p in self.clip.named_parameters():
                if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                    p.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the visual blocks (and the text tower's, when it trains)."""
        visual = self.clip.visual
        if _is_resnet(visual):
            for name in _RN_STAGES:
                stage = getattr(visual, name)
                if enable != isinstance(stage, CheckpointedStage):
                    new = (CheckpointedStage if enable else nn.Sequential)(OrderedDict(stage.named_children()))
                    setattr(visual, name, new.train(stage.training))
        else:
            visual.set_grad_checkpointing(enable)
        text = enable and self.train_text
        if hasattr(self.clip, "text"):  # CustomTextCLIP
            self.clip.text.set_grad_checkpointing(text)
        elif hasattr(self.clip, "transformer"):
            self.clip.transformer.grad_checkpointing = text
        self.grad_checkpointing = enable

    def train(self, mode: bool = True) -> "FrameEncoder":
        """Set the training mode; frozen parts (and every BatchNorm with ``bn="frozen"``) stay in eval."""
        super().train(mode)
        if mode:
            for m in self.clip.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
            if self.bn == "frozen":
                for m in self.clip.visual.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (for the optimiser's backbone group, ``--backbone-lr``)."""
        return [p for p in self.clip.parameters() if p.requires_grad]

    def forward(self, pixels: Tensor, episodes: int = 1) -> Tensor:
        """``(B, T, 3, H, W)`` normalised frames -> ``(B, T, D)`` float32 embeddings (not normalised).

        Args:
            pixels: B videos of T frames; with E episodes, episode e owns videos e*B/E .. (e+1)*B/E - 1.
            episodes: E, the number of episodes stacked along B (per-episode BatchNorm statistics).
        """
        b, t = pixels.shape[:2]
        if b % episodes:
            raise ValueError(f"batch of {b} videos is not {episodes} equal episodes")
        _set_episodes(self.clip.visual, episodes)
        with heads_autocast(pixels.device):
            z = self.clip.encode_image(pixels.flatten(0, 1))  # (B*T, D), rows episode-major
        return z.float().reshape(b, t, -1)  # (B, T, D)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(C, 77)`` tokens -> ``(C, D)`` float32 text embeddings; with gradients only when the text tower trains."""
        grad = contextlib.nullcontext() if self.train_text else torch.no_grad()
        with grad, heads_autocast(tokens.device):
            return self.clip.encode_text(tokens).float()

    def save_clip(self, path: Path | str) -> Path:
        """Save the CLIP state dict atomically, on the CPU, for ``load_backbone(name, pretrained=path)``
        (``mdmf-cache extract --pretrained path``): the keys are those of the stock model."""
        state = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in self.clip.state_dict().items())
        return atomic_torch_save(state, path)
