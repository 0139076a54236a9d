"""How should `infer` decode ahead: threads or processes, how many? Measured on camera JPEGs beside the graphs.

`cfvit infer`'s local engine decodes the next batches in a pool while the pipeline runs the current
one (``runtimes.infer.LocalEngine``: two batches in flight). This script runs the same loop with a
thread pool and with a process pool of 1..N workers on 4000x3000 camera JPEGs
(``camera_images.py``), batch 32, η = 1 (every image through both stages), per decode mode, and
compares each with the pipeline alone on preallocated tensors (the ceiling). Variants run
interleaved, ``--rounds`` times, median.

Pillow releases the GIL while it decodes and resizes and numpy while it normalises, so threads can
decode in parallel; a process pool pays a pickle of each 600 KB tensor and a process start, but
escapes whatever part of decoding holds the GIL. The two cores are shared with ONNX Runtime's intra-op
threads: more decode workers than idle cores only take CPU from the graphs.

    python benchmarks/decode_pool.py EXPORT_DIR [--images FOLDER] [--count 64] [--workers 1,2,4] [--rounds 2]

Writes ``--out`` (default benchmarks/results/decode_pool.json) and prints a table. On a busy, shared
machine the numbers are labelled so and only their ordering within one run means anything.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from statistics import median
from time import perf_counter

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import camera_images  # noqa: E402

from cfvit_deploy.io import atomic_write_path  # noqa: E402
from cfvit_deploy.preprocessing import load_and_preprocess  # noqa: E402

BATCH, AHEAD = 32, 2  # as runtimes.infer: two batches in flight


def decode(path: str, pp, mode: str) -> np.ndarray:  # noqa: ANN001 - a module-level function: picklable
    return load_and_preprocess(path, pp, decode=mode)


def make_pool(kind: str, workers: int) -> Executor:
    if kind == "threads":
        return ThreadPoolExecutor(max_workers=workers)
    # forkserver: no fork of a process that holds ONNX Runtime's threads
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))


def one_pass(pipe, files: list[str], pool: Executor, mode: str, eta: float = 1.0) -> float:  # noqa: ANN001
    """Images/s of one pass over `files`: decode ahead in `pool`, run full batches, as the local engine does."""
    pp = pipe.manifest.preprocessing
    todo, ahead, batch, n = iter(files), deque(), [], 0
    start = perf_counter()
    while True:
        while len(ahead) < AHEAD * BATCH and (path := next(todo, None)) is not None:
            ahead.append(pool.submit(decode, path, pp, mode))
        if not ahead:
            break
        batch.append(ahead.popleft().result())
        if len(batch) == BATCH:
            pipe.run(np.stack(batch), eta)
            n, batch = n + len(batch), []
    if batch:
        pipe.run(np.stack(batch), eta)
        n += len(batch)
    return n / (perf_counter() - start)


def model_only(pipe, files: list[str], seconds: float = 3.0, eta: float = 1.0) -> float:  # noqa: ANN001
    """Images/s of the pipeline alone at batch 32 on preallocated tensors (the ceiling)."""
    pp = pipe.manifest.preprocessing
    pool = np.stack([load_and_preprocess(f, pp) for f in files[:BATCH]])
    pipe.run(pool, eta)
    n, start = 0, perf_counter()
    while perf_counter() - start < seconds or n == 0:
        pipe.run(pool, eta)
        n += len(pool)
    return n / (perf_counter() - start)


def measure(export_dir: Path, files: list[str], workers: list[int], modes: list[str], rounds: int) -> dict:
    from runtimes.pipeline import CFViTPipeline

    pipe = CFViTPipeline(export_dir)
    variants = [(kind, w, m) for m in modes for kind in ("threads", "processes") for w in workers]
    pools = {(kind, w): make_pool(kind, w) for kind, w, _ in variants}
    for (_, w), pool in pools.items():  # start every worker before timing
        list(pool.map(int, range(2 * w)))
    seen: dict = {v: [] for v in variants}
    ceiling = []
    try:
        for r in range(rounds):
            ceiling.append(model_only(pipe, files))
            for v in variants if r % 2 == 0 else variants[::-1]:
                seen[v].append(one_pass(pipe, files, pools[v[:2]], v[2]))
    finally:
        for pool in pools.values():
            pool.shutdown()
    top = median(ceiling)
    rows = [
        {
            "pool": kind,
            "workers": w,
            "decode": m,
            "img_per_s": median(v),
            "rounds": v,
            "of_model_only": median(v) / top,
        }
        for (kind, w, m), v in seen.items()
    ]
    return {"model_only_img_per_s": top, "model_only_rounds": ceiling, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--images", type=Path, default=None, help="camera JPEGs (default: made in a temp folder)")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--decode", default="exact,fast")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="label the result as measured on a busy, shared machine")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_pool.json")
    args = ap.parse_args(argv)
    folder = args.images or Path(tempfile.gettempdir()) / f"cfvit-camera-{args.count}"
    files = [str(p) for p in camera_images.make_camera_jpegs(folder, args.count)]
    workers = [int(w) for w in args.workers.split(",")]
    result = measure(args.export_dir, files, workers, args.decode.split(","), args.rounds)
    result.update(
        {
            "export": str(args.export_dir),
            "images": f"{len(files)} camera JPEGs 4000x3000 ({folder})",
            "batch": BATCH,
            "eta": 1.0,
            "cpus": os.cpu_count(),
            "load_average_end": os.getloadavg()[0],
            "machine_state": "BUSY shared machine: ordering only, not a speed result" if args.busy else "as run",
        }
    )
    with atomic_write_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model only: {result['model_only_img_per_s']:.1f} img/s ({result['machine_state']})")
    print("| decode | pool | workers | img/s | of model-only |\n|---|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['decode']} | {r['pool']} | {r['workers']} | {r['img_per_s']:.1f} | {r['of_model_only']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
