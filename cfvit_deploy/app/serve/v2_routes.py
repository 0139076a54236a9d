"""``cfvit serve``'s Open Inference Protocol (KServe v2) routes: the same app, engine, limits and metrics as /v1.

Routes: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``, and for the one model
(``--model-name``, default ``cfvit``; version ``1``) ``GET /v2/models/{name}`` (metadata),
``GET .../ready`` and ``POST .../infer``, also under ``/v2/models/{name}/versions/1/``.

An infer request carries ``IMAGE`` (BYTES [N], encoded image files, decoded as ``/v1/classify`` decodes
its body) or ``PIXELS`` (FP32 [N, 3, S, S], preprocessed), and optionally ``ETA`` (FP32 [1]). Its N images
go through the two-stage engine as N ``/v1/classify`` requests would (batched with everyone's) and are
answered together; the request counts N images against ``--max-queue`` and is refused whole (503) when
they do not fit. Errors are the protocol's ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from cfvit_deploy import __version__
from cfvit_deploy.manifest import Manifest

from .decoding import decode_request
from .limits import CLOSE_AFTER, internal_error, read_body_within
from .requests import BadRequest, check_declared_length
from .v2_codec import BYTES, HEADER_LENGTH, InferRequest, Output, V2Error, encode_response, parse_infer_request

if TYPE_CHECKING:
    from .app import AppState

log = logging.getLogger(__name__)
MODEL_VERSION = "1"
SERVER_NAME = "cfvit-deploy"
EXTENSIONS = ["binary_tensor_data"]
#: outputs answered when the request names none; LOGITS and REFINED_PATCHES only when named
DEFAULT_OUTPUTS = ("LABEL", "PROBABILITY", "STAGE", "CONFIDENCE")
OUTPUTS = (*DEFAULT_OUTPUTS, "LOGITS", "REFINED_PATCHES")
INPUTS = ("IMAGE", "PIXELS", "ETA")
RETRY_AFTER_S = 1
CLIENT_GONE = 499
#: bodies up to this size are parsed on the event loop (microseconds); larger ones in the decoder pool
INLINE_BYTES = 64 * 1024


def model_metadata(name: str, manifest: Manifest) -> dict[str, Any]:
    """The model metadata answer: the inputs and outputs with their datatypes and shapes (-1: any N)."""
    s, c, k = manifest.image_size, manifest.num_classes, manifest.model.k
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "cfvit_two_stage_onnx",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": "ETA", "datatype": "FP32", "shape": [1]},
        ],
        "outputs": [
            {"name": "LABEL", "datatype": "BYTES", "shape": [-1]},
            {"name": "PROBABILITY", "datatype": "FP32", "shape": [-1]},
            {"name": "STAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "CONFIDENCE", "datatype": "FP32", "shape": [-1]},
            {"name": "LOGITS", "datatype": "FP32", "shape": [-1, c]},
            {"name": "REFINED_PATCHES", "datatype": "INT64", "shape": [-1, k]},
        ],
    }


@dataclass(frozen=True)
class Plan:
    """A checked infer request: its N images (encoded or preprocessed), η, and the outputs to send."""

    images: list[bytes] | np.ndarray
    encoded: bool
    eta: float | None
    outputs: list[tuple[str, bool]]  #: (name, binary) in the answer's order


def _input(request: InferRequest, name: str, datatype: str, rank: int) -> Any:
    tensor = request.inputs.get(name)
    if tensor is None:
        return None
    if tensor.datatype != datatype:
        raise V2Error(400, f"input {name!r} must be {datatype}, got {tensor.datatype}")
    if len(tensor.shape) != rank:
        raise V2Error(400, f"input {name!r} must have {rank} dimension(s), got shape {list(tensor.shape)}")
    return tensor


def plan_request(request: InferRequest, image_size: int) -> Plan:
    """The images, η and outputs of `request`, every name, datatype and shape checked."""
    unknown = sorted(set(request.inputs) - set(INPUTS))
    if unknown:
        raise V2Error(400, f"unknown input {unknown[0]!r}; this model takes IMAGE or PIXELS, and optionally ETA")
    image, pixels = _input(request, "IMAGE", BYTES, 1), _input(request, "PIXELS", "FP32", 4)
    if (image is None) == (pixels is None):
        raise V2Error(400, "give exactly one of the inputs IMAGE (BYTES [N]) and PIXELS (FP32 [N, 3, S, S])")
    if pixels is not None:
        s = image_size
        if pixels.shape[1:] != (3, s, s):
            raise V2Error(400, f"input 'PIXELS' must have shape [N, 3, {s}, {s}], got {list(pixels.shape)}")
        images: Any = np.asarray(pixels.data, np.float32).reshape(pixels.shape)
        if not np.isfinite(images).all():
            raise V2Error(400, "input 'PIXELS' holds NaN or infinite values")
    else:
        images = image.data
    if len(images) == 0:
        raise V2Error(400, "the request has no images (N = 0)")
    return Plan(images, pixels is None, _eta(request), _outputs(request))


def parse_and_plan(body: bytes, header_length: str | None, image_size: int) -> tuple[InferRequest, Plan]:
    """The request parsed from its body, and checked (one call, so that one pool hop does both)."""
    parsed = parse_infer_request(body, header_length)
    return parsed, plan_request(parsed, image_size)


def _eta(request: InferRequest) -> float | None:
    tensor = _input(request, "ETA", "FP32", 1)
    if tensor is None:
        return None
    if tensor.shape != (1,):
        raise V2Error(400, f"input 'ETA' must have shape [1], got {list(tensor.shape)}")
    value = float(tensor.data[0])
    if not 0.0 <= value <= 1.0:  # NaN too
        raise V2Error(400, f"input 'ETA' must be a number in [0, 1], got {value!r}")
    return value


def _outputs(request: InferRequest) -> list[tuple[str, bool]]:
    default = request.binary_data_output
    if request.outputs is None:
        return [(name, default) for name in DEFAULT_OUTPUTS]
    unknown = [name for name in request.outputs if name not in OUTPUTS]
    if unknown:
        raise V2Error(400, f"unknown output {unknown[0]!r}; this model gives {', '.join(OUTPUTS)}")
    return [(name, default if binary is None else binary) for name, binary in request.outputs.items()]


def answer_outputs(answers: list[Any], names: list[str], k: int) -> dict[str, Output]:
    """The named output tensors of N engine answers (:class:`runtimes.stages.Answer`)."""
    rows = [a.row for a in answers]
    make: dict[str, Callable[[], Output]] = {
        "LABEL": lambda: Output("LABEL", BYTES, [r.labels[0] for r in rows]),
        "PROBABILITY": lambda: Output("PROBABILITY", "FP32", np.array([r.probs[0] for r in rows], np.float32)),
        "STAGE": lambda: Output("STAGE", BYTES, [r.stage for r in rows]),
        "CONFIDENCE": lambda: Output("CONFIDENCE", "FP32", np.array([r.confidence for r in rows], np.float32)),
        "LOGITS": lambda: Output("LOGITS", "FP32", np.stack([a.logits for a in answers]).astype(np.float32)),
        "REFINED_PATCHES": lambda: Output("REFINED_PATCHES", "INT64", _refined(answers, k)),
    }
    return {name: make[name]() for name in names}


def _refined(answers: list[Any], k: int) -> np.ndarray:
    """[N, k] refined coarse patches, -1 for every slot of an image that exited (and any unused slot)."""
    out = np.full((len(answers), k), -1, np.int64)
    for i, answer in enumerate(answers):
        out[i, : len(answer.refined)] = answer.refined
    return out


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _error(exc: V2Error) -> Any:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return _json(exc.to_json(), exc.status, headers)


_BUSY = {
    "full": "the request queue is full (--max-queue images); retry later",
    "closing": "the server is shutting down",
    "not ready": "the model is still loading; retry later",
}


def _busy(reason: str) -> V2Error:
    return V2Error(503, _BUSY.get(reason, reason))


async def _client_gone(request: Any) -> None:
    """Return when the client disconnects (the body has been read, so only that message remains)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


