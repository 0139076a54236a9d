"""One command for every performance target of issue 14, with run-to-run ranges.

1. Cross-runtime headline: CF-ViT vs the plain DeiT-S on every runtime at hand. ONNX Runtime CPU and
   OpenVINO (fp32 and int8), and PyTorch eager, at batch 1 and 32, with the synthetic fine-fraction
   gate of ``cfvit_deploy.app.bench`` (f = 0.24, 0.52, 1); CUDA and TensorRT rows are measured when a
   GPU is present, else listed as "not measured: no GPU". The gated cells run both as the pair of
   graphs (model ``cfvit``) and as ``single.onnx`` (model ``cfvit-single``). DeiT-S-size weights
   (random init, seed 0: speed does not depend on the values), g = 7, exported with ``baseline.onnx``
   and ``single.onnx``. Every ratio is of two
   rows measured in one run. It also runs ``cfvit infer`` (its library twin, in a fresh process,
   default settings as users get them) on a folder of generated images at batch 1 and 32 and compares
   its images/s with the bench row of the same pipeline and batch (η = 1).
2. ``attention``: fused vs plain attention export, interleaved ABBA rounds (``attention_ab.run_ab``);
   target: fp32 pipeline batch-1 latency >= 15% lower fused.
3. ``int8-accuracy``: fp32 / dynamic / static int8 of the demo's trained model
   (``int8_accuracy.accuracy_part``; trains it once, ~3 min, cached in WORK/int8); targets: top-1 drop
   <= 1 point, exit-rate change within 2 points.
4. ``int8-speed``: DeiT-S-size dynamic and static int8 vs fp32 (``int8_accuracy.speed_part``);
   target: int8 pipeline >= 2.5x fp32 at batch 32, f = 0.24.

``--skip attention,int8-accuracy,int8-speed`` leaves parts out. ``--runs N`` repeats every measurement
pass N times (same exports, fresh measurements): each target is the median over the runs with its
min-max range; each cell of the headline table is its median run. ``--quick`` runs every part on the
micro model (quick demo training, 1 round, short cells): a smoke test of every step, not a result.

Writes into ``--out`` (default ``benchmarks/results/``; ``--quick``: ``WORK/quick-results``):
results.json/csv (bench schema, GPU rows included; the median-run rows), results-run<i>.json (every
run, when N > 1), headline.json (every target with value = median, range = [min, max], runs, values;
infer runs and the parts' raw results per run), headline.png, latency.png, throughput.png,
machine.txt, and the block of README.md between the ``bench:begin``/``bench:end`` markers.

    python benchmarks/run_headline.py                  # every target (make bench)
    python benchmarks/run_headline.py --runs 3         # the same, three runs: median and range
    python benchmarks/run_headline.py --quick          # smoke test of every step on a micro model
    python benchmarks/run_headline.py --skip attention,int8-accuracy,int8-speed   # headline only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import attention_ab  # noqa: E402
import int8_accuracy  # noqa: E402
from headline_report import markdown, merge_runs, plot_headline, write_readme  # noqa: E402
from headline_targets import (  # noqa: E402
    Target,
    aggregate,
    attention_targets,
    int8_accuracy_targets,
    int8_speed_targets,
    targets,
)

from cfvit_deploy.app.bench import BenchResult, BenchRow, Cell, NothingMeasuredError, run_bench  # noqa: E402
from cfvit_deploy.app.bench.machine import gpu_name  # noqa: E402
from cfvit_deploy.app.bench.schema import json_default  # noqa: E402
from cfvit_deploy.io import atomic_write_path  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402

SEED = 0
BATCHES = (1, 32)
FRACTIONS = (0.24, 0.52, 1.0)
NO_GPU = "not measured: no GPU on this machine"
PARTS = ("attention", "int8-accuracy", "int8-speed")
_INFER = """
import json, sys
from runtimes.backends import SessionConfig
from runtimes.infer import infer
export, folder, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = infer(export, folder, batch_size=batch, eta=1.0, config=SessionConfig(threads=threads))
print(json.dumps({"images": s.images, "seconds": s.seconds, "img_per_s": s.images_per_s}))
"""


def prepare(work: Path, size: str) -> tuple[Path, Path]:
    """Random-init CF-ViT checkpoint of `size` and its fp32 export with baseline.onnx and single.onnx (reused)."""
    ckpt, export_dir = work / f"deit_{size}_seed{SEED}.pth", work / f"export-{size}"
    try:
        if "single" in Manifest.load(export_dir).graphs and ckpt.is_file():
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
    save_checkpoint(CFViT(ModelConfig.named("deit", size, coarse_grid=7)).eval(), ckpt)
    print(f"exporting DeiT-{size} CF-ViT (g=7, random init) to {export_dir}", file=sys.stderr)
    export(ckpt, export_dir, baseline=True, single_graph=True, force=True)
    return ckpt, export_dir


def image_folder(work: Path, count: int) -> Path:
    """`count` seeded random 256x256 PNGs (decoding cost like a small photo), made once."""
    from PIL import Image

    folder = work / f"images-{count}"
    if len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def infer_run(export_dir: Path, folder: Path, batch: int, threads: int) -> dict:
    """`cfvit infer`'s library twin in a fresh process (as a user runs it): its own images/s."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-c", _INFER, str(export_dir), str(folder), str(batch), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    run = {"batch_size": batch, "eta": 1.0, "threads": threads, "folder": str(folder)}
    if proc.returncode != 0:
        return {**run, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**run, **json.loads(proc.stdout.strip().splitlines()[-1])}


