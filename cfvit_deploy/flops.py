"""Analytic multiply-accumulate counts (GMACs, the paper's "FLOPs") per stage (torch-free).

Counted: convolutions, every Linear, the two attention matmuls (N² terms); not counted: norms,
softmax, GELU, additions (as in the paper's numbers, which these reproduce within 3%).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class StageGMACs:
    """GMACs of an image that exits at the coarse stage, and of one that runs both (cumulative)."""

    coarse: float
    fine: float

    def expected(self, fine_fraction: float) -> float:
        """Average GMACs per image when `fine_fraction` of the images go on to the fine stage."""
        return self.coarse + fine_fraction * (self.fine - self.coarse)

    def as_list(self) -> list[float]:
        return [self.coarse, self.fine]


def _patch_embed_macs(cfg: ModelConfig, image_size: int) -> int:
    c = cfg.embed_dim
    if cfg.arch == "deit":
        n = (image_size // cfg.patch_size) ** 2
        return n * c * 3 * cfg.patch_size**2
    stem, half = 64, image_size // 2
    macs = half * half * stem * 3 * 49  # conv1 7x7 stride 2
    macs += 2 * half * half * stem * stem * 9  # conv2, conv3 3x3
    n = (half // 8) ** 2
    return macs + n * c * stem * 64  # proj 8x8 stride 8


def _block_macs(cfg: ModelConfig, n: int) -> int:
    c, h = cfg.embed_dim, cfg.mlp_hidden
    return n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * h


def _heads_macs(cfg: ModelConfig, n_tokens: int) -> int:
    macs = cfg.embed_dim * cfg.num_classes
    if cfg.arch == "lvvit":
        macs += (n_tokens - 1) * cfg.embed_dim * cfg.num_classes
    return macs


def stage_gmacs(cfg: ModelConfig) -> StageGMACs:
    """Per-stage GMACs: [exit at coarse, exit at fine (cumulative)]."""
    n_c = cfg.num_coarse + 1
    coarse = _patch_embed_macs(cfg, cfg.coarse_image_size) + cfg.depth * _block_macs(cfg, n_c)
    coarse += _heads_macs(cfg, n_c)
    n_f = cfg.fine_seq_len
    reuse = cfg.num_coarse * 2 * cfg.embed_dim * cfg.mlp_hidden
    fine = _patch_embed_macs(cfg, cfg.fine_image_size) + reuse + cfg.depth * _block_macs(cfg, n_f)
    fine += _heads_macs(cfg, n_f)
    return StageGMACs(coarse / 1e9, (coarse + fine) / 1e9)


def baseline_gmacs(cfg: ModelConfig) -> float:
    """GMACs of the plain ViT on all (2g)² fine patches (the no-coarse-to-fine reference)."""
    n = cfg.num_fine + 1
    macs = _patch_embed_macs(cfg, cfg.fine_image_size) + cfg.depth * _block_macs(cfg, n) + _heads_macs(cfg, n)
    return macs / 1e9
