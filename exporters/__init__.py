"""PyTorch -> ONNX: the two-graph export, its variants and validation against PyTorch."""

from .onnx_export import export
from .validation import ValidationReport, validate
from .variants import make_variant

__all__ = ["export", "validate", "make_variant", "ValidationReport"]
