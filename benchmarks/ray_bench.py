"""Images/s of ``cfvit infer --engine ray`` (1 and 2 actors) against the local engine on this machine.

    python benchmarks/ray_bench.py [--images 600] [--export DIR] [--repeats 2]

Generates a folder of JPEGs (fixed seed), exports the ``deit_g7`` upstream fixture unless --export
is given, starts one local Ray cluster with every core, and times each engine on the same folder.
Then the two-node rows: a head and a worker node of 1 CPU each started with ``ray start`` on
127.0.0.1 (:mod:`tests.ray_nodes`; both on this machine's cores, so they show the engine working
across nodes and its overhead, not scaling), joined with ``--address``.
``images_per_s`` is end to end (a call's wall time: ONNX Runtime sessions, and for Ray starting the
actors, included; starting the cluster is not); ``steady_images_per_s`` counts the rows after the
first batch over the time from that batch's last row to the last row. The best of `repeats` runs is kept.
Writes ``benchmarks/results/ray.json`` and ``ray.md`` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtimes.infer import InferSummary, RayOptions, infer  # noqa: E402
from runtimes.ray_cluster import layout_pool, plan_actors  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "upstream" / "deit_g7.pth"
BATCH = 32
#: (name, num_actors, actor_threads); None: derived by plan_actors
RAY_CONFIGS = [("ray, 1 actor", 1, None), ("ray, 1 actor x 2 threads", 1, 2), ("ray, 2 actors", 2, None)]
#: the same on two `ray start` nodes of 1 CPU each (the per-node layout: runtimes.ray_cluster.layout_pool)
TWO_NODE_CONFIGS = [("ray, 2 nodes x 1 CPU, default", None, None), ("ray, 2 nodes x 1 CPU, 2 actors", 2, None)]


def make_images(folder: Path, n: int) -> list[Path]:
    """`n` JPEGs of 320x240-400x300 (gradients and noise, like photos in size, not content)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 240 + i % 61, 320 + i % 81
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * (1 + i % 5)) % 256, (y * (1 + i % 3)) % 256, (x + y + i) % 256], -1).astype(np.float32)
        rgb += rng.normal(0, 8 + i % 40, rgb.shape)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return sorted(folder.iterdir())


def machine() -> dict[str, Any]:
    import onnxruntime
    import ray

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        / 2**20
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(run: Callable[..., InferSummary], repeats: int, **kwargs: Any) -> dict[str, Any]:
    """The best of `repeats` runs (wall time of the call), with its rate after the first batch."""
    best: dict[str, Any] = {}
    for _ in range(repeats):
        stamps: list[float] = []
        t0 = perf_counter()
        summary = run(on_row=lambda row, stamps=stamps: stamps.append(perf_counter()), **kwargs)
        wall = perf_counter() - t0
        steady = (len(stamps) - BATCH) / (stamps[-1] - stamps[BATCH - 1])  # after the first batch's rows
        if not best or wall < best["run_s"]:
            best = {
                "images": summary.images,
                "run_s": round(wall, 3),
                "images_per_s": round(summary.images / wall, 1),
                "first_row_s": round(stamps[0] - t0, 3),
                "steady_images_per_s": round(steady, 1),
            }
    return best


def bench_ray(
    export: Path,
    images: list[Path],
    repeats: int,
    name: str,
    actors: int | None,
    threads: int | None,
    cpus: int,
    address: str | None = None,
    nodes: dict[str, float] | None = None,
) -> dict[str, Any]:
    plan = layout_pool(nodes, actors, threads).plan if nodes else plan_actors(cpus, actors, threads)
    return {
        "engine": name,
        "num_actors": plan.num_actors,
        "actor_threads": plan.threads,
        "cpus_per_actor": plan.cpus_per_actor,
        **timed(
            infer,
            repeats,
            source=export,
            inputs=images,
            engine="ray",
            batch_size=BATCH,
            ray=RayOptions(address=address, num_actors=actors, actor_threads=threads),
        ),
    }