def gpu_rows(result: BenchResult) -> None:
    """CUDA and TensorRT rows "not measured: no GPU" (appended to `result`), so the table shows the gap."""
    for provider in ("cuda", "tensorrt"):
        for b in BATCHES:
            gated = (("cfvit", "fine_fraction", f) for f in FRACTIONS)
            single = (("cfvit-single", "fine_fraction", f) for f in FRACTIONS)
            for model, gate, value in (("baseline", "none", None), *gated, *single):
                cell = Cell("onnxruntime", provider, "fp32", model, b, gate, value)
                result.rows.append(
                    BenchRow.for_cell(cell, result.settings["isolation"], status="skipped", reason=NO_GPU)
                )


def measure(args: argparse.Namespace, export_dir: Path, ckpt: Path) -> BenchResult:
    providers = ["cpu", "openvino"] + (["cuda", "tensorrt"] if gpu_name() else [])
    try:
        result = run_bench(
            export_dir,
            providers=providers,
            precisions=("fp32", "int8"),
            batch_sizes=BATCHES,
            fine_fractions=FRACTIONS,
            graphs=("pair", "single"),  # single.onnx rows beside the pair's
            warmup=args.warmup,
            duration=args.duration,
            threads=args.threads,
            torch=True,
            checkpoint=ckpt,
            quiet_below=args.quiet_below,
            repeats=args.repeats,
            cache_dir=args.work / "variants",
            progress=lambda task, done, total: print(f"[{done}/{total}] {task}", file=sys.stderr),
        )
    except NothingMeasuredError as exc:  # a runtime missing here is a row of the table, not the end of the run
        print(f"warning: {exc}", file=sys.stderr)
        result = exc.result
    if not gpu_name():
        gpu_rows(result)
    return result


def _skip_list(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every part on a micro model, 1 round, short cells")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results (quick: WORK/quick-results)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cfvit-headline",
        help="checkpoints, exports, demo model, images and variant cache",
    )
    ap.add_argument("--runs", type=int, default=1, help="measurement passes; targets: median and min-max range")
    ap.add_argument("--skip", type=_skip_list, default=frozenset(), help=f"comma-separated parts: {','.join(PARTS)}")
    ap.add_argument("--duration", type=float, default=None, help="seconds of timed calls per cell (2; quick 0.3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="passes over all cells; each cell keeps its fastest run")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of attention/int8-speed (3; quick 1)")
    ap.add_argument("--ab-duration", type=float, default=None, help="seconds per A/B cell and round (3; quick 0.3)")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=None,
        help="wait for, and re-measure cells disturbed by, other processes above this CPU %%",
    )
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    args.duration = args.duration or (0.3 if args.quick else 2.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.ab_duration = args.ab_duration or (0.3 if args.quick else 3.0)
    args.size = "micro" if args.quick else "small"
    return args


def _part(name: str, raw: dict[str, list], measure_part: Callable, judge: Callable) -> list[Target]:
    """Run one part: its targets, its raw result appended to ``raw[name]``; a failure is a target "not
    measured" with the error (and in ``raw["errors"]``), not the end of the run (main exits 1)."""
    try:
        value = measure_part()
    except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"warning: part {name} failed: {error}", file=sys.stderr)
        raw.setdefault("errors", []).append({"part": name, "error": error})
        return [Target(f"{name}: failed", None, None, detail=error)]
    raw.setdefault(name.replace("-", "_"), []).append(value)
    return judge(value)


