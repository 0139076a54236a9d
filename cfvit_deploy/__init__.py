"""cfvit-deploy: CF-ViT from PyTorch to production (two ONNX graphs and a gated orchestrator).

Torch-free modules (config, manifest, preprocessing, errors, io) import eagerly; the torch parts
(`load_checkpoint`, `CFViT`, ...) are loaded on first attribute access so that `import cfvit_deploy`
stays cheap and works on an inference-only install.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import CFViTError, CheckpointError, ManifestError, UsageError
from .lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "CFViT": "model",
    "CFViTOutput": "model",
    "CoarseOutput": "model",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    "stage_gmacs": "flops",
    "train": "training",
    "TrainRecipe": "training",
    "make_synthetic_dataset": "data.synthetic",
}

__all__ = ["ModelConfig", "CFViTError", "CheckpointError", "ManifestError", "UsageError", "__version__", *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY)
