"""Two-stage dynamic batching for online serving (torch-free, no HTTP).

A serving system usually batches one model. CF-ViT's second stage is data dependent: only the
requests whose coarse confidence is below η go on to the fine graph, so running each request's
fine stage alone would waste what batching gives the coarse stage. :class:`BatchingEngine` batches
both stages:

    submit -> coarse queue -> batch (up to max_batch, waiting at most max_wait_ms) -> coarse graph
           -> per-request η gate -> exited: answered at once
                                 -> fine queue -> batch across requests -> fine graph -> answered

The graphs run in one worker thread per stage, so the event loop never blocks and the coarse stage
of the next batch overlaps the fine stage of the previous one. The queues are bounded by
``max_queue`` requests in the engine (queued or running); :meth:`BatchingEngine.submit` raises
:class:`EngineBusy` beyond it. A stage waits up to ``max_wait_ms`` for more requests only when more
can come: requests announced with :meth:`BatchingEngine.expect` (the HTTP layer calls it before
reading a body) for the coarse stage, a busy coarse stage for the fine stage. A lone request is
therefore never delayed by the wait. :meth:`BatchingEngine.close` stops accepting and answers every
request already accepted (drain).

The answer for one image is built by :func:`runtimes.rows.rows_for_batch` from the same arrays
:class:`~runtimes.pipeline.CFViTPipeline` computes, with the same functions (:mod:`runtimes.gate`:
max-softmax confidence, the gate ``confidence >= eta`` per request, the merge), so it equals
``cfvit infer``'s row.
:class:`runtimes.stages.StageRunner` holds these pieces without any queueing; the Ray Serve deployments
reuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import numpy as np

from .admission import Admission
from .engine import EngineBusy, EngineConfig, EngineObserver, admit, check_request
from .stages import STAGES, Answer, CoarseRow, FineRow, StageRunner

#: the per-stage calls live in runtimes.stages and the interface in runtimes.engine; re-exported here
__all__ = [
    "STAGES",
    "Answer",
    "BatchingEngine",
    "CoarseRow",
    "EngineBusy",
    "EngineConfig",
    "EngineObserver",
    "FineRow",
    "StageRunner",
]


@dataclass
class _Ticket:
    image: np.ndarray
    eta: float
    topk: int
    future: asyncio.Future[Answer]
    coarse: CoarseRow | None = None


_CLOSE = None  # queue sentinel: no more tickets


@dataclass
class _Counts:
    expected: int = 0  #: announced by expect() and not yet submitted
    coarse_busy: bool = False
    closing: bool = False
    ready: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class BatchingEngine:
    """Two-stage dynamic batching on one event loop (see the module docstring).

    `load` builds the :class:`StageRunner` (session creation); :meth:`start` runs it and a warm-up
    in the coarse worker thread, then starts the two batching tasks.
    """

    def __init__(
        self,
        load: Callable[[], StageRunner],
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._load = load
        self.runner: StageRunner | None = None
        self._workers = {stage: ThreadPoolExecutor(1, thread_name_prefix=f"cfvit-{stage}") for stage in STAGES}
        self._queues: dict[str, asyncio.Queue[_Ticket | None]] = {}
        self._state = _Counts()
        #: requests accepted and not yet answered (queued or running), at most config.max_queue
        self.admission = Admission(self.config.max_queue, "--max-queue")

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the sessions, warm them up and start batching; :attr:`ready` is True after it."""
        loop = asyncio.get_running_loop()
        self._queues = {stage: asyncio.Queue() for stage in STAGES}

        def load_and_warm() -> StageRunner:
            runner = self._load()
            runner.warm_up()
            return runner

        self.runner = await loop.run_in_executor(self._workers["coarse"], load_and_warm)
        if self.config.default_eta is None:
            self.config.default_eta = self.runner.manifest.default_eta
        self._state.tasks = [asyncio.create_task(self._coarse_loop()), asyncio.create_task(self._fine_loop())]
        self._state.ready = True

    async def close(self) -> None:
        """Stop accepting, answer every accepted request, stop the workers (idempotent)."""
        state = self._state
        if not state.closing:
            state.closing = True
            if state.tasks:
                self._queues["coarse"].put_nowait(_CLOSE)
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        state.ready = False
        for worker in self._workers.values():
            worker.shutdown(wait=False, cancel_futures=False)

    @property
    def ready(self) -> bool:
        return self._state.ready and not self._state.closing

    @property
    def closing(self) -> bool:
        return self._state.closing

    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered."""
        return self.admission.in_use

    def depth(self, stage: str) -> int:
        """Requests waiting in `stage`'s queue (not counting the batch that runs)."""
        queue = self._queues.get(stage)
        return 0 if queue is None else queue.qsize()

    # -- requests -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def expect(self) -> Any:
        """Announce a request that is on its way (body being read or decoded) while the block runs,
        so that a coarse batch waits for it (up to max_wait_ms) instead of leaving without it."""
        self._state.expected += 1
        try:
            yield
        finally:
            self._state.expected -= 1

    def check_request(self, eta: float | None, topk: int) -> tuple[float, int]:
        """η (default: the engine's) and top-k of a request, checked ("eta", "topk" are named)."""
        return check_request(self.config, eta, topk)

    async def submit(
        self, image: np.ndarray, eta: float | None = None, topk: int = 5, *, admitted: bool = False
    ) -> Answer:
        """Classify one preprocessed (3, S, S) float32 image; raises :class:`EngineBusy` when full,
        closing or not ready. Cancelling the awaiting task drops the request before its next stage.
        `admitted`: the caller took this image's unit of :attr:`admission` already (see :func:`admit`)."""
        state = self._state
        admit(self.admission, ready=state.ready, closing=state.closing, admitted=admitted)
        try:
            eta, topk = self.check_request(eta, topk)
        except BaseException:
            self.admission.release()
            raise
        ticket = _Ticket(image, eta, topk, asyncio.get_running_loop().create_future())
        self._queues["coarse"].put_nowait(ticket)
        try:
            return await ticket.future
        finally:
            if not ticket.future.done():  # the caller went away: the batcher skips a cancelled ticket
                ticket.future.cancel()

    # -- batching -----------------------------------------------------------------------------------
    async def _collect(self, stage: str, more_coming: Callable[[], bool]) -> tuple[list[_Ticket], bool]:
        """The next batch of live tickets of `stage`, and whether the queue was closed."""
        queue, cfg = self._queues[stage], self.config
        loop = asyncio.get_running_loop()
        batch: list[_Ticket] = []
        closed = False
        deadline: float | None = None
        while len(batch) < cfg.max_batch:
            if not queue.empty():
                item = queue.get_nowait()
            elif not batch:
                item = await queue.get()
            else:
                if deadline is None:
                    deadline = loop.time() + cfg.max_wait_ms / 1000
                remaining = deadline - loop.time()
                if remaining <= 0 or not more_coming():
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), min(remaining, 0.0005))
                except asyncio.TimeoutError:
                    continue
            if item is _CLOSE:
                closed = True
                break
            if item.future.done():  # cancelled by a client that went away: costs nothing
                self.admission.release()
                continue
            batch.append(item)
        return batch, closed

    async def _run(self, stage: str, fn: Callable[[Any], Any], arg: Any, size: int) -> Any:
        start = perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._workers[stage], fn, arg)
        if self.observer.on_batch:
            self.observer.on_batch(stage, size, perf_counter() - start)
        return result

    def _finish(
        self, ticket: _Ticket, stage: str, answer: Answer | None = None, error: BaseException | None = None
    ) -> None:
        self.admission.release()
        if ticket.future.done():
            return
        if error is not None:
            ticket.future.set_exception(error)
            return
        ticket.future.set_result(answer)  # type: ignore[arg-type]
        if self.observer.on_answer:
            self.observer.on_answer(stage)

    async def _coarse_loop(self) -> None:
        runner, state = self.runner, self._state
        assert runner is not None
        closed = False
        while not closed:
            batch, closed = await self._collect("coarse", lambda: state.expected > 0)
            if not batch:
                continue
            # a new array per batch: the fine inputs of the requests that go on keep views into it
            images = np.stack([ticket.image for ticket in batch])
            state.coarse_busy = True
            try:
                rows = await self._run("coarse", runner.run_coarse, images, len(batch))
            except Exception as exc:  # a failing graph answers its batch with the error, then goes on
                for ticket in batch:
                    self._finish(ticket, "coarse", error=exc)
                continue
            finally:
                state.coarse_busy = False
            exited = runner.gate(rows, [ticket.eta for ticket in batch])  # one η per request
            for ticket, row, exits in zip(batch, rows, exited, strict=True):
                ticket.image = None  # type: ignore[assignment]  # free it while the fine stage waits
                if ticket.future.done():
                    self._finish(ticket, "coarse")
                elif exits:
                    self._finish(ticket, "coarse", runner.answer(row, ticket.eta, ticket.topk))
                else:
                    ticket.coarse = row
                    self._queues["fine"].put_nowait(ticket)
        self._queues["fine"].put_nowait(_CLOSE)

    async def _fine_loop(self) -> None:
        runner, state = self.runner, self._state
        assert runner is not None

        def coarse_active() -> bool:
            return state.coarse_busy or self.depth("coarse") > 0

        closed = False
        while not closed:
            batch, closed = await self._collect("fine", coarse_active)
            if not batch:
                continue
            feeds = [t.coarse.fine_inputs for t in batch]  # type: ignore[union-attr]
            try:
                rows = await self._run("fine", runner.run_fine, feeds, len(batch))
            except Exception as exc:
                for ticket in batch:
                    self._finish(ticket, "fine", error=exc)
                continue
            for ticket, row in zip(batch, rows, strict=True):
                done = ticket.future.done()
                self._finish(
                    ticket,
                    "fine",
                    None
                    if done
                    else runner.answer(
                        ticket.coarse,
                        ticket.eta,  # type: ignore[arg-type]
                        ticket.topk,
                        row,
                    ),
                )
