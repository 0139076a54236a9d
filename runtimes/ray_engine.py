"""Folder inference on a Ray cluster (``infer(..., engine="ray")``, ``cfvit infer --engine ray``).

The driver cuts the inputs (found as the local engine finds them) into batches. Each batch is a
Ray task that decodes and preprocesses its files (an unreadable file becomes an error row, with
the local engine's reason) followed by a call on one of a pool of actors, each holding one
:class:`CFViTPipeline` built once in its ``__init__``. The driver keeps about two batches in flight
per actor and yields the rows in input order; writing them, the summary and interrupts are the
shared shell's (:mod:`runtimes.inference`).

Faults are the driver's job, not Ray's (Ray Data's fixed actor pool can hang on a dead actor, and
a restarted actor would need its object-store arguments again): when an actor dies or a node of
the layout leaves the cluster, the driver kills the pool, lays a new one out on the nodes still
alive (:func:`~runtimes.ray_cluster.layout_pool`), and runs the batches that had not come back
again. Rows are kept per batch and a batch's rows are taken once, so a batch that is run twice
still gives one row per input. The run's summary gets one warning saying what was lost and redone.
When nothing finishes for ``stall_timeout`` seconds, or no node is left, the run ends with
:class:`~runtimes.inference.InferStopped` naming the pending resource demand (the rows done so
far are kept by the shell). An actor that dies on a node that stays alive (a crash, not a lost
node) is not retried on that node; once no node is left the run ends the same way.

Shipping the export: by default the driver reads ``manifest.json`` and the coarse and fine graphs
once, puts them in Ray's object store, and every actor writes them to a private temporary folder,
verifies their sha256 (:meth:`Manifest.verify`) and builds its sessions from there, so a node need
not see the driver's disk. ``shared_export=True`` makes the actors load EXPORT_DIR by its path
instead (a folder on a shared file system; nothing is copied). The input images are read by the
decode tasks, so on a multi-node cluster they must be readable at the same path on every node.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

import numpy as np

from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import MANIFEST_NAME, Manifest
from cfvit_deploy.preprocessing import PreprocessConfig

from .backends import SessionConfig, check_provider
from .inference import InferJob, InferStopped, decode_image
from .pipeline import CFViTPipeline
from .ray_cluster import PoolLayout, RayOptions, alive_nodes, import_ray, layout_pool, ray_cluster
from .rows import InferRow, rows_for_batch

__all__ = ["CPU_PROVIDERS", "RayOptions", "check_ray_arguments", "ray_rows"]

log = logging.getLogger(__name__)
#: Providers an actor can run (the engine requests CPUs only).
CPU_PROVIDERS = ("cpu", "openvino")
_GRAPHS = ("coarse", "fine")
IN_FLIGHT_PER_ACTOR = 2  #: batches sent to an actor and not back yet (one running, one waiting)
MAX_TRIES = 3  #: runs of one batch that failed by themselves (not with a lost node) before the run ends
_NODE_CHECK_S = 2.0  #: how often the driver compares the alive nodes with the layout's
_WAIT_S = 0.5  #: longest wait for a result (signals are handled between waits)


def check_ray_arguments(
    source: Any, provider: str, config: SessionConfig | None, overlay: Any, workers: int | None, options: RayOptions
) -> None:
    """Refuse, before any work, what the Ray engine cannot do; then make sure Ray is installed."""
    if isinstance(source, CFViTPipeline):
        raise UsageError("--engine ray needs an export folder or a Manifest, not a ready pipeline")
    local_only = {
        "--overlay": overlay is not None,
        "--threads (use --actor-threads)": config is not None and config.threads is not None,
        "--allow-fallback": config is not None and config.allow_fallback,
        "workers": workers is not None,
    }
    for flag, given in local_only.items():
        if given:
            raise UsageError(f"{flag} is not supported with --engine ray")
    options.check()
    if check_provider(provider) not in CPU_PROVIDERS:
        raise UsageError(f"--engine ray runs CPU providers only ({', '.join(CPU_PROVIDERS)}), got {provider!r}")
    import_ray()


def ray_rows(
    manifest: Manifest,
    job: InferJob,
    *,
    provider: str = "cpu",
    options: RayOptions | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[InferRow]:
    """The rows of `job` on Ray, in input order; the cluster is connected on the first row, released at the end.

    `warn` receives one line per fault the run recovered from (a lost node, the work redone).
    """
    options = options or RayOptions()
    with ray_cluster(options.address or "local") as ray:
        assert manifest.directory is not None
        export = str(manifest.directory.absolute()) if options.shared_export else [ray.put(_export_files(manifest))]
        actor_args = (export, provider, job.eta, job.topk)
        yield from _Driver(ray, job, manifest.preprocessing, options, actor_args, warn).rows()


def _export_files(manifest: Manifest) -> dict[str, bytes]:
    """``manifest.json`` and the coarse and fine graphs, as bytes (what the actors need)."""
    assert manifest.directory is not None
    names = [MANIFEST_NAME, *(manifest.graphs[g].file for g in _GRAPHS)]
    return {name: (manifest.directory / name).read_bytes() for name in names}


def load_pipeline_manifest(directory: str | Path) -> Manifest:
    """The manifest of `directory`, restricted to the coarse and fine graphs, their sha256 verified."""
    manifest = Manifest.load(directory, verify=False)
    manifest.graphs = {name: manifest.graphs[name] for name in _GRAPHS}
    manifest.verify()
    return manifest


@dataclass
class _Flight:
    """One batch sent to the pool: its decode task, its actor call and the actor (an index in the pool)."""

    batch: int
    decode: Any
    result: Any
    actor: int
    generation: int


class _Driver:
    """Sends batches to the pool, takes each batch's rows once, and lays the pool out again on a fault."""

    def __init__(
        self,
        ray: Any,
        job: InferJob,
        pp: PreprocessConfig,
        options: RayOptions,
        actor_args: tuple[Any, ...],
        warn: Callable[[str], None] | None,
    ) -> None:
        self.ray, self.job, self.pp, self.options, self.actor_args = ray, job, pp, options, actor_args
        self.warn = warn or (lambda line: log.warning("%s", line))
        n = len(job.paths)
        self.batches = [range(i, min(i + job.batch_size, n)) for i in range(0, n, job.batch_size)]
        self.todo: deque[int] = deque(range(len(self.batches)))
        self.done: dict[int, list[InferRow]] = {}
        self.flights: dict[Any, _Flight] = {}  #: result ref -> flight
        self.tries = [0] * len(self.batches)
        self.excluded: set[str] = set()  #: nodes that lost an actor (not used again in this run)
        self.generation, self.actors, self.layout = 0, [], None  # type: ignore[var-annotated]
        self.lost_nodes, self.redone, self.relayouts = 0, 0, 0
        self.fault_at: float | None = None  #: when the last fault was noticed, until a batch finishes after it
        self.recovered_s = 0.0  #: longest time from noticing a fault to the next finished batch
        self.last_progress = self.last_node_check = monotonic()

    # -- the pool -----------------------------------------------------------------------------------
    def _start_pool(self) -> None:
        """Lay a pool out on the alive nodes (not the excluded ones) and start its actors."""
        nodes = {k: v for k, v in alive_nodes(self.ray).items() if k not in self.excluded}
        if not nodes:
            raise InferStopped(f"no Ray node with CPUs is left to run the job ({self._demand()})")
        opts = self.options
        want = min(opts.num_actors or 0, len(self.batches)) or None
        try:
            layout = layout_pool(nodes, want, opts.actor_threads)
            if opts.num_actors is None and layout.plan.num_actors > len(self.batches):  # an actor per batch at most
                layout = layout_pool(nodes, len(self.batches), layout.plan.threads)
        except UsageError as exc:
            if self.layout is None:  # before any work: a usage error (exit 2)
                raise
            raise InferStopped(f"the Ray nodes left cannot hold the pool: {exc}") from None  # rows kept
        self.layout, self.generation = layout, self.generation + 1
        actor_class = self.ray.remote(_PipelineActor)
        self.actors = [
            actor_class.options(
                num_cpus=layout.plan.cpus_per_actor,
                max_restarts=0,  # the driver replaces lost actors (a restart would need the export again)
                scheduling_strategy=self._on_node(node),
            ).remote(*self.actor_args, layout.plan.threads)
            for node in layout.actor_nodes
        ]
        self.decode = self.ray.remote(_decode_batch).options(num_cpus=layout.cpus_per_decode_task)

    def _on_node(self, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id=node, soft=False)

    def _relayout(self, why: str) -> None:
        """Kill the pool, put its batches back in the queue, and start a new pool on the nodes left."""
        redo = sorted({f.batch for f in self.flights.values()} - set(self.done))
        self.redone += sum(len(self.batches[b]) for b in redo)
        for flight in self.flights.values():
            for ref in (flight.result, flight.decode):
                self._quietly(self.ray.cancel, ref, force=False)
        for actor in self.actors:
            self._quietly(self.ray.kill, actor, no_restart=True)
        self.flights.clear()
        self.todo.extendleft(reversed(redo))
        self.relayouts += 1
        self.fault_at = self.fault_at or monotonic()
        log.debug("Ray pool laid out again (%s); %d batches to run again", why, len(redo))
        self._start_pool()

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as exc:  # already gone: nothing to cancel or kill
            log.debug("ignored: %s", exc)

    # -- the run ------------------------------------------------------------------------------------
    def rows(self) -> Iterator[InferRow]:
        following = 0
        try:
            self._start_pool()
            while following < len(self.batches):
                self._send()
                ready, _ = (
                    self.ray.wait(list(self.flights), num_returns=1, timeout=_WAIT_S) if self.flights else ([], [])
                )
                for ref in ready:
                    self._take(ref)
                while following in self.done:
                    yield from self.done.pop(following)
                    following += 1
                self._watch()
        finally:
            for actor in self.actors:
                self._quietly(self.ray.kill, actor, no_restart=True)
        if self.lost_nodes or self.relayouts:
            self.warn(self._fault_line())

    def _send(self) -> None:
        """Give queued batches to the actors with fewer than IN_FLIGHT_PER_ACTOR batches in flight."""
        load = [0] * len(self.actors)
        for flight in self.flights.values():
            load[flight.actor] += 1
        while self.todo:
            actor = min(range(len(self.actors)), key=load.__getitem__)
            if load[actor] >= IN_FLIGHT_PER_ACTOR:
                return
            batch = self.todo.popleft()
            if batch in self.done:
                continue
            items = [(i, str(self.job.paths[i]), str(self.job.paths[i].absolute())) for i in self.batches[batch]]
            decode = self.decode.remote(items, self.pp, self.job.max_pixels, self.job.decode)
            result = self.actors[actor].run.remote(decode)
            self.flights[result] = _Flight(batch, decode, result, actor, self.generation)
            load[actor] += 1

    def _take(self, ref: Any) -> None:
        """A result came back: keep its rows (once per batch), or handle the failure it carries."""
        flight = self.flights.pop(ref, None)
        if flight is None:  # a call of a pool replaced while this wait's results were taken
            return
        exceptions = self.ray.exceptions
        try:
            records = self.ray.get(ref)
        except exceptions.RayActorError as exc:  # its actor (or the actor's node) is gone
            self.todo.appendleft(flight.batch)
            self._actor_lost(flight, exc)
            return
        except exceptions.RayError as exc:  # a decode task that failed past Ray's retries, a lost object
            self.tries[flight.batch] += 1
            if self.tries[flight.batch] >= MAX_TRIES:
                raise InferStopped(f"a batch failed {MAX_TRIES} times on Ray: {_first_line(exc)}") from None
            self.todo.appendleft(flight.batch)
            return
        if flight.batch not in self.done:
            records.sort(key=lambda r: r["index"])
            self.done[flight.batch] = [
                InferRow.from_json({k: v for k, v in r.items() if k != "index"}) for r in records
            ]
            self.last_progress = monotonic()
            if self.fault_at is not None:
                self.recovered_s = max(self.recovered_s, self.last_progress - self.fault_at)
                self.fault_at = None

    def _actor_lost(self, flight: _Flight, exc: Exception) -> None:
        if flight.generation != self.generation:
            return  # a call of a pool that was already replaced
        assert self.layout is not None
        node = self.layout.actor_nodes[flight.actor]
        never_started = "creation task" in str(exc) or "never ran" in str(exc)  # its constructor raised, or Ray
        if never_started and node in alive_nodes(self.ray):  # dropped it before it started: not a lost node
            raise InferStopped(f"a Ray pipeline actor could not start: {_death_reason(exc)}") from None
        self.excluded.add(node)
        self.lost_nodes += 1
        self._relayout(f"actor lost on node {node[:8]}")

    def _watch(self) -> None:
        """Lay the pool out again when a node of the layout left; end the run when nothing progresses."""
        now = monotonic()
        if now - self.last_node_check >= _NODE_CHECK_S and self.layout is not None:
            self.last_node_check = now
            alive = alive_nodes(self.ray)
            gone = [n for n in self.layout.node_cpus if n not in alive and n not in self.excluded]
            if gone:
                self.excluded.update(gone)
                self.lost_nodes += len(gone)
                self._relayout(f"{len(gone)} node(s) left the cluster")
        if now - self.last_progress > self.options.stall_timeout:
            raise InferStopped(f"no batch finished on Ray for {self.options.stall_timeout:g} s ({self._demand()})")

    def _demand(self) -> str:
        """What the run waits for: the pool's requests against the CPUs the cluster has free."""
        layout: PoolLayout | None = self.layout
        try:
            free = float(self.ray.available_resources().get("CPU", 0.0))
            nodes = len(alive_nodes(self.ray))
        except Exception:  # the cluster itself is gone
            free, nodes = 0.0, 0
        need = (
            "nothing laid out"
            if layout is None
            else f"pending demand: {layout.plan.num_actors} actor(s) x {{'CPU': {layout.plan.cpus_per_actor:g}}}"
            f" and decode tasks of {{'CPU': {layout.cpus_per_decode_task:g}}}"
        )
        return f"{need}; the cluster has {free:g} CPU free on {nodes} alive node(s)"

    def _fault_line(self) -> str:
        n = len(self.job.paths)
        return (
            f"Ray: {self.lost_nodes} node(s) lost during the run; the pool was laid out again "
            f"{self.relayouts} time(s) ({self.layout.describe() if self.layout else 'no pool'}) and "
            f"{self.redone} of {n} inputs were run again (work resumed {self.recovered_s:.1f} s after the loss "
            "was noticed); every input has exactly one row"
        )


