"""One thin wrapper module per exported graph, each calling the model's own stage methods."""

from __future__ import annotations

from torch import Tensor, nn

from cfvit_deploy.model import CFViT

from .attention import attention_mode

COARSE_INPUTS = ["images"]
COARSE_OUTPUTS = ["coarse_logits", "global_attention", "reuse_tokens", "coarse_embedding"]
FINE_INPUTS = ["images", "global_attention", "reuse_tokens", "coarse_embedding"]
FINE_OUTPUTS = ["fine_logits", "informative_idx"]
BASELINE_INPUTS = ["images"]
BASELINE_OUTPUTS = ["logits"]


class _StageGraph(nn.Module):
    """A graph wrapper: the model's stage methods, traced with `attention` ("fused" or "plain")."""

    def __init__(self, model: CFViT, attention: str = "plain") -> None:
        super().__init__()
        self.model = model
        self.attention = attention


class CoarseGraph(_StageGraph):
    """images -> coarse logits, global class attention, reuse tokens, coarse input embedding."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with attention_mode(self.model, self.attention):
            c = self.model.coarse_stage(images)
        return c.logits, c.score, c.features, c.embedding


class FineGraph(_StageGraph):
    """images + coarse products -> fine logits and the informative indices (TopK with constant k)."""

    def forward(
        self, images: Tensor, global_attention: Tensor, reuse_tokens: Tensor, coarse_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        informative, uninformative = self.model.select(global_attention)
        with attention_mode(self.model, self.attention):
            logits = self.model.fine_stage(images, reuse_tokens, coarse_embedding, informative, uninformative)
        return logits, informative


class BaselineGraph(_StageGraph):
    """The plain-ViT reference: all (2g)² fine patches with the fine position embedding, no reuse."""

    def forward(self, images: Tensor) -> Tensor:
        with attention_mode(self.model, self.attention):
            return self.model.fine_stage_dense(images, None)
