"""What bounds one request in ``cfvit serve``: admission before the body is read, the body deadline,
and 5xx answers that hide internals (request ids instead of exception text).

Memory is bounded by one formula (docs/serve.md, "Limits and attacks"): a request takes a slot of the
admission counter (capacity ``--max-queue``) *before* its body is read, and keeps it until it is
answered, so at most ``--max-queue`` bodies of at most ``--max-bytes`` exist at once; the rest are
refused with 503 before the server buffers more than the 64 KiB uvicorn reads ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .requests import BadRequest, read_body

log = logging.getLogger(__name__)

#: statuses answered while the request's body may be partly unread: the connection is closed after
#: the answer (keeping it would mean reading and discarding the rest of a possibly endless body)
CLOSE_AFTER = frozenset({408, 413, 503})


class Admission:
    """A counter of requests admitted (body being read, decoding, or in the engine), at most `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held = capacity, 0

    def try_acquire(self, n: int = 1) -> bool:
        if self.held + n > self.capacity:
            return False
        self.held += n
        return True

    def release(self, n: int = 1) -> None:
        self.held = max(0, self.held - n)


@contextlib.asynccontextmanager
async def admitted(admission: Any) -> AsyncIterator[None]:
    """Hold one admission slot for the block, or refuse with 503 ``full`` (before any body is read)."""
    if not admission.try_acquire(1):
        raise BadRequest(503, "full", "the server has --max-queue requests in progress; retry later")
    try:
        yield
    finally:
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
