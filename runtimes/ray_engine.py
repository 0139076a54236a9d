"""Folder inference on a Ray cluster (``infer(..., engine="ray")``, ``cfvit infer --engine ray``).

Ray Data reads the input paths (found as the local engine finds them), decodes and preprocesses
them in parallel tasks (an unreadable file becomes an error row, with the local engine's reason),
and classifies them in ``map_batches`` on a pool of actors, each holding one :class:`CFViTPipeline`
built once in its ``__init__``. This module only produces rows (:func:`ray_rows`, the local
engine's :func:`~runtimes.inference.rows_for_batch`), in input order; writing them, the summary and
interrupts are the shared shell's (:mod:`runtimes.inference`).

Ray's own log lines (its logger, Ray Data's progress bars and execution messages, the workers'
output forwarded to the driver) are turned off: the command prints only its own lines.

Shipping the export: by default the driver reads ``manifest.json`` and the coarse and fine graphs
once, puts them in Ray's object store, and every actor writes them to a private temporary folder,
verifies their sha256 (:meth:`Manifest.verify`) and builds its sessions from there. That works on
any cluster, since a node need not see the driver's disk. ``shared_export=True`` makes the actors
load EXPORT_DIR by its path instead (a folder on a shared file system; nothing is copied).

The input images are read by the decode tasks, so on a multi-node cluster they must be readable at
the same absolute path on every node (a shared file system).

Resources: Ray schedules by CPU requests, and an actor pool that requests every CPU starves the
decode tasks (the dataset never finishes). :func:`plan_actors` sizes the requests so that a share
of the cluster's CPUs always stays free for decoding; requests may be fractional (0.5 CPU per actor
on a 2-CPU machine).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.checks import check_positive_int
from cfvit_deploy.errors import UsageError
from cfvit_deploy.extras import require
from cfvit_deploy.manifest import MANIFEST_NAME, Manifest
from cfvit_deploy.preprocessing import PreprocessConfig

from .backends import SessionConfig, check_provider
from .inference import InferJob, InferRow, decode_image, rows_for_batch
from .pipeline import CFViTPipeline
from .sinks import row_schema

#: Providers an actor can run (the engine requests CPUs only).
CPU_PROVIDERS = ("cpu", "openvino")
_GRAPHS = ("coarse", "fine")
_DECODE_WORKER_MEMORY = 256 * 2**20  #: bytes: a Ray worker with numpy and PIL loaded
#: Environment for a quiet Ray: no dedup summaries, no Ray Data progress bars or tips.
_QUIET_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data and pyarrow, or a MissingExtraError naming ``cfvit-deploy[ray]``."""
    require("pyarrow", "ray", "--engine ray")
    ray = require("ray", "ray", "--engine ray")
    require("ray.data", "ray", "--engine ray")
    return ray


