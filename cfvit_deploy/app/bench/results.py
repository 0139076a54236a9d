"""From raw measurements to results: rows with statistics and FLOP rates, speedups, notes, and the
presentation (a rich table; the latency and throughput plots are in :mod:`.plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cfvit_deploy.flops import baseline_gmacs, stage_gmacs
from cfvit_deploy.manifest import Manifest

from .schema import BenchResult, BenchRow, Cell

SYNTHETIC_GATE_NOTE = (
    "fine_fraction rows use a synthetic gate: eta is set per cell to the coarse-confidence quantile of the "
    "benchmark inputs that sends that fraction of the images to the fine stage"
)
ISOLATION_NOTES = {
    "process": "each cell ran in its own Python process (no spinning worker threads left by another runtime)",
    "inline": "all cells ran in one process (smoke-test mode; idle worker threads of earlier cells may bias "
    "later ones; no per-cell peak RSS)",
}
STAGES_NOTE = (
    "coarse_ms/fine_ms: the session runs; gate_ms: host softmax, gate, gather and merge; overhead_pct: "
    "everything outside the two session runs, from the whole-call timer"
)


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """mean/std/P50/P90/P95/P99 in ms per batch, and images per second."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    stats = {"mean_ms": float(ms.mean()), "std_ms": float(ms.std())}
    for p in (50, 90, 95, 99):
        stats[f"p{p}_ms"] = float(np.percentile(ms, p))
    stats["img_per_s"] = batch_size * 1e3 / stats["mean_ms"]
    return stats


def _stage_split(row: BenchRow, stages: list[tuple], b: int, manifest: Manifest) -> None:
    """Fine fraction, exit rate, per-stage times and GFLOP/s of a pipeline row, from its calls of `b` images."""
    gm = stage_gmacs(manifest.model)
    n_fine = np.array([s[3] for s in stages], dtype=np.float64)
    row.fine_fraction = float(n_fine.sum() / (b * len(stages)))
    row.exit_rate = 1.0 - row.fine_fraction
    row.fine_batch = float(n_fine[n_fine > 0].mean()) if n_fine.any() else 0.0
    row.gmacs_per_image = gm.expected(row.fine_fraction)
    if stages[0][0] is None:  # PyTorch eager and single.onnx: no split
        return
    coarse, gate, fine = (np.array([s[k] for s in stages]) for k in range(3))
    row.coarse_ms, row.gate_ms, row.fine_ms = (float(x.mean() * 1e3) for x in (coarse, gate, fine))
    row.overhead_pct = 100.0 * (row.mean_ms - row.coarse_ms - row.fine_ms) / row.mean_ms
    row.coarse_gflops = 2 * gm.coarse * b / float(coarse.mean())
    if fine.sum() > 0:
        row.fine_gflops = 2 * (gm.fine - gm.coarse) * float(n_fine.sum()) / float(fine.sum())


def make_row(cell: Cell, raw: dict[str, Any], manifest: Manifest, peak: float | None, isolation: str) -> BenchRow:
    """The row of one cell from its raw measurement (or its skip/error reason)."""
    if "times" not in raw:
        return BenchRow.for_cell(cell, isolation, status=raw.get("status", "error"), reason=raw.get("reason", ""))
    stats = latency_stats(raw["times"], cell.batch_size)
    row = BenchRow.for_cell(
        cell,
        isolation,
        iterations=len(raw["times"]),
        peak_rss_mb=raw.get("peak_rss_mb"),
        decode_workers=raw.get("decode_workers"),
        **raw.get("session_config", {}),
        **stats,
    )
    if cell.model == "baseline":
        row.gmacs_per_image = baseline_gmacs(manifest.model)
    else:
        row.eta = raw["eta"]
        _stage_split(row, raw["stages"], raw.get("images_per_call", cell.batch_size), manifest)
        if "images_per_call" in raw:  # end to end: infer's batches, not one fine run per call
            row.fine_batch = None
    row.gflops = 2 * row.gmacs_per_image * row.img_per_s
    if peak:
        row.pct_peak = 100 * row.gflops / peak
        row.fine_pct_peak = None if row.fine_gflops is None else 100 * row.fine_gflops / peak
    return row


def add_speedups(rows: list[BenchRow]) -> None:
    """speedup_vs_baseline: the baseline of the same runtime/provider/precision/batch, else its fp32 one."""
    base = {
        (r.runtime, r.provider, r.precision, r.batch_size): r.img_per_s
        for r in rows
        if r.model == "baseline" and r.status == "ok"
    }
    for r in rows:
        if r.status != "ok":
            continue
        for precision in (r.precision, "fp32"):
            ref = base.get((r.runtime, r.provider, precision, r.batch_size))
            if ref:
                r.speedup_vs_baseline, r.baseline_precision = r.img_per_s / ref, precision  # type: ignore[operator]
                break


#: A cell measured while other processes used at least this share of the CPUs is marked as under load.
LOADED_BACKGROUND_PCT = 25.0
#: A speed-up more than this factor above what the GMACs allow (baseline GMACs / cell GMACs) is marked.
GMACS_SLACK = 1.10


