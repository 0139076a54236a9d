"""One command for the cross-runtime headline: CF-ViT vs the plain DeiT-S on every runtime at hand.

ONNX Runtime CPU and OpenVINO (fp32 and int8), and PyTorch eager, at batch 1 and 32, with the
synthetic fine-fraction gate of ``cfvit_deploy.app.bench`` (f = 0.24, 0.52, 1); CUDA and TensorRT
rows are measured when a GPU is present, else listed as "not measured: no GPU". DeiT-S-size weights
(random init, seed 0: speed does not depend on the values), g = 7, exported with ``baseline.onnx``.
Every ratio is of two rows measured in one run. It also runs ``cfvit infer`` (its library twin, in a
fresh process, default settings as users get them) on a folder of generated images at batch 1 and 32
and compares its images/s with the bench row of the same pipeline and batch (η = 1).

Writes into ``--out`` (default ``benchmarks/results/``; ``--quick``: ``WORK/quick-results``):
results.json/csv (bench schema, GPU rows included), headline.json (targets and infer runs),
headline.png, latency.png, throughput.png, machine.txt, and the block of README.md between the
``bench:begin``/``bench:end`` markers.

    python benchmarks/run_headline.py            # full: ~10-15 min on 2 cores
    python benchmarks/run_headline.py --quick    # smoke test of every step: a micro model, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from headline_report import markdown, plot_headline, targets, write_readme  # noqa: E402

from cfvit_deploy.app.bench import BenchResult, BenchRow, Cell, NothingMeasuredError, run_bench  # noqa: E402
from cfvit_deploy.app.bench.machine import gpu_name  # noqa: E402
from cfvit_deploy.io import atomic_write_path  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402

SEED = 0
BATCHES = (1, 32)
FRACTIONS = (0.24, 0.52, 1.0)
NO_GPU = "not measured: no GPU on this machine"
_INFER = """
import json, sys
from runtimes.backends import SessionConfig
from runtimes.infer import infer
export, folder, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = infer(export, folder, batch_size=batch, eta=1.0, config=SessionConfig(threads=threads))
print(json.dumps({"images": s.images, "seconds": s.seconds, "img_per_s": s.images_per_s}))
"""


def prepare(work: Path, size: str) -> tuple[Path, Path]:
    """Random-init CF-ViT checkpoint of `size` and its fp32 export with baseline.onnx (reused when present)."""
    ckpt, export_dir = work / f"deit_{size}_seed{SEED}.pth", work / f"export-{size}"
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
    save_checkpoint(CFViT(ModelConfig.named("deit", size, coarse_grid=7)).eval(), ckpt)
    print(f"exporting DeiT-{size} CF-ViT (g=7, random init) to {export_dir}", file=sys.stderr)
    export(ckpt, export_dir, baseline=True, force=True)
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
            for model, gate, value in (("baseline", "none", None), *(("cfvit", "fine_fraction", f) for f in FRACTIONS)):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="micro model, short cells, out in WORK/quick-results")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results (quick: WORK/quick-results)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cfvit-headline",
        help="checkpoint, export, images and variant cache",
    )
    ap.add_argument("--duration", type=float, default=None, help="seconds of timed calls per cell (2; quick 0.3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="passes over all cells; each cell keeps its fastest run")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=None,
        help="wait for, and re-measure cells disturbed by, other processes above this CPU %%",
    )
    args = ap.parse_args(argv)
    args.duration = args.duration or (0.3 if args.quick else 2.0)
    out = args.out or (args.work / "quick-results" if args.quick else ROOT / "benchmarks" / "results")
    start = perf_counter()
    ckpt, export_dir = prepare(args.work, "micro" if args.quick else "small")
    result = measure(args, export_dir, ckpt)
    threads = result.settings["threads"]
    infer_runs = [
        infer_run(export_dir, image_folder(args.work, n), b, threads)
        for b, n in ((1, 32 if args.quick else 64), (32, 64 if args.quick else 256))
    ]
    goals = targets(result, infer_runs)
    out.mkdir(parents=True, exist_ok=True)
    result.write_files(out)
    plot_headline(result, out / "headline.png")
    mode = "quick: DeiT-micro, NOT the headline model" if args.quick else "full: DeiT-S size"
    with atomic_write_path(out / "headline.json") as tmp:
        tmp.write_text(
            json.dumps({"mode": mode, "targets": [t.to_json() for t in goals], "infer": infer_runs}, indent=2) + "\n"
        )
    with atomic_write_path(out / "machine.txt") as tmp:
        tmp.write_text("\n".join(f"{k}: {v}" for k, v in result.machine.items()) + "\n")
    write_readme(out / "README.md", markdown(result, goals, perf_counter() - start, mode))
    print("\n".join(t.line() for t in goals))
    print(f"wrote {out} in {(perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
