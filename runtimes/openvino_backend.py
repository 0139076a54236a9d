"""OpenVINO backend: the export's ONNX graphs compiled for the CPU by OpenVINO (optional runtime).

Same interface as :class:`~runtimes.ort_backend.OrtBackend` (:class:`~runtimes.backends.Backend`): ``run(graph, inputs) -> outputs``. The
batch axis stays dynamic. Inference runs in f32 (CPUs with AMX or AVX512-BF16 would otherwise
default to bf16) with ``SessionConfig.threads`` as ``INFERENCE_NUM_THREADS``. Each thread gets its
own infer request, so ``run`` is safe to call from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from cfvit_deploy.errors import ProviderError
from cfvit_deploy.extras import install_hint
from cfvit_deploy.manifest import Manifest

from .backends import DEFAULT_GRAPHS, SessionConfig


class OpenVinoBackend:
    """OpenVINO compiled models for graphs of an export (default: coarse and fine; device "CPU")."""

    def __init__(
        self, manifest: Manifest, config: SessionConfig | None = None, graphs: tuple[str, ...] | None = None
    ) -> None:
        try:  # a ProviderError, not MissingExtraError: bench reports the provider as unavailable
            import openvino as ov
        except ImportError:
            raise ProviderError(f"provider openvino needs the openvino package: {install_hint('openvino')}") from None
        self.name = "openvino-cpu"
        self.provider = "openvino"
        self.manifest = manifest
        self.config = config or SessionConfig()
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.config.effective_threads:
            properties["INFERENCE_NUM_THREADS"] = int(self.config.effective_threads)
        core = ov.Core()
        self.compiled: dict[str, Any] = {}
        for name in graphs or DEFAULT_GRAPHS:
            path = manifest.graph_path(name)
            try:
                self.compiled[name] = core.compile_model(core.read_model(str(path)), "CPU", properties)
            except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
                raise ProviderError(
                    f"OpenVINO cannot compile {path.name}: {str(exc).strip().splitlines()[0]}"
                ) from None
        # a port can carry several tensor names (converters add aliases such as 'graph_input_cast_0'):
        # name each port by the manifest's name for it
        self._outputs = {g: _port_names(m.outputs, manifest.graphs[g].output_names()) for g, m in self.compiled.items()}
        self._inputs = {g: _port_names(m.inputs, manifest.graphs[g].input_names()) for g, m in self.compiled.items()}
        self._local = threading.local()

    @classmethod
    def for_provider(
        cls,
        manifest: Manifest,
        provider: str = "openvino",
        config: SessionConfig | None = None,
        graphs: tuple[str, ...] | None = None,
    ) -> OpenVinoBackend:
        """The factory :data:`runtimes.backends.BACKENDS` names (OpenVINO has one provider, "openvino")."""
        return cls(manifest, config, graphs)

    def _request(self, graph: str) -> Any:
        requests = self._local.__dict__.setdefault("requests", {})
        if graph not in requests:
            requests[graph] = self.compiled[graph].create_infer_request()
        return requests[graph]

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {i: np.ascontiguousarray(inputs[name]) for i, name in enumerate(self._inputs[graph])}
        results = self._request(graph).infer(feeds)  # copies the outputs (share_outputs=False)
        return {name: results[i] for i, name in enumerate(self._outputs[graph])}


def _port_names(ports: Any, declared: list[str]) -> list[str]:
    """The declared (manifest) name of each port, falling back to any of its names."""
    return [next((n for n in declared if n in port.get_names()), port.get_any_name()) for port in ports]
