"""``cfvit serve --engine ray``: the two stages as Ray Serve deployments, each batched by Ray Serve.

Torch-free; Ray is imported on first use (the ``ray`` extra). The HTTP front (the same Starlette
app, validation and metrics) stays in the ``cfvit serve`` process; :class:`RayServeEngine`, a
:class:`~runtimes.engine.ServingEngine`, replaces the local engine behind it. It deploys two Ray Serve
applications, ``cfvit-coarse`` and ``cfvit-fine``, each with ``@serve.batch`` (``max_batch`` and
``max_wait_ms`` as Ray Serve's ``max_batch_size`` and ``batch_wait_timeout_s``) and its own number
of replicas, and talks to them through deployment handles. The gate runs in the front, per request,
with :class:`runtimes.stages.StageRunner`'s code, so the answers are those of the local server.
Ray Serve's own HTTP proxy is not started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.extras import require
from cfvit_deploy.manifest import Manifest

from .admission import Admission
from .engine import EngineConfig, EngineObserver, admit, check_request
from .stages import Answer, StageRunner

log = logging.getLogger(__name__)
APPS = {"coarse": "cfvit-coarse", "fine": "cfvit-fine"}


class _ManifestOnly:
    """A backend stand-in that only carries the manifest (the front gates and answers; no graphs)."""

    name = "none"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def run(self, graph: str, inputs: Any) -> dict[str, np.ndarray]:
        raise RuntimeError("the front of the Ray engine runs no graph")


def stage_deployment(stage: str, max_batch: int, max_wait_ms: float) -> Any:
    """A Ray Serve deployment running `stage`'s graph on batches formed by ``@serve.batch``.

    Each call takes one request's input (an image for "coarse", the fine inputs for "fine") and
    returns ``(row, batch size, position in the batch)``; the front records batch sizes from it.
    """
    serve = require("ray.serve", "ray", "cfvit serve --engine ray")

    @serve.deployment(name=f"{stage.capitalize()}Stage")
    class Stage:
        def __init__(self, export_dir: str, provider: str, threads: int | None) -> None:
            from .backends import SessionConfig, create_backend

            manifest = Manifest.load(export_dir)
            backend = create_backend(manifest, provider, SessionConfig(threads=threads), graphs=(stage,))
            self.runner = StageRunner(backend)
            self.runner.warm_up((stage,))

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def __call__(self, items: list[Any]) -> list[tuple[Any, int, int]]:
            if stage == "coarse":
                rows = await asyncio.to_thread(self.runner.run_coarse, np.stack(items))
            else:
                rows = await asyncio.to_thread(self.runner.run_fine, items)
            return [(row, len(items), i) for i, row in enumerate(rows)]

    return Stage


class RayServeEngine:
    """A :class:`~runtimes.engine.ServingEngine` on Ray Serve deployments (the gate runs here, per request)."""

    def __init__(
        self,
        export_dir: str | Path,
        config: EngineConfig,
        provider: str = "cpu",
        threads: int | None = None,
        replicas: dict[str, int] | None = None,
        observer: EngineObserver | None = None,
        ray_init: dict[str, Any] | None = None,
    ) -> None:
        require("ray.serve", "ray", "cfvit serve --engine ray")
        self.export_dir = str(Path(export_dir).resolve())
        self.config, self.provider, self.threads = config, provider, threads
        self.replicas = replicas or {"coarse": 1, "fine": 1}
        self.observer = observer or EngineObserver()
        self.ray_init = ray_init or {}
        self.runner = StageRunner(_ManifestOnly(Manifest.load(export_dir)))  # type: ignore[arg-type]
        if self.config.default_eta is None:
            self.config.default_eta = self.runner.manifest.default_eta
        self._handles: dict[str, Any] = {}
        self._in_stage = {"coarse": 0, "fine": 0}
        #: requests accepted and not yet answered, at most config.max_queue
        self.admission = Admission(config.max_queue, "--max-queue")
        self._closing = self._ready = self._started_ray = False

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._deploy)
        self._ready = True

    def _deploy(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(include_dashboard=False, logging_level=logging.WARNING, **self.ray_init)
            self._started_ray = True
        serve.start(http_options={"location": "NoServer"})
        cfg = self.config
        for stage in ("coarse", "fine"):
            deployment = stage_deployment(stage, cfg.max_batch, cfg.max_wait_ms).options(
                num_replicas=self.replicas[stage], max_ongoing_requests=max(2 * cfg.max_batch, 8)
            )
            app = deployment.bind(self.export_dir, self.provider, self.threads)
            self._handles[stage] = serve.run(
                app,
                name=APPS[stage],
                route_prefix=None,
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )

    async def close(self) -> None:
        """Stop accepting, wait for every accepted request, then delete the deployments."""
        self._closing = True
        while self.admission.in_use:
            await asyncio.sleep(0.01)
        self._ready = False
        if self._handles:
            await asyncio.get_running_loop().run_in_executor(None, self._undeploy)

    def _undeploy(self) -> None:
        import ray
        from ray import serve

        for name in APPS.values():
            with contextlib.suppress(Exception):
                serve.delete(name)
        self._handles.clear()
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()

    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def pending(self) -> int:
        return self.admission.in_use

    def depth(self, stage: str) -> int:
        """Requests sent to `stage`'s deployment and not yet back (queued or running there)."""
        return self._in_stage[stage]

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        yield  # Ray Serve's batching waits its batch_wait_timeout_s by itself

    def check_request(self, eta: float | None, topk: int) -> tuple[float, int]:
        """η (default: the engine's) and top-k of a request, checked ("eta", "topk" are named)."""
        return check_request(self.config, eta, topk)

    # -- requests -----------------------------------------------------------------------------------
    async def _call(self, stage: str, item: Any) -> Any:
        self._in_stage[stage] += 1
        try:
            row, size, position = await self._handles[stage].remote(item)
        finally:
            self._in_stage[stage] -= 1
        if position == 0 and self.observer.on_batch:
            self.observer.on_batch(stage, size, 0.0)
        return row

    async def submit(
        self, image: np.ndarray, eta: float | None = None, topk: int = 5, *, admitted: bool = False
    ) -> Answer:
        """Classify one preprocessed image as :meth:`runtimes.batching.BatchingEngine.submit` does."""
        admit(self.admission, ready=self._ready, closing=self._closing, admitted=admitted)
        try:
            eta, topk = self.check_request(eta, topk)
            coarse = await self._call("coarse", image)
            if self.runner.exits(coarse, eta):
                answer, stage = self.runner.answer(coarse, eta, topk), "coarse"
            else:
                fine = await self._call("fine", coarse.fine_inputs)
                answer, stage = self.runner.answer(coarse, eta, topk, fine), "fine"
        finally:
            self.admission.release()
        if self.observer.on_answer:
            self.observer.on_answer(stage)
        return answer
