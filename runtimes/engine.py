"""The serving-engine interface (torch-free, no HTTP): what ``cfvit serve``'s HTTP layer talks to.

Two engines implement :class:`ServingEngine`: :class:`runtimes.batching.BatchingEngine` (two-stage
dynamic batching in the server's process) and :class:`runtimes.ray_serve.RayServeEngine` (the two
stages as Ray Serve deployments). Both take a request through :func:`admit` (the same refusals, in
the same order, counted by one :class:`~runtimes.admission.Admission`) and :func:`check_request`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from cfvit_deploy.checks import check_eta, check_positive_int
from cfvit_deploy.errors import UsageError

from .admission import Admission

if TYPE_CHECKING:
    from .stages import Answer


class EngineBusy(Exception):
    """The engine cannot take a request now: ``reason`` is "full", "closing" or "not ready"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class EngineObserver:
    """Callbacks for metrics (all optional; called on the event loop's thread)."""

    on_batch: Callable[[str, int, float], None] | None = None  #: (stage, batch size, seconds)
    on_answer: Callable[[str], None] | None = None  #: (stage that answered)


@dataclass
class EngineConfig:
    max_batch: int = 32  #: most images per graph call (1: no batching)
    max_wait_ms: float = 5.0  #: longest a stage waits for more requests before it runs
    max_queue: int = 256  #: most requests in the engine (queued or running) before EngineBusy("full")
    default_eta: float | None = None  #: η when a request gives none (None: the manifest's)

    def __post_init__(self) -> None:
        check_positive_int(self.max_batch, "--max-batch")
        check_positive_int(self.max_queue, "--max-queue")
        if (
            isinstance(self.max_wait_ms, bool)
            or not isinstance(self.max_wait_ms, (int, float))
            or not 0 <= self.max_wait_ms < 60_000
        ):
            raise UsageError(f"--max-wait-ms must be a number in [0, 60000), got {self.max_wait_ms!r}")
        if self.default_eta is not None:
            self.default_eta = check_eta(self.default_eta, "--eta")


def check_request(config: EngineConfig, eta: float | None, topk: int) -> tuple[float, int]:
    """η (default: the engine's) and top-k of a request, checked ("eta", "topk" are named)."""
    eta = config.default_eta if eta is None else check_eta(eta, "eta")
    return eta, check_positive_int(topk, "topk")


def admit(admission: Admission, *, ready: bool, closing: bool, admitted: bool = False) -> None:
    """Take one unit of `admission` for a request, or raise :class:`EngineBusy` saying why not.

    `admitted`: the caller already took the unit (a request with several images takes them all at
    once with ``admission.try_acquire(n)``, then submits each image with ``admitted=True``); the
    engine releases it when the image is answered, as for any other request.
    """
    if closing or not ready:
        if admitted:
            admission.release()
        raise EngineBusy("closing" if closing else "not ready")
    if not admitted and not admission.try_acquire():
        raise EngineBusy("full")


@runtime_checkable
class ServingEngine(Protocol):
    """What the HTTP layer needs from an engine (see the module docstring for the two that exist)."""

    config: EngineConfig
    observer: EngineObserver
    #: images accepted and not yet answered, bounded by ``config.max_queue``
    admission: Admission

    async def start(self) -> None:
        """Create the sessions (or deployments) and warm them up; :attr:`ready` is True after it."""

    async def close(self) -> None:
        """Stop accepting, answer every accepted request, release the resources (idempotent)."""

    @property
    def ready(self) -> bool: ...

    @property
    def closing(self) -> bool: ...

    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered."""

    def depth(self, stage: str) -> int:
        """Requests waiting for `stage` (for the queue-depth metric)."""

    def expect(self) -> AbstractContextManager[None]:
        """Announce a request on its way (body being read) while the block runs."""

    async def submit(
        self, image: np.ndarray, eta: float | None = None, topk: int = 5, *, admitted: bool = False
    ) -> Answer:
        """Classify one preprocessed (3, S, S) float32 image; raises :class:`EngineBusy`."""
