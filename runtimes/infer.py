"""Folder inference, the library twin of ``cfvit infer``: the local engine and :func:`infer` (torch-free).

:func:`infer` checks its arguments, picks an engine and hands the engine's rows to the shared
shell (:mod:`runtimes.inference`: sinks, summary, interrupts). The local engine decodes in a small
thread pool with a bounded look-ahead (two batches), so decoding overlaps inference and memory
stays flat however many files there are; it yields rows as each batch finishes. ``engine="ray"``
runs the same rows on a Ray cluster (:mod:`runtimes.ray_engine`).

Row fields: ``path``, ``stage`` (``coarse``: exited at the coarse stage; ``fine``), ``confidence``
(max softmax of the coarse logits, the value compared with η), ``patches`` (coarse patches refined
at fine resolution: k for ``fine``, 0 for ``coarse``), the top-k labels and probabilities of the
final logits, ``overlay`` (the overlay PNG written for the input, or empty) and ``error`` (empty, or
why the file could not be read; its other fields are empty).

Interrupted runs (Ctrl-C, SIGTERM) leave a complete output holding the rows done so far, in input
order, and ``<output>.summary.json`` with ``"status": "interrupted"``; :class:`InferInterrupted` (a
``KeyboardInterrupt``) is then raised with the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cfvit_deploy.checks import check_choice, check_positive_int
from cfvit_deploy.errors import OutputError, OutputExistsError, UsageError
from cfvit_deploy.io import atomic_write_path
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import DECODE_MODES, DEFAULT_MAX_PIXELS, PreprocessConfig
from cfvit_deploy.progress import ProgressHook
from cfvit_deploy.wording import plural

from .backends import SessionConfig, check_provider, pinned_cpus
from .inference import (
    OUTPUT_SUFFIXES,
    PREFETCH_BATCHES,
    InferInterrupted,
    InferJob,
    InferRow,
    InferStopped,
    InferSummary,
    OverlaysFailed,
    check_arguments,
    check_output_path,
    collect_inputs,
    decode_image,
    export_identity,
    find_inputs,
    fit_batch_size,
    rows_for_batch,
    run_rows,
)
from .pipeline import GRAPH_KINDS, CFViTPipeline, graphs_for
from .ray_cluster import RayOptions

__all__ = [
    "ENGINES",
    "OUTPUT_SUFFIXES",
    "InferInterrupted",
    "InferRow",
    "InferStopped",
    "InferSummary",
    "RayOptions",
    "collect_inputs",
    "infer",
    "overlay_names",
    "render_overlay",
]

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
_RAY_ONLY = "--address, --num-actors, --actor-threads, --shared-export and --stall-timeout need --engine ray"


def overlay_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A unique PNG name per input, after its file name (``cat.jpg`` -> ``cat.png``, then ``cat-1.png``)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for path in paths:
        name, n = f"{path.stem}.png", 0
        while name.lower() in used:
            n += 1
            name = f"{path.stem}-{n}.png"
        used.add(name.lower())
        names[path] = name
    return names


def render_overlay(image: np.ndarray, informative_idx: np.ndarray, grid: int, pp: PreprocessConfig) -> Image.Image:
    """The preprocessed image (un-normalized) with the refined coarse cells highlighted.

    As in the paper's visualisation: the g x g cells the fine stage re-split keep their colours and
    get an outline; the others are washed out.
    """
    rgb = image.transpose(1, 2, 0) * np.asarray(pp.std, np.float32) + np.asarray(pp.mean, np.float32)
    rgb = np.clip(rgb * 255.0, 0, 255)
    size = rgb.shape[0]
    cell = size // grid
    selected = np.zeros(grid * grid, dtype=bool)
    selected[informative_idx[informative_idx >= 0]] = True
    mask = np.kron(selected.reshape(grid, grid), np.ones((cell, cell), dtype=bool))
    mask = np.pad(mask, ((0, size - mask.shape[0]), (0, size - mask.shape[1])))
    rgb[~mask] = rgb[~mask] * 0.35 + 255.0 * 0.65
    out = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for c in np.flatnonzero(selected):
        r, q = divmod(int(c), grid)
        draw.rectangle((q * cell, r * cell, (q + 1) * cell - 1, (r + 1) * cell - 1), outline=(255, 64, 0))
    return out


def _prepare_overlay_dir(directory: Path, names: Iterable[str], force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"overlay folder {directory} exists and is not a folder")
    if not directory.parent.exists():
        raise UsageError(f"overlay folder's parent {directory.parent} does not exist; create it first")
    if not force and directory.is_dir():
        clash = [n for n in names if (directory / n).exists()]
        if clash:
            raise OutputExistsError(
                f"{directory / clash[0]} already exists ({plural(len(clash), 'overlay')} would be "
                "replaced); pass --force to overwrite them"
            )
    directory.mkdir(exist_ok=True)


def infer(
    source: str | Path | Manifest | CFViTPipeline,
    inputs: str | Path | Sequence[str | Path],
    *,
    engine: str = "local",
    eta: float | None = None,
    batch_size: int = 32,
    topk: int = 5,
    recursive: bool = False,
    provider: str = "cpu",
    config: SessionConfig | None = None,
    output: str | Path | None = None,
    force: bool = False,
    overlay: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: str = "exact",
    workers: int | None = None,
    ray: RayOptions | None = None,
    graph: str = "pair",
    on_row: Callable[[InferRow], None] | None = None,
    progress: ProgressHook | None = None,
) -> InferSummary:
    """Classify image files and folders; see the module docstring for the rows.

    `source` is an export folder, a Manifest, or (local engine) a ready :class:`CFViTPipeline` (then
    `provider` and `config` are not used). `eta` defaults to the manifest's ``default_eta``; `topk`
    is capped at the number of classes and `batch_size` at the number of inputs. `output`
    (``.csv``, ``.jsonl`` or ``.parquet``) is written atomically, replaced only with `force`, with
    ``<output>.summary.json`` beside it; `on_row` gets each row as it is done; `progress` is called
    as ``progress("infer", done, total)``. `overlay` (local engine) is a folder that receives a PNG
    per fine-stage image. `engine="ray"` runs on a Ray cluster; `ray` holds its options
    (:class:`~runtimes.ray_cluster.RayOptions`; see :mod:`runtimes.ray_engine`). `graph` is what the
    local engine runs: "pair" (coarse.onnx, the gate, fine.onnx) or "single" (single.onnx; same rows).
    Raises :class:`UsageError` before any work for bad arguments, :class:`InferInterrupted` on
    Ctrl-C or SIGTERM, and :class:`InferStopped` when the Ray engine cannot go on (no capacity, no
    progress for ``ray.stall_timeout``); both after the rows done so far were written.
    """
    check_choice(engine, ENGINES, "--engine")
    check_choice(graph, GRAPH_KINDS, "--graph")
    if graph != "pair" and engine != "local":
        raise UsageError("--graph single runs on --engine local")
    check_choice(decode, DECODE_MODES, "--decode")
    eta = check_arguments(eta, batch_size, topk, max_pixels)
    _check_engine_arguments(engine, source, provider, config, overlay, workers, ray)
    out = check_output_path(output, force)
    paths = find_inputs(inputs, recursive)
    manifest = _manifest(source)
    job = InferJob(
        paths,
        eta,
        fit_batch_size(batch_size, len(paths), manifest),
        min(topk, manifest.num_classes),
        max_pixels,
        out,
        decode,
    )
    summary = InferSummary(
        inputs=len(paths),
        output=out,
        engine=engine,
        decode=decode,
        batch_size=job.batch_size,
        export=export_identity(manifest),
    )
    summary.settings = run_settings(source, manifest, provider, job)
    if engine == "ray":
        from .ray_engine import ray_rows

        rows = ray_rows(manifest, job, provider=provider, options=ray, warn=summary.warnings.append)
    else:
        if graph != "pair" and not isinstance(source, CFViTPipeline):
            graphs_for(graph, manifest)  # no single.onnx: one error line before any work
        rows = _local_rows(source, manifest, provider, config, job, overlay, force, workers, graph)
    return run_rows(rows, summary, output=out, topk=job.topk, force=force, on_row=on_row, progress=progress)


def run_settings(
    source: str | Path | Manifest | CFViTPipeline, manifest: Manifest, provider: str, job: InferJob
) -> dict[str, Any]:
    """What the rows depend on besides the export, for the summary JSON: the η applied (the manifest's
    default when none was given), the provider, the precision, the batch size and the image decoding."""
    if isinstance(source, CFViTPipeline):
        provider = getattr(source.backend, "provider", provider)
    return {
        "eta": manifest.default_eta if job.eta is None else job.eta,
        "provider": provider,
        "precision": manifest.precision,
        "batch_size": job.batch_size,
        "decode": job.decode,
    }


def _check_engine_arguments(
    engine: str,
    source: str | Path | Manifest | CFViTPipeline,
    provider: str,
    config: SessionConfig | None,
    overlay: str | Path | None,
    workers: int | None,
    ray: RayOptions | None,
) -> None:
    """The engine-specific checks of :func:`infer`, before any work: Ray's options only with the Ray engine."""
    if engine == "local":
        if ray is not None and ray != RayOptions():
            raise UsageError(_RAY_ONLY)
        if workers is not None:
            check_positive_int(workers, "workers")
        if config is not None and config.threads is not None:
            check_positive_int(config.threads, "--threads")
        if not isinstance(source, CFViTPipeline):
            check_provider(provider)
    else:
        from .ray_engine import check_ray_arguments

        check_ray_arguments(source, provider, config, overlay, workers, ray or RayOptions())


