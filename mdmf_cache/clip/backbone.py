"""CLIP backbones through open_clip: loading, image and text encoding.

Any open_clip model name works (``RN50``, ``ViT-B-16``, ...) with a pretrained tag that open_clip
downloads when online (``openai``) or a local checkpoint path. Two tiny configs ship in
``mdmf_cache/clip/model_configs`` (``mdmf-tiny-vit``, ``mdmf-tiny-rn``) so tests and the demo run on a CPU
in seconds without downloads; with no pretrained weights they are initialised from a fixed seed,
so their features are reproducible.

open_clip and torch are imported lazily: ``mdmf-cache --help`` must not pay for them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdmf_cache.device import resolve_device
from mdmf_cache.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = ("mdmf-tiny-vit", "mdmf-tiny-rn")
# Random-init seed for models without pretrained weights (the tiny test models).
INIT_SEED = 0


def _open_clip():
    import open_clip

    if not getattr(open_clip, "_mdmf_configs_added", False):
        open_clip.add_model_config(CONFIG_DIR)
        open_clip._mdmf_configs_added = True
    return open_clip


def weights_id(pretrained: str | None) -> str:
    """A fingerprint of the weights: the tag, or ``sha256:...`` of a checkpoint file."""
    if not pretrained:
        return f"random-init-seed{INIT_SEED}"
    path = Path(pretrained)
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"sha256:{h.hexdigest()}"
    return pretrained


def pretrained_slug(pretrained: str | None) -> str:
    """A short, path-safe name for the weights (used in the cache group name)."""
    if not pretrained:
        return "random"
    path = Path(pretrained)
    if path.is_file():
        return path.stem.replace(" ", "_")
    return pretrained.replace("/", "_").replace(":", "_")


@dataclass
class Backbone:
    """A loaded CLIP model with its tokenizer.

    Attributes:
        model: the open_clip model (eval mode, on ``device``).
        tokenizer: open_clip tokenizer (context 77).
        dim: embedding width D.
        device: compute device.
        name: open_clip model name.
        weights: ``weights_id`` of the loaded weights.
    """

    model: Any
    tokenizer: Any
    dim: int
    device: "torch.device"
    name: str
    weights: str

    @property
    def amp_dtype(self) -> "torch.dtype | None":
        """bf16 autocast on CUDA when supported, fp16 otherwise; None (fp32) on CPU."""
        import torch

        if self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def encode_images(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(B, 3, H, W) normalised pixels -> (B, D) float32 image embeddings (not normalised)."""
        import torch

        with torch.no_grad(), torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        ):
            return self.model.encode_image(pixels.to(self.device, non_blocking=True)).float()

    def encode_texts(self, prompts: list[str], batch_size: int = 256) -> "torch.Tensor":
        """Prompts -> (C, D) float32 projected text embeddings (not normalised)."""
        import torch

        out = []
        with torch.no_grad(), torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        ):
            for i in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(prompts[i : i + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        return torch.cat(out).cpu()


def list_models() -> list[str]:
    return _open_clip().list_models()


def load_backbone(name: str, pretrained: str | None = None, device: str = "auto") -> Backbone:
    """Build an open_clip model and load its weights.

    Args:
        name: open_clip model name (``RN50``, ``ViT-B-16``, ``mdmf-tiny-vit``, ...).
        pretrained: pretrained tag (downloaded by open_clip), a local checkpoint path, or None for
            a seeded random init (only sensible for the tiny test models).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...

    Raises:
        ConfigError: unknown model name or unusable weights.
    """
    import torch

    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {name!r}; try one of RN50, ViT-B-16, {', '.join(TINY_MODELS)} "
            "(full list: python -c 'import open_clip; print(open_clip.list_models())')"
        )
    dev = resolve_device(device)
    torch.manual_seed(INIT_SEED)  # reproducible random init for weight-less models
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=dev)
    except Exception as e:  # open_clip raises RuntimeError/HTTP/OSError for unknown tags or offline hubs
        raise ConfigError(
            f"could not load weights {pretrained!r} for {name}: {e}. Check the tag "
            f"(open_clip.list_pretrained_tags_by_model({name!r})), the checkpoint path, or your internet access."
        ) from e
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if not isinstance(dim, int):
        with torch.no_grad():
            dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    return Backbone(model=model, tokenizer=tokenizer, dim=dim, device=dev, name=name, weights=weights_id(pretrained))
