"""Planning a bench run: argument checks, absolute paths, the cells, precision variants, the input pool.

Every check runs before any work. Every path is resolved against the caller's working directory here,
before a worker process (which runs elsewhere) sees it.

Fine-fraction gating is *synthetic*: η is set, per cell, to the coarse-confidence quantile of the
benchmark inputs that sends the requested fraction f to the fine stage (confidences from the same
runtime, precision and batch size). It measures what a given exit rate costs on any model, trained
or random. With real images (``images=``) and ``etas=``, the measured fine fraction is reported.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cfvit_deploy.checks import (
    check_batch_sizes,
    check_choice,
    check_etas,
    check_fraction,
    check_positive_int,
    parse_batch_sizes,
    parse_etas,
    parse_number_list,
)
from cfvit_deploy.data.reader import list_images, read_images
from cfvit_deploy.errors import ManifestError, UsageError
from cfvit_deploy.extras import require
from cfvit_deploy.manifest import Manifest
from runtimes.backends import check_provider

from .schema import Cell

#: ``--precisions`` names -> (precision, optimized): a variant of the fp32 export (exporters.variants).
PRECISIONS = {
    "fp32": ("fp32", False),
    "fp16": ("fp16", False),
    "int8": ("int8", False),
    "optimized": ("fp32", True),
    "int8-optimized": ("int8", True),
}
#: Without --eta and --fine-fraction. 1.0 is the both-stages reference (η = 1, every image refined).
DEFAULT_FINE_FRACTIONS = (0.24, 0.52, 1.0)
#: Smallest input pool (images); batch 1 cycles through it, so fractions are exact to 1/25.
MIN_POOL = 25
#: Most images read from an ``images`` folder.
MAX_IMAGES = 256
DEFAULT_DURATION_S = 3.0
ISOLATIONS = ("process", "inline")


@dataclass
class BenchPlan:
    """A checked bench request: absolute paths, the cells in the order they run, the timing settings."""

    export_dir: Path
    manifest: Manifest
    cells: list[Cell]
    fine_fractions: list[float]
    threads: int
    isolation: str = "process"
    warmup: int = 3
    iterations: int | None = None
    duration: float = DEFAULT_DURATION_S
    images: Path | None = None
    checkpoint: Path | None = None
    cache_dir: Path | None = None
    quiet_below: float | None = None
    repeats: int = 1
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def export_precision(self) -> str:
        return precision_label(self.manifest)


def absolute(path: str | Path | None) -> Path | None:
    """`path` against the caller's working directory (None stays None)."""
    return None if path is None else Path(path).expanduser().absolute()


def _numbers(values: str | Sequence[float] | None, kind: type, name: str) -> list | None:
    if isinstance(values, str):
        return parse_number_list(values, kind, name)
    return None if values is None else list(values)


def check_request(
    providers: str | Sequence[str],
    precisions: str | Sequence[str] | None,
    batch_sizes: str | Sequence[int],
    etas: str | Sequence[float],
    fine_fractions: str | Sequence[float] | None,
) -> tuple[list, list | None, list, list, list]:
    """Providers, precisions, batch sizes, η values and fine fractions, checked (strings use the flag grammar).

    Fine fractions default to DEFAULT_FINE_FRACTIONS only when neither list is given: a run asks for
    exactly the gates it names, so ``--fine-fraction 0.5`` measures f = 0.5 and nothing else (a
    demanding user reads an extra, unrequested η = 1 row as noise and pays its time; 1.0 is one more
    value away when the both-stages reference is wanted).
    """
    provider_list = [
        check_provider(p.strip()) for p in (providers.split(",") if isinstance(providers, str) else providers)
    ]
    precision_list = None
    if precisions:
        items = precisions.split(",") if isinstance(precisions, str) else precisions
        precision_list = [check_choice(p.strip(), tuple(PRECISIONS), "--precisions") for p in items]
    sizes = parse_batch_sizes(batch_sizes) if isinstance(batch_sizes, str) else check_batch_sizes(batch_sizes)
    eta_list = (
        parse_etas(etas, "--eta") if isinstance(etas, str) and etas else check_etas(etas, "--eta") if etas else []
    )
    fractions = _numbers(fine_fractions, float, "--fine-fraction")
    if fractions is None:
        fractions = [] if eta_list else list(DEFAULT_FINE_FRACTIONS)
    fractions = sorted({check_fraction(f, "--fine-fraction") for f in fractions})
    if not fractions and not eta_list:
        raise UsageError("give at least one --eta or --fine-fraction value")
    return provider_list, precision_list, sizes, eta_list, fractions