def _int8_speed(args: argparse.Namespace) -> list[dict]:
    calibration = int8_accuracy.demo_data(args.work / "int8", args.quick) / "train"
    return int8_accuracy.speed_part(
        args.work / "int8", args.rounds, size=args.size, seconds=args.ab_duration, calibration=calibration
    )


def run_parts(args: argparse.Namespace, raw: dict[str, list]) -> list[Target]:
    """One pass of the parts not skipped: their targets; their raw results are appended to `raw`."""
    parts = {
        "attention": (
            partial(attention_ab.run_ab, args.work / "attention-ab", args.rounds, args.ab_duration, args.size),
            attention_targets,
        ),
        "int8-accuracy": (
            partial(int8_accuracy.accuracy_part, args.work / "int8", quick=args.quick, seconds=args.ab_duration),
            int8_accuracy_targets,
        ),
        "int8-speed": (partial(_int8_speed, args), int8_speed_targets),
    }
    goals: list[Target] = []
    for name, (measure_part, judge) in parts.items():
        if name not in args.skip:
            goals += _part(name, raw, measure_part, judge)
    return goals


def run_once(args: argparse.Namespace, export_dir: Path, ckpt: Path, raw: dict[str, list]) -> tuple[BenchResult, list]:
    """One measurement pass of every part: the bench result and this run's targets."""
    result = measure(args, export_dir, ckpt)
    threads = result.settings["threads"]
    infer_runs = [
        infer_run(export_dir, image_folder(args.work, n), b, threads)
        for b, n in ((1, 32 if args.quick else 64), (32, 64 if args.quick else 256))
    ]
    raw.setdefault("infer", []).append(infer_runs)
    return result, targets(result, infer_runs) + run_parts(args, raw)


def write_outputs(out: Path, results: list[BenchResult], goals: list[Target], raw: dict, mode: str, start: float):
    result = merge_runs(results)
    out.mkdir(parents=True, exist_ok=True)
    result.write_files(out)
    if len(results) > 1:
        for i, r in enumerate(results, 1):
            with atomic_write_path(out / f"results-run{i}.json") as tmp:
                tmp.write_text(json.dumps(r.to_json(), indent=2, default=json_default) + "\n")
    plot_headline(result, out / "headline.png")
    summary = {"mode": mode, "runs": len(results), "targets": [t.to_json() for t in goals], **raw}
    with atomic_write_path(out / "headline.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    with atomic_write_path(out / "machine.txt") as tmp:
        tmp.write_text("\n".join(f"{k}: {v}" for k, v in result.machine.items()) + "\n")
    write_readme(out / "README.md", markdown(result, goals, perf_counter() - start, mode))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (args.work / "quick-results" if args.quick else ROOT / "benchmarks" / "results")
    start = perf_counter()
    ckpt, export_dir = prepare(args.work, args.size)
    results, per_run, raw = [], [], {"skipped": sorted(args.skip)}
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", file=sys.stderr)
        result, goals = run_once(args, export_dir, ckpt, raw)
        results.append(result)
        per_run.append(goals)
    goals = aggregate(per_run)
    mode = "quick: DeiT-micro, NOT the headline model" if args.quick else "full: DeiT-S size"
    write_outputs(out, results, goals, raw, mode, start)
    print("\n".join(t.line() for t in goals))
    print(f"wrote {out} in {(perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    if raw.get("errors"):
        print(f"error: {len(raw['errors'])} part run(s) failed (headline.json: errors)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
