"""Folder inference on a Ray cluster (``cfvit infer --engine ray``): the Ray twin of :func:`runtimes.infer.infer`.

Ray Data reads the input paths (found as the local engine finds them), decodes and preprocesses
them in parallel tasks (an unreadable file becomes an error row, with the local engine's reason),
and classifies them in ``map_batches`` on a pool of actors, each holding one :class:`CFViTPipeline`
built once in its ``__init__``. Rows are the local engine's (:func:`~runtimes.infer.rows_for_batch`),
emitted in input order, and written as CSV, JSONL or Parquet (the JSONL record layout), atomically.

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
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from cfvit_deploy.errors import UsageError
from cfvit_deploy.io import atomic_write_path, check_output
from cfvit_deploy.manifest import MANIFEST_NAME, Manifest
from cfvit_deploy.preprocessing import DEFAULT_MAX_PIXELS, PreprocessConfig

from .backends import SessionConfig, check_provider
from .infer import (
    InferInterrupted,
    InferRow,
    InferSummary,
    _CsvWriter,
    _JsonlWriter,
    _tee,
    collect_inputs,
    decode_image,
    rows_for_batch,
)
from .pipeline import CFViTPipeline, check_eta

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".parquet")
INSTALL_HINT = "--engine ray needs Ray Data and pyarrow: pip install 'cfvit-deploy[ray]'"
#: Providers an actor can run (the engine requests CPUs only).
CPU_PROVIDERS = ("cpu", "openvino")
_GRAPHS = ("coarse", "fine")
_PARQUET_ROW_GROUP = 1024
_DECODE_WORKER_MEMORY = 256 * 2**20  #: bytes: a Ray worker with numpy and PIL loaded


def import_ray() -> Any:
    """The ``ray`` module with Ray Data and pyarrow, or a :class:`UsageError` saying how to install them."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


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
    try:
        if address == "local":
            ray.init(num_cpus=_machine_cpus(), include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
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


def infer_ray(
    export_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    *,
    eta: float | None = None,
    batch_size: int = 32,
    topk: int = 5,
    recursive: bool = False,
    provider: str = "cpu",
    address: str = "local",
    num_actors: int | None = None,
    actor_threads: int | None = None,
    shared_export: bool = False,
    output: str | Path | None = None,
    force: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_row: Callable[[InferRow], None] | None = None,
    progress: bool = False,
) -> InferSummary:
    """Classify image files and folders on Ray; the rows, summary and exit semantics of :func:`infer`.

    `address`: ``local`` (a private cluster on this machine, shut down afterwards), ``auto`` or a
    Ray address; `num_actors`, `actor_threads`: see :func:`plan_actors`. `output` may also end in
    ``.parquet``. `progress` shows Ray Data's progress bars. Raises :class:`UsageError` before any
    work for bad arguments or a missing Ray, and :class:`InferInterrupted` on Ctrl-C.
    """
    if eta is not None:
        eta = check_eta(eta)
    for name, value in (("batch size", batch_size), ("topk", topk), ("num actors", num_actors),
                        ("actor threads", actor_threads), ("max pixels", max_pixels)):
        optional = name in ("num actors", "actor threads", "max pixels")
        if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if check_provider(provider) not in CPU_PROVIDERS:
        raise UsageError(f"--engine ray runs CPU providers only ({', '.join(CPU_PROVIDERS)}), got {provider!r}")
    out_path = None if output is None else Path(output)
    if out_path is not None:
        if out_path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UsageError(f"output {out_path} must end in {', '.join(OUTPUT_SUFFIXES)}")
        check_output(out_path, force)
    ray = import_ray()
    manifest = Manifest.load(export_dir)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths = collect_inputs(inputs, recursive)
    if not paths:
        raise UsageError(f"no image files found in {', '.join(str(p) for p in inputs) or 'the inputs'}"
                         f"{'' if recursive else ' (sub-folders need --recursive)'}")
    topk = min(topk, manifest.num_classes)
    summary = InferSummary(inputs=len(paths), output=out_path)
    with ray_cluster(address), contextlib.ExitStack() as stack:
        emit, note = on_row or (lambda row: None), None
        if out_path is not None:
            tmp = stack.enter_context(atomic_write_path(out_path))
            writer = _open_writer(stack, tmp, out_path.suffix.lower(), topk)
            emit, note = _tee(writer.row, on_row), writer.note
        export = str(Path(export_dir).absolute()) if shared_export else [ray.put(_export_files(manifest))]
        cpus, batches = float(ray.cluster_resources().get("CPU", 0)), math.ceil(len(paths) / batch_size)
        plan = plan_actors(cpus, num_actors, actor_threads)
        if plan.num_actors > batches:  # an actor per batch at most: more would stay idle
            plan = plan_actors(cpus, batches, plan.threads)
        ds = _dataset(ray, paths, manifest.preprocessing, max_pixels, batch_size, plan,
                      (export, provider, eta, topk), progress)
        start = perf_counter()
        try:
            for row in _ordered(ds):
                emit(row)
                _count(summary, row)
        except KeyboardInterrupt:  # as the local engine: finish the file with a note, then re-raise
            summary.interrupted = True
            if note is not None:
                note(summary.rows, summary.inputs)
        finally:
            summary.seconds = perf_counter() - start
    if summary.interrupted:
        raise InferInterrupted(summary)
    return summary


def _count(summary: InferSummary, row: InferRow) -> None:
    if row.error:
        summary.errors += 1
    elif row.stage == "coarse":
        summary.exited += 1
    else:
        summary.fine += 1


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


def _dataset(ray: Any, paths: Sequence[Path], pp: PreprocessConfig, max_pixels: int | None, batch_size: int,
             plan: ActorPlan, actor_args: tuple[Any, ...], progress: bool) -> Any:
    """paths -> decode tasks -> actor pool: a Ray Dataset of row records (the JSONL layout plus ``index``).

    One block per batch of `batch_size` paths; both stages map whole blocks (no re-bundling).
    """
    items = [{"index": i, "path": str(p), "file": str(p.absolute())} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    # Decode tasks reserve memory for a worker and twice their decoded batch. Being the only op with
    # a memory request also keeps Ray Data from fusing them into the actors (it fuses adjacent maps
    # with equal remote args), which would decode inside the actors, one batch at a time.
    batch_bytes = batch_size * 3 * pp.crop_size**2 * np.dtype(np.float32).itemsize
    ds = ds.map_batches(_decode_batch, fn_kwargs={"pp": pp, "max_pixels": max_pixels}, batch_size=None,
                        batch_format="numpy", num_cpus=plan.cpus_per_decode_task,
                        memory=_DECODE_WORKER_MEMORY + 2 * batch_bytes, udf_modifying_row_count=False)
    ds = ds.map_batches(_PipelineActor, fn_constructor_args=(*actor_args, plan.threads), batch_size=None,
                        batch_format="numpy", num_cpus=plan.cpus_per_actor, udf_modifying_row_count=False,
                        compute=ray.data.ActorPoolStrategy(size=plan.num_actors))
    ds.context.enable_progress_bars = ds.context.print_on_execution_start = progress
    return ds


def _decode_batch(batch: dict[str, np.ndarray], pp: PreprocessConfig, max_pixels: int | None) -> dict[str, np.ndarray]:
    """Decode task: ``image`` (zeros for unreadable files), ``ok`` and ``error`` (the local engine's reason)."""
    n = len(batch["file"])
    images = np.zeros((n, 3, pp.crop_size, pp.crop_size), dtype=np.float32)
    ok, errors = np.ones(n, dtype=bool), np.full(n, "", dtype=object)
    for i, file in enumerate(batch["file"]):
        item = decode_image(Path(file), pp, max_pixels)
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
        self.schema = pa.schema([("index", pa.int64()), *_row_schema()])
        self.pa = pa

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        rows = [InferRow(path=str(p), error=str(e)) for p, e in zip(batch["path"], batch["error"])]
        good = np.flatnonzero(batch["ok"])
        if good.size:
            result = self.pipeline.run(np.ascontiguousarray(batch["image"][good]), self.eta)
            for i, row in zip(good, rows_for_batch(result, [rows[i].path for i in good], self.labels, self.topk)):
                rows[i] = row
        records = [{"index": int(i), **row.to_json()} for i, row in zip(batch["index"], rows)]
        return self.pa.Table.from_pylist(records, schema=self.schema)


def _row_schema() -> Any:
    """Arrow fields of a row: :meth:`InferRow.to_json`'s layout."""
    import pyarrow as pa

    topk = pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float64())]))
    return [("path", pa.string()), ("stage", pa.string()), ("confidence", pa.float64()), ("patches", pa.int64()),
            ("topk", topk), ("error", pa.string())]


