"""The ASGI app of ``cfvit serve`` (Starlette): classify, health, readiness and metrics endpoints.

The app does HTTP only: it validates and decodes a request (in a thread), hands the image to an
engine (:class:`runtimes.batching.BatchingEngine`, or the Ray Serve engine) and turns the answer
into JSON. The engine's sessions are created and warmed up in the background after startup, so
``/healthz`` answers at once and ``/readyz`` says when classification can start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from cfvit_deploy.extras import require
from cfvit_deploy.manifest import Manifest, export_identity
from cfvit_deploy.preprocessing import PreprocessConfig
from runtimes.engine import EngineBusy, ServingEngine

from .decoding import PixelBudget, decode_request
from .limits import CLOSE_AFTER, Slot, admitted, internal_error, read_body_within
from .metrics import ServeMetrics
from .requests import (
    MULTIPART,
    BadRequest,
    Limits,
    check_content_type,
    check_declared_length,
    check_multipart_complete,
    file_from_form,
    parse_params,
)
from .v2_routes import V2Routes

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
#: HTTP status recorded (never sent) for a request whose client went away before its answer
CLIENT_GONE = 499


@dataclass
class AppState:
    engine: ServingEngine  #: runtimes.batching.BatchingEngine or runtimes.ray_serve.RayServeEngine
    identity: dict[str, Any]  #: cfvit_deploy.manifest.export_identity, without the folder
    preprocessing: PreprocessConfig
    limits: Limits
    metrics: ServeMetrics
    load_error: str | None = None
    #: decoding threads: as many as `cfvit infer` uses (min(4, cores)); more would only contend
    #: with the graphs' own threads for the cores
    decoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="cfvit-decode")
    )
    decode_budget: PixelBudget = field(init=False)  #: pixels being decoded, at most limits.decode_pixels

    def __post_init__(self) -> None:
        self.decode_budget = PixelBudget(self.limits.decode_pixels)


def _error(exc: BadRequest, headers: dict[str, str] | None = None, request_id: str | None = None) -> Any:
    from starlette.responses import JSONResponse

    body = exc.to_json()
    if request_id is not None:
        body["error"]["request_id"] = request_id
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _busy(reason: str) -> BadRequest:
    text = {
        "full": "the request queue is full (--max-queue); retry later",
        "closing": "the server is shutting down",
        "not ready": "the model is still loading; retry later (see /readyz)",
    }.get(reason, reason)
    return BadRequest(503, reason.replace(" ", "_"), text)


async def _image_from_request(request: Any, state: AppState) -> bytes:
    kind = check_content_type(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), state.limits.max_bytes)
    body = await read_body_within(request.stream(), state.limits.max_bytes, state.limits.body_timeout)
    if kind != MULTIPART:
        return body
    check_multipart_complete(request.headers.get("content-type"), body)
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=4, max_fields=16) as form:
            return await file_from_form(form)
    except BadRequest:
        raise
    except Exception as exc:  # python-multipart's parse errors (a malformed form)
        raise BadRequest(400, "bad_form", f"cannot parse the multipart form ({exc})") from None


async def _client_gone(request: Any) -> None:
    """Return when the client disconnects (the body has been read, so only that message remains)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _answer(request: Any, state: AppState, slot: Slot) -> Any:
    from starlette.responses import JSONResponse, Response

    engine = state.engine
    with engine.expect():
        eta, topk = parse_params(request.query_params)
        if not engine.ready:
            raise _busy("closing" if engine.closing else "not ready")
        data = await _image_from_request(request, state)
        limits = state.limits
        image = await decode_request(
            data, state.preprocessing, limits.max_pixels, state.decode_budget, state.decoder, limits.decode
        )
    work = asyncio.ensure_future(slot.submit(engine, image, eta, topk))
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():  # the client went away: drop its request, answer nobody
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=CLIENT_GONE)
    gone.cancel()
    answer = work.result()  # EngineBusy and graph errors propagate to the caller
    row = answer.row
    return JSONResponse(
        {
            "label": row.labels[0],
            "probability": row.probs[0],
            "topk": [{"label": label, "prob": p} for label, p in zip(row.labels, row.probs, strict=True)],
            "stage": row.stage,
            "confidence": row.confidence,
            "eta": answer.eta,
            "patches": row.patches,
            "refined_patches": list(answer.refined),
            "export": state.identity,
        }
    )


