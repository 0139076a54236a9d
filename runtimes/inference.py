"""The inference shell shared by both engines (torch-free): checks, rows, summary, interrupts.

An engine (the local one in :mod:`runtimes.infer`, Ray in :mod:`runtimes.ray_engine`) only turns
input paths into :class:`~runtimes.rows.InferRow` s, in input order. Everything around that lives
here, once:

- the argument checks that come before any work (:func:`check_arguments`, :func:`check_output_path`,
  :func:`find_inputs`), and the batch size capped at the number of inputs and refused when its
  buffers cannot fit in the available memory (:func:`fit_batch_size`);
- the run itself (:func:`run_rows`): rows go to the sink (:mod:`runtimes.sinks`: CSV, JSONL or
  Parquet, always a clean table) and the callback, counts to the :class:`InferSummary`, progress to
  a :class:`~cfvit_deploy.progress.ProgressHook`;
- interrupts: on Ctrl-C or SIGTERM (:class:`~cfvit_deploy.signals.Terminated`) the rows done so far
  are kept as a complete file and :class:`InferInterrupted` is raised with the summary;
- the summary JSON beside the output (``<output>.summary.json``, written after it, atomically, on
  success and on interrupt): status, counts, timing and the export's identity. That, not a data
  row, is where "interrupted, N of M" is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from cfvit_deploy.checks import check_batch_size, check_eta, check_positive_int
from cfvit_deploy.errors import ImageError, OutputError, UsageError
from cfvit_deploy.extras import require
from cfvit_deploy.io import check_output
from cfvit_deploy.manifest import Manifest, export_identity
from cfvit_deploy.preprocessing import PreprocessConfig, is_image_file, load_and_preprocess
from cfvit_deploy.progress import ProgressHook, report
from cfvit_deploy.signals import Terminated

from .rows import InferRow, InferSummary, rows_for_batch
from .sinks import open_sink, summary_path, write_summary

#: the row and summary types live in runtimes.rows (below the sinks that write them) and the export's
#: identity in cfvit_deploy.manifest (one definition for infer and serve); re-exported here
__all__ = [
    "OUTPUT_SUFFIXES",
    "PREFETCH_BATCHES",
    "InferInterrupted",
    "InferJob",
    "InferRow",
    "InferSummary",
    "check_arguments",
    "check_output_path",
    "collect_inputs",
    "decode_image",
    "export_identity",
    "find_inputs",
    "fit_batch_size",
    "rows_for_batch",
    "run_rows",
]

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".parquet")
#: Batches decoded ahead of the one being classified (both engines keep about this many in flight).
PREFETCH_BATCHES = 2


class InferInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; the output holds the rows done so far (``summary``)."""

    def __init__(self, summary: InferSummary) -> None:
        super().__init__(f"interrupted, {summary.rows} of {summary.inputs} inputs written")
        self.summary = summary
        self.signal_name = summary.signal or "SIGINT"  #: read by cfvit_deploy.signals.exit_code_for


class OverlaysFailed(OutputError):
    """An overlay PNG could not be written (disk full, read-only, ...): raised by an engine after its
    last row, so that the rows output is still completed before the run fails."""


# -- inputs and rows ----------------------------------------------------------------------------
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


def decode_image(path: Path, pp: PreprocessConfig, max_pixels: int | None, decode: str = "exact") -> np.ndarray | str:
    """The preprocessed image, or why it cannot be read (never raises: one bad file must not stop the run)."""
    try:
        return load_and_preprocess(path, pp, max_pixels, decode=decode)
    except ImageError as exc:  # its message starts with the path, which the row already has
        return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # anything PIL did not anticipate
        return f"{type(exc).__name__}: {exc}"


# -- checks before any work ---------------------------------------------------------------------
@dataclass(frozen=True)
class InferJob:
    """A run's checked arguments: what both engines need."""

    paths: list[Path]
    eta: float | None
    batch_size: int  #: capped at the number of inputs
    topk: int  #: capped at the number of classes by the engine's manifest
    max_pixels: int | None
    output: Path | None
    decode: str = "exact"  #: preprocessing.DECODE_MODES


def check_arguments(eta: Any, batch_size: Any, topk: Any, max_pixels: Any) -> float | None:
    """The flag checks every engine shares (eta, batch size, topk, max pixels); returns eta."""
    eta = None if eta is None else check_eta(eta, "--eta")
    check_batch_size(batch_size)
    check_positive_int(topk, "--topk")
    if max_pixels is not None:
        check_positive_int(max_pixels, "--max-pixels")
    return eta


