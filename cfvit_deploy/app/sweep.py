"""`cfvit sweep`: the paper's accuracy / compute trade-off over η, measured through the orchestrator.

For each η on a labelled folder (``FOLDER/<class>/<images>``): top-1 accuracy, the fraction of images
that exit at the coarse stage, the expected GMACs per image (from the manifest's per-stage counts) and
the images/s measured through :class:`CFViTPipeline` (the gate and gather included). Torch-free.

With a budget, :func:`choose_eta` picks η from the measured rows: ``max_drop`` (top-1 points below
η = 1) takes the cheapest η (fewest expected GMACs) within the drop; ``max_latency_ms`` (measured ms per
image at the sweep's batch size) takes the most accurate η within the latency. :func:`write_default_eta`
stores the choice as the export's ``default_eta``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from runtimes.backends import SessionConfig
from runtimes.pipeline import CFViTPipeline, graphs_for

from ..checks import check_batch_size, check_choice, check_etas, check_positive_int, parse_etas
from ..data.listing import list_image_folder
from ..data.reader import read_images
from ..errors import CFViTError, UsageError
from ..extras import require
from ..io import atomic_directory, output_errors
from ..manifest import MANIFEST_NAME, Manifest
from ..preprocessing import DECODE_MODES
from ..progress import ProgressHook, report

log = logging.getLogger(__name__)

__all__ = ["SweepRow", "SweepResult", "sweep", "choose_eta", "write_default_eta", "parse_etas"]


@dataclass(frozen=True)
class SweepRow:
    eta: float
    accuracy: float  #: top-1 of the gated prediction
    exit_rate: float  #: fraction that exited at the coarse stage
    expected_gmacs: float  #: GMACs per image: coarse + (1 - exit_rate) * fine stage
    img_per_s: float  #: measured through the orchestrator (the fastest of `repeats` passes)
    ms_per_image: float
    #: CPU other processes used during the kept pass, % of all cores (load inflates the latency)
    background_cpu_pct: float | None = None


@dataclass
class SweepResult:
    export_dir: str
    folder: str
    provider: str
    batch_size: int
    n_images: int
    skipped_files: list[str]
    gmacs: dict[str, float]
    rows: list[SweepRow] = field(default_factory=list)
    #: the η chosen for a budget (:func:`choose_eta`): the row's fields plus the budget and reference
    choice: dict[str, Any] | None = None
    decode: str = "exact"  #: how the images were decoded (preprocessing.DECODE_MODES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write sweep.json, sweep.csv and sweep.png into a new folder (atomically)."""
        check_plotting()
        out = Path(out_dir)
        with atomic_directory(out, force=force) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            with open(tmp / "sweep.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0])))
                writer.writeheader()
                writer.writerows(asdict(r) for r in self.rows)
            plot_sweep(self, tmp / "sweep.png")
        return out


def check_plotting() -> None:
    """The plot needs matplotlib (the ``bench`` extra): check before anything is computed."""
    require("matplotlib", purpose="the sweep plot")


def _labelled_images(
    folder: Path, manifest: Manifest, max_images: int | None, decode: str = "exact"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and labels of ``folder/<class>/...`` (unreadable files skipped and reported)."""
    classes, files = list_image_folder(folder)
    if manifest.class_names:
        index = {name: i for i, name in enumerate(manifest.class_names)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UsageError(f"class folders not among the model's classes: {', '.join(unknown[:5])}")
    else:
        if len(classes) > manifest.num_classes:
            raise UsageError(f"{folder} has {len(classes)} class folders; the model has {manifest.num_classes} classes")
        index = {name: i for i, name in enumerate(classes)}
    label_of = {p: index[c] for c in classes for p in files[c]}
    paths = list(label_of)
    if max_images is not None:  # a seeded sample of readable images
        paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    read = read_images(paths, manifest.preprocessing, limit=max_images, name="FOLDER", decode=decode)
    skipped = [f"{path}: {reason}" for path, reason in read.skipped]
    return read.images, np.asarray([label_of[p] for p in read.paths]), skipped


def sweep(
    export_dir: str | Path,
    folder: str | Path,
    etas: Sequence[float] | str = "0:1:0.05",
    *,
    provider: str = "cpu",
    batch_size: int = 32,
    threads: int | None = None,
    max_images: int | None = None,
    allow_fallback: bool = False,
    max_drop: float | None = None,
    max_latency_ms: float | None = None,
    repeats: int = 1,
    quiet_below: float | None = None,
    decode: str = "exact",
    progress: ProgressHook | None = None,
    graph: str = "pair",
) -> SweepResult:
    """Measure accuracy, exit rate, expected GMACs and img/s for every η; with a budget (`max_drop` in
    top-1 points vs η = 1, or `max_latency_ms` per image) also choose η (:attr:`SweepResult.choice`).

    The latency of each η is the fastest of `repeats` timed passes over the folder; with `quiet_below`
    (a CPU %) a pass that other processes disturbed more is timed again after waiting for a quieter
    machine (as ``cfvit bench --quiet-below``), so a busy machine costs time, not truth.
    `decode` is how the images are decoded (``"exact"`` or ``"fast"``, see :mod:`cfvit_deploy.preprocessing`);
    `graph` is "pair" (coarse.onnx + fine.onnx) or "single" (single.onnx)."""
    batch_size = check_batch_size(batch_size)
    repeats = check_positive_int(repeats, "--repeats")
    check_choice(decode, DECODE_MODES, "--decode")
    if max_images is not None:
        max_images = check_positive_int(max_images, "--max-images")
    eta_values = parse_etas(etas) if isinstance(etas, str) else check_etas(etas)
    _check_budget(max_drop, max_latency_ms)
    if max_drop is not None and 1.0 not in eta_values:
        eta_values.append(1.0)  # the reference the drop is measured from
    manifest = Manifest.load(export_dir)
    graphs_for(graph, manifest)  # a bad --graph, or no single.onnx: before reading the images
    images, labels, skipped = _labelled_images(Path(folder), manifest, max_images, decode)
    config = SessionConfig(threads=threads, allow_fallback=allow_fallback)
    pipe = CFViTPipeline(manifest, provider, config, graph)
    batches = [slice(i, i + batch_size) for i in range(0, len(images), batch_size)]
    pipe.run(images[batches[0]], 1.0)  # warm-up: both sessions, first-run allocations
    coarse, fine = manifest.gmacs["coarse"], manifest.gmacs["fine"]
    result = SweepResult(
        str(export_dir), str(folder), provider, batch_size, len(images), skipped, dict(manifest.gmacs), decode=decode
    )
    for done, eta in enumerate(eta_values, 1):
        (elapsed, correct, exited), background = _timed_passes(pipe, images, labels, batches, eta, repeats, quiet_below)
        exit_rate = exited / len(images)
        row = SweepRow(
            eta,
            correct / len(images),
            exit_rate,
            coarse + (1 - exit_rate) * (fine - coarse),
            len(images) / elapsed,
            1000 * elapsed / len(images),
            None if background is None else round(background, 1),
        )
        result.rows.append(row)
        log.info("eta %.2f: top-1 %.3f, exit %.2f, %.1f img/s", eta, row.accuracy, row.exit_rate, row.img_per_s)
        report(progress, "sweep", done, len(eta_values))
    if max_drop is not None or max_latency_ms is not None:
        result.choice = choose_eta(result, max_drop=max_drop, max_latency_ms=max_latency_ms)
    return result


def _one_pass(
    pipe: CFViTPipeline, images: np.ndarray, labels: np.ndarray, batches: list[slice], eta: float
) -> tuple[float, int, int]:
    """(seconds in the pipeline, correct, exited) of one pass over every batch at `eta`."""
    correct = exited = 0
    elapsed = 0.0
    for sl in batches:
        t0 = perf_counter()
        res = pipe.run(images[sl], eta)
        elapsed += perf_counter() - t0
        correct += int((res.logits.argmax(1) == labels[sl]).sum())
        exited += int(res.exited.sum())
    return elapsed, correct, exited


def _timed_passes(
    pipe: CFViTPipeline,
    images: np.ndarray,
    labels: np.ndarray,
    batches: list[slice],
    eta: float,
    repeats: int,
    quiet_below: float | None,
) -> tuple[tuple[float, int, int], float | None]:
    """The fastest of `repeats` passes and the background CPU % during it (None without psutil, the
    ``bench`` extra). With `quiet_below`, a pass that other processes disturbed more than that is
    re-timed after waiting for a quieter machine (bench's rule and limits)."""
    if not _have_psutil():
        return min(_one_pass(pipe, images, labels, batches, eta) for _ in range(repeats)), None
    from .bench import machine

    best: tuple[tuple[float, int, int], float] | None = None
    background = 0.0
    for _ in range(repeats):
        for attempt in range(1 + (machine.QUIET_RETRIES if quiet_below is not None else 0)):
            if attempt and quiet_below is not None:
                log.info("other processes used %.0f%% of the CPUs during eta %.2f: timing it again", background, eta)
                machine.wait_for_quiet(quiet_below, machine.QUIET_WAIT_S, log.info)
            before = machine.cpu_snapshot()
            timed = _one_pass(pipe, images, labels, batches, eta)
            background = machine.background_cpu_pct(before)
            if best is None or timed[0] < best[0][0]:
                best = (timed, background)
            if quiet_below is None or background < quiet_below:
                break
    assert best is not None
    return best


def _have_psutil() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def _check_budget(max_drop: float | None, max_latency_ms: float | None) -> None:
    if max_drop is not None and max_latency_ms is not None:
        raise UsageError("give one budget: --max-drop or --max-latency-ms, not both")
    for name, value in (("--max-drop", max_drop), ("--max-latency-ms", max_latency_ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise UsageError(f"{name} must be a number >= 0, got {value!r}")


def choose_eta(
    result: SweepResult, *, max_drop: float | None = None, max_latency_ms: float | None = None
) -> dict[str, Any]:
    """The η a budget allows, from measured rows.

    `max_drop` (top-1 points below the η = 1 row): the cheapest η (fewest expected GMACs, then the more
    accurate, then the lower η) within the drop. `max_latency_ms` (measured ms per image): the most
    accurate η within it (then the cheaper). No η within the budget is a :class:`CFViTError`.
    """
    _check_budget(max_drop, max_latency_ms)
    rows = result.rows
    if max_drop is not None:
        reference = next((r for r in rows if r.eta == 1.0), None)
        if reference is None:
            raise UsageError("--max-drop needs the eta = 1 row (the reference accuracy) in the sweep")
        floor = reference.accuracy - max_drop / 100 - 1e-12  # tolerance: accuracies are counts / n
        fits = [r for r in rows if r.accuracy >= floor]
        best = min(fits, key=lambda r: (r.expected_gmacs, -r.accuracy, r.eta))
        budget = {"max_drop": float(max_drop), "reference_eta": 1.0, "reference_accuracy": reference.accuracy}
    elif max_latency_ms is not None:
        fits = [r for r in rows if r.ms_per_image <= max_latency_ms]
        if not fits:
            fastest = min(r.ms_per_image for r in rows)
            raise CFViTError(
                f"no eta meets --max-latency-ms {max_latency_ms:g}: the fastest measured is "
                f"{fastest:.3f} ms per image (batch {result.batch_size})"
            )
        best = max(fits, key=lambda r: (r.accuracy, -r.expected_gmacs, -r.eta))
        budget = {"max_latency_ms": float(max_latency_ms)}
    else:
        raise UsageError("choose_eta needs a budget: max_drop or max_latency_ms")
    return {**asdict(best), "budget": budget, "batch_size": result.batch_size, "provider": result.provider}


def write_default_eta(export_dir: str | Path, eta: float, chosen_by: dict[str, Any] | None = None) -> Manifest:
    """Store `eta` as the export's ``default_eta`` (manifest.json rewritten atomically).

    The graphs are untouched, so their recorded sha256 still holds and ``cfvit validate`` still passes;
    `chosen_by` (e.g. :attr:`SweepResult.choice`) is kept in the manifest's ``source``.
    """
    manifest = Manifest.load(export_dir)
    eta = check_etas([eta], "eta")[0]
    source = {**manifest.source, "default_eta_chosen_by": chosen_by} if chosen_by else manifest.source
    updated = replace(manifest, default_eta=eta, source=source)
    Manifest.from_dict(updated.to_dict())  # the same checks a later load applies, before anything is written
    # Manifest.save writes the file (and whatever it records with it); into a folder beside the
    # export, then one rename, so a crash leaves the old manifest or the new one, never half of one
    # (a full or read-only disk names the manifest, not the temporary folder, and removes that folder)
    target = Path(export_dir) / MANIFEST_NAME
    with (
        output_errors(target, only_output=True),
        tempfile.TemporaryDirectory(prefix=".default-eta.", dir=export_dir) as tmp,
    ):
        os.replace(updated.save(Path(tmp)), target)
    return Manifest.load(export_dir)


def label_indices(
    xs: Sequence[float], ys: Sequence[float], first: Sequence[int] = (), min_sep: float = 0.07
) -> list[int]:
    """Which points get an η label: `first` (the chosen η), then each point in order that lies at least
    `min_sep` (in axis fractions) from every labelled one, so labels of clustered points never overlap."""

    def span(values: Sequence[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        return low, (high - low) or 1.0

    (x0, dx), (y0, dy) = span(xs), span(ys)
    points = [((x - x0) / dx, (y - y0) / dy) for x, y in zip(xs, ys, strict=True)]
    chosen: list[int] = []
    for i in [*first, *range(len(points))]:
        if i not in chosen and all(
            max(abs(points[i][0] - points[j][0]), abs(points[i][1] - points[j][1])) >= min_sep for j in chosen
        ):
            chosen.append(i)
    return chosen


def plot_sweep(result: SweepResult, path: Path) -> None:
    """Accuracy vs measured latency and vs GMACs, each point labelled with its η."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    acc = [100 * r.accuracy for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xs, xlabel in (
        (
            axes[0],
            [r.ms_per_image for r in rows],
            f"measured latency (ms / image, batch {result.batch_size}, {result.provider})",
        ),
        (axes[1], [r.expected_gmacs for r in rows], "expected GMACs / image"),
    ):
        order = sorted(range(len(rows)), key=lambda i: (xs[i], acc[i]))  # along the x axis: no zig-zag
        ax.plot([xs[i] for i in order], [acc[i] for i in order], "o-", color="tab:blue")
        chosen_eta = result.choice["eta"] if result.choice else None
        first = [i for i, r in enumerate(rows) if r.eta == chosen_eta]
        for i in label_indices(xs, acc, first=first):
            ax.annotate(f"η={rows[i].eta:g}", (xs[i], acc[i]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if result.choice:
            chosen = [(x, y) for x, y, r in zip(xs, acc, rows, strict=True) if r.eta == result.choice["eta"]]
            ax.plot(*chosen[0], "o", ms=12, mfc="none", color="tab:red", label=f"chosen η={result.choice['eta']:g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"CF-ViT accuracy vs cost over η ({result.n_images} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
