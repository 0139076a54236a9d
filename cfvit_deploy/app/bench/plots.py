"""The bench plots: latency.png and throughput.png of a :class:`~.schema.BenchResult`.

Below the schema (it only reads a result's rows), so :meth:`BenchResult.write_files` can draw them
without the schema importing the module that builds results.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfvit_deploy.extras import require
from cfvit_deploy.io import atomic_write_path

if TYPE_CHECKING:
    from .schema import BenchResult


def _plot_batch(ax: Any, result: BenchResult, b: int, metric: str, label: str) -> None:
    series = sorted({(r.runtime, r.provider, r.precision, r.decode or "") for r in result.find(batch_size=b)})
    for j, (runtime, provider, precision, decode) in enumerate(series):
        color = f"C{j % 10}"
        key = dict(runtime=runtime, provider=provider, precision=precision, batch_size=b)
        points = sorted(
            (r.fine_fraction, getattr(r, metric)) for r in result.find(model="cfvit", decode=decode or None, **key)
        )
        name = f"{runtime}/{provider} {precision}" + (f" end-to-end {decode}" if decode else "")
        if points:
            ax.plot(*zip(*points, strict=False), marker="o", color=color, label=f"CF-ViT {name}")
        for r in result.find(model="baseline", **key) if not decode else ():
            ax.axhline(getattr(r, metric), color=color, linestyle="--", label=f"baseline {name}")
    ax.set(title=f"batch {b}", xlabel="fine fraction (measured)", ylabel=label, xlim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def plot(result: BenchResult, directory: Path) -> list[Path]:
    """latency.png and throughput.png: per batch size, one line per runtime/precision over the fine
    fraction, the baseline of the same runtime/precision as a dashed horizontal line."""
    matplotlib = require("matplotlib", "bench", purpose="the bench plots")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench")
    batch_sizes = sorted({r.batch_size for r in result.rows})
    paths = []
    for metric, name, label in (  # p50, as the tables; img/s is batch / mean time, as `img_per_s`
        ("p50_ms", "latency.png", "p50 latency per batch (ms)"),
        ("img_per_s", "throughput.png", "images/s (batch / mean latency)"),
    ):
        fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4.2), squeeze=False)
        for ax, b in zip(axes[0], batch_sizes, strict=True):
            _plot_batch(ax, result, b, metric, label)
        fig.tight_layout()
        with atomic_write_path(Path(directory) / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(Path(directory) / name)
    return paths