def check_output_path(output: str | Path | None, force: bool) -> Path | None:
    """The output path: a known suffix, not existing (nor its summary) unless `force`, in an existing folder."""
    if output is None:
        return None
    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"output {out} must end in {', '.join(OUTPUT_SUFFIXES)}")
    check_output(out, force)
    check_output(summary_path(out), force)
    if out.suffix.lower() == ".parquet":
        require("pyarrow", "parquet", "Parquet output")
    return out


def find_inputs(inputs: str | Path | Sequence[str | Path], recursive: bool) -> list[Path]:
    """:func:`collect_inputs`, refusing an empty result with a usage error that says why."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths = collect_inputs(items, recursive)
    if not paths:
        raise UsageError(
            f"no image files found in {', '.join(str(p) for p in items) or 'the inputs'}"
            f"{'' if recursive else ' (sub-folders need --recursive)'}"
        )
    return paths


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_memory(batch_size: int, manifest: Manifest) -> int:
    """Bytes a batch needs: its decoded images, the batches decoded ahead, one block's activations.

    An image is 3 x S x S float32; the batch buffer plus :data:`PREFETCH_BATCHES` batches in flight
    hold ``1 + PREFETCH_BATCHES`` of them per batch slot. The graphs' working set is estimated from
    one transformer block on the fine sequence (N = (2g)² + 1 tokens): the attention matrices
    (heads x N² floats) plus the MLP and q/k/v activations (about 8 x N x embed floats).
    """
    s, m = manifest.image_size, manifest.model
    image = 3 * s * s * 4
    tokens = (2 * m.coarse_grid) ** 2 + 1
    activations = (m.num_heads * tokens**2 + 8 * tokens * m.embed_dim) * 4
    return batch_size * (image * (1 + PREFETCH_BATCHES) + activations)


def fit_batch_size(batch_size: int, n_inputs: int, manifest: Manifest) -> int:
    """`batch_size` capped at the number of inputs; a :class:`UsageError` when it cannot fit in memory."""
    batch = min(batch_size, n_inputs)
    need, free = batch_memory(batch, manifest), available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"a batch of {batch} images needs about {need / 2**30:.1f} GiB of buffers, more than the "
            f"{free / 2**30:.1f} GiB of memory available; use a smaller --batch-size"
        )
    return batch


# -- the run -------------------------------------------------------------------------------------
def run_rows(
    rows: Iterator[InferRow],
    summary: InferSummary,
    *,
    output: Path | None,
    topk: int,
    force: bool = False,
    on_row: Callable[[InferRow], None] | None = None,
    progress: ProgressHook | None = None,
) -> InferSummary:
    """Drain an engine's `rows` into the output, `on_row` and `summary`; keep them on an interrupt.

    On Ctrl-C or SIGTERM the rows done so far are kept as a complete output (and summary JSON with
    ``status: interrupted``), then :class:`InferInterrupted` is raised carrying the summary. Without
    `force`, an output that another run put in place meanwhile is an ``OutputExistsError`` (nothing kept).
    """
    start = perf_counter()
    interrupt: KeyboardInterrupt | None = None
    overlays_failed: OverlaysFailed | None = None
    with contextlib.ExitStack() as stack:
        sink = None if output is None else stack.enter_context(open_sink(output, topk, force))
        report(progress, "infer", 0, summary.inputs)
        try:
            for row in rows:
                if sink is not None:
                    sink.row(row)
                summary.count(row)  # before on_row: an interrupt there must not leave a row written but uncounted
                if on_row is not None:
                    on_row(row)
                report(progress, "infer", summary.rows, summary.inputs)
        except KeyboardInterrupt as exc:  # keep what is done: the sink is finished as a whole file
            interrupt = exc
            summary.interrupted = True
            summary.signal = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        except OverlaysFailed as exc:  # every row is in the sink: keep the output, then fail
            overlays_failed = exc
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # an engine generator stopped early releases its threads / actors now
            summary.seconds = perf_counter() - start
    if output is not None:
        write_summary(output, summary, force)
    if interrupt is not None:
        log.debug("interrupted after %d of %d inputs", summary.rows, summary.inputs)
        raise InferInterrupted(summary) from interrupt
    if overlays_failed is not None:
        raise overlays_failed
    return summary
