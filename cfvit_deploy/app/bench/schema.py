"""The bench schema: what a cell is, one row of results, and the result set with its JSON/CSV files.

`results.json` holds ``rows`` (one :class:`BenchRow` each), ``machine``, ``settings`` and ``notes``;
`results.csv` holds the rows with the columns of :data:`ROW_FIELDS`, in that order. Both are written
atomically; pandas reads either with its defaults.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.errors import CFViTError
from cfvit_deploy.io import atomic_directory, atomic_write_path


@dataclass(frozen=True)
class Cell:
    """What one measurement runs (JSON-able: it is the spec handed to the worker)."""

    runtime: str  #: onnxruntime | openvino | torch
    provider: str  #: cpu | cuda | tensorrt | openvino
    precision: str  #: a key of plan.PRECISIONS
    model: str  #: "cfvit" (gated pipeline) | "baseline" (plain ViT on all fine tokens)
    batch_size: int
    gate: str  #: "eta" | "fine_fraction" | "none" (baseline)
    value: float | None = None  #: η or the target fine fraction

    @property
    def label(self) -> str:
        gate = f" {self.gate}={self.value:g}" if self.value is not None else ""
        return f"{self.runtime}/{self.provider} {self.precision} {self.model} b{self.batch_size}{gate}"


@dataclass
class BenchRow:
    """One line of the results (times in ms per batch; None where it does not apply)."""

    runtime: str
    provider: str
    precision: str
    model: str
    batch_size: int
    gate: str
    eta: float | None = None
    target_fine_fraction: float | None = None
    fine_fraction: float | None = None  #: measured share of images that ran the fine stage
    exit_rate: float | None = None
    status: str = "ok"  #: ok | skipped | error
    reason: str = ""
    iterations: int = 0
    mean_ms: float | None = None
    std_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    img_per_s: float | None = None
    coarse_ms: float | None = None  #: coarse session run
    gate_ms: float | None = None  #: host: softmax, gate, sub-batch gather, merge
    fine_ms: float | None = None  #: fine session run
    overhead_pct: float | None = None  #: share of the call outside the two session runs
    fine_batch: float | None = None  #: mean images per fine run
    gmacs_per_image: float | None = None
    gflops: float | None = None  #: achieved 2*GMACs*img/s of the whole call
    pct_peak: float | None = None  #: gflops as % of the measured fp32 matmul peak
    coarse_gflops: float | None = None
    fine_gflops: float | None = None
    fine_pct_peak: float | None = None
    peak_rss_mb: float | None = None
    #: CPU used by other processes while the cell ran, % of all cores (concurrent load inflates the times)
    background_cpu_pct: float | None = None
    #: with repeats > 1: spread of the repeats' mean latencies, 100 * (slowest - fastest) / fastest
    repeat_spread_pct: float | None = None
    speedup_vs_baseline: float | None = None
    baseline_precision: str | None = None  #: precision of the baseline row the speedup refers to
    isolation: str = "process"

    @classmethod
    def for_cell(cls, cell: Cell, isolation: str, **values: Any) -> BenchRow:
        row = cls(
            cell.runtime, cell.provider, cell.precision, cell.model, cell.batch_size, cell.gate, isolation=isolation
        )
        if cell.gate == "eta":
            row.eta = cell.value
        elif cell.gate == "fine_fraction":
            row.target_fine_fraction = cell.value
        return replace(row, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FIELDS = tuple(f.name for f in fields(BenchRow))


@dataclass
class BenchResult:
    """Rows plus the machine and settings they were measured on."""

    rows: list[BenchRow]
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "machine": self.machine,
            "settings": self.settings,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        """The inverse of :meth:`to_json` (e.g. ``BenchResult.from_json(json.load(open("results.json")))``)."""
        rows = [BenchRow(**{k: v for k, v in r.items() if k in ROW_FIELDS}) for r in data["rows"]]
        return cls(rows, data.get("machine", {}), data.get("settings", {}), data.get("notes", []))

    def find(self, **match: Any) -> list[BenchRow]:
        """Measured rows whose fields equal `match`."""
        return [r for r in self.rows if r.status == "ok" and all(getattr(r, k) == v for k, v in match.items())]

    def write_files(self, directory: str | Path) -> list[Path]:
        """results.json, results.csv, latency.png and throughput.png in `directory`, each replaced atomically."""
        from .plots import plot

        directory = Path(directory)
        with atomic_write_path(directory / "results.json") as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, default=json_default) + "\n")
        with atomic_write_path(directory / "results.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(r.to_dict() for r in self.rows)
        return [directory / "results.json", directory / "results.csv", *plot(self, directory)]

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write :meth:`write_files` into a new folder `out` (replaced only with `force`), atomically."""
        with atomic_directory(Path(out), force=force) as tmp:
            self.write_files(tmp)
        return Path(out)


class NothingMeasuredError(CFViTError):
    """Every requested cell of a runtime was skipped (exit 1). :attr:`result` holds every row, with reasons."""

    def __init__(self, message: str, result: BenchResult) -> None:
        super().__init__(message)
        self.result = result


def json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
