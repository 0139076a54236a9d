"""The headline of `run_headline.py`: the cross-runtime table with the fastest runtime per cell marked
(over ``--runs N``: each cell's median run), its plot, and the generated block of
benchmarks/results/README.md with every target (median and min-max range; built in `headline_targets`)."""

from __future__ import annotations

from pathlib import Path

from headline_targets import Target, ok, row_of, targets

from cfvit_deploy.app.bench import BenchResult, BenchRow
from cfvit_deploy.extras import require
from cfvit_deploy.io import atomic_write_path

__all__ = ["Target", "headline_table", "markdown", "merge_runs", "plot_headline", "targets", "write_readme"]

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
#: Headline columns: (batch, model, fine fraction); batch 1 compares latency, batch 32 throughput.
COLUMNS = ((1, "cfvit", 0.24), (1, "baseline", None), (32, "cfvit", 0.24), (32, "cfvit", 0.52), (32, "baseline", None))
#: Headline rows: (label, runtime, provider, precision).
RUNTIMES = (
    ("ONNX Runtime CPU fp32", "onnxruntime", "cpu", "fp32"),
    ("ONNX Runtime CPU int8", "onnxruntime", "cpu", "int8"),
    ("OpenVINO CPU fp32", "openvino", "openvino", "fp32"),
    ("OpenVINO CPU int8", "openvino", "openvino", "int8"),
    ("PyTorch eager fp32", "torch", "cpu", "fp32"),
    ("ONNX Runtime CUDA fp32", "onnxruntime", "cuda", "fp32"),
    ("ONNX Runtime TensorRT fp32", "onnxruntime", "tensorrt", "fp32"),
)
#: Rows whose CF-ViT cells are single.onnx (bench model "cfvit-single"), shown when the run measured it.
SINGLE_RUNTIMES = (
    ("ONNX Runtime CPU fp32, single.onnx", "onnxruntime", "cpu", "fp32"),
    ("OpenVINO CPU fp32, single.onnx", "openvino", "openvino", "fp32"),
)


