"""One thin wrapper module per exported graph, each calling the model's own stage methods."""

from __future__ import annotations

from torch import Tensor, nn

from cfvit_deploy.model import CFViT

COARSE_INPUTS = ["images"]
COARSE_OUTPUTS = ["coarse_logits", "global_attention", "reuse_tokens", "coarse_embedding"]
FINE_INPUTS = ["images", "global_attention", "reuse_tokens", "coarse_embedding"]
FINE_OUTPUTS = ["fine_logits", "informative_idx"]
BASELINE_INPUTS = ["images"]
BASELINE_OUTPUTS = ["logits"]


class CoarseGraph(nn.Module):
    """images -> coarse logits, global class attention, reuse tokens, coarse input embedding."""

    def __init__(self, model: CFViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = self.model.coarse_stage(images)
        return c.logits, c.score, c.features, c.embedding


class FineGraph(nn.Module):
    """images + coarse products -> fine logits and the informative indices (TopK with constant k)."""

    def __init__(self, model: CFViT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: Tensor, global_attention: Tensor, reuse_tokens: Tensor, coarse_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        informative, uninformative = self.model.select(global_attention)
        logits = self.model.fine_stage(images, reuse_tokens, coarse_embedding, informative, uninformative)
        return logits, informative


class BaselineGraph(nn.Module):
    """The plain-ViT reference: all (2g)² fine patches with the fine position embedding, no reuse."""

    def __init__(self, model: CFViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.fine_stage_dense(images, None)
