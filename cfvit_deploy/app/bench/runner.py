"""`run_bench`: plan the cells, measure them (each in its own process by default), assemble the result.

A *cell* is runtime/provider x precision x model (CF-ViT pipeline or plain-ViT baseline) x batch
size x gate; see :mod:`.worker` for how one is timed and why each runs in a fresh process,
:mod:`.plan` for the gates, :mod:`.machine` for the GEMM peak and the load of other processes.
A run in which every requested cell of a runtime was skipped raises :class:`NothingMeasuredError`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.errors import CFViTError
from cfvit_deploy.io import check_output
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.progress import ProgressHook, report

from . import machine
from .plan import (
    DEFAULT_DURATION_S,
    BenchPlan,
    absolute,
    check_graphs,
    check_request,
    check_timing,
    load_pool,
    make_cells,
    pool_size,
    precision_label,
    torch_checkpoint,
    variant_dir,
)
from .results import add_speedups, make_notes, make_row, unmeasured_runtimes
from .schema import BenchResult, BenchRow, Cell, NothingMeasuredError
from .worker import measure_cell, run_isolated

log = logging.getLogger(__name__)


@dataclass
class _Measured:
    """What the passes collected: GEMM peaks, each cell's runs (mean s, raw, background %), skips."""

    peaks: list[tuple[float, float, float]] = field(default_factory=list)
    runs: dict[int, list[tuple[float, dict[str, Any], float]]] = field(default_factory=dict)
    skipped: dict[int, BenchRow] = field(default_factory=dict)
    variants: dict[str, Path | str] = field(default_factory=dict)  #: precision -> folder, or why none
    unavailable: dict[tuple[str, str, str], str] = field(default_factory=dict)
    skipped_images: list[tuple[Path, str]] = field(default_factory=list)


def make_plan(
    export_dir: str | Path,
    *,
    providers: str | Sequence[str],
    precisions: str | Sequence[str] | None,
    batch_sizes: str | Sequence[int],
    etas: str | Sequence[float],
    fine_fractions: str | Sequence[float] | None,
    torch: bool,
    checkpoint: str | Path | None,
    threads: int | None,
    graphs: str | Sequence[str] = ("pair",),
    **timing: Any,
) -> BenchPlan:
    """Check every argument and resolve every path (against this process's working directory)."""
    provider_list, precision_list, sizes, eta_list, fractions = check_request(
        providers, precisions, batch_sizes, etas, fine_fractions
    )
    check_timing(
        timing["warmup"],
        timing["iterations"],
        timing["duration"],
        threads,
        timing["repeats"],
        timing["isolation"],
        timing["quiet_below"],
    )
    export = absolute(export_dir)
    manifest = Manifest.load(export)
    graph_list = check_graphs(graphs, manifest)
    gates = [("fine_fraction", f) for f in fractions] + [("eta", e) for e in eta_list]
    runtimes = [("openvino" if p == "openvino" else "onnxruntime", p) for p in provider_list]
    cells = make_cells(runtimes, precision_list or [precision_label(manifest)], sizes, gates, torch, graph_list)
    return BenchPlan(
        export_dir=export,
        manifest=manifest,
        cells=cells,
        fine_fractions=fractions,
        threads=threads or machine.default_threads(),
        isolation=timing["isolation"],
        warmup=timing["warmup"],
        iterations=timing["iterations"],
        duration=timing["duration"] or DEFAULT_DURATION_S,
        images=absolute(timing["images"]),
        checkpoint=torch_checkpoint(manifest, checkpoint) if torch else None,
        cache_dir=absolute(timing["cache_dir"]),
        quiet_below=timing["quiet_below"],
        repeats=timing["repeats"],
        batch_sizes=sizes,
    )


def _settings(plan: BenchPlan) -> dict[str, Any]:
    from runtimes.backends import SessionConfig

    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(SessionConfig(threads=plan.threads)).items()}
    return {
        "threads": plan.threads,
        "session_config": config,
        "isolation": plan.isolation,
        "warmup": plan.warmup,
        "quiet_below": plan.quiet_below,
        "repeats": plan.repeats,
        "iterations": plan.iterations,
        "duration_s": None if plan.iterations else plan.duration,
        "inputs": str(plan.images) if plan.images else "synthetic (seeded standard normal)",
        "export": str(plan.export_dir),
        "export_precision": plan.export_precision,
        "model": plan.manifest.model.to_dict(),
    }


