"""ONNX Runtime backend: the graphs of an export as sessions on the CPU, CUDA or TensorRT provider.

After the sessions are created it checks that the requested provider is really active (ONNX Runtime
falls back to CPU silently) and raises :class:`ProviderError` unless fallback was allowed. It also
offers the IOBinding path (:meth:`OrtBackend.run_bound`, :meth:`OrtBackend.take`) that keeps the
coarse outputs on the device for the fine graph: on by default for CUDA and TensorRT, and available
on the CPU device with ``SessionConfig(io_binding=True)`` (so the tests exercise it without a GPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.errors import ProviderError, UsageError
from cfvit_deploy.manifest import Manifest

from .backends import DEFAULT_GRAPHS, ORT_PROVIDERS, SessionConfig, check_provider
from .take_graph import ROWS, output_name, take_rows_model

_shared_pool: list[int] = []  #: the size the process-wide ONNX Runtime pool was created with


def _use_shared_pool(shared: bool, threads: int | None) -> bool:
    """Whether a new session runs on the process-wide intra-op pool (created here on first use).

    ONNX Runtime cannot mix the two kinds in one process: once the global pool exists, every session
    must use it (a session with its own pool, or a pool of another size, is a :class:`UsageError`).
    """
    from onnxruntime.capi import _pybind_state

    size = threads or 0
    if not shared:
        if _shared_pool:
            raise UsageError(
                "this process already runs ONNX Runtime sessions on the shared thread pool; "
                "later sessions must use it too (SessionConfig.shared_threads)"
            )
        return False
    if not _shared_pool:
        _pybind_state.set_global_thread_pool_sizes(size, 1)
        _shared_pool.append(size)
    elif _shared_pool[0] != size:
        raise UsageError(
            f"the shared ONNX Runtime thread pool of this process has {_shared_pool[0] or 'default'} "
            f"threads; it cannot also have {size or 'default'}"
        )
    return True


@contextlib.contextmanager
def _quiet_ort_log(ort: Any, quiet: bool) -> Iterator[None]:
    """With `quiet`, ONNX Runtime logs only FATAL messages while the block runs.

    A GPU provider that cannot start (no GPU, missing CUDA libraries) makes ONNX Runtime print
    several ERROR and WARNING lines before it falls back; the :class:`ProviderError` raised after
    the active-provider check says it in one line instead. The level is set back to ONNX Runtime's
    default (WARNING) afterwards.
    """
    if not quiet:
        yield
        return
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


class OrtBackend:
    """ONNX Runtime sessions for graphs of an export (default: coarse and fine), on one execution provider."""

    def __init__(
        self,
        manifest: Manifest,
        provider: str = "cpu",
        config: SessionConfig | None = None,
        graphs: tuple[str, ...] | None = None,
    ) -> None:
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
            name: self._session(ort, manifest.graph_path(name), wanted) for name in (graphs or DEFAULT_GRAPHS)
        }
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}
        on_gpu = all(s.get_providers()[0] != "CPUExecutionProvider" for s in self.sessions.values())
        use_binding = on_gpu if self.config.io_binding is None else self.config.io_binding
        #: where the IOBinding path keeps intermediates ("cuda", or "cpu" when forced); None: plain runs
        self.io_device: str | None = ("cuda" if on_gpu else "cpu") if use_binding else None
        self.device_id = int(self.config.provider_options.get("device_id", os.environ.get("CFVIT_CUDA_DEVICE", 0)))
        self._take = self._take_session(ort) if self.io_device and "fine" in self.sessions else None

    def _session(self, ort: Any, path: Path, wanted: str) -> Any:
        cfg = self.config
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization]
        threads = cfg.effective_threads
        shared = _use_shared_pool(cfg.shared_threads, threads)
        if shared:
            so.use_per_session_threads = False
        elif threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not cfg.spin and not shared:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if cfg.stop_spinning and not shared:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        # No "session.disable_cpu_ep_fallback": ORT rejects it next to an explicit CPU EP, and without
        # one it fails on the shape nodes that CUDA deliberately leaves to the CPU. The check of the
        # active provider below catches the silent fallback instead.
        providers: list[Any] = [(wanted, self._provider_options(wanted))]
        if wanted != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:  # enable_fallback=0: ORT's own retry prints to stdout (where `cfvit infer` writes rows)
            with _quiet_ort_log(ort, wanted != "CPUExecutionProvider"):
                session = ort.InferenceSession(str(path), so, providers=providers, enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            on_cpu = wanted == "CPUExecutionProvider"
            if cfg.allow_fallback and not on_cpu:
                session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            else:
                first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                # the hint only where a fallback exists: the CPU provider has nothing to fall back to
                hint = "" if on_cpu else "; pass --allow-fallback to run on the CPU instead"
                raise ProviderError(f"cannot create a {self.provider} session for {path.name}: {first}{hint}") from None
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
        return dict(zip(self._outputs[graph], self.sessions[graph].run(self._outputs[graph], feeds), strict=True))

    # -- IOBinding path (device-resident intermediates) ----------------------------------------------
    def to_device(self, array: np.ndarray) -> Any:
        """Copy a host array to :attr:`io_device` once, as an ``onnxruntime.OrtValue``."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.io_device, self.device_id)

    def run_bound(self, graph: str, inputs: Mapping[str, Any], host_outputs: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run `graph` with its outputs allocated on :attr:`io_device`.

        `inputs` are OrtValues (used in place) or host arrays (copied once). Outputs come back as
        OrtValues that stay on the device, except those named in `host_outputs`, copied to numpy.
        A binding is made per call, so concurrent calls share no mutable state.
        """
        session = self.sessions[graph]
        binding = session.io_binding()
        for name in self._inputs[graph]:
            value = inputs[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._outputs[graph]:
            binding.bind_output(name, self.io_device, self.device_id)
        session.run_with_iobinding(binding)
        values = dict(zip(self._outputs[graph], binding.get_outputs(), strict=True))
        return {name: v.numpy() if name in host_outputs else v for name, v in values.items()}

    def take(self, values: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
        """Rows `rows` (batch axis) of the fine graph's inputs, gathered on :attr:`io_device`.

        Runs a one-node-per-input ONNX ``Gather`` graph on the same provider, so device-resident
        coarse outputs never travel to the host (no torch or cupy needed); only `rows` is uploaded.
        """
        if self._take is None:
            raise UsageError("take() needs the IOBinding path and a fine graph (SessionConfig.io_binding)")
        names = self._inputs["fine"]
        feeds = {name: values[name] for name in names}
        feeds[ROWS] = np.ascontiguousarray(rows, dtype=np.int64)
        session, binding = self._take, self._take.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(output_name(name), self.io_device, self.device_id)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs(), strict=True))

    def _take_session(self, ort: Any) -> Any:
        """A session of the tiny graph behind :meth:`take` (serialized by :mod:`runtimes.take_graph`)."""
        model = take_rows_model([(i.name, i.type) for i in self.sessions["fine"].get_inputs()])
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.io_device == "cuda":  # CUDA EP also under TensorRT: no engine build for a Gather
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device_id}))
        so = ort.SessionOptions()
        so.use_per_session_threads = not _shared_pool  # ORT: no own pool once the process-wide one exists
        return ort.InferenceSession(model, sess_options=so, providers=providers)
