"""Does the demo recipe hold on this machine? Train it for several seeds and thread counts.

Each run trains :data:`cfvit_deploy.training.DEMO_RECIPE` (with the run's seed) on the demo's built-in
set (:data:`DEMO_DATA`, generated once under ``--work``) in a fresh process: 1 thread runs pinned to
one core (``taskset -c 0``'s affinity), 2 threads on the cores the process may use. Training is
deterministic for a given CPU and thread count, so the accuracies are facts about this machine; the
wall time depends on the load, which the row records (background CPU sampled from /proc/stat, minus
the run's own CPU time), with the run's CPU time beside it.

    python benchmarks/demo_recipe.py [--seeds 0,1,2] [--threads 1,2] [--out benchmarks/results/demo_recipe]
                                     [--work runs/demo_recipe] [--set key=value ...]

Writes ``OUT/runs.csv`` (one row per run, appended as each run ends, so an interrupted sweep keeps
what it measured) and ``OUT/machine.json``; prints the rows and the range. ``--set`` overrides recipe
fields (``--set lr=1e-3``) to compare candidate recipes; a row records the overrides it ran with.
Goal (issue 23): fine top-1 >= 90% and fine - coarse >= 20 points for every run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [
    "seed",
    "threads",
    "coarse",
    "fine",
    "gap",
    "wall_s",
    "cpu_s",
    "background_cpu_pct",
    "cpu",
    "overrides",
    "recipe",
    "history",
]


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat's first line."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    from cfvit_deploy.training import TrainRecipe

    types = {k: type(v) for k, v in asdict(TrainRecipe()).items()}
    out: dict[str, object] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        kind = types[key] if types[key] is not type(None) else int
        out[key] = None if value == "None" else kind(value)
    return out


def one(args: argparse.Namespace) -> None:
    """One training in this (fresh) process; prints one JSON line (the epoch lines go to stderr)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from cfvit_deploy.data.synthetic import make_synthetic_dataset
    from cfvit_deploy.training import DEMO_DATA, DEMO_RECIPE, train

    recipe = replace(DEMO_RECIPE, seed=args.seed, **_parse_overrides(args.set))
    data = make_synthetic_dataset(Path(args.work) / "data", **asdict(DEMO_DATA))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train(
        data,
        Path(args.work) / f"seed{args.seed}-t{args.threads}.pth",
        recipe,
        force=True,
        progress=None,
        threads=args.threads,
    )
    print(
        json.dumps(
            {
                "coarse": result.val.coarse_acc,
                "fine": result.val.fine_acc,
                "cpu_s": time.process_time() - cpu0,
                "train_wall_s": time.perf_counter() - wall0,
                "recipe": recipe.to_dict(),
                "history": [
                    (h["epoch"], round(h["loss"], 3), round(h["val_coarse_acc"], 3), round(h["val_fine_acc"], 3))
                    for h in result.history
                ],
            }
        )
    )


def run(args: argparse.Namespace, seed: int, threads: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--one", "--seed", str(seed), "--threads", str(threads), "--work", args.work]
    for pair in args.set:
        cmd += ["--set", pair]
    # 1 thread: pinned to one core as `taskset -c 0` would (which core does not change the numbers; with
    # --parallel the runs take turns so that they do not all queue on core 0)
    pin = {seed % len(os.sched_getaffinity(0))} if threads == 1 else None
    busy0, total0 = _busy_jiffies()
    wall0 = time.perf_counter()
    log = Path(args.work) / f"seed{seed}-t{threads}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.run(
            cmd,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},  # no spinning on a shared machine; same numbers
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None,
        )
    wall = time.perf_counter() - wall0
    busy1, total1 = _busy_jiffies()
    if proc.returncode != 0:
        sys.exit(f"run seed {seed} threads {threads} failed:\n{log.read_text()[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    elapsed_cpu = (total1 - total0) / hz  # all cores' seconds
    background = max(0.0, (busy1 - busy0) / hz - got["cpu_s"]) / max(elapsed_cpu, 1e-9) * 100
    return {
        "seed": seed,
        "threads": threads,
        "coarse": round(100 * got["coarse"], 1),
        "fine": round(100 * got["fine"], 1),
        "gap": round(100 * (got["fine"] - got["coarse"]), 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(got["cpu_s"], 1),
        "background_cpu_pct": round(background, 1),
        "cpu": f"{cpu_name()} ({ncpu} cores)",
        "overrides": " ".join(args.set),
        "recipe": json.dumps(got["recipe"]),
        "history": json.dumps(got["history"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/demo_recipe"))
    p.add_argument("--work", default=str(ROOT / "runs/demo_recipe"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (each in its own process)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.threads = int(args.threads)
        one(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    import torch

    machine["torch"] = torch.__version__
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    from cfvit_deploy.data.synthetic import make_synthetic_dataset
    from cfvit_deploy.training import DEMO_DATA

    make_synthetic_dataset(Path(args.work) / "data", **asdict(DEMO_DATA))  # once, before parallel runs read it
    table = out / "runs.csv"
    lock = threading.Lock()

    def one_run(seed: int, threads: int) -> None:
        row = run(args, seed, threads)
        with lock:
            new = not table.exists()
            with table.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(
                f"seed {seed} threads {threads}: coarse {row['coarse']}% fine {row['fine']}% "
                f"(gap {row['gap']}), wall {row['wall_s']} s, cpu {row['cpu_s']} s, "
                f"background {row['background_cpu_pct']}%  {row['overrides']}",
                flush=True,
            )

    runs = [(int(s), int(t)) for s in args.seeds.split(",") for t in args.threads.split(",")]
    with ThreadPoolExecutor(args.parallel) as pool:
        for done in [pool.submit(one_run, seed, threads) for seed, threads in runs]:
            done.result()


if __name__ == "__main__":
    main()
