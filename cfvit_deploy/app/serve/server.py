"""Run the server: the engine, the app and uvicorn, with a bounded graceful shutdown (the twin of ``cfvit serve``).

The port is bound before anything else starts, so a busy port or a bad host is one error (exit 1)
before "ready" can be logged. SIGTERM (and Ctrl-C) make uvicorn stop accepting connections and wait
for the requests in flight, at most ``--drain-timeout`` seconds; then what is left is closed, the app's
shutdown closes the engine, and :func:`serve` returns 0 after SIGTERM (130 after Ctrl-C), as a process
manager expects from a clean stop. A second SIGTERM or Ctrl-C during the drain exits at once
(128 + the signal's number). The limits that uvicorn lacks (header deadline, connection cap) are
in :mod:`.protocol`, the per-request ones in :mod:`.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
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
from .protocol import TruncatedAccessLog, limited_protocol
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
    body_timeout: float = 30.0  #: seconds from a request's headers to its last body byte (beyond: 408)
    header_timeout: float = 10.0  #: seconds for a request's headers, from connect or the previous answer
    drain_timeout: float = 30.0  #: longest SIGTERM waits for requests in flight before closing them
    max_connections: int = 512  #: open connections beyond which a new one is answered 503 and closed
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
        check_positive_int(self.max_queue, "--max-queue")
        check_positive_int(self.max_connections, "--max-connections")
        for name in ("body_timeout", "header_timeout", "drain_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
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
    limits = Limits(
        options.max_bytes, options.max_pixels, options.decode_pixels, options.decode, body_timeout=options.body_timeout
    )
    return create_app(engine, export_dir, limits, metrics, on_load_error, model_name=options.model_name)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port`, or a :class:`CFViTError` naming the reason (exit 1).

    Bound here, before the engine or uvicorn starts, so that a busy port or an unknown host is one
    error line and nothing else (uvicorn would log its own error, then exit 3).
    """
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise CFViTError(f"cannot listen on {where}: unknown host {host!r} ({reason})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CFViTError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def serve(export_dir: str | Path, options: ServeOptions | None = None, sockets: list[Any] | None = None) -> int:
    """Serve `export_dir` until SIGTERM or Ctrl-C; returns the exit code (0 after SIGTERM, 130 after Ctrl-C).

    Raises :class:`CFViTError` when the export is unusable or the port cannot be bound (before
    anything listens or is loaded), or when the sessions cannot be created (the server then stops at once).
    """
    options = (options or ServeOptions()).check()
    uvicorn = require("uvicorn", "serve", "cfvit serve")
    failures: list[Exception] = []

    def stop_on_load_error(exc: Exception) -> None:  # sessions cannot be created: stop, and say why
        failures.append(exc)
        server.should_exit = True

    app = build_app(export_dir, options, stop_on_load_error)  # an unusable export fails here
    own_sockets = sockets is None
    sockets = sockets if sockets is not None else [bind_socket(options.host, options.port)]
    config = uvicorn.Config(
        app,
        log_level=options.log_level,
        lifespan="on",
        http=limited_protocol(options.header_timeout, options.max_connections),
        timeout_graceful_shutdown=options.drain_timeout,
    )
    access_filter = TruncatedAccessLog()
    logging.getLogger("uvicorn.access").addFilter(access_filter)
    server = _Server(config, options.drain_timeout)
    try:
        host, port = sockets[0].getsockname()[:2]
        logging.getLogger("uvicorn.error").info("listening on http://%s:%d (SIGTERM or Ctrl-C to stop)", host, port)
        server.run(sockets=sockets)
    finally:
        logging.getLogger("uvicorn.access").removeFilter(access_filter)
        if own_sockets:
            for sock in sockets:
                sock.close()
    if failures:
        exc = failures[0]
        raise exc if isinstance(exc, CFViTError) else CFViTError(f"cannot start the engine: {exc}")
    if server.state_failed():
        raise CFViTError(f"cannot serve on {options.host}:{options.port} (see the log above)")
    return 130 if signal.SIGINT in server.signals else 0


def _server_class() -> type:
    uvicorn = require("uvicorn", "serve", "cfvit serve")
    error_log = logging.getLogger("uvicorn.error")

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
        """uvicorn's server with a drain that always ends: at most `drain_timeout` for the requests in
        flight, then their connections are closed; a second signal exits at once; no re-raising of the
        stop signal after the drain (that would exit 143)."""

        signals: list[int]
        drain_timeout: float = 30.0

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            self.signals = []
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig: int, frame: Any) -> None:
                name = signal.Signals(sig).name
                if self.signals:  # the second signal: the operator will not wait for the drain
                    error_log.warning("received %s again: exiting now, without draining", name)
                    sys.stderr.flush()
                    os._exit(128 + sig)
                self.signals.append(sig)
                error_log.info(
                    "received %s: draining for at most %g s (stop accepting, answer every queued request)",
                    name,
                    self.drain_timeout,
                )
                self.handle_exit(sig, frame)

            originals = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            # uvicorn bounds its wait for the connections by timeout_graceful_shutdown (= drain_timeout)
            # but not the connections themselves, nor the app's shutdown: both are bounded here
            try:
                async with asyncio.timeout(self.drain_timeout + 5):
                    await super().shutdown(sockets)
            except TimeoutError:
                error_log.error("the engine did not stop within --drain-timeout + 5 s: exiting anyway")
            finally:
                for connection in list(self.server_state.connections):
                    connection.transport.close()

        def state_failed(self) -> bool:
            return not self.started  # startup failed (app error)

    return Server


def _Server(config: Any, drain_timeout: float = 30.0) -> Any:  # noqa: N802 - a factory that reads like the class
    server = _server_class()(config)
    server.drain_timeout = drain_timeout
    return server
