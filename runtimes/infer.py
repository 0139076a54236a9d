"""Folder inference (torch-free), the library twin of ``cfvit infer``.

Files and folders in, one row per input file out (CSV or JSONL, written atomically, or handed to a
callback). Decoding runs in a small thread pool with a bounded look-ahead (two batches), so it
overlaps inference and memory stays flat however many files there are; rows are written as each
batch finishes.

Row fields: ``path``, ``stage`` (``coarse``: exited at the coarse stage; ``fine``), ``confidence``
(max softmax of the coarse logits, the value compared with η), ``patches`` (coarse patches refined
at fine resolution: k for ``fine``, 0 for ``coarse``), the top-k labels and probabilities of the
final logits, and ``error`` (empty, or why the file could not be read; its other fields are empty).

Interrupted runs (Ctrl-C) still leave a complete file holding the rows done so far, in input order,
followed by one note line: ``# interrupted: N of M inputs written`` in CSV, and
``{"interrupted": true, "rows": N, "inputs": M}`` in JSONL. :class:`InferInterrupted` (a
``KeyboardInterrupt``) is then raised with the summary.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw

from cfvit_deploy.errors import ImageError, OutputExistsError, UsageError
from cfvit_deploy.io import atomic_write_path, check_output
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import DEFAULT_MAX_PIXELS, PreprocessConfig, is_image_file, load_and_preprocess

from .backends import SessionConfig, check_provider
from .pipeline import CFViTPipeline, PipelineResult, check_eta, softmax

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class InferRow:
    """The result for one input file."""

    path: str
    stage: str = ""  #: "coarse" | "fine" ("" for an error row)
    confidence: float | None = None  #: max softmax(coarse logits)
    patches: int | None = None  #: refined coarse patches: k for "fine", 0 for "coarse"
    labels: tuple[str, ...] = ()  #: top-k class names, most probable first
    probs: tuple[float, ...] = ()
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "stage": self.stage or None,
            "confidence": self.confidence,
            "patches": self.patches,
            "topk": [{"label": label, "prob": p} for label, p in zip(self.labels, self.probs)],
            "error": self.error,
        }


@dataclass
class InferSummary:
    """Counts of one run (also the content of the CLI's final summary)."""

    inputs: int = 0  #: input files found
    exited: int = 0  #: images answered by the coarse stage
    fine: int = 0  #: images that went to the fine stage
    errors: int = 0  #: files that could not be read
    seconds: float = 0.0
    output: Path | None = None
    overlays: int = 0  #: overlay PNGs written
    interrupted: bool = False

    @property
    def images(self) -> int:
        """Images classified."""
        return self.exited + self.fine

    @property
    def rows(self) -> int:
        return self.images + self.errors

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_rate(self) -> float:
        return self.exited / self.images if self.images else 0.0


class InferInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`infer`; the output holds the rows done so far and a note (``summary``)."""

    def __init__(self, summary: InferSummary) -> None:
        super().__init__(f"interrupted after {summary.rows} of {summary.inputs} inputs")
        self.summary = summary


def collect_inputs(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """The files to classify, in a deterministic order.

    Files named explicitly are always kept (a non-image gets an error row). Folders contribute their
    image files (extension, case-insensitive) sorted by name; sub-folders only with `recursive`
    (symlinked folders are not followed). A path listed twice is kept once.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            found.setdefault(path)
            continue
        files: list[Path] = []
        for root, dirs, names in os.walk(path):
            if not recursive:
                dirs.clear()
            files.extend(Path(root) / n for n in names if is_image_file(Path(n)))
        for f in sorted(files, key=lambda f: f.relative_to(path).parts):
            found.setdefault(f)
    return list(found)


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


class _CsvWriter:
    def __init__(self, f: IO[str], topk: int) -> None:
        self.f, self.w = f, csv.writer(f, lineterminator="\n")
        ranks = [(f"label_{i}", f"prob_{i}") for i in range(1, topk + 1)]
        self.w.writerow(["path", "stage", "confidence", "patches", *[c for pair in ranks for c in pair], "error"])
        self.topk = topk

    def row(self, r: InferRow) -> None:
        pairs = [x for lp in zip(r.labels, (f"{p:.6g}" for p in r.probs)) for x in lp]
        pairs += [""] * (2 * self.topk - len(pairs))
        conf = "" if r.confidence is None else f"{r.confidence:.6g}"
        patches = "" if r.patches is None else str(r.patches)
        self.w.writerow([r.path, r.stage, conf, patches, *pairs, r.error])

    def note(self, rows: int, inputs: int) -> None:
        self.f.write(f"# interrupted: {rows} of {inputs} inputs written\n")


class _JsonlWriter:
    def __init__(self, f: IO[str], topk: int) -> None:
        self.f = f

    def row(self, r: InferRow) -> None:
        self.f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")

    def note(self, rows: int, inputs: int) -> None:
        self.f.write(json.dumps({"interrupted": True, "rows": rows, "inputs": inputs}) + "\n")


def _rounded(x: float) -> float:
    return float(f"{x:.6g}")


def rows_for_batch(result: PipelineResult, paths: Sequence[Path], labels: Sequence[str], topk: int) -> list[InferRow]:
    """Rows for one pipeline batch (vectorised softmax and top-k)."""
    probs = softmax(result.logits)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    top_p = np.take_along_axis(probs, top, axis=1)
    patches = (result.informative_idx >= 0).sum(axis=1)
    return [
        InferRow(
            path=str(path),
            stage="coarse" if result.exited[i] else "fine",
            confidence=_rounded(float(result.confidence[i])),
            patches=int(patches[i]),
            labels=tuple(labels[j] for j in top[i]),
            probs=tuple(_rounded(float(p)) for p in top_p[i]),
        )
        for i, path in enumerate(paths)
    ]


def decode_image(path: Path, pp: PreprocessConfig, max_pixels: int | None) -> np.ndarray | str:
    """The preprocessed image, or why it cannot be read (never raises: one bad file must not stop the run)."""
    try:
        return load_and_preprocess(path, pp, max_pixels)
    except ImageError as exc:  # its message starts with the path, which the row already has
        return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # anything PIL did not anticipate
        return f"{type(exc).__name__}: {exc}"


def infer(
    source: str | Path | Manifest | CFViTPipeline,
    inputs: str | Path | Sequence[str | Path],
    *,
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
    workers: int | None = None,
    on_row: Callable[[InferRow], None] | None = None,
    progress: Any = None,
) -> InferSummary:
    """Classify image files and folders; see the module docstring for the rows.

    `source` is an export folder, a Manifest, or a ready :class:`CFViTPipeline` (then `provider`
    and `config` are not used). `eta` defaults to the manifest's ``default_eta``; `topk` is capped at
    the number of classes. `output` (``.csv`` or ``.jsonl``) is written atomically and replaced only
    with `force`; `on_row` gets each row as it is done. `overlay` is a folder that receives a PNG per
    fine-stage image. `progress` is a ``rich.console.Console`` for a progress bar (None: no bar).
    Raises :class:`UsageError` before any work for bad arguments, and :class:`InferInterrupted` on Ctrl-C.
    """
    if eta is not None:
        eta = check_eta(eta)
    for name, value in (("batch size", batch_size), ("topk", topk), ("workers", workers or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if config is not None and config.threads is not None and (isinstance(config.threads, bool) or config.threads < 1):
        raise UsageError(f"threads must be a positive integer, got {config.threads!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise UsageError(f"max pixels must be a positive integer, got {max_pixels!r}")
    if not isinstance(source, CFViTPipeline):
        check_provider(provider)
    out_path = None if output is None else Path(output)
    if out_path is not None:
        if out_path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise UsageError(f"output {out_path} must end in {' or '.join(OUTPUT_SUFFIXES)}")
        check_output(out_path, force)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths = collect_inputs(inputs, recursive)
    if not paths:
        raise UsageError(f"no image files found in {', '.join(str(p) for p in inputs) or 'the inputs'}"
                         f"{'' if recursive else ' (sub-folders need --recursive)'}")
    overlay_dir = None if overlay is None else Path(overlay)
    names = overlay_names(paths) if overlay_dir is not None else {}
    if overlay_dir is not None:
        _prepare_overlay_dir(overlay_dir, names.values(), force)

    pipeline = source if isinstance(source, CFViTPipeline) else CFViTPipeline(source, provider, config)
    run = _Run(pipeline, eta, batch_size, min(topk, pipeline.manifest.num_classes), max_pixels,
               workers or min(4, os.cpu_count() or 1), overlay_dir, names)
    run.summary.inputs, run.summary.output = len(paths), out_path
    with contextlib.ExitStack() as stack:
        emit, note = on_row or (lambda row: None), None
        if out_path is not None:
            tmp = stack.enter_context(atomic_write_path(out_path))
            f = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
            writer = (_CsvWriter if out_path.suffix.lower() == ".csv" else _JsonlWriter)(f, run.topk)
            emit, note = _tee(writer.row, on_row), writer.note
        try:
            run.loop(paths, emit, progress)
        except KeyboardInterrupt:  # keep the rows done so far: finish the file with a note, then re-raise
            run.summary.interrupted = True
            if note is not None:
                note(run.summary.rows, run.summary.inputs)
    if run.summary.interrupted:
        raise InferInterrupted(run.summary)
    return run.summary


def _tee(write: Callable[[InferRow], None], also: Callable[[InferRow], None] | None) -> Callable[[InferRow], None]:
    if also is None:
        return write

    def both(row: InferRow) -> None:
        write(row)
        also(row)

    return both


def _prepare_overlay_dir(directory: Path, names: Iterable[str], force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"overlay folder {directory} exists and is not a folder")
    if not directory.parent.exists():
        raise UsageError(f"overlay folder's parent {directory.parent} does not exist; create it first")
    if not force and directory.is_dir():
        clash = [n for n in names if (directory / n).exists()]
        if clash:
            raise OutputExistsError(f"{directory / clash[0]} already exists ({len(clash)} overlays would be "
                                    "replaced); pass --force to overwrite them")
    directory.mkdir(exist_ok=True)


class _Run:
    """One streaming pass: decode ahead in threads, run full batches, emit rows in input order."""

    def __init__(self, pipeline: CFViTPipeline, eta: float | None, batch_size: int, topk: int,
                 max_pixels: int | None, workers: int, overlay_dir: Path | None, names: dict[Path, str]) -> None:
        self.pipeline, self.eta, self.batch_size, self.topk = pipeline, eta, batch_size, topk
        self.max_pixels, self.workers = max_pixels, workers
        self.overlay_dir, self.names = overlay_dir, names
        self.manifest = pipeline.manifest
        self.labels = self.manifest.labels()
        s = pipeline.image_size
        self.buffer = np.empty((batch_size, 3, s, s), dtype=np.float32)
        self.summary = InferSummary()

    def _decode(self, path: Path) -> np.ndarray | str:
        return decode_image(path, self.manifest.preprocessing, self.max_pixels)

    def loop(self, paths: Sequence[Path], emit: Callable[[InferRow], None], console: Any) -> None:
        start = perf_counter()
        bar = _progress(console, len(paths))
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cfvit-decode")
        todo: Iterator[Path] = iter(paths)
        ahead: deque[tuple[Path, Future[np.ndarray | str]]] = deque()
        batch: list[tuple[Path, np.ndarray | str]] = []
        n_images = 0
        try:
            if bar is not None:
                bar.start()
            while True:
                while len(ahead) < 2 * self.batch_size and (path := next(todo, None)) is not None:
                    ahead.append((path, pool.submit(self._decode, path)))
                if not ahead:
                    break
                path, future = ahead.popleft()
                item = future.result()
                batch.append((path, item))
                n_images += not isinstance(item, str)
                if n_images == self.batch_size:
                    self._flush(batch, emit, bar, start)
                    batch, n_images = [], 0
            self._flush(batch, emit, bar, start)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.summary.seconds = perf_counter() - start
            if bar is not None:
                bar.stop()

    def _flush(self, batch: list[tuple[Path, np.ndarray | str]], emit: Callable[[InferRow], None],
               bar: Any, start: float) -> None:
        """Classify the decoded images of `batch` and emit every row of it in order."""
        good = [(i, item) for i, (_, item) in enumerate(batch) if not isinstance(item, str)]
        rows: dict[int, InferRow] = {}
        if good:
            images = self.buffer[: len(good)]
            for j, (_, arr) in enumerate(good):
                images[j] = arr
            result = self.pipeline.run(images, self.eta)
            fine_rows = rows_for_batch(result, [batch[i][0] for i, _ in good], self.labels, self.topk)
            for j, ((i, _), row) in enumerate(zip(good, fine_rows)):
                rows[i] = row
                if self.overlay_dir is not None and not result.exited[j]:
                    self._write_overlay(batch[i][0], images[j], result.informative_idx[j])
        for i, (path, item) in enumerate(batch):
            row = rows.get(i) or InferRow(path=str(path), error=str(item))
            emit(row)
            s = self.summary
            if row.error:
                s.errors += 1
            elif row.stage == "coarse":
                s.exited += 1
            else:
                s.fine += 1
        if bar is not None and batch:
            s, elapsed = self.summary, perf_counter() - start
            bar.update(bar.task_ids[0], completed=s.rows, rate=f"{s.images / elapsed if elapsed else 0:.1f}",
                       exit=f"{s.exit_rate:.0%}")

    def _write_overlay(self, path: Path, image: np.ndarray, informative_idx: np.ndarray) -> None:
        target = self.overlay_dir / self.names[path]  # type: ignore[operator]
        img = render_overlay(image, informative_idx, self.manifest.model.coarse_grid, self.manifest.preprocessing)
        with atomic_write_path(target) as tmp:
            img.save(tmp, format="PNG")
        self.summary.overlays += 1


def _progress(console: Any, total: int) -> Any:
    """A rich progress bar (images, img/s, running exit rate) on `console`, or None."""
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("infer"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TextColumn("exit {task.fields[exit]}"),
                   TimeElapsedColumn(), console=console, transient=False)
    bar.add_task("infer", total=total, rate="0.0", exit="-")
    return bar
