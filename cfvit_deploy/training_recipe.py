"""Training recipes and results: what `cfvit train` runs (TrainRecipe, the demo recipe) and returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch

from .config import ARCHS, SIZES, ModelConfig
from .data.synthetic import SyntheticSpec
from .errors import UsageError
from .model import confidence

#: Top-level checkpoint key of the optimizer/epoch state that `--resume` needs (plain tensors/types).
TRAIN_STATE_KEY = "train_state"


@dataclass(frozen=True)
class TrainRecipe:
    """Model choice and optimisation hyper-parameters of one run (stored in the checkpoint)."""

    arch: str = "deit"
    size: str = "micro"
    coarse_grid: int = 7
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    selection_after: int | None = None  #: dense warm-up epochs; None: two thirds (the paper's 201 of 300)
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    crop_scale: float = 0.5  #: smallest area fraction of the random resized crop
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.size not in SIZES[self.arch]:
            raise UsageError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES[self.arch])}")
        checks = [
            (self.coarse_grid >= 1, f"--coarse-grid must be >= 1, got {self.coarse_grid}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"min lr must lie in [0, lr], got {self.min_lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be >= 0, got {self.warmup_epochs}"),
            (
                self.selection_after is None or self.selection_after >= 0,
                f"--selection-after must be >= 0, got {self.selection_after}",
            ),
            (0 <= self.label_smoothing < 1, f"label smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (0 <= self.drop_path < 1, f"drop path must lie in [0, 1), got {self.drop_path}"),
            (0 < self.crop_scale <= 1, f"crop scale must lie in (0, 1], got {self.crop_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def dense_epochs(self) -> int:
        """Epochs whose fine stage runs on all fine tokens before informative selection starts.

        By default two thirds of the run, but always leaving at least one selection epoch (with
        ``epochs=2`` the second one), so a short run still trains the model that is deployed."""
        if self.selection_after is None:
            return min(math.ceil(2 * self.epochs / 3), self.epochs - 1)
        return self.selection_after

    @property
    def selection_epochs(self) -> int:
        """Epochs trained with the informative selection (0 if ``selection_after >= epochs``)."""
        return max(0, self.epochs - self.dense_epochs)

    def model_config(self, num_classes: int) -> ModelConfig:
        return ModelConfig.named(self.arch, self.size, num_classes=num_classes, coarse_grid=self.coarse_grid)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: The built-in set the demo trains on: 1500 training and 300 validation images, 60% hard.
DEMO_DATA = SyntheticSpec()
#: The demo's recipe: shows fine >> coarse accuracy in a few minutes on 2 CPU cores.
#: crop_scale=1 (translation + flip, no rescaling) keeps the hard images' 1 px patterns intact.
#: Robust since the built-in set's version 5 (issue 23): with every pattern at a random phase (version 4)
#: the loss sat near chance for the first epochs and when it left that plateau depended on float summation
#: order, i.e. on the CPU and thread count (57-95% fine top-1 for this recipe; no lr, warm-up, batch or
#: epoch setting fixed it). Half of the training images now have their pattern aligned to the pixel grid
#: (see cfvit_deploy.data.synthetic), so learning starts at once: fine top-1 95-99% after 8 epochs for
#: every seed and thread count measured (benchmarks/demo_recipe.py, benchmarks/results/demo_recipe/aligned/).
DEMO_RECIPE = TrainRecipe(epochs=8, batch_size=16, lr=2e-3, warmup_epochs=0.3, selection_after=3, crop_scale=1.0)
#: The range the demo promises (issue 23's goal: fine >= 90%, >= 20 points above coarse on every CPU and
#: thread count); `cfvit demo` warns, with what to try, when its model ends below it.
DEMO_EXPECTED_FINE = 0.90
DEMO_EXPECTED_GAP = 0.20
#: What the demo's warning suggests when its model ends below that range.
DEMO_TRY = (
    "try training longer on the same data, the loss is usually still falling at the end "
    "(`cfvit train OUT/data --synthetic --epochs 14 --out model.pth`, "
    "then `cfvit export model.pth`); a rerun repeats the same result (training is deterministic for a CPU and "
    "thread count), so please report the CPU and threads the report names"
)


@dataclass(frozen=True)
class EvalResult:
    """Both stages' logits on a labelled set (the plain forward, informative selection on)."""

    coarse_logits: np.ndarray
    fine_logits: np.ndarray
    labels: np.ndarray

    @property
    def coarse_acc(self) -> float:
        return float((self.coarse_logits.argmax(1) == self.labels).mean())

    @property
    def fine_acc(self) -> float:
        return float((self.fine_logits.argmax(1) == self.labels).mean())

    def at_eta(self, eta: float) -> tuple[float, float]:
        """(accuracy, fraction sent to the fine stage) of the gate at threshold `eta`."""
        conf = confidence(torch.from_numpy(self.coarse_logits)).numpy()
        to_fine = conf < eta
        pred = np.where(to_fine, self.fine_logits.argmax(1), self.coarse_logits.argmax(1))
        return float((pred == self.labels).mean()), float(to_fine.mean())


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    path: Path
    class_names: list[str]
    history: list[dict[str, Any]]
    val: EvalResult
    seconds: float
