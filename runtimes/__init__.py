"""Torch-free serving: backends (ONNX Runtime, OpenVINO), the gated two-stage pipeline, folder
inference and benchmarking. Heavy or optional pieces are imported on first use."""

from __future__ import annotations

from cfvit_deploy.lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _LAZY)
