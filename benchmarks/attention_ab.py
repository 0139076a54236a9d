"""Interleaved A/B: fused vs plain attention export of the same DeiT-S-size weights (ONNX Runtime CPU).

Exports one random-init model (embed 384, depth 12, heads 6, g = 7, 1000 classes, seed 0) twice, with
``--attention fused`` and ``--attention plain`` (both with baseline.onnx), then measures in rounds,
each round running every cell once in a fresh process, in alternating order (ABBA), so that a busy
machine shifts both sides alike:

* pipeline batch-1 latency (mean over whole passes of a 25-image pool) at fine fraction 0.24;
* pipeline batch-32 throughput at fine fractions 0.24 and 0.52;
* the DeiT-S baseline graph of the same export at batch 1 and 32.

The fine fraction uses the synthetic gate of the bench (η = the confidence quantile that sends that
share of the pool to the fine stage). Each number is the median over rounds. Pipelines are built by
the default ``CFViTPipeline(export_dir)`` constructor: what users get.

    python benchmarks/attention_ab.py [--rounds 5] [--duration 3] [--work /tmp/cfvit-attention-ab] [--out ab.json]

``run_ab`` is the library twin; ``benchmarks/run_headline.py`` runs it and judges its target.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("fused", "plain")
POOL = {1: 25, 32: 64}


def export_pair(work: Path, size: str = "small") -> dict[str, Path]:
    """The two exports of one seed-0 DeiT model of `size` (reused when already there)."""
    import torch

    from cfvit_deploy import ModelConfig
    from cfvit_deploy.model import CFViT
    from exporters import export

    stem = "deit_s" if size == "small" else f"deit_{size}"
    dirs = {mode: work / f"{stem}_{mode}" for mode in MODES}
    work.mkdir(parents=True, exist_ok=True)
    if all((d / "manifest.json").is_file() for d in dirs.values()):
        return dirs
    torch.manual_seed(0)
    model = CFViT(ModelConfig.named("deit", size, coarse_grid=7)).eval()
    for mode, d in dirs.items():
        export(model, d, attention=mode, baseline=True, force=True)
    return dirs


def _eta_for_fraction(confidence: np.ndarray, fraction: float) -> float:
    c = np.sort(confidence.astype(np.float32))
    m = int(math.floor(fraction * c.size + 0.5))
    return 0.0 if m <= 0 else 1.0 if m >= c.size else float(c[m])


def measure(export_dir: str, what: str, batch: int, fraction: float, duration: float) -> float:
    """Mean seconds per batch over whole passes of the pool (runs in the worker process)."""
    from cfvit_deploy.manifest import Manifest
    from runtimes.backends import create_backend
    from runtimes.pipeline import CFViTPipeline

    rng = np.random.default_rng(0)
    manifest = Manifest.load(export_dir)
    s = manifest.image_size
    pool = rng.standard_normal((POOL[batch], 3, s, s)).astype(np.float32)
    batches = [pool[i : i + batch] for i in range(0, len(pool), batch)]
    if what == "baseline":
        backend = create_backend(manifest, "cpu", graphs=("baseline",))
        call = lambda b: backend.run("baseline", {"images": b})  # noqa: E731
    else:
        pipe = CFViTPipeline(export_dir)
        eta = _eta_for_fraction(np.concatenate([pipe.run(b, 0.0).confidence for b in batches]), fraction)
        pipe.run(batches[0], 1.0)  # both graphs warm
        call = lambda b: pipe.run(b, eta)  # noqa: E731
    for b in batches[:2]:
        call(b)
    times: list[float] = []
    start = perf_counter()
    while perf_counter() - start < duration or len(times) < 2 * len(batches):
        for b in batches:
            t0 = perf_counter()
            call(b)
            times.append(perf_counter() - t0)
    return float(np.mean(times))


CELLS = [
    ("pipeline", 1, 0.24),
    ("pipeline", 32, 0.24),
    ("pipeline", 32, 0.52),
    ("baseline", 1, 1.0),
    ("baseline", 32, 1.0),
]


def _worker(args: argparse.Namespace) -> None:
    print(json.dumps(measure(args.export_dir, args.what, args.batch, args.fraction, args.duration)))


def _run_cell(export_dir: Path, cell: tuple[str, int, float], duration: float) -> float:
    what, batch, fraction = cell
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--export-dir",
        str(export_dir),
        "--what",
        what,
        "--batch",
        str(batch),
        "--fraction",
        str(fraction),
        "--duration",
        str(duration),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_ab(work: Path, rounds: int = 5, duration: float = 3.0, size: str = "small") -> dict:
    """Export the pair (once) and measure `rounds` interleaved ABBA rounds: rows (median per cell), ratios."""
    dirs = export_pair(work, size)
    seconds: dict[tuple[str, str, int, float], list[float]] = {}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]  # ABBA: neither side always goes first
        for cell in CELLS:
            for mode in order:
                seconds.setdefault((mode, *cell), []).append(_run_cell(dirs[mode], cell, duration))
        print(f"attention A/B: round {r + 1}/{rounds} done", file=sys.stderr)
    med = {key: float(np.median(v)) for key, v in seconds.items()}
    rows = [
        {
            "attention": m,
            "graph": w,
            "batch": b,
            "fine_fraction": f if w == "pipeline" else None,
            "median_ms_per_batch": 1e3 * med[(m, w, b, f)],
            "img_per_s": b / med[(m, w, b, f)],
            "rounds_ms": [round(1e3 * t, 3) for t in seconds[(m, w, b, f)]],
        }
        for (m, w, b, f) in med
    ]
    ratios = {
        "fused_vs_plain_b1_latency_reduction_pct": 100
        * (1 - med[("fused", "pipeline", 1, 0.24)] / med[("plain", "pipeline", 1, 0.24)])
    }
    for m in MODES:
        ratios[f"{m}: deit_s_vs_cfvit_b1_f0.24"] = med[(m, "baseline", 1, 1.0)] / med[(m, "pipeline", 1, 0.24)]
        for f in (0.24, 0.52):
            ratios[f"{m}: deit_s_vs_cfvit_b32_f{f}"] = med[(m, "baseline", 32, 1.0)] / med[(m, "pipeline", 32, f)]
    return {"rows": rows, "ratios": ratios, "rounds": rounds, "duration_s": duration, "size": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell and round")
    p.add_argument("--work", type=Path, default=Path("/tmp/cfvit-attention-ab"))
    p.add_argument("--size", default="small", help="DeiT size of the model (small: DeiT-S; micro: a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export-dir", help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    result = run_ab(args.work, args.rounds, args.duration, args.size)
    for row in result["rows"]:
        print(
            f"{row['attention']:>5} {row['graph']:<8} b{row['batch']:<2} f={row['fine_fraction']}: "
            f"{row['median_ms_per_batch']:9.2f} ms/batch {row['img_per_s']:8.1f} img/s"
        )
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
