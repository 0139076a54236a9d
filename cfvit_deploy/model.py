"""CF-ViT (coarse-to-fine vision transformer) with DeiT and LV-ViT backbones.

The stages are methods shared by PyTorch inference, training and the ONNX exporter:

* :meth:`CFViT.coarse_stage` — image (B, 3, 32g, 32g) -> :class:`CoarseOutput`
* :meth:`CFViT.select` — score (B, g²) -> informative / uninformative coarse indices
* :meth:`CFViT.fine_stage` — image + coarse products + indices -> fine logits

Parameter names equal the original code's, so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
from torch import Tensor, nn

from .checks import check_eta
from .config import ModelConfig
from .layers import (
    Block,
    ConvPatchEmbed,
    ConvStemPatchEmbed,
    Mlp,
    gather_tokens,
    resize_bilinear,
    upsample_tokens_2x,
)


class CoarseOutput(NamedTuple):
    """What the coarse stage hands to the gate and the fine stage."""

    logits: Tensor  #: (B, classes) coarse logits
    score: Tensor  #: (B, g²) EMA class attention of the cls query over the coarse patches
    features: Tensor  #: (B, g², C) final-normed coarse patch tokens (input of the reuse block)
    embedding: Tensor  #: (B, g², C) coarse input tokens: patch embedding + pos_embed_list.0


class CFViTOutput(NamedTuple):
    """Both stages for every image (the original's plain forward)."""

    coarse_logits: Tensor
    fine_logits: Tensor
    score: Tensor
    informative_idx: Tensor
    uninformative_idx: Tensor


class Prediction(NamedTuple):
    """Gated inference: coarse logits where an image exited, fine logits elsewhere."""

    logits: Tensor  #: (B, classes)
    exited: Tensor  #: (B,) bool, True where max softmax(coarse) >= eta
    coarse_logits: Tensor


def fine_indices(informative_idx: Tensor, grid: int) -> Tensor:
    """Fine-grid raster indices of the 2x2 children, ordered [TL all | TR all | BL all | BR all]."""
    col = informative_idx % grid
    tl = 4 * informative_idx - 2 * col
    return torch.cat([tl, tl + 1, tl + 2 * grid, tl + 2 * grid + 1], dim=1)


def confidence(logits: Tensor) -> Tensor:
    """Max softmax probability per image: the gate's confidence."""
    return logits.softmax(dim=-1).max(dim=-1).values


class CFViT(nn.Module):
    """Coarse-to-fine ViT. One class for both backbones (stem, skip scaling and aux head differ)."""

    def __init__(self, config: ModelConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.config = cfg = config
        dim, eps = cfg.embed_dim, cfg.layer_norm_eps
        lvvit = cfg.arch == "lvvit"
        self.patch_embed: nn.Module = ConvStemPatchEmbed(dim) if lvvit else ConvPatchEmbed(dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_list = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, cfg.num_coarse + 1, dim)), nn.Parameter(torch.zeros(1, cfg.num_fine + 1, dim))]
        )
        rates = torch.linspace(0, drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias, eps, cfg.skip_lam, lvvit, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.aux_head = nn.Linear(dim, cfg.num_classes) if lvvit else None
        self.reuse_block = nn.Sequential(nn.LayerNorm(dim, eps=eps), Mlp(dim, cfg.mlp_hidden))
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.cls_token, *self.pos_embed_list):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- shared pieces ----------------------------------------------------------------------------
    def _with_cls(self, patches: Tensor) -> Tensor:
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)

    def _head(self, tokens: Tensor, coarse: bool) -> Tensor:
        """Logits from final-normed tokens (B, N, C). LV-ViT mixes in the max of the aux head."""
        logits = self.head(tokens[:, 0])
        if self.aux_head is None:
            return logits
        aux = self.aux_head(tokens[:, 1:]).max(dim=1).values
        logits = logits + 0.25 * aux
        return logits / 1.25 if coarse else logits

    def _encode(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    # -- stage API --------------------------------------------------------------------------------
    def coarse_stage(self, images: Tensor) -> CoarseOutput:
        """Run the coarse stage on normalized (B, 3, 32g, 32g) images (resized to 16g inside)."""
        cfg = self.config
        coarse = resize_bilinear(images, cfg.coarse_image_size)
        x = self._with_cls(self.patch_embed(coarse)) + self.pos_embed_list[0]
        embedding = x[:, 1:]
        ema: Tensor | None = None
        for i, block in enumerate(self.blocks):
            x, attn = block(x)
            if i >= cfg.ema_start:
                row = attn[:, :, 0, 1:]  # the only part of the map the score uses
                ema = (1 - cfg.beta) * row if ema is None else cfg.beta * ema + (1 - cfg.beta) * row
        assert ema is not None
        x = self.norm(x)
        return CoarseOutput(self._head(x, coarse=True), ema.mean(dim=1), x[:, 1:], embedding)

    def select(self, score: Tensor) -> tuple[Tensor, Tensor]:
        """Descending-score split into k informative and g²-k uninformative coarse indices."""
        order = torch.topk(score, score.shape[1], dim=1, largest=True, sorted=True).indices
        return order[:, : self.config.k], order[:, self.config.k :]

    def fine_tokens(self, images: Tensor, features: Tensor | None) -> Tensor:
        """All fine input tokens E2 = (cls|patches + 0|upsampled reuse) + pos_embed_list.1, (B, 4g²+1, C).

        `features=None` leaves out feature reuse (the plain-ViT baseline).
        """
        x = self._with_cls(self.patch_embed(images))
        if features is not None:
            reuse = upsample_tokens_2x(self.reuse_block(features), self.config.coarse_grid)
            x = x + torch.cat([torch.zeros_like(reuse[:, :1]), reuse], dim=1)
        return x + self.pos_embed_list[1]

    def fine_stage(
        self,
        images: Tensor,
        features: Tensor,
        embedding: Tensor,
        informative_idx: Tensor,
        uninformative_idx: Tensor,
    ) -> Tensor:
        """Fine logits from the sequence [cls | TL | TR | BL | BR of informative | uninformative coarse]."""
        e2 = self.fine_tokens(images, features)
        fine = gather_tokens(e2[:, 1:], fine_indices(informative_idx, self.config.coarse_grid))
        rest = gather_tokens(embedding, uninformative_idx)
        x = torch.cat([e2[:, :1], fine, rest], dim=1)
        return self._head(self._encode(x), coarse=False)

    def fine_stage_dense(self, images: Tensor, features: Tensor | None) -> Tensor:
        """Fine logits on all 4g² fine tokens (training warm-up; `features=None` is the plain ViT)."""
        return self._head(self._encode(self.fine_tokens(images, features)), coarse=False)

    # -- whole-model entry points -----------------------------------------------------------------
    def forward(self, images: Tensor) -> CFViTOutput:
        """Both stages for every image, with informative selection."""
        c = self.coarse_stage(images)
        inf, uninf = self.select(c.score)
        fine = self.fine_stage(images, c.features, c.embedding, inf, uninf)
        return CFViTOutput(c.logits, fine, c.score, inf, uninf)

    @torch.no_grad()
    def predict(self, images: Tensor, eta: float) -> Prediction:
        """The paper's gate: an image exits iff max softmax(coarse) >= eta; the rest run the fine stage."""
        eta = check_eta(eta)  # a UsageError (also a ValueError), worded as everywhere else
        c = self.coarse_stage(images)
        exited = confidence(c.logits) >= eta
        logits = c.logits.clone()
        todo = (~exited).nonzero().squeeze(1)
        if todo.numel():
            inf, uninf = self.select(c.score[todo])
            logits[todo] = self.fine_stage(images[todo], c.features[todo], c.embedding[todo], inf, uninf)
        return Prediction(logits, exited, c.logits)
