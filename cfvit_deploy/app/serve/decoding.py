"""Decoding a request's image for ``cfvit serve``: the toolkit's one decoder, bounded in pixels in flight.

The image is decoded by :func:`cfvit_deploy.preprocessing.load_and_preprocess`, exactly as ``cfvit infer``
decodes a file; its :class:`ImageError` reason maps to the answer's 4xx code (:data:`REASON_CODES`).
Decoding costs CPU and memory in proportion to width x height, so the decode work in flight is bounded
in pixels (:class:`PixelBudget`, ``--decode-pixels``): the size is read from the header first, and an
image that does not fit beside the ones being decoded is refused at once with 503 and ``Retry-After``,
so a burst of large images is shed instead of making every request wait behind it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor

import numpy as np

from cfvit_deploy.errors import ImageError
from cfvit_deploy.preprocessing import PreprocessConfig, image_size, load_and_preprocess

from .requests import BadRequest

#: the HTTP status and error code of each :class:`ImageError` reason (docs/serve.md lists them)
REASON_CODES = {
    "empty": (400, "empty_body"),
    "not_an_image": (400, "not_an_image"),
    "truncated": (400, "truncated_image"),
    "corrupt": (400, "corrupt_image"),
    "unreadable": (400, "corrupt_image"),  # only files are unreadable; kept for completeness
    "too_many_pixels": (413, "too_many_pixels"),
}
#: default of ``--decode-pixels``: one image at the default --max-pixels (40 MP) beside a few photos
DEFAULT_DECODE_PIXELS = 64_000_000


def bad_image(exc: ImageError) -> BadRequest:
    status, code = REASON_CODES.get(exc.reason, (400, "corrupt_image"))
    return BadRequest(status, code, str(exc))


class PixelBudget:
    """Pixels (width x height) being decoded at once, at most `limit`; an image alone always fits."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.in_flight = limit, 0
        self._lock = threading.Lock()  # released from the decoding thread

    def take(self, pixels: int) -> None:
        """Count `pixels` as in flight, or raise the 503 ``decode_busy`` if they do not fit."""
        with self._lock:
            if self.limit is not None and self.in_flight and self.in_flight + pixels > self.limit:
                raise BadRequest(
                    503,
                    "decode_busy",
                    f"the server is decoding {self.in_flight:,} pixels; this image's {pixels:,} would pass the "
                    f"limit of {self.limit:,} (--decode-pixels); retry later",
                )
            self.in_flight += pixels

    def give_back(self, pixels: int) -> None:
        with self._lock:
            self.in_flight -= pixels


async def decode_request(
    data: bytes,
    pp: PreprocessConfig,
    max_pixels: int | None,
    budget: PixelBudget,
    pool: Executor,
    decode: str = "exact",
) -> np.ndarray:
    """The preprocessed image of a request body, decoded in `pool` within `budget`, or a :class:`BadRequest`."""
    loop = asyncio.get_running_loop()
    try:
        w, h = await loop.run_in_executor(None, image_size, data, max_pixels)  # the header only
    except ImageError as exc:
        raise bad_image(exc) from None
    budget.take(w * h)
    try:
        work = pool.submit(_decode, data, pp, max_pixels, decode)
    except BaseException:  # the pool is shut down: nothing was queued
        budget.give_back(w * h)
        raise
    # the pixels stay counted until the decode itself ends, even if the client goes away before
    work.add_done_callback(lambda _: budget.give_back(w * h))
    return await asyncio.wrap_future(work)


def _decode(data: bytes, pp: PreprocessConfig, max_pixels: int | None, decode: str) -> np.ndarray:
    try:
        return load_and_preprocess(data, pp, max_pixels, decode=decode)
    except ImageError as exc:
        raise bad_image(exc) from None