def merge_runs(results: list[BenchResult]) -> BenchResult:
    """The results of ``--runs N`` as one: each cell is the row of its median run by images/s (for an even N
    the slower of the two middle runs); the machine is the first run's with the last run's end load."""
    if len(results) == 1:
        return results[0]
    key = lambda r: (r.runtime, r.provider, r.precision, r.model, r.batch_size, r.gate, r.target_fine_fraction)  # noqa: E731
    rows = []
    for row in results[0].rows:
        measured = sorted(
            (r for res in results for r in res.rows if key(r) == key(row) and ok(r)), key=lambda r: r.img_per_s
        )
        rows.append(measured[(len(measured) - 1) // 2] if measured else row)
    machine = {**results[0].machine, "load_avg_end": results[-1].machine.get("load_avg_end")}
    return BenchResult(rows, machine, {**results[0].settings, "runs": len(results)}, results[0].notes)


def _cell_text(row: BenchRow | None, batch: int) -> str:
    if row is None:
        return "-"
    if row.status != "ok":
        return "not measured: no GPU" if "no GPU" in row.reason else f"{row.status}"
    return f"{row.mean_ms:.1f} ms" if batch == 1 else f"{row.img_per_s:.1f} img/s"


def headline_table(result: BenchResult) -> list[str]:
    """Markdown: one row per runtime, one column per headline cell, the fastest runtime of each column in bold."""
    cells = {
        (label, col): row_of(result, rt, prov, prec, *col) for label, rt, prov, prec in RUNTIMES for col in COLUMNS
    }
    single = [r for r in SINGLE_RUNTIMES if any(x.model == "cfvit-single" for x in result.rows)]
    for label, rt, prov, prec in single:
        for b, model, f in COLUMNS:
            cells[(label, (b, model, f))] = row_of(result, rt, prov, prec, b, "cfvit-single" if f else model, f)
    best = {}
    for col in COLUMNS:
        measured = [(r.img_per_s, label) for (label, c), r in cells.items() if c == col and ok(r)]
        best[col] = max(measured)[1] if measured else None
    head = ["runtime"] + [
        f"b{b} {'CF-ViT f=' + format(f, 'g') if m == 'cfvit' else 'DeiT-S'}" + (" latency" if b == 1 else " throughput")
        for b, m, f in COLUMNS
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, *_ in (*RUNTIMES, *single):
        texts = []
        for col in COLUMNS:
            text = _cell_text(cells[(label, col)], col[0])
            texts.append(f"**{text}** ★" if best[col] == label else text)
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return lines + ["", "★ fastest runtime of the column (lowest latency / highest throughput)."]


def plot_headline(result: BenchResult, path: Path) -> Path:
    """headline.png: per batch size, images/s of every runtime, CF-ViT (f=0.24) next to DeiT-S."""
    matplotlib = require("matplotlib", "bench", purpose="the headline plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, b in zip(axes, (1, 32), strict=True):
        labels, pipe, base = [], [], []
        for label, rt, prov, prec in RUNTIMES:
            p, d = (
                ok(row_of(result, rt, prov, prec, b, "cfvit", 0.24)),
                ok(row_of(result, rt, prov, prec, b, "baseline", None)),
            )
            labels.append(label.replace(" ", "\n", 2) + ("" if p or d else "\n(not measured)"))
            pipe.append(p.img_per_s if p else 0.0)
            base.append(d.img_per_s if d else 0.0)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], pipe, width=0.4, label="CF-ViT pipeline, f=0.24")
        ax.bar([i + 0.2 for i in x], base, width=0.4, label="DeiT-S baseline")
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set(title=f"batch {b}", ylabel="images/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


#: CPU features that decide int8 GEMM speed, fastest first (ONNX Runtime's MLAS uses the first it finds)
INT8_UNITS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))


def int8_units(flags: list[str]) -> str:
    """The int8 matrix units of a CPU, by its flags ("none" when it multiplies int8 with plain AVX2 / AVX-512)."""
    found = [name for flag, name in INT8_UNITS if flag in flags]
    return " + ".join(found) if found else "none (no VNNI)"


def _machine_lines(result: BenchResult, elapsed_s: float, mode: str) -> list[str]:
    m, s = result.machine, result.settings
    peak = m.get("matmul_peak_gflops")
    return [
        f"Machine: {m['cpu_model']}, {m['physical_cores']} cores ({m['logical_cores']} logical), {m['ram_gb']} GB "
        f"RAM, GPU: {m['gpu'] or 'none'}; int8 units: {int8_units(m.get('cpu_flags') or [])}. "
        f"onnxruntime {m['versions']['onnxruntime']}, openvino {m['versions']['openvino']}, "
        f"torch {m['versions']['torch']}. fp32 GEMM peak: {'-' if peak is None else f'{peak:.0f}'} GFLOP/s. "
        f"Load average start/end: {m['load_avg_start'][0]:.2f} / {m['load_avg_end'][0]:.2f}.",
        "",
        f"Settings ({mode}): {s['threads']} threads for every runtime, sessions as users get them "
        f"(`SessionConfig(threads={s['threads']})`), {s['isolation']} isolation, fastest of {s['repeats']} "
        f"pass(es), {s['warmup']} warm-up calls, {s['duration_s']} s of timed calls per cell, inputs "
        f"{s['inputs']}. Run took {elapsed_s / 60:.1f} min.",
        "",
        f"Runs: {s.get('runs', 1)} (`--runs`), fresh measurements of the same exports. Each cell of the "
        "headline table is its median run (for an even count the slower of the two middle runs); each target "
        "is the median over the runs, with the min–max range of the runs.",
        "",
    ]


def markdown(result: BenchResult, goals: list[Target], elapsed_s: float, mode: str) -> str:
    lines = [BEGIN, "", "_Generated by `python benchmarks/run_headline.py`; edit the text outside the markers._", ""]
    lines += _machine_lines(result, elapsed_s, mode)
    lines += ["### Cross-runtime headline", "", *headline_table(result), "", "![headline](headline.png)", ""]
    runs = result.settings.get("runs", 1)
    lines += [
        "### Targets",
        "",
        f"| target | measured (median of {runs} run(s)) | range (min–max) | goal | verdict | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [t.line() for t in goals] + [""]
    reasons = sorted({f"{r.runtime}/{r.provider} {r.precision}: {r.reason}" for r in result.rows if r.status != "ok"})
    if reasons:
        lines += ["Not measured:", "", *[f"- {reason}" for reason in reasons], ""]
    lines += [
        "Every cell: `results.json` / `results.csv` (bench schema); ![latency](latency.png) "
        "![throughput](throughput.png)",
        "",
        *[f"- {n}" for n in result.notes],
        "",
        END,
    ]
    return "\n".join(lines)


def write_readme(path: Path, generated: str) -> None:
    """Replace the generated block of README.md (or append one), keeping the hand-written text."""
    text = path.read_text() if path.is_file() else "# Benchmark: CF-ViT vs DeiT-S across runtimes\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    with atomic_write_path(path) as tmp:
        tmp.write_text(text)
