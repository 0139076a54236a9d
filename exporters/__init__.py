"""PyTorch -> ONNX: the two-graph export, its variants and validation against PyTorch."""

from .export import export
from .validate import ValidationReport, validate
from .variants import make_variant

__all__ = ["export", "validate", "make_variant", "ValidationReport"]
