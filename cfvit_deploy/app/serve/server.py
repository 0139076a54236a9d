"""Run the server: the engine, the app and uvicorn, with a graceful shutdown (the twin of ``cfvit serve``).

SIGTERM (and Ctrl-C) make uvicorn stop accepting connections and wait for the requests in flight;
the app's shutdown then closes the engine, which answers every request it accepted. :func:`serve`
returns 0 after a SIGTERM drain (130 after Ctrl-C), as a process manager expects from a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfvit_deploy.checks import check_choice, check_positive_int
from cfvit_deploy.errors import CFViTError, UsageError
from cfvit_deploy.extras import require
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import DECODE_MODES
from runtimes.engine import ServingEngine

from .app import create_app
from .metrics import ServeMetrics
from .requests import Limits

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


@dataclass
class ServeOptions:
    """Everything ``cfvit serve`` takes besides the export folder."""

    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "cpu"
    eta: float | None = None  #: default η of requests that give none (None: the manifest's)
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = 40_000_000
    decode_pixels: int | None = 64_000_000  #: most pixels being decoded at once; beyond it: 503 (None: no bound)
    decode: str = "exact"  #: preprocessing.DECODE_MODES
    threads: int | None = None  #: intra-op threads per session, or of the shared pool (None: the runtime's default)
    #: ONNX Runtime's process-wide pool for both sessions instead of SessionConfig()'s default (a pool per
    #: session that spins only while its graph runs: the measured fastest, as infer and bench use it)
    shared_threads: bool = False
    engine: str = "local"
    replicas: dict[str, int] = field(default_factory=lambda: {"coarse": 1, "fine": 1})  #: Ray Serve only
    log_level: str = "info"
    model_name: str = "cfvit"  #: the model's name on the v2 (Open Inference Protocol) routes

    def check(self) -> ServeOptions:
        check_choice(self.engine, ENGINES, "--engine")
        if not isinstance(self.model_name, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.model_name
        ):
            raise UsageError(
                f"--model-name must be letters, digits, '_', '.' or '-' (URL-safe), got {self.model_name!r}"
            )
        check_positive_int(self.max_bytes, "--max-bytes")
        if self.max_pixels is not None:
            check_positive_int(self.max_pixels, "--max-pixels")
        if self.decode_pixels is not None:
            check_positive_int(self.decode_pixels, "--decode-pixels")
        check_choice(self.decode, DECODE_MODES, "--decode")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be an integer in [0, 65535], got {self.port!r}")
        if self.threads is not None:
            check_positive_int(self.threads, "--threads")
        for stage, n in self.replicas.items():
            check_positive_int(n, f"--{stage}-replicas")
        return self


def build_engine(export_dir: str | Path, options: ServeOptions, metrics: ServeMetrics) -> ServingEngine:
    """The engine for `options.engine`: local two-stage batching, or Ray Serve deployments."""
    from runtimes.backends import SessionConfig, check_provider, create_backend
    from runtimes.batching import BatchingEngine, EngineConfig, EngineObserver, StageRunner

    check_provider(options.provider)
    config = EngineConfig(options.max_batch, options.max_wait_ms, options.max_queue, options.eta)
    manifest = Manifest.load(export_dir)  # a broken export fails here, before the port is taken
    observer = EngineObserver(on_batch=metrics.on_batch, on_answer=metrics.on_answer)
    if options.engine == "ray":
        from runtimes.ray_serve import RayServeEngine

        return RayServeEngine(export_dir, config, options.provider, options.threads, options.replicas, observer)
    session = SessionConfig(threads=options.threads, shared_threads=options.shared_threads)
    return BatchingEngine(lambda: StageRunner(create_backend(manifest, options.provider, session)), config, observer)


def build_app(
    export_dir: str | Path,
    options: ServeOptions | None = None,
    on_load_error: Callable[[Exception], None] | None = None,
) -> Any:
    """The ASGI app for `export_dir` with `options` (checked), ready for uvicorn or a test client."""
    options = (options or ServeOptions()).check()
    metrics = ServeMetrics()
    engine = build_engine(export_dir, options, metrics)
    limits = Limits(options.max_bytes, options.max_pixels, options.decode_pixels, options.decode)
    return create_app(engine, export_dir, limits, metrics, on_load_error, model_name=options.model_name)


def serve(export_dir: str | Path, options: ServeOptions | None = None, sockets: list[Any] | None = None) -> int:
    """Serve `export_dir` until SIGTERM or Ctrl-C; returns the exit code (0 after SIGTERM, 130 after Ctrl-C).

    Raises :class:`CFViTError` when the sessions cannot be created (after the port was opened: the
    server stops at once) or the server cannot start (the port is taken).
    """
    options = (options or ServeOptions()).check()
    uvicorn = require("uvicorn", "serve", "cfvit serve")
    failures: list[Exception] = []

    def stop_on_load_error(exc: Exception) -> None:  # sessions cannot be created: stop, and say why
        failures.append(exc)
        server.should_exit = True

    app = build_app(export_dir, options, stop_on_load_error)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        lifespan="on",
        timeout_graceful_shutdown=None,
    )
    server = _Server(config)
    server.run(sockets=sockets)
    if failures:
        exc = failures[0]
        raise exc if isinstance(exc, CFViTError) else CFViTError(f"cannot start the engine: {exc}")
    if server.state_failed():
        raise CFViTError(f"cannot serve on {options.host}:{options.port} (see the log above)")
    return 130 if signal.SIGINT in server.signals else 0


def _server_class() -> type:
    uvicorn = require("uvicorn", "serve", "cfvit serve")

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
        """uvicorn's server, minus re-raising the stop signal after the drain (that would exit 143)."""

        signals: list[int]

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            self.signals = []
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig: int, frame: Any) -> None:
                self.signals.append(sig)
                logging.getLogger("uvicorn.error").info(
                    "received %s: draining (stop accepting, answer every queued request)", signal.Signals(sig).name
                )
                self.handle_exit(sig, frame)

            originals = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def state_failed(self) -> bool:
            return not self.started  # startup failed (port in use, app error)

    return Server


def _Server(config: Any) -> Any:  # noqa: N802 - a factory that reads like the class it builds
    return _server_class()(config)