def check_ray_arguments(
    source: Any,
    provider: str,
    config: SessionConfig | None,
    overlay: Any,
    workers: int | None,
    num_actors: int | None,
    actor_threads: int | None,
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
    for name, value in (("--num-actors", num_actors), ("--actor-threads", actor_threads)):
        if value is not None:
            check_positive_int(value, name)
    if check_provider(provider) not in CPU_PROVIDERS:
        raise UsageError(f"--engine ray runs CPU providers only ({', '.join(CPU_PROVIDERS)}), got {provider!r}")
    import_ray()


@dataclass(frozen=True)
class ActorPlan:
    """Resource requests of one run."""

    num_actors: int
    cpus_per_actor: float  #: Ray CPU request of each actor (scheduling only; may be fractional)
    threads: int  #: ONNX Runtime intra-op threads of each actor's sessions
    decode_cpus: float  #: CPUs the actors leave free for the decode tasks
    cpus_per_decode_task: float


def plan_actors(cluster_cpus: float, num_actors: int | None = None, actor_threads: int | None = None) -> ActorPlan:
    """Split `cluster_cpus` between the actor pool and the decode tasks so every stage progresses.

    A quarter of the CPUs (at least 1, at most half) is kept for decoding; the actors share the
    rest. Missing values are derived: `actor_threads` from the actors' share (at least 1), and
    `num_actors` as many as fit the share at `actor_threads` (2 by default) each. Each actor
    requests ``min(threads, share / num_actors)`` CPUs, whole above 1 CPU, so the pool never takes
    the decoders' CPUs however many actors are asked for.
    """
    if not cluster_cpus > 0:
        raise UsageError(f"the Ray cluster has no CPUs ({cluster_cpus}); --engine ray needs at least one")
    decode = min(max(1.0, cluster_cpus / 4), cluster_cpus / 2)
    share = cluster_cpus - decode
    if num_actors is None:
        num_actors = max(1, int(share // (actor_threads or 2)))
    threads = actor_threads or max(1, int(share // num_actors))
    request = min(float(threads), share / num_actors)
    # whole CPUs above 1; below, rounded down to Ray's resource granularity (1e-4)
    request = float(math.floor(request)) if request > 1 else math.floor(request * 1e4) / 1e4
    return ActorPlan(num_actors, request, threads, decode, min(1.0, decode))


@contextlib.contextmanager
def ray_cluster(address: str = "local") -> Iterator[Any]:
    """Connect Ray for one run and disconnect afterwards; an already initialised Ray is used as is.

    ``local`` starts a private cluster with this machine's cores (no dashboard); anything else
    (``auto``, ``ray://host:10001``, ``host:6379``) is passed to ``ray.init(address=...)``.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    _quiet_ray()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(num_cpus=_machine_cpus(), include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError) as exc:  # no cluster there; a bad address; ray:// without ray[client]
        raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _quiet_ray() -> None:
    """Keep Ray's own log lines off stderr (the CLI prints only its own lines)."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_rows(
    manifest: Manifest,
    job: InferJob,
    *,
    provider: str = "cpu",
    address: str | None = None,
    num_actors: int | None = None,
    actor_threads: int | None = None,
    shared_export: bool = False,
) -> Iterator[InferRow]:
    """The rows of `job` on Ray, in input order; the cluster is connected on the first row, released at the end.

    `address`: ``local`` (default: a private cluster on this machine, shut down afterwards),
    ``auto`` or a Ray address; `num_actors`, `actor_threads`: see :func:`plan_actors`;
    `shared_export`: actors load the export folder by path instead of from the object store.
    """
    with ray_cluster(address or "local") as ray:
        assert manifest.directory is not None
        export = str(manifest.directory.absolute()) if shared_export else [ray.put(_export_files(manifest))]
        cpus = float(ray.cluster_resources().get("CPU", 0))
        batches = math.ceil(len(job.paths) / job.batch_size)
        plan = plan_actors(cpus, num_actors, actor_threads)
        if plan.num_actors > batches:  # an actor per batch at most: more would stay idle
            plan = plan_actors(cpus, batches, plan.threads)
        ds = _dataset(ray, job, manifest.preprocessing, plan, (export, provider, job.eta, job.topk))
        yield from _ordered(ds)


def infer_ray(export_dir: str | Path | Manifest, inputs: Any, **kwargs: Any) -> Any:
    """``infer(export_dir, inputs, engine="ray", **kwargs)`` (kept for callers of the older name)."""
    from .infer import infer

    return infer(export_dir, inputs, engine="ray", **kwargs)


def _export_files(manifest: Manifest) -> dict[str, bytes]:
    """``manifest.json`` and the coarse and fine graphs, as bytes (what the actors need)."""
    assert manifest.directory is not None
    names = [MANIFEST_NAME, *(manifest.graphs[g].file for g in _GRAPHS)]
    return {name: (manifest.directory / name).read_bytes() for name in names}


def _load_pipeline_manifest(directory: str | Path) -> Manifest:
    """The manifest of `directory`, restricted to the coarse and fine graphs, their sha256 verified."""
    manifest = Manifest.load(directory, verify=False)
    manifest.graphs = {name: manifest.graphs[name] for name in _GRAPHS}
    manifest.verify()
    return manifest


def _dataset(ray: Any, job: InferJob, pp: PreprocessConfig, plan: ActorPlan, actor_args: tuple[Any, ...]) -> Any:
    """paths -> decode tasks -> actor pool: a Ray Dataset of row records (the JSONL layout plus ``index``).

    One block per batch of `batch_size` paths; both stages map whole blocks (no re-bundling).
    """
    paths, batch_size, max_pixels = job.paths, job.batch_size, job.max_pixels
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    items = [{"index": i, "path": str(p), "file": str(p.absolute())} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    # Decode tasks reserve memory for a worker and twice their decoded batch. Being the only op with
    # a memory request also keeps Ray Data from fusing them into the actors (it fuses adjacent maps
    # with equal remote args), which would decode inside the actors, one batch at a time.
    batch_bytes = batch_size * 3 * pp.crop_size**2 * np.dtype(np.float32).itemsize
    # max_restarts=0: a restarted actor would need the shipped export again (Ray warns about that on
    # stderr for every actor with object-store constructor arguments); a crashed actor fails the run.
    ds = ds.map_batches(
        _decode_batch,
        fn_kwargs={"pp": pp, "max_pixels": max_pixels, "decode": job.decode},
        batch_size=None,
        batch_format="numpy",
        num_cpus=plan.cpus_per_decode_task,
        memory=_DECODE_WORKER_MEMORY + 2 * batch_bytes,
        udf_modifying_row_count=False,
    )
    with warnings.catch_warnings():  # max_restarts has no named parameter yet; Ray's own docs pass it so
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            _PipelineActor,
            fn_constructor_args=(*actor_args, plan.threads),
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.cpus_per_actor,
            udf_modifying_row_count=False,
            compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
            max_restarts=0,
        )
    ds.context.enable_progress_bars = ds.context.print_on_execution_start = False
    return ds


def _decode_batch(
    batch: dict[str, np.ndarray], pp: PreprocessConfig, max_pixels: int | None, decode: str = "exact"
) -> dict[str, np.ndarray]:
    """Decode task: ``image`` (zeros for unreadable files), ``ok`` and ``error`` (the local engine's reason)."""
    n = len(batch["file"])
    images = np.zeros((n, 3, pp.crop_size, pp.crop_size), dtype=np.float32)
    ok, errors = np.ones(n, dtype=bool), np.full(n, "", dtype=object)
    for i, file in enumerate(batch["file"]):
        item = decode_image(Path(file), pp, max_pixels, decode)
        if isinstance(item, str):
            ok[i], errors[i] = False, item
        else:
            images[i] = item
    return {"index": batch["index"], "path": batch["path"], "image": images, "ok": ok, "error": errors}


class _PipelineActor:
    """One :class:`CFViTPipeline` per actor, built once from the shipped (or shared) export."""

    def __init__(self, export: list[Any] | str, provider: str, eta: float | None, topk: int, threads: int) -> None:
        import pyarrow as pa
        import ray

        config = SessionConfig(threads=threads)
        if isinstance(export, str):  # a folder every node can read
            self.pipeline = CFViTPipeline(_load_pipeline_manifest(export), provider, config)
        else:  # [ObjectRef] (in a list, so Ray does not resolve it into every constructor call's arguments)
            files: dict[str, bytes] = ray.get(export[0])
            with tempfile.TemporaryDirectory(prefix="cfvit-export-") as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                self.pipeline = CFViTPipeline(_load_pipeline_manifest(tmp), provider, config)
        self.eta, self.topk = eta, topk
        self.labels = self.pipeline.manifest.labels()
        self.schema = pa.schema([("index", pa.int64()), *row_schema()])
        self.pa = pa

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        rows = [InferRow(path=str(p), error=str(e)) for p, e in zip(batch["path"], batch["error"], strict=True)]
        good = np.flatnonzero(batch["ok"])
        if good.size:
            result = self.pipeline.run(np.ascontiguousarray(batch["image"][good]), self.eta)
            done = rows_for_batch(result, [rows[i].path for i in good], self.labels, self.topk)
            for i, row in zip(good, done, strict=True):
                rows[i] = row
        records = [{"index": int(i), **row.to_json()} for i, row in zip(batch["index"], rows, strict=True)]
        return self.pa.Table.from_pylist(records, schema=self.schema)


def _ordered(ds: Any) -> Iterator[InferRow]:
    """The dataset's rows in input order (Ray finishes batches out of order; early ones wait here)."""
    pending: dict[int, InferRow] = {}
    following = 0
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for record in table.to_pylist():
            pending[record.pop("index")] = InferRow.from_json(record)
        while following in pending:
            yield pending.pop(following)
            following += 1
    if pending:
        raise RuntimeError(f"Ray Data lost rows: {len(pending)} rows wait for row {following}")
