"""SIGTERM handled like Ctrl-C: every command keeps what is done, says so on one line, and exits.

``timeout``, ``docker stop`` and Kubernetes send SIGTERM. :func:`sigterm_as_interrupt` turns it into
:class:`Terminated`, a ``KeyboardInterrupt``, raised in the main thread, so the code paths that keep
partial work on Ctrl-C (finish the output file, remove temporaries) run for both signals. The CLI
maps SIGINT to exit 130 and SIGTERM to exit 143 (128 + the signal number), as shells do.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM was received (raised like Ctrl-C so that partial work is kept)."""


def exit_code_for(interrupt: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (also when `interrupt` wraps a :class:`Terminated`)."""
    terminated = isinstance(interrupt, Terminated) or getattr(interrupt, "signal_name", "") == "SIGTERM"
    return EXIT_SIGTERM if terminated else EXIT_SIGINT


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
