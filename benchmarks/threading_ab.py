"""Interleaved A/B of ONNX Runtime threading for the two-session pipeline (SessionConfig's default).

Candidates: ``spin-stop`` (SessionConfig()'s default: a pool per session that spins only while its own
graph runs, ORT's ``session.force_spinning_stop``), ``spin`` (a spinning pool per session: ONNX Runtime's
default), ``no-spin`` (a pool per session whose idle threads sleep) and ``shared`` (one process-wide pool
for every session). Each
measurement is a fresh Python process (the shared pool is process-wide, and a spinning pool left
behind would disturb the next candidate) that warms up, then times ``CFViTPipeline.run`` calls; the
candidates run interleaved in a shuffled order per round, so load on the machine hits all of them alike.

    python benchmarks/threading_ab.py EXPORT_DIR [--batch-sizes 1,8] [--rounds 5] [--calls 40] [--eta 1]
                                      [--threads N] [--out results.json]

Prints, per batch size and candidate, the median over rounds of each process's median ms per call and
the img/s it implies, with the min-max range over rounds. ``--eta 1`` sends every image through both
graphs (the case where one session's idle pool can spin against the other's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "spin-stop": {},  # SessionConfig()'s default: per-session pools spinning only while their graph runs
    "spin": {"spin": True, "stop_spinning": False},  # ONNX Runtime's own default
    "no-spin": {"spin": False, "stop_spinning": False},
    "shared": {"shared_threads": True},
}


def worker(export_dir: str, candidate: str, batch: int, calls: int, eta: float, threads: int | None) -> None:
    """One measurement in this (fresh) process: prints {"ms": [...]} as one JSON line."""
    from time import perf_counter

    import numpy as np

    from runtimes import CFViTPipeline, SessionConfig

    pipe = CFViTPipeline(export_dir, config=SessionConfig(threads=threads, **CANDIDATES[candidate]))
    s = pipe.image_size
    images = np.random.default_rng(0).standard_normal((batch, 3, s, s)).astype(np.float32)
    for _ in range(5):
        pipe.run(images, eta)
    times = []
    for _ in range(calls):
        t0 = perf_counter()
        pipe.run(images, eta)
        times.append(1000 * (perf_counter() - t0))
    print(json.dumps({"ms": times}))


def measure(args: argparse.Namespace, candidate: str, batch: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        args.export_dir,
        "--candidate",
        candidate,
        "--batch",
        str(batch),
        "--calls",
        str(args.calls),
        "--eta",
        str(args.eta),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"error: the {candidate} worker failed:\n{proc.stderr[-2000:]}")
    out = proc.stdout
    return statistics.median(json.loads(out.strip().splitlines()[-1])["ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--candidate", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.export_dir, args.candidate, args.batch, args.calls, args.eta, args.threads)
        return
    batches = [int(b) for b in args.batch_sizes.split(",")]
    candidates = args.candidates.split(",")
    ms: dict[tuple[int, str], list[float]] = {(b, c): [] for b in batches for c in candidates}
    rng = random.Random(0)
    for r in range(args.rounds):
        for b in batches:
            order = rng.sample(candidates, len(candidates))
            for c in order:
                ms[b, c].append(measure(args, c, b))
            print(
                f"round {r + 1}/{args.rounds} batch {b}: " + ", ".join(f"{c} {ms[b, c][-1]:.2f} ms" for c in order),
                file=sys.stderr,
            )
    rows = []
    print(f"{'batch':>5} {'threading':>9} {'median ms':>10} {'range ms':>15} {'img/s':>8}")
    for b in batches:
        for c in candidates:
            m = statistics.median(ms[b, c])
            rows.append(
                {
                    "batch": b,
                    "threading": c,
                    "median_ms": m,
                    "min_ms": min(ms[b, c]),
                    "max_ms": max(ms[b, c]),
                    "img_per_s": 1000 * b / m,
                    "round_ms": ms[b, c],
                }
            )
            print(f"{b:>5} {c:>9} {m:>10.2f} {min(ms[b, c]):>7.2f}-{max(ms[b, c]):<7.2f} {1000 * b / m:>8.1f}")
    if args.out:
        settings = {k: getattr(args, k) for k in ("export_dir", "rounds", "calls", "eta", "threads")}
        args.out.write_text(json.dumps({"settings": settings, "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