def two_node_runs(export: Path, images: list[Path], repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """The TWO_NODE_CONFIGS on a head and a worker node (`ray start`, 1 CPU each), joined by address."""
    from tests.ray_nodes import ENV, LocalCluster

    os.environ.update(ENV)  # this process joins the cluster as a driver
    cluster = LocalCluster(tmp / "ray", workers=1, cpus=1)
    try:
        cluster.start()
        nodes = {"head": 1.0, "worker": 1.0}
        return [
            bench_ray(export, images, repeats, name, n, t, 2, address=cluster.address, nodes=nodes)
            for name, n, t in TWO_NODE_CONFIGS
        ]
    finally:
        cluster.stop()


def two_node_runs_in_child(export: Path, folder: Path, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """:func:`two_node_runs` in a fresh process, as the CLI runs: with Ray 2.60, a process that shut a private
    cluster down and then joined another one had its new actors dropped before they started."""
    import subprocess

    out = tmp / "two-node.json"
    cmd = [sys.executable, __file__, "--two-node-json", str(out), "--export", str(export), "--images-dir", str(folder)]
    subprocess.run([*cmd, "--repeats", str(repeats)], check=True)
    return json.loads(out.read_text())


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Ray engine vs local engine (`cfvit infer`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']} (CPU EP), Ray {m['ray']}. Load average (1/5/15 min) before "
        f"{result['load_before']}, after {result['load_after']} (other developers share the machine).",
        "",
        f"{result['images']} generated JPEGs (~320x240-400x300), model {result['model']}, batch {result['batch_size']}, "
        f"best of {result['repeats']}. Ray: a local cluster of {m['cores']} CPUs started once "
        f"({result['ray_init_s']} s, not counted); a run's time includes creating its sessions (Ray: starting "
        "its actors). Steady: the rows after the first batch / the time they took. The two-node rows: a head and "
        "a worker node of 1 CPU each (`ray start` on this machine, so the two nodes share its cores: overhead "
        "across nodes, not scaling), joined with `--address`.",
        "",
        "| engine | actors x threads (CPU request) | images/s end to end | run s | first row s | images/s steady |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        setup = (
            "-" if r["engine"] == "local" else f"{r['num_actors']} x {r['actor_threads']} ({r['cpus_per_actor']} CPU)"
        )
        lines.append(
            f"| {r['engine']} | {setup} | {r['images_per_s']} | {r['run_s']} | {r['first_row_s']} | "
            f"{r['steady_images_per_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--export", type=Path, help="export folder (default: the deit_g7 fixture, exported)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--two-node-json", type=Path, help=argparse.SUPPRESS)  # the child of two_node_runs_in_child
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.two_node_json:
        images = sorted(args.images_dir.iterdir())
        with tempfile.TemporaryDirectory(prefix="cfvit-rb-") as tmp:
            runs = two_node_runs(args.export, images, args.repeats, Path(tmp))
        args.two_node_json.write_text(json.dumps(runs))
        return

    import ray

    with tempfile.TemporaryDirectory(prefix="cfvit-raybench-") as tmp:
        export = args.export
        if export is None:
            from exporters import export as do_export

            export = Path(tmp) / "export"
            do_export(FIXTURE, export, num_heads=3)
        images = make_images(Path(tmp) / "images", args.images)
        result: dict[str, Any] = {
            "machine": machine(),
            "load_before": load(),
            "images": len(images),
            "model": "deit_g7 fixture (DeiT, embed 48, depth 12, g=7)" if args.export is None else str(export),
            "batch_size": BATCH,
            "repeats": args.repeats,
        }
        runs = [{"engine": "local", **timed(infer, args.repeats, source=export, inputs=images, batch_size=BATCH)}]
        cpus = result["machine"]["cores"]
        t0 = perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        result["ray_init_s"] = round(perf_counter() - t0, 2)
        try:
            runs += [bench_ray(export, images, args.repeats, name, n, t, cpus) for name, n, t in RAY_CONFIGS]
        finally:
            ray.shutdown()
        runs += two_node_runs_in_child(export, images[0].parent, args.repeats, Path(tmp))
        result["runs"], result["load_after"] = runs, load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ray.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
