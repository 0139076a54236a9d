"""Request parsing and validation for ``POST /v1/classify`` (torch-free).

Every problem is a :class:`BadRequest` with an HTTP status, a short machine-readable code and a
message that names the problem; the app turns it into a 4xx JSON answer and goes on serving.
Images are decoded by the toolkit's one decoder (:mod:`.decoding`), exactly as ``cfvit infer``
decodes files, from the request's bytes instead of a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cfvit_deploy.checks import check_eta, check_positive_int
from cfvit_deploy.errors import UsageError

QUERY_PARAMS = ("eta", "topk")
MULTIPART = "multipart/form-data"


class BadRequest(Exception):
    """A request the server refuses: HTTP `status`, a `code` such as ``bad_eta``, and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024  #: largest request body accepted
    max_pixels: int | None = 40_000_000  #: largest decoded image (width x height) accepted
    decode_pixels: int | None = 64_000_000  #: most pixels being decoded at once (beyond: 503)
    decode: str = "exact"  #: the decode mode (preprocessing.DECODE_MODES)
    body_timeout: float | None = 30.0  #: seconds from the headers to the last body byte (None: no deadline)


#: the accepted spellings: ASCII digits only (str.isdigit and float() also take full-width and other
#: Unicode digits, and int() takes "1_0"), so a parameter means the same to every proxy and log reader
_ETA_TEXT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TOPK_TEXT = re.compile(r"[0-9]+")


def _single(query: Any, name: str) -> str | None:
    """The one value of query parameter `name` (None when absent); a repeated parameter is a 400."""
    values = query.getlist(name) if hasattr(query, "getlist") else ([query[name]] if name in query else [])
    if len(values) > 1:
        raise BadRequest(400, "bad_parameter", f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_params(query: Any) -> tuple[float | None, int]:
    """η (None: the server's default) and top-k from the query string (a multidict or mapping of str -> str)."""
    unknown = sorted(set(query) - set(QUERY_PARAMS))
    if unknown:
        raise BadRequest(
            400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}; accepted: {', '.join(QUERY_PARAMS)}"
        )
    eta_text, topk_text = _single(query, "eta"), _single(query, "topk")
    eta = None
    if eta_text is not None:
        try:
            if not _ETA_TEXT.fullmatch(eta_text):
                raise ValueError
            eta = check_eta(float(eta_text), "eta")
        except (ValueError, UsageError):
            raise BadRequest(400, "bad_eta", f"eta must be a number in [0, 1], got {eta_text[:50]!r}") from None
    topk = 5
    if topk_text is not None:
        try:
            if not _TOPK_TEXT.fullmatch(topk_text):
                raise ValueError
            topk = check_positive_int(int(topk_text), "topk")
        except (ValueError, UsageError):
            raise BadRequest(400, "bad_topk", f"topk must be a positive integer, got {topk_text[:50]!r}") from None
    return eta, topk


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """``image/*`` (raw body) or ``multipart/form-data`` (a file field); anything else is a 415."""
    kind = media_type(content_type)
    if kind.startswith("image/") or kind == MULTIPART:
        return kind
    raise BadRequest(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not accepted; send the image as the body with an "
        "image/* content type, or as a file field of a multipart/form-data form",
    )


def check_declared_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body whose declared Content-Length is over the limit before reading it."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise BadRequest(
            413,
            "body_too_large",
            f"request body of {int(content_length):,} bytes is over the limit of {max_bytes:,} bytes (--max-bytes)",
        )


async def read_body(chunks: Any, max_bytes: int) -> bytes:
    """The body from an async iterator of byte chunks, refused as soon as it passes `max_bytes`."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(
                413, "body_too_large", f"request body is over the limit of {max_bytes:,} bytes (--max-bytes)"
            )
        parts.append(chunk)
    return b"".join(parts)


def check_multipart_complete(content_type: str | None, body: bytes) -> None:
    """A multipart body must end with its closing boundary: python-multipart parses a cut-off body
    without complaint (the form then looks empty: 'missing_file'), so it is checked here."""
    from python_multipart.multipart import parse_options_header

    _, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest(400, "bad_form", "the multipart/form-data content type has no boundary parameter")
    if b"--" + boundary + b"--" not in body:
        raise BadRequest(400, "bad_form", "the multipart body is unterminated (no closing boundary)")


async def file_from_form(form: Any) -> bytes:
    """The bytes of the form's file field (``file`` or ``image``, else the only file)."""
    files = [(name, value) for name, value in form.multi_items() if hasattr(value, "read")]
    chosen = [v for name, v in files if name in ("file", "image")] or [v for _, v in files]
    if not chosen:
        raise BadRequest(400, "missing_file", "the multipart form has no file field; send the image as field 'file'")
    if len(files) > 1:
        raise BadRequest(
            400, "too_many_files", f"the multipart form has {len(files)} files; send one image per request"
        )
    return await chosen[0].read()
