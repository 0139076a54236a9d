"""Transformer building blocks with the original CF-ViT parameter names."""

from __future__ import annotations

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention returning the post-softmax attention maps too.

    `scale_query` reproduces LV-ViT's `(q * scale) @ k^T`; DeiT computes `(q @ k^T) * scale`.
    The explicit softmax is kept (no fused SDPA) because the coarse stage needs the maps.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, scale_query: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.scale_query = scale_query
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.scale_query:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn


class DropPath(nn.Module):
    """Stochastic depth (identity in eval)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-LN transformer block; LV-ViT divides both residual branches by `skip_lam`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool,
        eps: float,
        skip_lam: float,
        scale_query: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, scale_query)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.skip_lam = skip_lam

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x))
        if self.skip_lam == 1.0:
            x = x + self.drop_path(y)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(y) / self.skip_lam
            x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x, attn


class ConvPatchEmbed(nn.Module):
    """DeiT patch embedding: one Conv2d(3, C, 16, stride 16), shared by both resolutions."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStemPatchEmbed(nn.Module):
    """LV-ViT 4-layer stem: 7x7/2 conv-BN-ReLU, two 3x3 conv-BN-ReLU, then an 8x8/8 projection."""

    def __init__(self, dim: int, stem_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_dim, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(stem_dim, dim, kernel_size=8, stride=8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


def resize_bilinear(images: Tensor, size: int) -> Tensor:
    """The original's coarse input: bilinear, align_corners=True resize of the normalized image."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)


def upsample_tokens_2x(tokens: Tensor, grid: int) -> Tensor:
    """(B, g*g, C) raster tokens -> (B, 4*g*g, C): each token copied to its 2x2 fine children.

    Equal to the original's reshape + nearest x2 interpolate + flatten (a pure copy).
    """
    b, _, c = tokens.shape
    t = tokens.reshape(b, grid, 1, grid, 1, c).expand(b, grid, 2, grid, 2, c)
    return t.reshape(b, 4 * grid * grid, c)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, N, C), index (B, M) int64 -> (B, M, C)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