def cell_caveat(row: BenchRow, baseline_gmacs: float | None) -> str:
    """Why a measured cell should not be trusted as it stands ("" when nothing is known against it):
    measured under load, or faster than its GMACs allow next to the baseline (a disturbed baseline)."""
    why = []
    if row.background_cpu_pct is not None and row.background_cpu_pct >= LOADED_BACKGROUND_PCT:
        why.append(f"under load: other processes used {row.background_cpu_pct:.0f}% of the CPUs")
    if row.model != "baseline" and row.speedup_vs_baseline and baseline_gmacs and row.gmacs_per_image:
        bound = baseline_gmacs / row.gmacs_per_image
        if row.speedup_vs_baseline > GMACS_SLACK * bound:
            why.append(
                f"{row.speedup_vs_baseline:.2f}x is more than 10% above the {bound:.2f}x its GMACs allow "
                f"({row.gmacs_per_image:.3f} vs {baseline_gmacs:.3f} per image): a disturbed measurement"
            )
    return "; ".join(why)


def caveats(rows: list[BenchRow]) -> dict[int, str]:
    """index in `rows` -> :func:`cell_caveat` for every measured row that has one."""
    base = {
        (r.runtime, r.provider, r.precision, r.batch_size): r.gmacs_per_image
        for r in rows
        if r.model == "baseline" and r.status == "ok"
    }
    out = {}
    for i, r in enumerate(rows):
        if r.status != "ok":
            continue
        why = cell_caveat(r, base.get((r.runtime, r.provider, r.baseline_precision or r.precision, r.batch_size)))
        if why:
            out[i] = why
    return out


def make_notes(isolation: str, synthetic_gate: bool, peak: float | None, skipped_images: int) -> list[str]:
    notes = [ISOLATION_NOTES[isolation]]
    if synthetic_gate:
        notes.append(SYNTHETIC_GATE_NOTE)
    notes.append(STAGES_NOTE)
    if peak:
        notes.append(
            f"pct_peak: achieved 2*GMACs*img/s against the measured fp32 matmul peak of {peak:.0f} GFLOP/s "
            "(int8 and fp16 rows too)"
        )
    if skipped_images:
        notes.append(f"{skipped_images} unreadable files in the images folder were skipped (settings.skipped_images)")
    return notes


def unmeasured_runtimes(rows: list[BenchRow]) -> dict[str, str]:
    """runtime/provider -> why, for every runtime none of whose cells was measured: its distinct reasons,
    the pipeline cells' first (a missing baseline.onnx is not why a provider failed)."""
    groups: dict[str, list[BenchRow]] = {}
    for r in rows:
        groups.setdefault(f"{r.runtime}/{r.provider}", []).append(r)
    failed = {}
    for name, group in groups.items():
        if any(r.status == "ok" for r in group):
            continue
        ordered = sorted(group, key=lambda r: r.model != "cfvit")  # stable: pipeline rows first
        reasons = dict.fromkeys((r.reason or "no reason given").splitlines()[0] for r in ordered)
        failed[name] = "; also: ".join(reasons)
    return failed


# -- presentation ---------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gate_text(r: BenchRow) -> str:
    if r.gate == "none":
        return "-"
    return f"f={r.target_fine_fraction:g}" if r.gate == "fine_fraction" else f"eta={_fmt(r.eta, 'g')}"


def _measured_cells(r: BenchRow) -> list[str]:
    split = "-" if r.coarse_ms is None else f"{r.coarse_ms:.1f}/{r.gate_ms:.2f}/{r.fine_ms:.1f}"
    return [
        _fmt(r.fine_fraction, ".2f"),
        f"{r.mean_ms:.1f}",
        f"{r.p50_ms:.1f}",
        f"{r.p99_ms:.1f}",
        f"{r.img_per_s:.1f}",
        split,
        _fmt(r.overhead_pct, ".1f"),
        f"{r.gflops:.0f} ({_fmt(r.pct_peak, '.0f')})",
        _fmt(r.speedup_vs_baseline, ".2f") + "x",
        _fmt(r.peak_rss_mb, ".0f"),
        _fmt(r.background_cpu_pct, ".0f"),
    ]


def render_table(result: BenchResult) -> Any:
    """A rich Table of every row; a skipped row points to its reason, listed in the caption."""
    from rich.markup import escape
    from rich.table import Table

    peak = result.machine.get("matmul_peak_gflops")
    table = Table(title=f"cfvit bench ({result.settings['threads']} threads, matmul peak {_fmt(peak, '.0f')} GFLOP/s)")
    for col in (
        "runtime",
        "prec",
        "model",
        "batch",
        "gate",
        "fine",
        "mean ms",
        "p50",
        "p99",
        "img/s",
        "coarse/gate/fine ms",
        "ovh %",
        "GFLOP/s (%pk)",
        "speedup",
        "RSS MB",
        "bg cpu %",
    ):
        table.add_column(col, justify="left" if col in ("runtime", "prec", "model", "gate") else "right")
    reasons: dict[str, int] = {}
    marked = caveats(result.rows)
    for i, r in enumerate(result.rows):
        model = f"{r.model} e2e:{r.decode}" if r.end_to_end else r.model
        head = [f"{r.runtime}/{r.provider}", r.precision, model, str(r.batch_size), _gate_text(r)]
        if r.status != "ok":
            n = reasons.setdefault(r.reason, len(reasons) + 1)
            table.add_row(*head, f"[yellow]{r.status} [{n}][/yellow]", *[""] * 10)
        else:
            cells = _measured_cells(r)
            if i in marked:  # the caveat is listed under the table, as a skip's reason
                n = reasons.setdefault(marked[i], len(reasons) + 1)
                cells[-1] += f" [yellow]\\[{n}][/yellow]"
            table.add_row(*head, *cells)
    if reasons:
        table.caption = "\n".join(f"[{n}] {escape(reason)}" for reason, n in reasons.items())
        table.caption_justify = "left"
    return table
