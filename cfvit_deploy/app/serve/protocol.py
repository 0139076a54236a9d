"""Uvicorn's HTTP/1.1 protocol with the limits uvicorn lacks: a header deadline and a connection cap.

Uvicorn reads headers with no deadline (its keep-alive timer is cancelled by every byte received, so a
client dripping one header byte at a time holds its connection for ever), and its
``limit_concurrency`` accepts every socket and answers 503 only once a request's headers are complete
(idle sockets still pile up). This subclass of the protocol uvicorn would pick itself (httptools when
installed, else h11) adds:

- **a header deadline**: from the moment a connection opens, and again from the end of each answer
  (keep-alive), the next request's headers must be complete within `header_timeout` seconds, however
  the bytes trickle in; otherwise the server answers 408 and closes the connection;
- **a header size cap**: a request whose headers are not complete after :data:`MAX_HEADER_BYTES`
  is answered 431 and closed (httptools keeps every header it parses: without a cap, 4 s of headers
  on the loopback grew the server by 740 MB);
- **a connection cap**: beyond `max_connections` open connections a new one is answered 503 at once and
  closed, so idle sockets cannot exhaust the process's file descriptors.

The body deadline (``--body-timeout``) is the app's: it answers 408 in JSON (:mod:`.app`). Both
protocols pause reading a request's body beyond 64 KiB until the app asks for more, so a connection
whose body the app refuses to read holds at most that much.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger("uvicorn.error")
#: bytes a request's headers may take (request line included); nginx's default buffers allow 4 x 8 KiB
MAX_HEADER_BYTES = 64 * 1024


def _raw_answer(status: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer with the server's JSON error body, written before any app runs."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


_HEADERS_LATE = _raw_answer("408 Request Timeout", "header_timeout", "the request headers did not arrive in time")
_HEADERS_LARGE = _raw_answer(
    "431 Request Header Fields Too Large", "headers_too_large", f"the request headers are over {MAX_HEADER_BYTES} bytes"
)
_TOO_MANY = _raw_answer(
    "503 Service Unavailable", "too_many_connections", "too many open connections; retry later", "retry-after: 1\r\n"
)


def _base_protocol() -> type:
    """The protocol uvicorn's ``http="auto"`` picks: httptools when it is installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def limited_protocol(header_timeout: float, max_connections: int) -> type:
    """A protocol class for ``uvicorn.Config(http=...)`` with the header deadline and connection cap."""
    base = _base_protocol()

    class LimitedProtocol(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0  #: received since the current request's headers began

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning(
                    "refused a connection: %d open (--max-connections %d)", len(self.connections) - 1, max_connections
                )
                transport.write(_TOO_MANY)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle, waiting = self.cycle, self._deadline is not None
            super().data_received(data)
            if self.cycle is not cycle:  # a new request's headers are complete: the app has it now
                self._disarm()
            elif waiting and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._disarm()
                    self.transport.write(_HEADERS_LARGE)
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_bytes = 0
            self._deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being answered: its body deadline is the app's
            self.transport.write(_HEADERS_LATE)
            self.transport.close()

    return LimitedProtocol


class TruncatedAccessLog(logging.Filter):
    """Cut the path and query of uvicorn's access log lines to `limit` characters (a 100 KB query
    would otherwise make a 100 KB log line)."""

    def __init__(self, limit: int = 200) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and len(args[2]) > self.limit:
            cut = args[2][: self.limit] + f"...[{len(args[2]) - self.limit} more characters]"
            record.args = (*args[:2], cut, *args[3:])
        return True
