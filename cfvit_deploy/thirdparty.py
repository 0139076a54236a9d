"""Third-party chatter kept off the console (torch-free): re-logged at DEBUG on our own logger.

Libraries we call print advice meant for their own users: ONNX Runtime's quantizer logs "Please
consider to run pre-processing before quantization" on the root logger once per graph, others raise
Python warnings. Inside :func:`third_party_at_debug` those records and warnings go to the given
logger at DEBUG (``cfvit --debug`` shows them), not to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


class _ToDebug(logging.Filter):
    """Drops a record logged on the root logger after re-logging it on `log` at DEBUG."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        self.log.debug("%s said: %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def third_party_at_debug(log: logging.Logger) -> Iterator[None]:
    """Records logged on the root logger (``logging.warning(...)`` in a library) and Python warnings
    raised inside the block are re-logged on `log` at DEBUG instead of being printed."""
    root = logging.getLogger()
    to_debug = _ToDebug(log)
    root.addFilter(to_debug)  # a logger's own filter sees the records logged on it directly
    # with no handler at all, logging.warning() would call basicConfig() and leave a stderr handler behind
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeFilter(to_debug)
        if placeholder is not None:
            root.removeHandler(placeholder)
    for warning in caught:
        log.debug("%s: %s", warning.category.__name__, warning.message)