class V2Routes:
    """The v2 handlers over the app's state (engine, limits, decoder pool, metrics) for one model name."""

    def __init__(self, state: AppState, manifest: Manifest, model_name: str) -> None:
        self.state, self.model_name = state, model_name
        self.metadata = model_metadata(model_name, manifest)
        self.image_size, self.k = manifest.image_size, manifest.model.k

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        model_routes = []
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            model_routes += [
                Route(base, self.model, methods=["GET"]),
                Route(base + "/ready", self.model_ready, methods=["GET"]),
                Route(base + "/infer", self.infer, methods=["POST"]),
            ]
        return [
            Route("/v2", self.server, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            *model_routes,
            Route("/v2/{rest:path}", self.unknown, methods=["GET", "POST", "PUT", "DELETE"]),
        ]

    # -- metadata and health ------------------------------------------------------------------------
    async def server(self, request: Any) -> Any:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Any) -> Any:
        return _json({"live": True})

    def _not_ready(self) -> V2Error | None:
        engine = self.state.engine
        if engine.ready:
            return None
        if getattr(engine, "closing", False):
            return _busy("closing")
        return V2Error(503, "failed: " + self.state.load_error) if self.state.load_error else _busy("not ready")

    async def ready(self, request: Any) -> Any:
        error = self._not_ready()
        return _json({"ready": True}) if error is None else _error(error)

    def _check_model(self, params: dict[str, str]) -> None:
        name, version = params["name"], params.get("version")
        if name != self.model_name:
            raise V2Error(404, f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version is not None and version != MODEL_VERSION:
            raise V2Error(404, f"unknown version {version!r} of model {name!r}; it has version {MODEL_VERSION}")

    async def model(self, request: Any) -> Any:
        try:
            self._check_model(request.path_params)
        except V2Error as exc:
            return _error(exc)
        return _json(self.metadata)

    async def model_ready(self, request: Any) -> Any:
        try:
            self._check_model(request.path_params)
        except V2Error as exc:
            return _error(exc)
        error = self._not_ready()
        return _json({"name": self.model_name, "ready": True}) if error is None else _error(error)

    async def unknown(self, request: Any) -> Any:
        return _error(V2Error(404, f"no v2 route {request.method} {request.url.path}"))

    # -- inference ----------------------------------------------------------------------------------
    async def infer(self, request: Any) -> Any:
        """POST .../infer: the answer, or one ``{"error": ...}``; counted in the metrics as protocol v2."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        from runtimes.batching import EngineBusy

        start = perf_counter()
        try:
            self._check_model(request.path_params)
            response = await self._infer(request)
        except V2Error as exc:
            response = _error(exc)
        except BadRequest as exc:  # the /v1 checks (body size, image decoding), in the v2 form
            response = _error(V2Error(exc.status, exc.message))
        except EngineBusy as exc:
            response = _error(_busy(exc.reason))
        except ClientDisconnect:
            response = Response(status_code=CLIENT_GONE)
        except Exception as exc:  # a failing graph: the server goes on, the client learns nothing internal
            error, request_id = internal_error(exc)
            response = _error(V2Error(500, error.message))
            response.headers["X-Request-ID"] = request_id
        if response.status_code in CLOSE_AFTER:  # the body may be partly unread: do not read the rest
            response.headers["Connection"] = "close"
        seconds = perf_counter() - start
        response.headers["Server-Timing"] = f"app;dur={seconds * 1000:.3f}"
        self.state.metrics.on_request(response.status_code, seconds, "v2")
        return response

    async def _infer(self, request: Any) -> Any:
        from starlette.responses import Response

        state, engine = self.state, self.state.engine
        not_ready = self._not_ready()
        if not_ready is not None:
            raise not_ready
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as admitted:
            # one unit of the engine's counter before the body is read (a refused request buffers nothing);
            # it becomes the first image's unit once the request's images are counted
            if not engine.admission.try_acquire(1):
                raise _busy("full")
            body_unit = [1]
            admitted.callback(lambda: body_unit[0] and engine.admission.release(body_unit[0]))
            with engine.expect():  # a coarse batch waits for these images while they are read and decoded
                check_declared_length(request.headers.get("content-length"), state.limits.max_bytes)
                body = await read_body_within(request.stream(), state.limits.max_bytes, state.limits.body_timeout)
                if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
                    raise V2Error(400, "compressed request bodies are not accepted (send Content-Encoding: identity)")
                args = (body, request.headers.get(HEADER_LENGTH), self.image_size)
                if len(body) <= INLINE_BYTES:  # bounded work: cheaper here than a hop to the pool
                    parsed, plan = parse_and_plan(*args)
                else:  # JSON of many numbers, many BYTES elements: off the event loop
                    parsed, plan = await loop.run_in_executor(state.decoder, parse_and_plan, *args)
                del body, args
                handed = await admitted.enter_async_context(self._admitted(len(plan.images), body_unit))
                images = await self._decode(plan) if plan.encoded else list(plan.images)
            answers = await self._run(request, images, plan.eta, handed)
        if answers is None:
            return Response(status_code=CLIENT_GONE)
        return self._response(parsed, plan, answers)

    @contextlib.asynccontextmanager
    async def _admitted(self, n: int, body_unit: list[int]) -> AsyncIterator[list[int]]:
        """Take `n` images of the engine's queue (``--max-queue``) at once, or refuse the whole request;
        the unit taken for the body (`body_unit`) is the first of them.

        The units pass to the engine image by image (``submit(..., admitted=True)``), which gives each
        back when its image is answered; the units of images never submitted are given back here."""
        admission = self.state.engine.admission
        if n > admission.capacity:
            raise V2Error(413, f"{n} images in one request, over --max-queue ({admission.capacity}); split the request")
        if n > 1 and not admission.try_acquire(n - 1):
            raise _busy("full")
        if n >= 1:
            body_unit[0] = 0  # from here on this block gives it back (or the engine does)
        handed = [0]  # units passed to the engine by _run
        try:
            yield handed
        finally:
            if n - handed[0]:
                admission.release(n - handed[0])

    async def _decode(self, plan: Plan) -> list[np.ndarray]:
        """Every image decoded as /v1 decodes its body, or a 400/413/503 naming the first bad one's index.

        One image after another: the request's own images never compete for the decode budget
        (``--decode-pixels``), so N large ones cannot refuse each other; other requests use the pool's
        other threads meanwhile."""
        state, limits = self.state, self.state.limits
        images = []
        for i, data in enumerate(plan.images):
            try:
                images.append(
                    await decode_request(
                        data, state.preprocessing, limits.max_pixels, state.decode_budget, state.decoder, limits.decode
                    )
                )
            except BadRequest as exc:
                raise V2Error(exc.status, f"IMAGE[{i}]: {exc.message} ({exc.code})") from None
        return images

    async def _run(
        self, request: Any, images: list[np.ndarray], eta: float | None, handed: list[int]
    ) -> list[Any] | None:
        """The N answers, submitted together (batched with everyone's); None when the client went away.

        Each submit takes one of the units this request holds (`handed` counts them); one loop turn
        lets every submit reach the engine, so that a cancelled one gives its unit back there."""
        engine = self.state.engine
        tasks = [asyncio.ensure_future(engine.submit(image, eta, 1, admitted=True)) for image in images]
        handed[0] = len(tasks)
        await asyncio.sleep(0)  # every task takes its first step: its image (and unit) is the engine's now
        work = asyncio.ensure_future(asyncio.gather(*tasks))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away: drop its images before their next stage
                for task in tasks:
                    task.cancel()
        if not work.done() or work.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return None
        if work.exception() is not None:  # one failed (a graph error, or shutting down): none is answered
            for task in tasks:
                task.cancel()
        return work.result()

    def _response(self, parsed: InferRequest, plan: Plan, answers: list[Any]) -> Any:
        from starlette.responses import Response

        tensors = answer_outputs(answers, [name for name, _ in plan.outputs], self.k)
        head: dict[str, Any] = {"model_name": self.model_name, "model_version": MODEL_VERSION}
        if parsed.id is not None:
            head["id"] = parsed.id
        head["parameters"] = {"eta": answers[0].eta}
        body, json_size = encode_response(head, [(tensors[name], binary) for name, binary in plan.outputs])
        if json_size is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)})
