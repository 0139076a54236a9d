"""One progress hook type for every long-running library function.

Library functions take ``progress: ProgressHook | None`` and call it as ``progress(task, done, total)``
(``total`` None when unknown; ``done == total`` when a task ends). They never draw anything
themselves: the CLI passes a hook that drives rich progress bars on stderr (only on a terminal),
Python callers may pass their own or None. Messages that are not progress go through ``logging``
(``logging.getLogger(__name__)``); the CLI installs one rich handler on stderr.
"""

from __future__ import annotations

from typing import Protocol


class ProgressHook(Protocol):
    def __call__(self, task: str, done: int, total: int | None) -> None: ...


def report(progress: ProgressHook | None, task: str, done: int, total: int | None) -> None:
    """Call `progress` if one was given (so callers need no ``if progress:`` at each step)."""
    if progress is not None:
        progress(task, done, total)