def _cell_folder(plan: BenchPlan, cell: Cell, m: _Measured, cache: Path) -> Path | str:
    """The export folder a cell runs (building its precision variant once), or why there is none."""
    if cell.runtime == "torch":
        return plan.export_dir
    if cell.precision not in m.variants:
        try:
            if cell.precision != plan.export_precision:
                log.info("building the %s variant from the fp32 export", cell.precision)
            m.variants[cell.precision] = variant_dir(plan.export_dir, plan.manifest, cell.precision, cache)
        except CFViTError as exc:
            m.variants[cell.precision] = f"cannot build the {cell.precision} variant: {exc}"
    return m.variants[cell.precision]


def _measure_pass(
    plan: BenchPlan,
    m: _Measured,
    base_spec: dict[str, Any],
    inputs: Path,
    n_real: int | None,
    cache: Path,
    rep: int,
    progress: ProgressHook | None,
) -> None:
    """One pass over every cell (the GEMM peak first); skipped cells are not tried again."""
    measure = run_isolated if plan.isolation == "process" else measure_cell
    quiet = plan.quiet_below
    # the GEMM peak always runs in its own process: its ONNX Runtime threads must not bind this one's
    mm, background = machine.measure_quietly(
        run_isolated, {**base_spec, "kind": "matmul", "n": machine.MATMUL_N, "iterations": 4}, quiet, log.info
    )
    if "gflops" in mm:
        m.peaks.append((mm["gflops"], mm["median_gflops"], background))
    else:
        log.warning("GEMM peak not measured: %s", mm.get("reason"))
    total = len(plan.cells) * plan.repeats
    for i, cell in enumerate(plan.cells):
        report(progress, cell.label, rep * len(plan.cells) + i, total)
        key = (cell.runtime, cell.provider, cell.precision)
        where = _cell_folder(plan, cell, m, cache)
        if i in m.skipped:
            continue
        if isinstance(where, str) or key in m.unavailable:
            m.skipped[i] = BenchRow.for_cell(
                cell, plan.isolation, status="skipped", reason=m.unavailable.get(key) or str(where)
            )
            continue
        spec = {
            **base_spec,
            "cell": asdict(cell),
            "export_dir": str(where),
            "inputs": str(inputs),
            "pool": pool_size(cell.batch_size, n_real),
        }
        raw, background = machine.measure_quietly(measure, spec, quiet, log.info)
        if "times" not in raw:
            if raw.get("unavailable"):
                m.unavailable[key] = raw["reason"]
            m.skipped[i] = make_row(cell, raw, plan.manifest, None, plan.isolation)
            continue
        m.runs.setdefault(i, []).append((float(np.mean(raw["times"])), raw, background))
    report(progress, "done", total if rep == plan.repeats - 1 else (rep + 1) * len(plan.cells), total)


def _measure(plan: BenchPlan, progress: ProgressHook | None) -> _Measured:
    m = _Measured()
    base_spec = {
        "threads": plan.threads,
        "isolation": plan.isolation,
        "warmup": plan.warmup,
        "iterations": plan.iterations,
        "duration": plan.duration,
        "checkpoint": str(plan.checkpoint),
    }
    with tempfile.TemporaryDirectory(prefix="cfvit-bench.") as tmp:
        pool, n_real, m.skipped_images = load_pool(plan.manifest, plan.images, plan.batch_sizes)
        inputs = Path(tmp) / "inputs.npy"
        np.save(inputs, pool)
        del pool
        cache = plan.cache_dir or Path(tmp) / "variants"
        for rep in range(plan.repeats):  # separate passes: a slow spell of the machine hits one run
            _measure_pass(plan, m, base_spec, inputs, n_real, cache, rep, progress)
    return m