def _death_reason(exc: BaseException) -> str:
    """Ray's line saying why an actor is dead (else the first line of its message)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return next((line for line in lines if line.startswith("The actor is dead because")), _first_line(exc))


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _decode_batch(
    items: list[tuple[int, str, str]], pp: PreprocessConfig, max_pixels: int | None, decode: str = "exact"
) -> dict[str, Any]:
    """Decode task: ``image`` (zeros for unreadable files), ``ok`` and ``error`` (the local engine's reason)."""
    n = len(items)
    images = np.zeros((n, 3, pp.crop_size, pp.crop_size), dtype=np.float32)
    ok, errors = np.ones(n, dtype=bool), [""] * n
    for i, (_, _, file) in enumerate(items):
        item = decode_image(Path(file), pp, max_pixels, decode)
        if isinstance(item, str):
            ok[i], errors[i] = False, item
        else:
            images[i] = item
    return {"index": [t[0] for t in items], "path": [t[1] for t in items], "image": images, "ok": ok, "error": errors}


class _PipelineActor:
    """One :class:`CFViTPipeline` per actor, built once from the shipped (or shared) export."""

    def __init__(self, export: list[Any] | str, provider: str, eta: float | None, topk: int, threads: int) -> None:
        import ray

        config = SessionConfig(threads=threads)
        if isinstance(export, str):  # a folder every node can read
            self.pipeline = CFViTPipeline(load_pipeline_manifest(export), provider, config)
        else:  # [ObjectRef] (in a list, so Ray does not resolve it into every constructor call's arguments)
            files: dict[str, bytes] = ray.get(export[0])
            with tempfile.TemporaryDirectory(prefix="cfvit-export-") as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                self.pipeline = CFViTPipeline(load_pipeline_manifest(tmp), provider, config)
        self.eta, self.topk = eta, topk
        self.labels = self.pipeline.manifest.labels()

    def run(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of a decoded batch as JSON records with their input ``index``."""
        rows = [InferRow(path=p, error=e) for p, e in zip(batch["path"], batch["error"], strict=True)]
        good = np.flatnonzero(batch["ok"])
        if good.size:
            result = self.pipeline.run(np.ascontiguousarray(batch["image"][good]), self.eta)
            done = rows_for_batch(result, [rows[i].path for i in good], self.labels, self.topk)
            for i, row in zip(good, done, strict=True):
                rows[i] = row
        return [{"index": int(i), **row.to_json()} for i, row in zip(batch["index"], rows, strict=True)]
