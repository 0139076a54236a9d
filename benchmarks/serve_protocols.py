"""`serve_load.py --protocol both`: v1 and v2 (binary) on one batching server, side by side, interleaved.

Both protocols drive the same `cfvit serve --max-batch 32` from the same httpx load generator with the
same images; only the route and the request's encoding differ (v1: the PNG as the body; v2: the PNG as a
length-prefixed BYTES element after a JSON header, outputs in binary, as ``tritonclient`` sends it).
At each concurrency the cells alternate v1, v2 (`rounds` times), so a busy machine's drift hits both;
each protocol's throughput is the median of its rounds, and the goal is judged on the median of the
rounds' paired ratios (issue 27: v2 >= 90% of v1 at concurrency 32).
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
                        cells[protocol][c].append(_cell(server, bodies, c, requests, time_limit, protocol))
        finally:
            server.stop()
            if server.exit_code != 0:  # say why, before the temporary folder goes
                log = (Path(tmp) / "server.log").read_text(errors="replace")
                print(f"cfvit serve exited with {server.exit_code}; its log ends:\n{log[-3000:]}", file=sys.stderr)
    result["exit_code"] = server.exit_code
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["cells"] = cells
    result["summary"] = summary(cells)
    result["goals"] = goals(cells)
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process (all its threads: HTTP, decoding, both graphs)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _cell(server: Server, bodies: list[bytes], c: int, requests: int, time_limit: float, protocol: str) -> dict:
    """One load cell, with the server's CPU time per answered request: unlike throughput, it hardly
    depends on how many other jobs share the cores, so it shows a protocol's own cost on a busy machine."""
    before = _cpu_seconds(server.proc.pid)
    cell = asyncio.run(load(server.base, bodies, c, requests, time_limit, protocol))
    used = _cpu_seconds(server.proc.pid) - before
    cell["server_cpu_ms_per_request"] = 1000 * used / cell["requests"] if cell["requests"] else float("nan")
    return cell


def summary(cells: dict) -> list[dict]:
    """Per protocol and concurrency: the median over the rounds of throughput and latency percentiles."""
    rows = []
    for protocol, by_c in cells.items():
        for c, runs in by_c.items():
            row = {"protocol": protocol, "concurrency": int(c), "rounds": len(runs)}
            for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "server_p50_ms", "server_cpu_ms_per_request"):
                row[key] = round(median(r[key] for r in runs), 3)
            row["errors"] = sum(r["errors"] for r in runs)
            rows.append(row)
    return rows


def goals(cells: dict) -> list[dict]:
    """v2 / v1 throughput per concurrency: the median of the per-round ratios (each round's v2 cell ran
    right after its v1 cell, so the pair saw the same machine), with every round's ratio listed."""
    out = []
    for c in CONCURRENCY:
        pairs = zip(_at(cells["v1"], c), _at(cells["v2"], c), strict=True)
        ratios = [v2["throughput"] / v1["throughput"] for v1, v2 in pairs]
        ratio = median(ratios)
        judged = c == 32
        out.append(
            {
                "goal": f"c={c} v2 binary / v1 throughput",
                "value": round(ratio, 3),
                "rounds": [round(r, 3) for r in ratios],
                "target": f">= {GOAL_RATIO:.2f}" if judged else "(reported)",
                "met": bool(ratio >= GOAL_RATIO) if judged else None,
            }
        )
    # the server's CPU per request, v1 / v2: what the throughput ratio would be on cores the server had alone
    pairs = zip(_at(cells["v1"], 32), _at(cells["v2"], 32), strict=True)
    ratios = [v1["server_cpu_ms_per_request"] / v2["server_cpu_ms_per_request"] for v1, v2 in pairs]
    out.append(
        {
            "goal": "c=32 server CPU per request, v1 / v2",
            "value": round(median(ratios), 3),
            "rounds": [round(r, 3) for r in ratios],
            "target": "(reported)",
            "met": None,
        }
    )
    return out


def _at(by_concurrency: dict, c: int) -> list[dict]:
    """The cells at concurrency `c` (JSON turns the int keys into strings)."""
    return by_concurrency[c] if c in by_concurrency else by_concurrency[str(c)]


def table(result: dict) -> str:
    lines = [
        "| protocol | concurrency | req/s (median) | p50 ms | p95 ms | p99 ms | server p50 ms | server CPU ms/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["summary"], key=lambda r: (r["concurrency"], r["protocol"])):
        lines.append(
            f"| {r['protocol']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_p50_ms']:.2f} | {r['server_cpu_ms_per_request']:.2f} | {r['errors']} |"
        )
    verdict = {True: "met", False: "missed", None: "reported"}
    lines += ["", "| goal (median of the rounds' ratios) | value | rounds | target | |", "|---|---:|---|---|---|"]
    lines += [
        f"| {g['goal']} | {g['value']} | {', '.join(map(str, g['rounds']))} | {g['target']} | {verdict[g['met']]} |"
        for g in result["goals"]
    ]
    return "\n".join(lines)