def _assemble(plan: BenchPlan, m: _Measured, machine_start: dict[str, Any]) -> BenchResult:
    """Each cell's fastest run as a row (spread of the runs with repeats), speedups, machine, notes."""
    peak, median, background = max(m.peaks) if m.peaks else (None, None, None)
    rows: list[BenchRow] = []
    for i, cell in enumerate(plan.cells):
        if i in m.skipped:
            rows.append(m.skipped[i])
            continue
        ordered = sorted(m.runs[i], key=lambda run: run[0])
        row = make_row(cell, ordered[0][1], plan.manifest, peak, plan.isolation)
        row.background_cpu_pct = ordered[0][2]
        if plan.repeats > 1:
            row.repeat_spread_pct = 100 * (ordered[-1][0] - ordered[0][0]) / ordered[0][0]
        rows.append(row)
    add_speedups(rows)
    info = {
        **machine_start,
        "threads": plan.threads,
        "matmul_peak_gflops": peak,
        "matmul_median_gflops": median,
        "matmul_background_cpu_pct": background,
        "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    settings = {**_settings(plan), "skipped_images": [[str(p), why] for p, why in m.skipped_images]}
    notes = make_notes(plan.isolation, bool(plan.fine_fractions), peak, len(m.skipped_images))
    return BenchResult(rows, info, settings, notes)


def _check_every_runtime_measured(result: BenchResult, out: Path | None) -> None:
    """A requested runtime none of whose cells ran is a failure: one line naming it and why."""
    failed = unmeasured_runtimes(result.rows)
    if failed:
        where = f" (rows with every reason in {out})" if out is not None else ""
        reasons = "; ".join(f"{name}: every cell skipped: {reason}" for name, reason in failed.items())
        raise NothingMeasuredError(f"nothing measured for {reasons}{where}", result)


def run_bench(
    export_dir: str | Path,
    *,
    providers: str | Sequence[str] = ("cpu",),
    precisions: str | Sequence[str] | None = None,
    batch_sizes: str | Sequence[int] = (1, 32),
    etas: str | Sequence[float] = (),
    fine_fractions: str | Sequence[float] | None = None,
    images: str | Path | None = None,
    warmup: int = 3,
    iterations: int | None = None,
    duration: float | None = None,
    threads: int | None = None,
    graphs: str | Sequence[str] = ("pair",),
    torch: bool = False,
    checkpoint: str | Path | None = None,
    isolation: str = "process",
    cache_dir: str | Path | None = None,
    quiet_below: float | None = None,
    repeats: int = 1,
    out: str | Path | None = None,
    force: bool = False,
    progress: ProgressHook | None = None,
) -> BenchResult:
    """Benchmark an export: pipeline and baseline cells per provider x precision x batch size x gate.

    Lists may be sequences or flag strings (``"1,8,32"``, ``"0.2:0.6:0.2"``). `precisions` default to the
    export's own; others are built from the (fp32) export into `cache_dir` (default: a temporary folder).
    Exactly the gates asked for are measured: `fine_fractions` default to (0.24, 0.52, 1.0) only when no
    `etas` are given; fraction 1.0 is the both-stages (η = 1) reference. `threads` (default: physical
    cores) is the same for every runtime; `graphs` ("pair", "single" or both) are what the gated rows
    run: the two stage graphs (model ``cfvit``) and/or single.onnx (model ``cfvit-single``); sessions are built with the library's default
    ``SessionConfig(threads=threads)``, as users get them. `torch` adds PyTorch eager rows from
    `checkpoint` (default: the checkpoint recorded in the manifest). With `quiet_below` (a CPU %), a
    cell waits (up to a minute) for other processes to use less than that share of the CPUs and is
    measured again (up to QUIET_RETRIES times, keeping the cleanest) when they used more. With `repeats`
    > 1, every cell is measured that many times in separate passes and keeps its fastest run
    (``repeat_spread_pct`` shows how runs differ). With `out`, results are saved there (see
    :meth:`BenchResult.save`); an existing `out` is refused unless `force`. `progress` gets
    ``(cell, done, total)``. Paths are resolved against the caller's working directory.

    Raises :class:`UsageError` before any work for bad arguments, and :class:`NothingMeasuredError`
    (after saving `out`) when every cell of a requested runtime was skipped.
    """
    request = {k: v for k, v in locals().items() if k not in ("out", "force", "progress")}
    plan = make_plan(**request)  # every check, every path made absolute: before any work
    out_path = absolute(out)
    if out_path is not None:
        check_output(out_path, force)
    machine_start = machine.machine_info()
    result = _assemble(plan, _measure(plan, progress), machine_start)
    if out_path is not None:
        result.save(out_path, force=force)
    _check_every_runtime_measured(result, out_path)
    return result
