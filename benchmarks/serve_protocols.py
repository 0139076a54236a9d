"""`serve_load.py --protocol both`: v1 and v2 (binary) on one batching server, side by side, interleaved.

Both protocols drive the same `cfvit serve --max-batch 32` from the same httpx load generator with the
same images; only the route and the request's encoding differ (v1: the PNG as the body; v2: the PNG as a
length-prefixed BYTES element after a JSON header, outputs in binary, as ``tritonclient`` sends it).
At each concurrency the cells alternate v1, v2 (`rounds` times), so a busy machine's drift hits both;
each protocol's throughput is the median of its rounds and the goal is judged on the ratio (issue 27:
v2 >= 90% of v1 at concurrency 32).
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
from pathlib import Path
from statistics import median

from serve_load import CONCURRENCY, PROTOCOLS, Server, Setup, load, make_images

from cfvit_deploy.manifest import Manifest

GOAL_RATIO = 0.90


def compare(setup: Setup, quick: bool, eta: float | None, rounds: int) -> dict:
    manifest = Manifest.load(setup.export_dir)
    eta = manifest.default_eta if eta is None else eta
    requests, time_limit = (48, 20.0) if quick else (256, 60.0)
    result: dict = {
        "mode": "protocols",
        "export": str(setup.export_dir),
        "provider": setup.provider,
        "precision": manifest.precision,
        "quick": quick,
        "eta": eta,
        "threads": setup.threads,
        "rounds": rounds,
        "requests_per_cell": requests,
        "time_limit_per_cell_s": time_limit,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": os.getloadavg(),
        },
    }
    cells: dict[str, dict[int, list[dict]]] = {p: {c: [] for c in CONCURRENCY} for p in PROTOCOLS}
    with tempfile.TemporaryDirectory(prefix="cfvit-serve-protocols-") as tmp:
        bodies = [p.read_bytes() for p in make_images(Path(tmp), 64)]
        server = Server(setup, 32, eta, Path(tmp) / "server.log")
        try:
            server.wait_ready(120)
            for protocol in PROTOCOLS:  # warm-up, not recorded
                asyncio.run(load(server.base, bodies, 8, 16, time_limit, protocol))
            for _ in range(rounds):
                for c in CONCURRENCY:
                    for protocol in PROTOCOLS:
                        cells[protocol][c].append(
                            asyncio.run(load(server.base, bodies, c, requests, time_limit, protocol))
                        )
        finally:
            server.stop()
            if server.exit_code != 0:  # say why, before the temporary folder goes
                log = (Path(tmp) / "server.log").read_text(errors="replace")
                print(f"cfvit serve exited with {server.exit_code}; its log ends:\n{log[-3000:]}", file=sys.stderr)
    result["exit_code"] = server.exit_code
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["cells"] = cells
    result["summary"] = summary(cells)
    result["goals"] = goals(result["summary"])
    return result


def summary(cells: dict) -> list[dict]:
    """Per protocol and concurrency: the median over the rounds of throughput and latency percentiles."""
    rows = []
    for protocol, by_c in cells.items():
        for c, runs in by_c.items():
            row = {"protocol": protocol, "concurrency": int(c), "rounds": len(runs)}
            for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "server_p50_ms"):
                row[key] = round(median(r[key] for r in runs), 3)
            row["errors"] = sum(r["errors"] for r in runs)
            rows.append(row)
    return rows


def goals(rows: list[dict]) -> list[dict]:
    at = {(r["protocol"], r["concurrency"]): r for r in rows}
    out = []
    for c in CONCURRENCY:
        ratio = at[("v2", c)]["throughput"] / at[("v1", c)]["throughput"]
        judged = c == 32
        out.append(
            {
                "goal": f"c={c} v2 binary / v1 throughput",
                "value": round(ratio, 3),
                "target": f">= {GOAL_RATIO:.2f}" if judged else "(reported)",
                "met": bool(ratio >= GOAL_RATIO) if judged else None,
            }
        )
    return out


def table(result: dict) -> str:
    lines = [
        "| protocol | concurrency | req/s (median) | p50 ms | p95 ms | p99 ms | server p50 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["summary"], key=lambda r: (r["concurrency"], r["protocol"])):
        lines.append(
            f"| {r['protocol']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_p50_ms']:.2f} | {r['errors']} |"
        )
    verdict = {True: "met", False: "missed", None: "reported"}
    lines += ["", "| goal | value | target | |", "|---|---:|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {g['target']} | {verdict[g['met']]} |" for g in result["goals"]]
    return "\n".join(lines)
