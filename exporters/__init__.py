"""PyTorch -> ONNX: the two-graph export, its variants and validation against PyTorch.

The names below are imported on first use, so ``import exporters.variants`` (torch-free: onnx and
ONNX Runtime tooling only) does not pull in torch through the export driver.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "export": "onnx_export",
    "validate": "validation",
    "ValidationReport": "validation",
    "make_variant": "variants",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
