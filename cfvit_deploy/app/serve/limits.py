"""What bounds one request in ``cfvit serve``: admission before the body is read, the body deadline,
and 5xx answers that hide internals (request ids instead of exception text).

Memory is bounded by one formula (docs/serve.md, "Limits and attacks"): a request takes a unit of
the engine's admission counter (:class:`runtimes.admission.Admission`, capacity ``--max-queue``)
*before* its body is read, and hands it to the engine with its image (``submit(..., admitted=True)``),
which gives it back when the image is answered. So one counter bounds bodies being read, images
being decoded and images in the engine together: at most ``--max-queue`` bodies of at most
``--max-bytes`` exist at once, and the rest are refused with 503 before the server buffers more than
the 64 KiB uvicorn reads ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from runtimes.admission import Admission

from .requests import BadRequest, read_body

log = logging.getLogger(__name__)

#: statuses answered while the request's body may be partly unread: the connection is closed after
#: the answer (keeping it would mean reading and discarding the rest of a possibly endless body)
CLOSE_AFTER = frozenset({408, 413, 503})


class Slot:
    """One admitted request's unit of the counter: released here unless handed to the engine."""

    def __init__(self, admission: Admission) -> None:
        self.admission, self.handed = admission, False

    async def submit(self, engine: Any, image: Any, eta: float | None, topk: int) -> Any:
        """``engine.submit`` with this unit: from here on the engine releases it (also when it refuses)."""
        self.handed = True  # set in the same step as the engine's admit(): no await in between
        return await engine.submit(image, eta, topk, admitted=True)


@contextlib.asynccontextmanager
async def admitted(admission: Admission) -> AsyncIterator[Slot]:
    """Take one unit for a request before its body is read, or refuse with 503 ``full``; the unit is
    given back when the block ends, unless :meth:`Slot.submit` handed it to the engine."""
    if not admission.try_acquire(1):
        raise BadRequest(503, "full", "the server has --max-queue requests in progress; retry later")
    slot = Slot(admission)
    try:
        yield slot
    finally:
        if not slot.handed:
            admission.release(1)


async def read_body_within(chunks: Any, max_bytes: int, timeout: float | None) -> bytes:
    """The body (at most `max_bytes`), complete within `timeout` seconds, else a 408 ``body_timeout``."""
    try:
        async with asyncio.timeout(timeout):
            return await read_body(chunks, max_bytes)
    except TimeoutError:
        raise BadRequest(
            408, "body_timeout", f"the request body did not arrive within {timeout:g} s (--body-timeout)"
        ) from None


def internal_error(exc: BaseException) -> tuple[BadRequest, str]:
    """A 500 that names no path, command or exception text, and its request id; the traceback is
    logged once, with the same id, for the operator."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s failed", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    error = BadRequest(
        500, "internal_error", f"internal error; the server log has the details (request id {request_id})"
    )
    return error, request_id
