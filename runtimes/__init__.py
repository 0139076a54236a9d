"""Torch-free serving: backends (ONNX Runtime, OpenVINO), the gated two-stage pipeline, folder
inference and benchmarking. Heavy or optional pieces are imported on first use."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CFViTPipeline": "pipeline",
    "PipelineResult": "pipeline",
    "StageTimings": "pipeline",
    "OpenVinoBackend": "openvino_backend",
    "OrtBackend": "ort_backend",
    "SessionConfig": "backends",
    "create_backend": "backends",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