def _local_rows(
    source: str | Path | Manifest | CFViTPipeline,
    manifest: Manifest,
    provider: str,
    config: SessionConfig | None,
    job: InferJob,
    overlay: str | Path | None,
    force: bool,
    workers: int | None,
    graph: str = "pair",
) -> Iterator[InferRow]:
    """The local engine's rows; the overlay folder (if any) is checked and created before any session."""
    overlay_dir = None if overlay is None else Path(overlay)
    names = overlay_names(job.paths) if overlay_dir is not None else {}
    if overlay_dir is not None:
        _prepare_overlay_dir(overlay_dir, names.values(), force)
    pipeline = source if isinstance(source, CFViTPipeline) else CFViTPipeline(manifest, provider, config, graph)
    engine = LocalEngine(pipeline, job, workers or default_decode_workers(), overlay_dir, names)
    return engine.rows()


def default_decode_workers() -> int:
    """Threads of the local engine's decode-ahead pool when `workers` is not given."""
    return min(4, pinned_cpus() or os.cpu_count() or 1)


def _manifest(source: str | Path | Manifest | CFViTPipeline) -> Manifest:
    if isinstance(source, CFViTPipeline):
        return source.manifest
    return source if isinstance(source, Manifest) else Manifest.load(source)


class LocalEngine:
    """One streaming pass in this process: decode ahead in threads, run full batches, yield rows in input order."""

    def __init__(
        self,
        pipeline: CFViTPipeline,
        job: InferJob,
        workers: int,
        overlay_dir: Path | None = None,
        names: dict[Path, str] | None = None,
    ) -> None:
        self.pipeline, self.job, self.workers = pipeline, job, workers
        self.overlay_dir, self.names = overlay_dir, names or {}
        self.overlay_error: OutputError | None = None  #: the first overlay the disk refused
        self.manifest = pipeline.manifest
        self.labels = self.manifest.labels()
        s = pipeline.image_size
        self.buffer = np.empty((job.batch_size, 3, s, s), dtype=np.float32)

    def _decode(self, path: Path) -> np.ndarray | str:
        return decode_image(path, self.manifest.preprocessing, self.job.max_pixels, self.job.decode)

    def rows(self) -> Iterator[InferRow]:
        """The rows of every input, batch by batch; closing the generator stops the decode threads."""
        batch_size = self.job.batch_size
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cfvit-decode")
        todo: Iterator[Path] = iter(self.job.paths)
        ahead: deque[tuple[Path, Future[np.ndarray | str]]] = deque()
        batch: list[tuple[Path, np.ndarray | str]] = []
        n_images = 0
        try:
            while True:
                while len(ahead) < PREFETCH_BATCHES * batch_size and (path := next(todo, None)) is not None:
                    ahead.append((path, pool.submit(self._decode, path)))
                if not ahead:
                    break
                path, future = ahead.popleft()
                item = future.result()
                batch.append((path, item))
                n_images += not isinstance(item, str)
                if n_images == batch_size:
                    yield from self._classify(batch)
                    batch, n_images = [], 0
            yield from self._classify(batch)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.overlay_error is not None:  # every row is out: now the run fails, naming the overlay
            raise OverlaysFailed(f"{self.overlay_error} (every row was written; no overlay after that one)")

    def _classify(self, batch: list[tuple[Path, np.ndarray | str]]) -> list[InferRow]:
        """The rows of `batch`, in order: its decoded images classified, its unreadable files as error rows."""
        good = [(i, item) for i, (_, item) in enumerate(batch) if not isinstance(item, str)]
        rows = [InferRow(path=str(path), error=str(item)) if isinstance(item, str) else None for path, item in batch]
        if good:
            images = self.buffer[: len(good)]
            for j, (_, arr) in enumerate(good):
                images[j] = arr
            result = self.pipeline.run(images, self.job.eta)
            done = rows_for_batch(result, [batch[i][0] for i, _ in good], self.labels, self.job.topk)
            for j, ((i, _), row) in enumerate(zip(good, done, strict=True)):
                if self.overlay_dir is not None and not result.exited[j] and self.overlay_error is None:
                    target = self._write_overlay(batch[i][0], images[j], result.informative_idx[j])
                    row = dataclasses.replace(row, overlay=str(target) if target else "")
                rows[i] = row
        return rows  # type: ignore[return-value]

    def _write_overlay(self, path: Path, image: np.ndarray, informative_idx: np.ndarray) -> Path | None:
        """The overlay PNG written, or None when the disk refused it (then no more are tried: the rows
        go on, and the run ends with the error once every row is written)."""
        target = self.overlay_dir / self.names[path]  # type: ignore[operator]
        img = render_overlay(image, informative_idx, self.manifest.model.coarse_grid, self.manifest.preprocessing)
        try:
            with atomic_write_path(target) as tmp:
                img.save(tmp, format="PNG")
        except OutputError as exc:
            self.overlay_error = exc
            log.warning("%s; the rows go on without overlays", exc)
            return None
        return target
