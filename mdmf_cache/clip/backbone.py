"""CLIP backbones through open_clip: loading, image and text encoding.

Any open_clip model name works (``RN50``, ``ViT-B-16``, ...) with a pretrained tag that open_clip
downloads when online (``openai``) or a local checkpoint path. Three tiny configs ship in
``mdmf_cache/clip/model_configs`` (``mdmf-tiny-vit`` with one block, ``mdmf-tiny-vit3`` with three, for
multi-layer ``--tokens``, and ``mdmf-tiny-rn``) so tests and the demo run on a CPU in seconds without
downloads; with no pretrained weights they are initialised from a fixed seed, so their features are
reproducible.

Token arrays (``extract --tokens SPEC``, :mod:`mdmf_cache.tokens`): :meth:`Backbone.encode_with_tokens` runs
open_clip's own ``encode_image`` with forward hooks on the blocks a SPEC names, so the pooled embeddings are
those of :meth:`Backbone.encode_images` bit for bit, and derives the tokens from what the hooks saw. What a
backbone can give is checked by :func:`token_info` (from the model's config, before any weights load) and
:meth:`Backbone.token_info` (from the built model).

open_clip and torch are imported lazily: ``mdmf-cache --help`` must not pay for them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdmf_cache.device import resolve_device
from mdmf_cache.errors import ConfigError
from mdmf_cache.tokens import TokenInfo, TokenSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = ("mdmf-tiny-vit", "mdmf-tiny-vit3", "mdmf-tiny-rn")
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

    def autocast(self):
        """The encoders' mixed precision (:attr:`amp_dtype`; off on a CPU)."""
        import torch

        amp = self.amp_dtype
        return torch.autocast(self.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)

    def encode_images(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(B, 3, H, W) normalised pixels -> (B, D) float32 image embeddings (not normalised)."""
        import torch

        with torch.no_grad(), self.autocast():
            return self.model.encode_image(pixels.to(self.device, non_blocking=True)).float()

    def token_info(self, spec: "TokenSpec | str") -> TokenInfo:
        """What ``spec`` gives on this model (:func:`token_info`, read from the built tower)."""
        return _visual_layout(self.model.visual, self.name).info(_spec(spec))

    def encode_with_tokens(self, pixels: "torch.Tensor", spec: "TokenSpec | str"
                           ) -> tuple["torch.Tensor", list["torch.Tensor"]]:
        """(B, 3, H, W) normalised pixels -> (B, D) float32 pooled embeddings, exactly :meth:`encode_images`'s on the
        same batch, and one (B, P, Dt) float32 token tensor per layer of ``spec``, in its order.

        ViT: the output of each named block (1-based; ``last`` the final one) through ``ln_post`` and ``proj``, all
        1 + h*w tokens, class token first. RN: ``map``, the last stage's (C, h, w) output before attention pooling,
        as h*w tokens of C. With a grid, the h*w patches are adaptive-average-pooled to it (a ViT's class token
        stays first). The hooks only look: ``encode_image`` runs unchanged, so the pooled output is untouched;
        ``ln_post`` and ``proj`` run under the same autocast as the pooled path.
        """
        import torch

        spec = _spec(spec)
        layout = _visual_layout(self.model.visual, self.name)
        layout.info(spec)  # refuses what this tower cannot give, before any work
        modules = layout.modules(spec)
        seen: dict[int, "torch.Tensor"] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out))
                 for k, m in enumerate(modules)]
        try:
            with torch.no_grad(), self.autocast():
                pooled = self.model.encode_image(pixels.to(self.device, non_blocking=True))
                tokens = [layout.tokens(seen[k]) for k in range(len(modules))]
        finally:
            for h in hooks:
                h.remove()
        return pooled.float(), [_pool_grid(t.float(), spec.grid, layout.cls, layout.grid) for t in tokens]

    def encode_texts(self, prompts: list[str], batch_size: int = 256) -> "torch.Tensor":
        """Prompts -> (C, D) float32 projected text embeddings (not normalised)."""
        import torch

        out = []
        with torch.no_grad(), self.autocast():
            for i in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(prompts[i : i + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        return torch.cat(out).cpu()


def _spec(spec: "TokenSpec | str") -> TokenSpec:
    return spec if isinstance(spec, TokenSpec) else TokenSpec.parse(spec)


def _pool_grid(tokens: "torch.Tensor", grid: tuple[int, int] | None, cls: bool, hw: tuple[int, int]) -> "torch.Tensor":
    """(B, P, Dt) tokens with their ``hw`` patches (row-major) adaptive-average-pooled to ``grid`` (None: as they are)."""
    import torch
    import torch.nn.functional as F

    if grid is None:
        return tokens
    head, patches = (tokens[:, :1], tokens[:, 1:]) if cls else (tokens[:, :0], tokens)
    b, _, dt = patches.shape
    pooled = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(b, dt, *hw), grid)  # (B, Dt, gh, gw)
    return torch.cat([head, pooled.flatten(2).transpose(1, 2)], dim=1)  # (B, int(cls) + gh*gw, Dt)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@dataclass(frozen=True)
class _Layout:
    """What a vision tower can give as tokens: ``kind`` vit (``blocks`` resblocks) or rn; the patch ``grid``;
    ``dim`` Dt; the tower itself when built (None when read from a config)."""

    model: str
    kind: str
    blocks: int
    grid: tuple[int, int]
    dim: int
    visual: Any = None

    @property
    def cls(self) -> bool:
        return self.kind == "vit"

    def info(self, spec: TokenSpec) -> TokenInfo:
        """The arrays ``spec`` gives here; a ConfigError (one line) for what this tower cannot give."""
        head = f"--tokens {spec.text} on {self.model}"
        if self.kind == "vit":
            if "map" in spec.layers:
                raise ConfigError(f"{head}: map is a ResNet's last stage; a ViT gives blocks 1..{self.blocks} or last")
            blocks = [self._block(p) for p in spec.layers]
            too_deep = [p for p, b in zip(spec.layers, blocks) if b >= self.blocks]
            if too_deep:
                raise ConfigError(f"{head}: block {too_deep[0]} does not exist; it has {self.blocks} blocks "
                                  f"(1..{self.blocks} or last)")
            if len(set(blocks)) != len(blocks):
                raise ConfigError(f"{head}: last is block {self.blocks}, named twice")
        elif spec.layers != ("map",):
            raise ConfigError(f"{head}: a ResNet gives only map (its last stage before attention pooling), "
                              f"not {', '.join(p for p in spec.layers if p != 'map')}")
        if spec.grid and (spec.grid[0] > self.grid[0] or spec.grid[1] > self.grid[1]):
            raise ConfigError(f"{head}: the grid {spec.grid[0]}x{spec.grid[1]} is larger than the backbone's "
                              f"{self.grid[0]}x{self.grid[1]} patches")
        return TokenInfo(spec.text, spec.layers, spec.grid or self.grid, self.cls, self.dim)

    def _block(self, layer: str) -> int:
        """0-based index of a ViT layer name (``last`` or a 1-based block number)."""
        return self.blocks - 1 if layer == "last" else int(layer) - 1

    def modules(self, spec: TokenSpec) -> list:
        """The modules whose outputs the layers of ``spec`` are, in its order."""
        if self.kind == "vit":
            return [self.visual.transformer.resblocks[self._block(p)] for p in spec.layers]
        return [self.visual.layer4]

    def tokens(self, out: "torch.Tensor") -> "torch.Tensor":
        """A hooked module's output -> (B, P, Dt) tokens, before any grid pooling."""
        v = self.visual
        if self.kind == "rn":  # (B, C, h, w) -> (B, h*w, C), row-major like the ViT's patches
            return out.flatten(2).transpose(1, 2)
        if not getattr(v.transformer, "batch_first", True):
            out = out.transpose(0, 1)  # (P, B, W) -> (B, P, W)
        x = v.ln_post(out)  # per token, as open_clip's pooled path normalises the class token
        return x @ v.proj if v.proj is not None else x


def _visual_layout(visual, model: str) -> _Layout:
    """The :class:`_Layout` of a built open_clip vision tower (open_clip's VisionTransformer or ModifiedResNet)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ConfigError(f"--tokens on {model}: its ViT pools with attention after ln_post (CoCa); the "
                              "token contract reads blocks through ln_post and proj, which this tower does not have")
        dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.transformer.width)
        return _Layout(model, "vit", len(visual.transformer.resblocks), _pair(visual.grid_size), dim, visual)
    if isinstance(visual, ModifiedResNet):
        side = int(visual.image_size) // 32
        return _Layout(model, "rn", 0, (side, side), int(visual.attnpool.k_proj.in_features), visual)
    raise ConfigError(f"--tokens on {model}: its vision tower is a {type(visual).__name__}; tokens come from "
                      "open_clip's VisionTransformer or ModifiedResNet")


def token_info(model: str, spec: "TokenSpec | str") -> TokenInfo | None:
    """What ``spec`` gives on open_clip model ``model``, read from its config (no weights built: checked before
    any heavy work). A ConfigError (one line) for a SPEC the backbone cannot give; None for a model without a
    config to read (an hf-hub name, a timm tower), which is checked once built (:meth:`Backbone.token_info`)."""
    spec = _spec(spec)
    cfg = _open_clip().get_model_config(model) if model in list_models() else None
    vision = (cfg or {}).get("vision_cfg")
    if not vision or vision.get("timm_model_name"):
        return None
    size = _pair(vision.get("image_size", 224))
    layers = vision.get("layers")
    if isinstance(layers, (list, tuple)):  # ModifiedResNet: stride 32, C = width * 32 (8x width, expansion 4)
        layout = _Layout(model, "rn", 0, (size[0] // 32, size[1] // 32), int(vision.get("width", 64)) * 32)
    else:
        if vision.get("attentional_pool"):
            raise ConfigError(f"--tokens on {model}: its ViT pools with attention after ln_post (CoCa); the "
                              "token contract reads blocks through ln_post and proj, which this tower does not have")
        patch = _pair(vision["patch_size"])
        layout = _Layout(model, "vit", int(layers), (size[0] // patch[0], size[1] // patch[1]), int(cfg["embed_dim"]))
    return layout.info(spec)


def list_models() -> list[str]:
    return _open_clip().list_models()


@functools.lru_cache(maxsize=None)
def _tokenizer(name: str):
    """open_clip's tokenizer of a model, built once per process: building CLIP's BPE tables takes 0.15 s, and a
    process may load a backbone many times (extract, then predict or eval of a full run). Its one state is a memo."""
    return _open_clip().get_tokenizer(name)


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
    tokenizer = _tokenizer(name)
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if not isinstance(dim, int):
        with torch.no_grad():
            dim = int(model.encode_text(tokenizer(["x"]).to(dev)).shape[-1])
    return Backbone(model=model, tokenizer=tokenizer, dim=dim, device=dev, name=name, weights=weights_id(pretrained))
