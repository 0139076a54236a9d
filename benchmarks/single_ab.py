"""Interleaved A/B of issue 26's goals at batch 1: ``single.onnx`` against the pair at its best threading.

Candidates, each measured in a fresh Python process (a process-wide pool, or a spinning one left behind,
would disturb the next), interleaved in a shuffled order per round so that load hits all alike:

* ``pair``: the two graphs with ``SessionConfig()``'s default (a pool per session, spinning only while its
  graph runs), as ``cfvit infer`` and ``cfvit bench`` build them;
* ``pair-shared``: the two graphs on one process-wide pool (``--shared-threads``);
* ``single``: ``single.onnx`` (``--graph single``), default threading;
* ``baseline``: the plain ViT (``baseline.onnx``) the speed-up is measured against.

Workloads: fine fraction 0.24 (bench's synthetic gate: η is the confidence that sends round(0.24 × 64)
of a pool of 64 random images to the fine stage; every call cycles through the pool) and η = 0 (every image
exits: for the pair, the coarse graph alone plus the host's gate). The figure per process is the mean ms
per call over whole cycles of the pool (so each process sees the same fine fraction exactly); each
candidate's value is the median over rounds, with the min-max range.

    python benchmarks/single_ab.py EXPORT_DIR [--rounds 5] [--cycles 3] [--threads N] [--out results.json]

Goals (issue 26, item 4): single <= min(pair, pair-shared) at f = 0.24; baseline / single >= 2.2 at
f = 0.24; single <= 1.05 x pair at η = 0.
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
sys.path[:0] = [str(ROOT)]
CANDIDATES = ("pair", "pair-shared", "single", "baseline")
WORKLOADS = {"f=0.24": 0.24, "eta=0": 0.0}
POOL = 64


def worker(export_dir: str, candidate: str, fraction: float, cycles: int, threads: int | None) -> None:
    """One measurement in this (fresh) process: prints {"ms": mean ms per call} as one JSON line."""
    from time import perf_counter

    import numpy as np

    from cfvit_deploy.app.bench.timing import eta_for_fine_fraction
    from cfvit_deploy.manifest import Manifest
    from runtimes import CFViTPipeline
    from runtimes.backends import SessionConfig, create_backend

    config = SessionConfig(threads=threads, shared_threads=candidate == "pair-shared")
    manifest = Manifest.load(export_dir)
    s = manifest.model.fine_image_size
    pool = np.random.default_rng(0).standard_normal((POOL, 1, 3, s, s)).astype(np.float32)
    if candidate == "baseline":
        backend = create_backend(manifest, "cpu", config, graphs=("baseline",))

        def call(x: np.ndarray) -> None:
            backend.run("baseline", {"images": x})
    else:
        pipe = CFViTPipeline(export_dir, config=config, graph="single" if candidate == "single" else "pair")
        confidence = np.concatenate([pipe.run(x, 0.0).confidence for x in pool])
        eta = eta_for_fine_fraction(confidence, fraction)

        def call(x: np.ndarray) -> None:
            pipe.run(x, eta)

    for x in pool[:16]:
        call(x)
    t0 = perf_counter()
    for _ in range(cycles):
        for x in pool:
            call(x)
    print(json.dumps({"ms": 1000 * (perf_counter() - t0) / (cycles * POOL)}))


def measure(args: argparse.Namespace, candidate: str, fraction: float) -> float:
    cmd = [sys.executable, __file__, args.export_dir, "--worker", candidate, "--fraction", str(fraction)]
    cmd += ["--cycles", str(args.cycles)] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"error: the {candidate} worker failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])


def goals(median: dict[tuple[str, str], float]) -> list[dict[str, object]]:
    """Issue 26's batch-1 goals as ratios of the medians (value, goal, met)."""
    f, zero = "f=0.24", "eta=0"
    best_pair = min(median[f, "pair"], median[f, "pair-shared"])
    rows = [
        ("single / best pair threading, f=0.24 (ms ratio, at most)", median[f, "single"] / best_pair, 1.0, "le"),
        (
            "DeiT-S baseline / single, f=0.24 (speed-up, at least)",
            median[f, "baseline"] / median[f, "single"],
            2.2,
            "ge",
        ),
        ("DeiT-S baseline / best pair, f=0.24 (speed-up, for comparison)", median[f, "baseline"] / best_pair, None, ""),
        ("single / pair at eta=0 (ms ratio, at most)", median[zero, "single"] / median[zero, "pair"], 1.05, "le"),
    ]
    out = []
    for name, value, goal, how in rows:
        met = None if goal is None else (value <= goal if how == "le" else value >= goal)
        out.append({"target": name, "value": round(value, 3), "goal": goal, "met": met})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=3, help="passes over the 64-image pool per process")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.export_dir, args.worker, args.fraction, args.cycles, args.threads)
        return
    ms: dict[tuple[str, str], list[float]] = {(w, c): [] for w in WORKLOADS for c in CANDIDATES}
    rng = random.Random(0)
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for w, fraction in WORKLOADS.items():
            order = [c for c in rng.sample(CANDIDATES, len(CANDIDATES)) if w == "f=0.24" or c != "pair-shared"]
            for c in order:
                ms[w, c].append(measure(args, c, fraction))
            print(f"round {r + 1}/{args.rounds} {w}: " + ", ".join(f"{c} {ms[w, c][-1]:.2f} ms" for c in order))
        load.append(os.getloadavg()[0])
    median = {k: statistics.median(v) for k, v in ms.items() if v}
    rows = [
        {"workload": w, "candidate": c, "median_ms": median[w, c], "min_ms": min(v), "max_ms": max(v), "round_ms": v}
        for (w, c), v in ms.items()
        if v
    ]
    for row in rows:
        print(
            f"{row['workload']:>7} {row['candidate']:>11} {row['median_ms']:8.2f} ms ({row['min_ms']:.2f}-{row['max_ms']:.2f})"
        )
    judged = goals(median)
    for g in judged:
        print(f"{g['target']}: {g['value']} (goal {g['goal']}, met {g['met']})")
    if args.out:
        from cfvit_deploy.app.bench.machine import machine_info

        machine = {**machine_info(), "load_1min_per_round": load}
        settings = {k: getattr(args, k) for k in ("export_dir", "rounds", "cycles", "threads")}
        doc = {"settings": settings, "machine": machine, "rows": rows, "goals": judged}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
