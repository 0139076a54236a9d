"""Model configuration (torch-free): everything the model, exporter and runtimes derive from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Arch = Literal["deit", "lvvit"]
ARCHS: tuple[str, ...] = ("deit", "lvvit")

#: Named sizes for `cfvit train --size` (embed_dim, depth, num_heads, mlp_ratio per arch).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "deit": {
        "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4),
        "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
        "micro": dict(embed_dim=48, depth=12, num_heads=3, mlp_ratio=4),
    },
    "lvvit": {
        "tiny": dict(embed_dim=192, depth=16, num_heads=3, mlp_ratio=3.0),
        "small": dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0),
        "micro": dict(embed_dim=48, depth=16, num_heads=3, mlp_ratio=3.0),
    },
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a CF-ViT. Defaults are the official DeiT-S, g=7 model."""

    arch: str = "deit"
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4
    qkv_bias: bool = True
    num_classes: int = 1000
    coarse_grid: int = 7
    alpha: float = 0.5
    beta: float = 0.99
    ema_start: int = 3
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        for name in ("embed_dim", "depth", "num_heads", "num_classes", "coarse_grid", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.ema_start < self.depth:
            raise ValueError(f"ema_start {self.ema_start} must lie in [0, depth={self.depth})")
        if self.coarse_grid < 1 or not 0 < self.alpha <= 1:
            raise ValueError("coarse_grid must be >= 1 and alpha in (0, 1]")

    @classmethod
    def named(cls, arch: str, size: str, **overrides: Any) -> ModelConfig:
        """A config from a named size (`micro`, `tiny`, `small`) of an arch."""
        try:
            base = SIZES[arch][size]
        except KeyError:
            raise ValueError(f"unknown arch/size {arch}/{size}; sizes: {', '.join(SIZES.get(arch, {}))}") from None
        return cls(arch=arch, qkv_bias=(arch == "deit"), **{**base, **overrides})

    # -- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)

    @property
    def layer_norm_eps(self) -> float:
        return 1e-6 if self.arch == "deit" else 1e-5

    @property
    def fine_image_size(self) -> int:
        return 2 * self.coarse_grid * self.patch_size

    @property
    def coarse_image_size(self) -> int:
        return self.coarse_grid * self.patch_size

    @property
    def num_coarse(self) -> int:
        return self.coarse_grid**2

    @property
    def num_fine(self) -> int:
        return 4 * self.num_coarse

    @property
    def k(self) -> int:
        """Number of informative coarse patches, ceil(alpha * g^2)."""
        return math.ceil(self.alpha * self.num_coarse)

    @property
    def fine_seq_len(self) -> int:
        """Tokens in the fine stage: cls + 4k fine + (g^2 - k) coarse."""
        return 1 + 4 * self.k + (self.num_coarse - self.k)

    @property
    def crop_pct(self) -> float:
        return 0.875 if self.arch == "deit" else 0.9

    @property
    def skip_lam(self) -> float:
        return 1.0 if self.arch == "deit" else 2.0

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)