def _row(record: dict[str, Any]) -> InferRow:
    """:meth:`InferRow.to_json`, inverted."""
    topk = record["topk"] or []
    return InferRow(path=record["path"], stage=record["stage"] or "", confidence=record["confidence"],
                    patches=record["patches"], labels=tuple(t["label"] for t in topk),
                    probs=tuple(t["prob"] for t in topk), error=record["error"] or "")


def _ordered(ds: Any) -> Iterator[InferRow]:
    """The dataset's rows in input order (Ray finishes batches out of order; early ones wait here)."""
    pending: dict[int, InferRow] = {}
    following = 0
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for record in table.to_pylist():
            pending[record.pop("index")] = _row(record)
        while following in pending:
            yield pending.pop(following)
            following += 1
    if pending:
        raise RuntimeError(f"Ray Data lost rows: {len(pending)} rows wait for row {following}")


class _ParquetWriter:
    """Rows as Parquet in the JSONL record layout, written in row groups as they come."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.schema = pa, pa.schema(_row_schema())
        self.w = pq.ParquetWriter(path, self.schema)
        self.buffer: list[dict[str, Any]] = []

    def row(self, r: InferRow) -> None:
        self.buffer.append(r.to_json())
        if len(self.buffer) >= _PARQUET_ROW_GROUP:
            self._flush()

    def note(self, rows: int, inputs: int) -> None:
        """The interrupted-run note, as the file's ``cfvit.interrupted`` metadata."""
        self.w.add_key_value_metadata({"cfvit.interrupted": json.dumps({"rows": rows, "inputs": inputs})})

    def _flush(self) -> None:
        if self.buffer:
            self.w.write_table(self.pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        self._flush()
        self.w.close()


def _open_writer(stack: contextlib.ExitStack, tmp: Path, suffix: str, topk: int) -> Any:
    if suffix == ".parquet":
        writer = _ParquetWriter(tmp)
        stack.callback(writer.close)
        return writer
    f = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
    return (_CsvWriter if suffix == ".csv" else _JsonlWriter)(f, topk)
