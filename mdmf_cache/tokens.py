"""Token arrays of a cache: what ``extract --tokens SPEC`` asks for, how the arrays are named, and what a
head is told about them (:class:`TokenInfo`).

A SPEC names layers, comma-separated, and optionally a grid to average-pool the patches to::

    last          ViT: the last block's 1 + h*w tokens after ln_post and the projection (EMP-Net's x)
    4,8,12        ViT: blocks 4, 8 and 12 (1-based), each after ln_post and the projection (EMP-Net)
    map           RN: the h*w map of the last stage, before attention pooling (channels: the stage's width)
    last@7x7      any of the above with the patch grid average-pooled to 7x7 (a ViT keeps its class token first)

Each layer is one array of a split, ``tokens_<layer>`` ``(N, V, T, P, Dt)`` float16 (P = 1 + h*w with a class
token, h*w without), row-aligned with ``features``. Which layers a backbone can give is the CLIP loader's to
say (:mod:`mdmf_cache.clip.backbone`); this module only reads the text. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mdmf_cache.errors import ConfigError

__all__ = ["TokenSpec", "TokenInfo", "ARRAY_PREFIX", "array_name"]

ARRAY_PREFIX = "tokens_"
_GRID = re.compile(r"^(\d+)x(\d+)$")


def array_name(layer: str) -> str:
    """The split's array holding ``layer``'s tokens: ``tokens_last``, ``tokens_4``, ``tokens_map``."""
    return ARRAY_PREFIX + layer


@dataclass(frozen=True)
class TokenSpec:
    """A parsed ``--tokens`` SPEC.

    Attributes:
        layers: ``"last"``, ``"map"`` or a 1-based ViT block number as text (``"4"``), in the order given.
        grid: (h, w) to average-pool the patch grid to; None keeps the backbone's grid.
    """

    layers: tuple[str, ...]
    grid: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str) -> "TokenSpec":
        """``"4,8,12"``, ``"last@7x7"``, ``"map"`` -> TokenSpec; a ConfigError (one line) for anything else."""
        raw = str(text).strip()
        body, _, grid_text = raw.partition("@")
        grid = None
        if grid_text:
            m = _GRID.match(grid_text.strip())
            if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
                raise ConfigError(f"--tokens {raw}: the grid after @ is HxW with H, W >= 1, e.g. last@7x7")
            grid = (int(m.group(1)), int(m.group(2)))
        layers = tuple(p.strip() for p in body.split(",")) if body.strip() else ()
        if not layers or any(not p for p in layers):
            raise ConfigError(f"--tokens {raw!r}: name one or more layers, e.g. last, 4,8,12 or map")
        for p in layers:
            if p not in ("last", "map") and not (p.isdigit() and int(p) >= 1):
                raise ConfigError(f"--tokens {raw}: {p!r} is not a layer (last, map, or a block number >= 1)")
        if "map" in layers and len(layers) > 1:
            raise ConfigError(f"--tokens {raw}: map (a ResNet's last stage) stands alone")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"--tokens {raw}: a layer is named twice")
        return cls(tuple(str(int(p)) if p.isdigit() else p for p in layers), grid)

    @property
    def text(self) -> str:
        """The canonical SPEC (what ``info`` prints and a config records)."""
        return ",".join(self.layers) + (f"@{self.grid[0]}x{self.grid[1]}" if self.grid else "")

    @property
    def arrays(self) -> tuple[str, ...]:
        return tuple(array_name(p) for p in self.layers)


@dataclass(frozen=True)
class TokenInfo:
    """What a split's token arrays hold (the split's ``tokens`` attribute), as a head is told.

    Attributes:
        spec: the canonical SPEC they were extracted with.
        layers: the layers, in the SPEC's order (L of them).
        grid: (h, w) of the patch grid as stored.
        cls: a class token comes first (ViT); False for a ResNet map.
        dim: Dt, each token's width (D for ViT tokens after the projection; the stage's channels for a map).
    """

    spec: str
    layers: tuple[str, ...]
    grid: tuple[int, int]
    cls: bool
    dim: int

    @property
    def patches(self) -> int:
        """P, tokens per frame: 1 + h*w with a class token, h*w without."""
        return int(self.cls) + self.grid[0] * self.grid[1]

    def to_attrs(self) -> dict:
        return {"spec": self.spec, "layers": list(self.layers), "grid": list(self.grid), "cls": self.cls,
                "dim": self.dim}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "TokenInfo":
        return cls(str(attrs["spec"]), tuple(attrs["layers"]), (int(attrs["grid"][0]), int(attrs["grid"][1])),
                   bool(attrs["cls"]), int(attrs["dim"]))
