"""Reproduce the README's CPU headline table: CF-ViT vs the plain DeiT-S on ONNX Runtime (CPU).

DeiT-S-size weights (random init, seed 0: speed does not depend on the values; the gate is the
synthetic fine-fraction gate of ``runtimes.bench``), g = 7, exported with ``baseline.onnx``. Every
target is a ratio of two rows measured side by side in one run. Writes into ``--out`` (default
``benchmarks/results/``): results.json/csv, latency.png, throughput.png, machine.txt, and the part
of README.md between the ``bench:begin``/``bench:end`` markers (text outside them is kept).

    python benchmarks/run_cpu_bench.py [--duration 3] [--threads N] [--work /tmp/cfvit-cpu-bench]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfvit_deploy.io import atomic_write_path  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402
from runtimes.bench import BenchResult, BenchRow, run_bench  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SEED = 0


@dataclass(frozen=True)
class Target:
    """One headline ratio and its goal."""

    name: str
    value: float | None
    goal: float | None  #: None: reported only
    higher_is_better: bool = True
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.goal is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value < self.goal

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.2f}"
        goal = "-" if self.goal is None else f"{'>=' if self.higher_is_better else '<'} {self.goal:g}"
        verdict = "reported" if self.goal is None and self.value is not None else {
            True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"| {self.name} | {value} | {goal} | {verdict} | {self.detail} |"


def prepare(work: Path) -> tuple[Path, Path]:
    """Random-init DeiT-S CF-ViT checkpoint and its fp32 export with baseline.onnx (reused when present)."""
    ckpt, export_dir = work / "deit_small_seed0.pth", work / "export"
    try:
        Manifest.load(export_dir)
        if ckpt.is_file():
            return ckpt, export_dir
    except Exception:  # missing or stale: rebuild
        pass
    import torch

    from cfvit_deploy.checkpoints import save_checkpoint
    from cfvit_deploy.config import ModelConfig
    from cfvit_deploy.model import CFViT
    from exporters import export

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    save_checkpoint(CFViT(ModelConfig.named("deit", "small", coarse_grid=7)).eval(), ckpt)
    print(f"exporting DeiT-S CF-ViT (g=7, random init) to {export_dir}", file=sys.stderr)
    export(ckpt, export_dir, baseline=True, force=True)
    return ckpt, export_dir


def _one(result: BenchResult, **match) -> BenchRow | None:
    rows = result.find(**match)
    return rows[0] if rows else None


def _ratio(a: BenchRow | None, b: BenchRow | None) -> float | None:
    return None if a is None or b is None else a.img_per_s / b.img_per_s


def targets(result: BenchResult) -> list[Target]:
    """The headline ratios, each from rows of this run."""
    ort = dict(runtime="onnxruntime", provider="cpu")

    def pipe(precision: str, b: int, f: float | None, runtime: str = "onnxruntime") -> BenchRow | None:
        return _one(result, runtime=runtime, precision=precision, model="cfvit", batch_size=b, target_fine_fraction=f)

    def base(precision: str, b: int, runtime: str = "onnxruntime") -> BenchRow | None:
        return _one(result, runtime=runtime, precision=precision, model="baseline", batch_size=b)

    out = [
        Target("fp32 pipeline / fp32 DeiT-S, batch 32, f=0.24 (img/s)", _ratio(pipe("fp32", 32, 0.24), base("fp32", 32)), 2.6),
        Target("fp32 pipeline / fp32 DeiT-S, batch 32, f=0.52 (img/s)", _ratio(pipe("fp32", 32, 0.52), base("fp32", 32)), 1.8),
        Target("fp32 pipeline / fp32 DeiT-S, batch 1, f=0.24 (latency)", _ratio(pipe("fp32", 1, 0.24), base("fp32", 1)), 2.2),
    ]
    for b, goal in ((32, 3.0), (1, 5.0)):
        rows = [r for r in result.find(model="cfvit", precision="fp32", batch_size=b, **ort)]
        worst = max(rows, key=lambda r: r.overhead_pct, default=None)
        out.append(Target(f"orchestration overhead, batch {b}, worst fine fraction (% of the call)",
                          None if worst is None else worst.overhead_pct, goal, higher_is_better=False,
                          detail="" if worst is None else f"at f={worst.target_fine_fraction:g}"))
    for f in (0.24, 0.52, 1.0):
        out.append(Target(f"int8 pipeline / fp32 pipeline, batch 32, f={f:g} (img/s)",
                          _ratio(pipe("int8", 32, f), pipe("fp32", 32, f)), 2.0))
    out.append(Target("int8 pipeline (ORT) / DeiT-S PyTorch eager fp32, batch 32, f=0.24 (img/s)",
                      _ratio(pipe("int8", 32, 0.24), base("fp32", 32, "torch")), 5.0))
    for b, goal in ((1, 1.3), (32, None)):
        out.append(Target(f"fp32 pipeline (ORT) / CF-ViT PyTorch eager predict, batch {b}, f=0.24 (img/s)",
                          _ratio(pipe("fp32", b, 0.24), pipe("fp32", b, 0.24, "torch")), goal))
    full = pipe("fp32", 32, 1.0)
    peak = result.machine.get("matmul_peak_gflops")
    out.append(Target("fine graph, batch 32 (eta=1): achieved % of the fp32 matmul peak",
                      None if full is None else full.fine_pct_peak, 70.0,
                      detail="" if full is None or peak is None else
                      f"{full.fine_gflops:.0f} of {peak:.0f} GFLOP/s"))
    return out


def profile_ops(export_dir: Path, batch_size: int, threads: int, runs: int = 2) -> dict[str, list[tuple[str, float, float, int]]]:
    """Per-op-type kernel time (ms per run, % of the graph, nodes) of each fp32 graph, from ORT profiling."""
    import onnxruntime as ort

    manifest = Manifest.load(export_dir)
    x = np.random.default_rng(SEED).standard_normal((batch_size, 3, manifest.image_size, manifest.image_size),
                                                    dtype=np.float32)
    tables: dict[str, list[tuple[str, float, float, int]]] = {}
    coarse_out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for graph in ("coarse", "fine", "baseline"):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, graph)
            session = ort.InferenceSession(str(manifest.graph_path(graph)), so, providers=["CPUExecutionProvider"])
            feeds = {"images": x} if graph != "fine" else {"images": x, **{
                k: coarse_out[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}}
            for _ in range(runs + 1):  # the first run is the warm-up (dropped below)
                outputs = session.run(None, feeds)
            if graph == "coarse":
                coarse_out = dict(zip([o.name for o in session.get_outputs()], outputs))
            events = json.loads(Path(session.end_profiling()).read_text())
            nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            per_run = len(nodes) // (runs + 1)  # every run executes the same nodes; drop the warm-up's
            totals: collections.Counter[str] = collections.Counter()
            counts: collections.Counter[str] = collections.Counter()
            for e in nodes[per_run:]:
                totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
                counts[e["args"]["op_name"]] += 1
            total = sum(totals.values())
            tables[graph] = [(op, ms, 100 * ms / total, counts[op] // runs) for op, ms in totals.most_common()]
    return tables


def markdown(result: BenchResult, goals: list[Target], profile: dict | None, elapsed_s: float) -> str:
    m, s = result.machine, result.settings
    lines = [BEGIN, "", "_Generated by `python benchmarks/run_cpu_bench.py`; edit the text outside the markers._", ""]
    lines += [f"Machine: {m['cpu_model']}, {m['physical_cores']} cores ({m['logical_cores']} logical), {m['ram_gb']} GB RAM, "
              f"GPU: {m['gpu'] or 'none'}; AVX-512 VNNI: {'yes' if m['avx512_vnni'] else 'no'}. "
              f"onnxruntime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}, numpy {m['versions']['numpy']}. "
              f"fp32 matmul peak (2048^3 ORT MatMul, constant B, best of all passes): {m['matmul_peak_gflops']:.0f} GFLOP/s "
              f"(other processes meanwhile: {m['matmul_background_cpu_pct']:.0f}% CPU). "
              f"Load average at start/end: {m['load_avg_start'][0]:.2f} / {m['load_avg_end'][0]:.2f}.", ""]
    lines += [f"Settings: {s['threads']} threads for every runtime, ONNX Runtime threading '{s['ort_threading']}', "
              f"cells re-measured when other processes used >= {s['quiet_below']}% CPU, "
              f"{s['isolation']} isolation, fastest of {s['repeats']} passes over all cells, {s['warmup']} untimed warm-up calls (the first through both stages), "
              f"{s['duration_s']} s of timed calls per cell (at least 5), inputs {s['inputs']}. Run took {elapsed_s / 60:.1f} min.", ""]
    lines += ["### Targets", "", "| target | measured | goal | verdict | note |", "|---|---|---|---|---|"]
    lines += [t.line() for t in goals] + [""]
    lines += ["### All cells", "",
              "| runtime | precision | model | batch | gate | fine frac | mean ms | p50 | p99 | img/s | coarse / gate / fine ms "
              "| overhead % | GFLOP/s | % peak | fine-graph % peak | speedup vs baseline | peak RSS MB | background CPU % "
              "| repeat spread % |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in result.rows:
        gate = "-" if r.gate == "none" else (f"f={r.target_fine_fraction:g} (eta={r.eta:.4g})" if r.gate == "fine_fraction"
                                             else f"eta={r.eta:g}")
        if r.status != "ok":
            lines.append(f"| {r.runtime}/{r.provider} | {r.precision} | {r.model} | {r.batch_size} | {gate} | {r.status}: "
                         f"{r.reason} |" + " |" * 13)
            continue
        split = "-" if r.coarse_ms is None else f"{r.coarse_ms:.1f} / {r.gate_ms:.2f} / {r.fine_ms:.1f}"
        lines.append(f"| {r.runtime}/{r.provider} | {r.precision} | {r.model} | {r.batch_size} | {gate} | "
                     f"{f(r.fine_fraction, '.2f')} | {r.mean_ms:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.img_per_s:.1f} | "
                     f"{split} | {f(r.overhead_pct, '.2f')} | {r.gflops:.0f} | {f(r.pct_peak, '.0f')} | "
                     f"{f(r.fine_pct_peak, '.0f')} | {f(r.speedup_vs_baseline, '.2f')} | {f(r.peak_rss_mb, '.0f')} | "
                     f"{f(r.background_cpu_pct, '.0f')} | {f(r.repeat_spread_pct, '.0f')} |")
    lines += ["", *[f"- {n}" for n in result.notes], ""]
    if profile:
        lines += ["### Per-op profile (ONNX Runtime fp32, batch 32, kernel time per run)", ""]
        for graph, table in profile.items():
            total = sum(ms for _, ms, _, _ in table)
            lines += [f"**{graph}.onnx** ({total:.0f} ms of kernels per run)", "", "| op | ms | % | nodes |",
                      "|---|---|---|---|"]
            lines += [f"| {op} | {ms:.1f} | {pct:.1f} | {n} |" for op, ms, pct, n in table[:10]] + [""]
    lines += ["![latency](latency.png) ![throughput](throughput.png)", "", END]
    return "\n".join(lines)


def write_readme(path: Path, generated: str) -> None:
    """Replace the generated block of README.md (or append one), keeping the hand-written text."""
    text = path.read_text() if path.is_file() else "# CPU benchmark: CF-ViT vs DeiT-S on ONNX Runtime\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    with atomic_write_path(path) as tmp:
        tmp.write_text(text)


def machine_txt(result: BenchResult) -> str:
    m = result.machine
    return "\n".join([
        f"cpu: {m['cpu_model']}", f"cores: {m['physical_cores']} physical, {m['logical_cores']} logical",
        f"ram: {m['ram_gb']} GB", f"gpu: {m['gpu'] or 'none'}", f"os: {m['os']}", f"python: {m['python']}",
        f"cpu flags (SIMD): {' '.join(m['cpu_flags'])}",
        *(f"{k}: {v}" for k, v in m["versions"].items()),
        f"fp32 matmul peak: {m['matmul_peak_gflops']:.1f} GFLOP/s (best), {m['matmul_median_gflops']:.1f} (median)",
        f"threads: {result.settings['threads']}, ORT threading: {result.settings['ort_threading']}, isolation: {result.settings['isolation']}",
        f"load average start: {m['load_avg_start']}, end: {m['load_avg_end']}", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfvit-cpu-bench",
                    help="checkpoint, export and variant cache")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of timed calls per cell")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="passes over all cells; each cell keeps its fastest run")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--ort-threading", choices=("shared", "spin", "no-spin"), default="shared",
                    help="ONNX Runtime pools: one shared spinning pool (default), or one per session (see README)")
    ap.add_argument("--quiet-below", type=float, default=25.0,
                    help="wait for, and re-measure cells disturbed by, other processes above this CPU %% (shared machine)")
    ap.add_argument("--no-quiet", dest="quiet_below", action="store_const", const=None, help="measure regardless of load")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-op ORT profile")
    args = ap.parse_args(argv)
    start = perf_counter()
    ckpt, export_dir = prepare(args.work)
    print(f"load average: {os.getloadavg()}", file=sys.stderr)
    result = run_bench(export_dir, providers=("cpu",), precisions=("fp32", "int8"), batch_sizes=(1, 32),
                       fine_fractions=(0.24, 0.52, 1.0), warmup=args.warmup, duration=args.duration,
                       threads=args.threads, ort_threading=args.ort_threading, torch=True, checkpoint=ckpt, quiet_below=args.quiet_below,
                       repeats=args.repeats,
                       cache_dir=args.work / "variants", progress=lambda msg: print(msg, file=sys.stderr))
    profile = profile_ops(export_dir, 32, result.settings["threads"]) if args.profile else None
    goals = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    result.write_files(args.out)
    with atomic_write_path(args.out / "machine.txt") as tmp:
        tmp.write_text(machine_txt(result))
    write_readme(args.out / "README.md", markdown(result, goals, profile, perf_counter() - start))
    print("\n".join(t.line() for t in goals))
    print(f"wrote {args.out} in {(perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
