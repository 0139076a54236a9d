"""Load test of `cfvit serve`: two-stage batching against no batching and against offline `cfvit infer`.

One command, on the loopback only, bounded in requests and time:

    python benchmarks/serve_load.py EXPORT_DIR [--quick] [--provider cpu] [--protocol v1|v2|both]
                                    [--out benchmarks/results/serve] [--force]

It starts `cfvit serve` twice on 127.0.0.1 (a free port each): with `--max-batch 32` (two-stage
batching) and with `--max-batch 1` (no batching). For each server and each concurrency (1, 8, 32) a
bounded asyncio client on httpx sends a fixed number of requests (the same PNG images, cycled) and
records throughput and p50/p95/p99 latency. It also measures, in this process, offline
`runtimes.infer.infer` throughput on the same images and η, and the pipeline's own latency for one
image (decode + preprocess + `CFViTPipeline.run` at batch 1: the work the server cannot avoid).

Goals (issue 15), reported as met/missed: at concurrency 32, batching >= 2x no batching and >= 70%
of offline throughput; at concurrency 1, server p50 - pipeline p50 <= 2 ms, the server's p50 read from
its ``Server-Timing`` header (request in to answer out, on the server's clock: the load generator's own
Python time on the same cores is not the server's); the client-side difference is reported beside it.
Also reported: the batching ceiling of this machine, offline batch-32 over batch-1 throughput (batching
cannot give the server more than it gives the pipeline).
Writes OUT/results.json and OUT/serve_load.png; prints a markdown table.

``--protocol v2`` drives the Open Inference Protocol route instead (``POST /v2/models/cfvit/infer``, one
image per request, as ``tritonclient`` sends it by default: the binary tensor extension both ways).
``--protocol both`` starts the batching server only and measures v1 and v2 side by side, interleaved
(v1, v2, v1, v2, ... at each concurrency, `--rounds` times; the median of the rounds is reported), so
that a busy machine's drift hits both alike; goal (issue 27): v2 throughput >= 90% of v1's at c = 32.
The client runs on the same machine as the server and takes CPU from it; on a busy machine the
numbers are noisy (the JSON records the load average before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfvit_deploy.errors import CFViTError  # noqa: E402
from cfvit_deploy.io import atomic_write_path, check_output  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402

CONCURRENCY = (1, 8, 32)
PROTOCOLS = ("v1", "v2")
V2_MODEL = "cfvit"  #: the server's default --model-name


@dataclass(frozen=True)
class Setup:
    """What both servers and the offline run use: the export, the execution provider, intra-op threads."""

    export_dir: Path
    provider: str = "cpu"
    threads: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(folder: Path, n: int) -> list[Path]:
    """`n` smooth PNG images of mixed sizes (seeded), the same on every run."""
    from PIL import Image

    paths = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        size = [(240, 200), (300, 180), (224, 224), (320, 240)][seed % 4]
        path = folder / f"img{seed:03d}.png"
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


class Server:
    """`cfvit serve` in a subprocess on 127.0.0.1; stopped with SIGTERM (its exit code is kept)."""

    def __init__(self, setup: Setup, max_batch: int, eta: float, log: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-c",
            "import sys, cli; sys.exit(cli.main())",
            "serve",
            str(setup.export_dir),
            "--provider",
            setup.provider,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--eta",
            repr(eta),
        ]
        if setup.threads:
            cmd += ["--threads", str(setup.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.exit_code: int | None = None

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cfvit serve exited with {self.proc.returncode} before it was ready")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"cfvit serve not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode


def _server_ms(header: str) -> float:
    """The ``dur`` of a ``Server-Timing: app;dur=12.345`` header (nan when absent)."""
    for part in header.split(";"):
        if part.strip().startswith("dur="):
            return float(part.strip()[4:])
    return float("nan")


def v2_request(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request for one image as ``tritonclient`` builds it by default: the JSON header, then the
    image as a length-prefixed BYTES element (binary tensor extension), all outputs asked in binary."""
    header = json.dumps(
        {
            "inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(image) + 4}}
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
    return header + len(image).to_bytes(4, "little") + image, headers


def requests_for(bodies: list[bytes], protocol: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """(path, body, headers) per image for `protocol` ("v1": the image as the body; "v2": a binary infer)."""
    if protocol == "v1":
        return [("/v1/classify", body, {"content-type": "image/png"}) for body in bodies]
    return [(f"/v2/models/{V2_MODEL}/infer", *v2_request(body)) for body in bodies]


async def load(
    base: str, bodies: list[bytes], concurrency: int, requests: int, time_limit: float, protocol: str = "v1"
) -> dict:
    """`requests` POSTs from `concurrency` workers (bounded by `time_limit` seconds); latency stats."""
    import httpx

    calls = requests_for(bodies, protocol)

    latencies: list[float] = []
    server_ms: list[float] = []  # the server's own time per request (its Server-Timing header)
    errors = 0
    kinds: dict[str, int] = {}  # the errors by HTTP status or transport exception
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        stop_at = start + time_limit

        async def worker() -> None:
            nonlocal issued, errors
            while issued < requests and time.perf_counter() < stop_at:
                path, body, headers = calls[issued % len(calls)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, content=body, headers=headers)
                except httpx.TransportError as exc:  # a connection reset or timeout: an error, the run goes on
                    errors += 1
                    kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                    continue
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    server_ms.append(_server_ms(r.headers.get("server-timing", "")))
                else:
                    errors += 1
                    kinds[str(r.status_code)] = kinds.get(str(r.status_code), 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    pct = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "protocol": protocol,
        "requests": len(latencies),
        "errors": errors,
        "error_kinds": kinds,
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": float(pct[0]),
        "p95_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "server_p50_ms": float(np.nanmedian(server_ms)) if server_ms else float("nan"),
    }


def offline(setup: Setup, paths: list[Path], eta: float, repeats: int) -> dict:
    """Offline `infer` throughput (batch 32) and the pipeline's own one-image latency, on `paths`."""
    from cfvit_deploy.preprocessing import load_and_preprocess
    from runtimes import CFViTPipeline
    from runtimes.backends import SessionConfig
    from runtimes.infer import infer

    pipeline = CFViTPipeline(setup.export_dir, setup.provider, SessionConfig(threads=setup.threads))
    infer(pipeline, paths[:32], eta=eta)  # warm-up
    rates = [infer(pipeline, paths, eta=eta, batch_size=32).images_per_s for _ in range(repeats)]
    pp = pipeline.manifest.preprocessing
    one: list[float] = []
    for path in (paths * 4)[: max(32, len(paths))]:
        t0 = time.perf_counter()
        pipeline.run(load_and_preprocess(path, pp)[None], eta)
        one.append(time.perf_counter() - t0)
    rate, p50_ms = max(rates), median(one[4:]) * 1000
    # what batching can give at most on this machine: batch-32 throughput over batch-1 throughput (one
    # image: decode + run); a 2x target above this ceiling cannot be met here
    return {"infer_images_per_s": rate, "pipeline_p50_ms": p50_ms, "batching_ceiling": rate * p50_ms / 1000}


def run(setup: Setup, quick: bool, eta: float | None, protocol: str = "v1") -> dict:
    manifest = Manifest.load(setup.export_dir)
    eta = manifest.default_eta if eta is None else eta
    requests = 48 if quick else 512
    time_limit = 20.0 if quick else 120.0
    load_before = os.getloadavg()
    result: dict = {
        "export": str(setup.export_dir),
        "provider": setup.provider,
        "precision": manifest.precision,
        "quick": quick,
        "eta": eta,
        "protocol": protocol,
        "threads": setup.threads,
        "requests_per_cell": requests,
        "time_limit_per_cell_s": time_limit,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
        },
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="cfvit-serve-load-") as tmp:
        paths = make_images(Path(tmp), 64)
        bodies = [p.read_bytes() for p in paths]
        result["offline"] = offline(setup, paths, eta, repeats=1 if quick else 3)
        for name, max_batch in (("batching", 32), ("no-batching", 1)):
            server = Server(setup, max_batch, eta, Path(tmp) / f"{name}.log")
            try:
                server.wait_ready(120)
                asyncio.run(load(server.base, bodies, 8, 16, time_limit, protocol))  # warm-up, not recorded
                cells = [asyncio.run(load(server.base, bodies, c, requests, time_limit, protocol)) for c in CONCURRENCY]
            finally:
                server.stop()
            result["servers"][name] = {"max_batch": max_batch, "cells": cells, "exit_code": server.exit_code}
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["goals"] = goals(result)
    return result


def goals(result: dict) -> list[dict]:
    cell = {name: {c["concurrency"]: c for c in s["cells"]} for name, s in result["servers"].items()}
    b32, n32 = cell["batching"][32]["throughput"], cell["no-batching"][32]["throughput"]
    offline_rate = result["offline"]["infer_images_per_s"]
    # what the server adds, by its own clock (Server-Timing: request in -> answer out, decode included, as in
    # the pipeline's one-image time); the client-side figure also holds the Python load generator's own
    # time on the same 2 cores, and is reported beside it
    added = cell["batching"][1]["server_p50_ms"] - result["offline"]["pipeline_p50_ms"]
    client_added = cell["batching"][1]["p50_ms"] - result["offline"]["pipeline_p50_ms"]
    ceiling = result["offline"]["batching_ceiling"]
    rows = [  # (goal, value, target, met; None: reported only)
        ("c=32 batching / no batching", b32 / n32 if n32 else float("inf"), ">= 2.0x", b32 >= 2 * n32),
        ("ceiling: offline batch-32 / batch-1 throughput", ceiling, "(reported)", None),
        ("c=32 batching / offline infer", b32 / offline_rate, ">= 0.70", b32 >= 0.7 * offline_rate),
        ("c=1 added latency, server's clock (ms)", added, "<= 2 ms", added <= 2.0),
        ("c=1 added latency, client's clock (ms)", client_added, "(reported)", None),
    ]
    return [
        {"goal": g, "value": round(v, 3), "target": t, "met": None if m is None else bool(m)} for g, v, t, m in rows
    ]


_VERDICT = {True: "met", False: "missed", None: "reported"}


def table(result: dict) -> str:
    lines = [
        "| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | server p50 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["servers"].items():
        for c in s["cells"]:
            lines.append(
                f"| {name} (max-batch {s['max_batch']}) | {c['concurrency']} | {c['throughput']:.1f} | "
                f"{c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['p99_ms']:.1f} | {c['server_p50_ms']:.1f} | "
                f"{c['errors']} |"
            )
    o = result["offline"]
    lines += [
        "",
        f"export precision {result.get('precision', 'fp32')}; protocol {result.get('protocol', 'v1')}; "
        f"offline `infer` (batch 32): {o['infer_images_per_s']:.1f} img/s; pipeline alone, one image "
        f"(decode + batch-1 run): p50 {o['pipeline_p50_ms']:.1f} ms; batching ceiling (offline batch-32 / "
        f"batch-1 throughput) {o['batching_ceiling']:.2f}x",
        "",
        "| goal | value | target | |",
        "|---|---:|---|---|",
    ]
    lines += [f"| {g['goal']} | {g['value']} | {g['target']} | {_VERDICT[g['met']]} |" for g in result["goals"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, s in result["servers"].items():
        cs = [c["concurrency"] for c in s["cells"]]
        a.plot(cs, [c["throughput"] for c in s["cells"]], marker="o", label=f"{name} (max-batch {s['max_batch']})")
        b.plot(cs, [c["p95_ms"] for c in s["cells"]], marker="o", label=name)
    a.axhline(result["offline"]["infer_images_per_s"], ls="--", c="gray", label="offline infer")
    a.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p95 latency (ms)", title="p95 latency")
    for ax in (a, b):
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.legend(fontsize=8)
    fig.suptitle(
        f"cfvit serve load test, {result.get('precision', 'fp32')} export{' (quick)' if result['quick'] else ''}"
    )
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    parser.add_argument("--quick", action="store_true", help="48 requests per cell, 20 s limit: proves the script")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per session (server and offline)")
    parser.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | openvino (server and offline)")
    parser.add_argument("--eta", type=float, default=None, help="exit threshold (default: the manifest's)")
    parser.add_argument(
        "--protocol",
        choices=("v1", "v2", "both"),
        default="v1",
        help="v1: POST /v1/classify; v2: the KServe v2 infer route (binary); both: v1 and v2 interleaved",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--protocol both: interleaved rounds per cell")
    parser.add_argument("--force", action="store_true", help="replace existing results in --out")
    args = parser.parse_args(argv)
    json_path = args.out / "results.json"
    try:
        Manifest.load(args.export_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        check_output(json_path, args.force)
    except CFViTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    setup = Setup(args.export_dir, args.provider, args.threads)
    if args.protocol == "both":
        return _compare(setup, args, json_path)
    result = run(setup, args.quick, args.eta, args.protocol)
    with atomic_write_path(json_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "serve_load.png")
    print(table(result))
    print(f"\nwrote {json_path} and {args.out / 'serve_load.png'}", file=sys.stderr)
    bad = [n for n, s in result["servers"].items() if s["exit_code"] != 0]
    return 1 if bad else 0


def _compare(setup: Setup, args: argparse.Namespace, json_path: Path) -> int:
    import serve_protocols

    result = serve_protocols.compare(setup, args.quick, args.eta, args.rounds)
    with atomic_write_path(json_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(serve_protocols.table(result))
    print(f"\nwrote {json_path}", file=sys.stderr)
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