async def _classify(request: Any, state: AppState) -> Any:
    """POST /v1/classify: the answer, or one JSON error; every outcome is counted in the metrics."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    start = perf_counter()
    try:
        # one unit of the engine's counter from before the body is read: a refused request buffers nothing
        async with admitted(state.engine.admission) as slot:
            response = await _answer(request, state, slot)
    except ClientDisconnect:  # gone while its body was read: nothing to answer
        response = Response(status_code=CLIENT_GONE)
    except BadRequest as exc:
        response = _error(exc)
    except EngineBusy as exc:
        response = _error(_busy(exc.reason), {"Retry-After": str(RETRY_AFTER_S)})
    except Exception as exc:  # a failing graph: the server goes on, the client learns nothing internal
        error, request_id = internal_error(exc)
        response = _error(error, {"X-Request-ID": request_id}, request_id)
    if response.status_code == 503 and "retry-after" not in response.headers:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    if response.status_code in CLOSE_AFTER:
        response.headers["Connection"] = "close"
    seconds = perf_counter() - start
    # the server's own time for this request (W3C Server-Timing), so a client can tell it from the network's
    response.headers["Server-Timing"] = f"app;dur={seconds * 1000:.3f}"
    state.metrics.on_request(response.status_code, seconds)
    return response


async def _healthz(request: Any) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"status": "alive"})


async def _readyz(request: Any, state: AppState) -> Any:
    from starlette.responses import JSONResponse

    if state.engine.ready:
        return JSONResponse({"status": "ready", "export": state.identity})
    status = "failed: " + state.load_error if state.load_error else "loading"
    return JSONResponse({"status": status}, status_code=503)


async def _metrics(request: Any, state: AppState) -> Any:
    from starlette.responses import Response

    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def _load(state: AppState, on_load_error: Callable[[Exception], None] | None) -> None:
    """Start the engine (sessions created and warmed up); a failure goes to /readyz and `on_load_error`."""
    try:
        await state.engine.start()
        log.info("ready: sessions created and warmed up")
    except Exception as exc:  # /readyz reports it; the process stays up for /healthz and logs
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("cannot start the engine: %s", state.load_error)
        if on_load_error is not None:
            on_load_error(exc)


def _lifespan(state: AppState, on_load_error: Callable[[Exception], None] | None) -> Callable[[Any], Any]:
    """Load the engine in the background at startup; at shutdown answer every accepted request, then close."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, on_load_error))
        try:
            yield
        finally:
            await loading
            await state.engine.close()
            state.decoder.shutdown(wait=False)

    return lifespan


def create_app(
    engine: ServingEngine,
    export_dir: str | Path,
    limits: Limits | None = None,
    metrics: ServeMetrics | None = None,
    on_load_error: Callable[[Exception], None] | None = None,
    model_name: str = "cfvit",
) -> Any:
    """The Starlette app serving `engine` for the export in `export_dir` (/v1, and /v2 as `model_name`).

    The engine is started (sessions created and warmed up) in the background when the app starts,
    and closed, answering every accepted request first, when it shuts down. If it cannot start,
    ``/readyz`` says why and `on_load_error` gets the exception (the CLI then stops the server).
    """
    require("starlette", "serve", "cfvit serve")
    from starlette.applications import Starlette
    from starlette.routing import Route

    manifest = Manifest.load(export_dir, verify=False)
    metrics = metrics or ServeMetrics()
    identity = export_identity(manifest, with_directory=False)
    state = AppState(engine, identity, manifest.preprocessing, limits or Limits(), metrics)
    metrics.watch(engine)

    async def classify(request: Any) -> Any:
        return await _classify(request, state)

    async def readyz(request: Any) -> Any:
        return await _readyz(request, state)

    async def metrics_endpoint(request: Any) -> Any:
        return await _metrics(request, state)

    routes = [
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *V2Routes(state, manifest, model_name).routes(),  # the Open Inference Protocol (docs/serve.md)
    ]
    app = Starlette(routes=routes, lifespan=_lifespan(state, on_load_error))
    app.state.serve = state
    return app
