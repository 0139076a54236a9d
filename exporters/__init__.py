"""PyTorch -> ONNX: the two-graph export, its variants and validation against PyTorch.

The names below are imported on first use, so ``import exporters.variants`` (torch-free: onnx and
ONNX Runtime tooling only) does not pull in torch through the export driver.
"""

from __future__ import annotations

from cfvit_deploy.lazy import lazy_getattr

_LAZY = {
    "export": "onnx_export",
    "validate": "validation",
    "ValidationReport": "validation",
    "make_variant": "variants",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
