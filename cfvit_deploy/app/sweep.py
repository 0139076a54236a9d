"""`cfvit sweep`: the paper's accuracy / compute trade-off over η, measured through the orchestrator.

For each η on a labelled folder (``FOLDER/<class>/<images>``): top-1 accuracy, the fraction of images
that exit at the coarse stage, the expected GMACs per image (from the manifest's per-stage counts) and
the images/s measured through :class:`CFViTPipeline` (the gate and gather included). Torch-free.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from runtimes.backends import SessionConfig
from runtimes.pipeline import CFViTPipeline, check_eta

from ..data.listing import list_image_folder
from ..errors import ImageError, UsageError
from ..io import atomic_directory
from ..manifest import Manifest
from ..preprocessing import load_and_preprocess


@dataclass(frozen=True)
class SweepRow:
    eta: float
    accuracy: float  #: top-1 of the gated prediction
    exit_rate: float  #: fraction that exited at the coarse stage
    expected_gmacs: float  #: GMACs per image: coarse + (1 - exit_rate) * fine stage
    img_per_s: float  #: measured through the orchestrator
    ms_per_image: float


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write sweep.json, sweep.csv and sweep.png into a new folder (atomically)."""
        out = Path(out_dir)
        with atomic_directory(out, force=force) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            with open(tmp / "sweep.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0])))
                writer.writeheader()
                writer.writerows(asdict(r) for r in self.rows)
            plot_sweep(self, tmp / "sweep.png")
        return out


def parse_etas(spec: str) -> list[float]:
    """"0:1:0.05" (start:stop:step, stop included) or "0.3,0.5,0.7" -> sorted η values in [0, 1]."""
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if step <= 0:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--etas expects start:stop:step or a comma-separated list, got {spec!r}") from None
    if not values:
        raise UsageError(f"--etas {spec!r} gives no values")
    return sorted({check_eta(v) for v in values})


def _labelled_images(folder: Path, manifest: Manifest, max_images: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
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
    samples = [(p, index[c]) for c in classes for p in files[c]]
    if max_images is not None:
        rng = np.random.default_rng(0)
        samples = [samples[i] for i in sorted(rng.permutation(len(samples))[:max_images])]
    images, labels, skipped = [], [], []
    for path, label in samples:
        try:
            images.append(load_and_preprocess(path, manifest.preprocessing))
            labels.append(label)
        except ImageError as exc:
            skipped.append(str(exc))
    if not images:
        raise UsageError(f"no readable images in {folder}")
    return np.stack(images), np.asarray(labels), skipped


def sweep(
    export_dir: str | Path,
    folder: str | Path,
    etas: list[float] | str = "0:1:0.05",
    *,
    provider: str = "cpu",
    batch_size: int = 32,
    threads: int | None = None,
    max_images: int | None = None,
    allow_fallback: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Measure accuracy, exit rate, expected GMACs and img/s for every η."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    eta_values = parse_etas(etas) if isinstance(etas, str) else sorted({check_eta(e) for e in etas})
    manifest = Manifest.load(export_dir)
    images, labels, skipped = _labelled_images(Path(folder), manifest, max_images)
    pipe = CFViTPipeline(manifest, provider, SessionConfig(threads=threads, allow_fallback=allow_fallback))
    batches = [slice(i, i + batch_size) for i in range(0, len(images), batch_size)]
    pipe.run(images[batches[0]], 1.0)  # warm-up: both sessions, first-run allocations
    coarse, fine = manifest.gmacs["coarse"], manifest.gmacs["fine"]
    result = SweepResult(str(export_dir), str(folder), provider, batch_size, len(images), skipped, dict(manifest.gmacs))
    for eta in eta_values:
        correct = exited = 0
        elapsed = 0.0
        for sl in batches:
            t0 = perf_counter()
            res = pipe.run(images[sl], eta)
            elapsed += perf_counter() - t0
            correct += int((res.logits.argmax(1) == labels[sl]).sum())
            exited += int(res.exited.sum())
        exit_rate = exited / len(images)
        row = SweepRow(eta, correct / len(images), exit_rate, coarse + (1 - exit_rate) * (fine - coarse),
                       len(images) / elapsed, 1000 * elapsed / len(images))
        result.rows.append(row)
        if progress:
            progress(f"eta {eta:.2f}: top-1 {row.accuracy:.3f}, exit {row.exit_rate:.2f}, {row.img_per_s:.1f} img/s")
    return result


def plot_sweep(result: SweepResult, path: Path) -> None:
    """Accuracy vs measured latency and vs GMACs, each point labelled with its η."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    acc = [100 * r.accuracy for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xs, xlabel in (
        (axes[0], [r.ms_per_image for r in rows], f"measured latency (ms / image, batch {result.batch_size}, {result.provider})"),
        (axes[1], [r.expected_gmacs for r in rows], "expected GMACs / image"),
    ):
        ax.plot(xs, acc, "o-", color="tab:blue")
        for x, y, r in zip(xs, acc, rows):
            if len(rows) <= 11 or round(r.eta * 20) % 4 == 0:
                ax.annotate(f"η={r.eta:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"CF-ViT accuracy vs cost over η ({result.n_images} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