def check_timing(
    warmup: int,
    iterations: int | None,
    duration: float | None,
    threads: int | None,
    repeats: int,
    isolation: str,
    quiet_below: float | None,
) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"--warmup must be a non-negative integer, got {warmup!r}")
    if iterations is not None and duration is not None:
        raise UsageError("give either --iterations or --duration, not both")
    if iterations is not None:
        check_positive_int(iterations, "--iterations")
    if duration is not None and not (isinstance(duration, (int, float)) and duration > 0 and math.isfinite(duration)):
        raise UsageError(f"--duration must be a positive number of seconds, got {duration!r}")
    if threads is not None:
        check_positive_int(threads, "--threads")
    check_positive_int(repeats, "--repeats")
    check_choice(isolation, ISOLATIONS, "isolation")
    if quiet_below is not None and not 0 < quiet_below <= 100:
        raise UsageError(f"--quiet-below must be a CPU percentage in (0, 100], got {quiet_below!r}")


def torch_checkpoint(manifest: Manifest, checkpoint: str | Path | None) -> Path:
    """The checkpoint of the --torch cells: `checkpoint`, else the one the manifest records."""
    path = absolute(checkpoint or (manifest.source.get("checkpoint") or {}).get("path"))
    if path is None or not path.is_file():
        raise UsageError(f"--torch needs the PyTorch checkpoint (--checkpoint); {path or 'none'} not found")
    return path


def precision_label(manifest: Manifest) -> str:
    if manifest.optimized:
        return "optimized" if manifest.precision == "fp32" else f"{manifest.precision}-optimized"
    return manifest.precision


def variant_dir(export_dir: Path, manifest: Manifest, precision: str, cache: Path) -> Path:
    """The export folder holding `precision`: the export itself, or a variant built (once) in `cache`."""
    if precision == precision_label(manifest):
        return export_dir
    require("onnx", purpose=f"building the {precision} variant")
    make_variant = importlib.import_module("exporters.variants").make_variant  # torch-free, needs onnx
    target = cache / manifest.graphs["coarse"].sha256[:16] / precision
    try:
        Manifest.load(target)
        return target
    except ManifestError:
        target.parent.mkdir(parents=True, exist_ok=True)
    prec, optimize = PRECISIONS[precision]
    make_variant(export_dir, target, prec, optimize, force=True)
    return target


def pool_size(batch_size: int, available: int | None = None) -> int:
    """Images per input pool: whole batches, at least MIN_POOL images (or all `available` real images)."""
    return batch_size * math.ceil(max(available or MIN_POOL, 1) / batch_size)


def load_pool(
    manifest: Manifest, images: Path | None, batch_sizes: Sequence[int]
) -> tuple[np.ndarray, int | None, list[tuple[Path, str]]]:
    """(pool, number of real images, skipped files): preprocessed files from `images` (repeated to whole
    batches; unreadable files skipped and reported), else seeded normal noise; large enough for
    :func:`pool_size` of every batch size."""
    s = manifest.image_size
    if images is None:
        size = max(pool_size(b) for b in batch_sizes)
        return np.random.default_rng(0).standard_normal((size, 3, s, s), dtype=np.float32), None, []
    read = read_images(list_images(images, "--images"), manifest.preprocessing, limit=MAX_IMAGES, name="--images")
    n = len(read.images)
    pool = np.stack([read.images[i % n] for i in range(max(pool_size(b, n) for b in batch_sizes))])
    return pool, n, read.skipped


#: The bench model name of each graph kind (``--graph``): the pair, or single.onnx.
GATED_MODELS = {"pair": "cfvit", "single": "cfvit-single"}


def check_graphs(graphs: str | Sequence[str], manifest: Manifest) -> list[str]:
    """`graphs` ("pair", "single", "pair,single" or a sequence) checked against the export."""
    items = [g.strip() for g in graphs.split(",")] if isinstance(graphs, str) else list(graphs)
    if not items:
        raise UsageError("--graph needs at least one of: pair, single")
    for g in items:
        check_choice(g, tuple(GATED_MODELS), "--graph")
    if "single" in items and "single" not in manifest.graphs:
        raise UsageError("--graph single: the export has no single.onnx (re-export with `cfvit export --single-graph`)")
    return list(dict.fromkeys(items))


def make_cells(
    runtimes: list[tuple[str, str]],
    precisions: Sequence[str],
    batch_sizes: Sequence[int],
    gates: list[tuple[str, float]],
    torch: bool,
    graphs: Sequence[str] = ("pair",),
) -> list[Cell]:
    """Per runtime x precision x batch size: the baseline, then each gated graph at every gate; torch last."""
    cells = []
    for runtime, provider in runtimes:
        for precision in precisions:
            for b in batch_sizes:
                cells.append(Cell(runtime, provider, precision, "baseline", b, "none"))
                for graph in graphs:
                    model = GATED_MODELS[graph]
                    cells.extend(Cell(runtime, provider, precision, model, b, g, v) for g, v in gates)
    if torch:
        for b in batch_sizes:
            cells.append(Cell("torch", "cpu", "fp32", "baseline", b, "none"))
            cells.extend(Cell("torch", "cpu", "fp32", "cfvit", b, g, v) for g, v in gates)
    return cells
