"""Runtime backends behind one small interface: ``run(graph, inputs) -> outputs`` (torch-free).

* :class:`OrtBackend` — ONNX Runtime with the CPU, CUDA or TensorRT execution provider. After the
  sessions are created it checks that the requested provider is really active (ONNX Runtime falls
  back to CPU silently) and raises :class:`ProviderError` unless fallback was allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cfvit_deploy.errors import ProviderError, UsageError
from cfvit_deploy.manifest import Manifest

#: User-facing provider names -> ONNX Runtime execution providers ("openvino" is its own runtime).
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDERS = (*ORT_PROVIDERS, "openvino")


class Backend(Protocol):
    """What the pipeline needs from a runtime."""

    name: str
    manifest: Manifest

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class SessionConfig:
    """Session settings shared by every backend (the same for every runtime compared in bench)."""

    threads: int | None = None  #: intra-op threads (None: runtime default)
    allow_fallback: bool = False  #: accept a silent fallback to CPU instead of raising
    spin: bool = True  #: let idle worker threads spin (fast back-to-back calls, but burns CPU)
    cache_dir: Path | None = None  #: TensorRT engine/timing caches
    fp16: bool = False  #: TensorRT fp16 kernels
    provider_options: dict[str, Any] = field(default_factory=dict)
    graph_optimization: str = "all"  #: "disable" | "basic" | "extended" | "all"


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    return provider


class OrtBackend:
    """ONNX Runtime sessions for every graph of an export, on one execution provider."""

    def __init__(self, manifest: Manifest, provider: str = "cpu", config: SessionConfig | None = None,
                 graphs: tuple[str, ...] | None = None) -> None:
        import onnxruntime as ort

        check_provider(provider)
        if provider == "openvino":
            raise UsageError("provider 'openvino' is served by OpenVinoBackend, not ONNX Runtime")
        self.name = f"onnxruntime-{provider}"
        self.provider = provider
        self.manifest = manifest
        self.config = config or SessionConfig()
        wanted = ORT_PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted not in available and not self.config.allow_fallback:
            raise ProviderError(
                f"execution provider {provider} ({wanted}) is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); install onnxruntime-gpu with CUDA/TensorRT libraries, "
                "or pass --allow-fallback"
            )
        self.sessions = {
            name: self._session(ort, manifest.graph_path(name), wanted)
            for name in (graphs or tuple(manifest.graphs))
        }
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}

    def _session(self, ort: Any, path: Path, wanted: str) -> Any:
        cfg = self.config
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization]
        if cfg.threads:
            so.intra_op_num_threads = cfg.threads
            so.inter_op_num_threads = 1
        if not cfg.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if wanted != "CPUExecutionProvider" and not cfg.allow_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers: list[Any] = [(wanted, self._provider_options(wanted))]
        if wanted != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if cfg.allow_fallback:
                session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            else:
                raise ProviderError(f"cannot create a {self.provider} session for {path.name}: {exc}") from None
        active = session.get_providers()
        if active[0] != wanted and not cfg.allow_fallback:
            raise ProviderError(
                f"onnxruntime fell back from {wanted} to {active[0]} for {path.name} "
                "(GPU libraries missing?); pass --allow-fallback to accept"
            )
        return session

    def _provider_options(self, wanted: str) -> dict[str, Any]:
        opts: dict[str, Any] = dict(self.config.provider_options)
        if wanted == "TensorrtExecutionProvider":
            cache = Path(self.config.cache_dir or Path.home() / ".cache" / "cfvit-deploy" / "tensorrt")
            cache.mkdir(parents=True, exist_ok=True)
            b, s = 32, self.manifest.image_size
            opts.setdefault("trt_engine_cache_enable", True)
            opts.setdefault("trt_engine_cache_path", str(cache))
            opts.setdefault("trt_timing_cache_enable", True)
            opts.setdefault("trt_timing_cache_path", str(cache))
            opts.setdefault("trt_fp16_enable", self.config.fp16)
            opts.setdefault("trt_layer_norm_fp32_fallback", True)
            opts.setdefault("trt_profile_min_shapes", f"images:1x3x{s}x{s}")
            opts.setdefault("trt_profile_opt_shapes", f"images:{b}x3x{s}x{s}")
            opts.setdefault("trt_profile_max_shapes", f"images:{4 * b}x3x{s}x{s}")
        elif wanted == "CUDAExecutionProvider":
            opts.setdefault("device_id", int(os.environ.get("CFVIT_CUDA_DEVICE", "0")))
        return opts

    @property
    def active_providers(self) -> dict[str, list[str]]:
        return {name: s.get_providers() for name, s in self.sessions.items()}

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: inputs[name] for name in self._inputs[graph]}
        return dict(zip(self._outputs[graph], self.sessions[graph].run(self._outputs[graph], feeds)))


def create_backend(manifest: Manifest, provider: str = "cpu", config: SessionConfig | None = None,
                   graphs: tuple[str, ...] | None = None) -> Backend:
    """The backend serving `provider` ("cpu", "cuda", "tensorrt" via ONNX Runtime; "openvino")."""
    check_provider(provider)
    if provider == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(manifest, config=config, graphs=graphs)
    return OrtBackend(manifest, provider, config, graphs)
