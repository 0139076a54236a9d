"""The headline of `run_headline.py`: target ratios (met/missed), the cross-runtime table with the
fastest runtime per cell marked, its plot, and the generated block of benchmarks/results/README.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cfvit_deploy.app.bench import BenchResult, BenchRow
from cfvit_deploy.extras import require
from cfvit_deploy.io import atomic_write_path

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


@dataclass(frozen=True)
class Target:
    """One headline ratio and its goal (None: reported only)."""

    name: str
    value: float | None
    goal: float | None
    detail: str = ""
    within: bool = False  #: goal is a tolerance: |value - 1| <= goal

    @property
    def met(self) -> bool | None:
        if self.value is None or self.goal is None:
            return None
        return abs(self.value - 1) <= self.goal if self.within else self.value >= self.goal

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "goal": self.goal, "met": self.met, "detail": self.detail}

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.2f}"
        goal = "-" if self.goal is None else (f"1 ± {self.goal:g}" if self.within else f">= {self.goal:g}")
        verdict = (
            "reported"
            if self.goal is None and self.value is not None
            else {True: "met", False: "**MISSED**", None: "not measured"}[self.met]
        )
        return f"| {self.name} | {value} | {goal} | {verdict} | {self.detail} |"


def row_of(
    result: BenchResult, runtime: str, provider: str, precision: str, batch: int, model: str, fraction: float | None
) -> BenchRow | None:
    """The row of one headline cell (measured or not), or None when it was not requested."""
    for r in result.rows:
        if (r.runtime, r.provider, r.precision, r.batch_size, r.model) == (
            runtime,
            provider,
            precision,
            batch,
            model,
        ) and (model == "baseline" or r.target_fine_fraction == fraction):
            return r
    return None


def _ok(row: BenchRow | None) -> BenchRow | None:
    return row if row is not None and row.status == "ok" else None


def _ratio(a: BenchRow | None, b: BenchRow | None) -> float | None:
    a, b = _ok(a), _ok(b)
    return None if a is None or b is None else a.img_per_s / b.img_per_s


def targets(result: BenchResult, infer_runs: list[dict]) -> list[Target]:
    """Issue 14's ratios, each from rows of this run, and `cfvit infer` vs the bench row of the same batch."""

    def ort(precision: str, b: int, model: str = "cfvit", f: float | None = None) -> BenchRow | None:
        return row_of(result, "onnxruntime", "cpu", precision, b, model, f)

    base1, base32 = ort("fp32", 1, "baseline"), ort("fp32", 32, "baseline")
    out = [
        Target("fp32 pipeline / DeiT-S fp32, batch 1 latency, f=0.24", _ratio(ort("fp32", 1, f=0.24), base1), 2.4),
        Target("fp32 pipeline / DeiT-S fp32, batch 32 img/s, f=0.24", _ratio(ort("fp32", 32, f=0.24), base32), 2.6),
        Target("fp32 pipeline / DeiT-S fp32, batch 32 img/s, f=0.52", _ratio(ort("fp32", 32, f=0.52), base32), 1.8),
        Target(
            "int8 pipeline / fp32 pipeline, batch 32 img/s, f=0.24",
            _ratio(ort("int8", 32, f=0.24), ort("fp32", 32, f=0.24)),
            2.5,
        ),
    ]
    for run in infer_runs:
        bench_row = _ok(ort("fp32", run["batch_size"], f=1.0))
        value = None if bench_row is None or not run.get("img_per_s") else run["img_per_s"] / bench_row.img_per_s
        detail = run.get("error") or (
            f"infer {run['img_per_s']:.1f} img/s on {run['images']} files, bench {bench_row.img_per_s:.1f} img/s"
            if value is not None
            else ""
        )
        out.append(
            Target(
                f"`cfvit infer` / bench row, fp32 eta=1, batch {run['batch_size']} (img/s)",
                value,
                0.10,
                detail,
                within=True,
            )
        )
    for b, f in ((1, 0.24), (32, 0.24)):
        ov, cpu = row_of(result, "openvino", "openvino", "fp32", b, "cfvit", f), ort("fp32", b, f=f)
        out.append(Target(f"OpenVINO / ONNX Runtime, fp32 pipeline, batch {b}, f={f:g}", _ratio(ov, cpu), None))
    return out


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
    best = {}
    for col in COLUMNS:
        measured = [(r.img_per_s, label) for (label, c), r in cells.items() if c == col and _ok(r)]
        best[col] = max(measured)[1] if measured else None
    head = ["runtime"] + [
        f"b{b} {'CF-ViT f=' + format(f, 'g') if m == 'cfvit' else 'DeiT-S'}" + (" latency" if b == 1 else " throughput")
        for b, m, f in COLUMNS
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, *_ in RUNTIMES:
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
                _ok(row_of(result, rt, prov, prec, b, "cfvit", 0.24)),
                _ok(row_of(result, rt, prov, prec, b, "baseline", None)),
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


def _machine_lines(result: BenchResult, elapsed_s: float, mode: str) -> list[str]:
    m, s = result.machine, result.settings
    peak = m.get("matmul_peak_gflops")
    return [
        f"Machine: {m['cpu_model']}, {m['physical_cores']} cores ({m['logical_cores']} logical), {m['ram_gb']} GB "
        f"RAM, GPU: {m['gpu'] or 'none'}; AVX-512 VNNI: {'yes' if m['avx512_vnni'] else 'no'}. "
        f"onnxruntime {m['versions']['onnxruntime']}, openvino {m['versions']['openvino']}, "
        f"torch {m['versions']['torch']}. fp32 GEMM peak: {'-' if peak is None else f'{peak:.0f}'} GFLOP/s. "
        f"Load average start/end: {m['load_avg_start'][0]:.2f} / {m['load_avg_end'][0]:.2f}.",
        "",
        f"Settings ({mode}): {s['threads']} threads for every runtime, sessions as users get them "
        f"(`SessionConfig(threads={s['threads']})`), {s['isolation']} isolation, fastest of {s['repeats']} "
        f"pass(es), {s['warmup']} warm-up calls, {s['duration_s']} s of timed calls per cell, inputs "
        f"{s['inputs']}. Run took {elapsed_s / 60:.1f} min.",
        "",
    ]


def markdown(result: BenchResult, goals: list[Target], elapsed_s: float, mode: str) -> str:
    lines = [BEGIN, "", "_Generated by `python benchmarks/run_headline.py`; edit the text outside the markers._", ""]
    lines += _machine_lines(result, elapsed_s, mode)
    lines += ["### Cross-runtime headline", "", *headline_table(result), "", "![headline](headline.png)", ""]
    lines += ["### Targets", "", "| target | measured | goal | verdict | note |", "|---|---|---|---|---|"]
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
