"""The backend interface and registry (torch-free): ``run(graph, inputs) -> outputs`` per runtime.

This module holds what every runtime shares: the :class:`Backend` protocol the pipeline needs, the
session settings (:class:`SessionConfig`), the provider names and :func:`create_backend`. Each
implementation lives in its own module, imports only this one, and is found by name in
:data:`BACKENDS` (a module path, imported on first use), so this module never imports an
implementation and an install without OpenVINO never loads its backend:

* :mod:`runtimes.ort_backend` — ONNX Runtime with the CPU, CUDA or TensorRT execution provider,
  with the IOBinding path that keeps the coarse outputs on the device for the fine graph.
* :mod:`runtimes.openvino_backend` — the same graphs compiled by OpenVINO (CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import Manifest

#: User-facing provider names -> ONNX Runtime execution providers ("openvino" is its own runtime).
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDERS = (*ORT_PROVIDERS, "openvino")
#: The graphs a backend loads when none are named: the pair the pipeline runs (baseline.onnx and
#: single.onnx are loaded only by the commands that run them).
DEFAULT_GRAPHS = ("coarse", "fine")


class Backend(Protocol):
    """What the pipeline needs from a runtime."""

    name: str
    manifest: Manifest

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class SessionConfig:
    """Session settings shared by every backend (the same for every runtime compared in bench).

    ``SessionConfig()`` is the measured-fastest threading for the two-session pipeline: one intra-op
    pool per session that spins only while its own graph runs (``spin=True, stop_spinning=True``:
    ONNX Runtime's ``session.force_spinning_stop``), so the idle session's threads never compete with
    the busy one's. It matched the process-wide shared pool and beat sleeping pools by 1.7x at batch 1
    (benchmarks/threading_ab.py, README "Performance"), without the shared pool's process-wide state.
    """

    threads: int | None = None  #: intra-op threads (None: runtime default)
    allow_fallback: bool = False  #: accept a silent fallback to CPU instead of raising
    #: per-session pools: let intra-op threads spin for work between ops (fast op dispatch)
    spin: bool = True
    #: per-session pools: stop spinning as soon as a Run returns (ORT's session.force_spinning_stop),
    #: so a pool spins only while its own graph runs and never against the other session's
    stop_spinning: bool = True
    cache_dir: Path | None = None  #: TensorRT engine/timing caches
    fp16: bool = False  #: TensorRT fp16 kernels
    provider_options: dict[str, Any] = field(default_factory=dict)
    graph_optimization: str = "all"  #: "disable" | "basic" | "extended" | "all"
    #: chain the graphs through IOBinding with device-resident intermediates (None: on for cuda and
    #: tensorrt, off for cpu, where binding only adds overhead; True also runs it on the CPU device)
    io_binding: bool | None = None
    #: all ONNX Runtime sessions of the process share one intra-op pool of `threads` threads (spinning).
    #: Process-wide: once a session uses it, every later session of the process must too, with the same
    #: `threads` (ONNX Runtime cannot mix them), so it is opt-in.
    shared_threads: bool = False

    @property
    def effective_threads(self) -> int | None:
        """`threads`, or where it is None and this process may run on fewer CPUs than the machine has
        (`taskset`, a container's cpuset), that many: a runtime's own default counts the machine's cores
        and would put several spinning threads on one allowed core. None otherwise (the runtime's default)."""
        return self.threads or pinned_cpus()


def pinned_cpus() -> int | None:
    """How many CPUs this process may run on, where that is fewer than the machine has; else None."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity to honour
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None


def check_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    return provider


#: provider -> "module:factory" of its backend; a factory takes (manifest, provider, config, graphs)
BACKENDS: dict[str, str] = {
    **dict.fromkeys(ORT_PROVIDERS, "runtimes.ort_backend:OrtBackend"),
    "openvino": "runtimes.openvino_backend:OpenVinoBackend.for_provider",
}
BackendFactory = Callable[[Manifest, str, SessionConfig | None, tuple[str, ...] | None], Backend]


def backend_factory(provider: str) -> BackendFactory:
    """The factory of `provider`'s backend, its module imported now (the first use)."""
    module_name, _, attribute = BACKENDS[check_provider(provider)].partition(":")
    found: Any = import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found  # type: ignore[no-any-return]


def create_backend(
    manifest: Manifest,
    provider: str = "cpu",
    config: SessionConfig | None = None,
    graphs: tuple[str, ...] | None = None,
) -> Backend:
    """The backend serving `provider` ("cpu", "cuda", "tensorrt" via ONNX Runtime; "openvino").

    `graphs` are the graphs it loads (default :data:`DEFAULT_GRAPHS`).
    """
    return backend_factory(provider)(manifest, provider, config, graphs)


def __getattr__(name: str) -> Any:
    """``runtimes.backends.OrtBackend`` still works (it moved to :mod:`runtimes.ort_backend`)."""
    if name == "OrtBackend":
        return backend_factory("cpu")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
