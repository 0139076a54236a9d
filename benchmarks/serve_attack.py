"""`cfvit serve` under attack: slow clients, a burst of large bodies, and overload (issue 22).

One command, on the loopback only, bounded in connections and time (about 2 minutes in all):

    python benchmarks/serve_attack.py EXPORT_DIR [--out benchmarks/results/serve_attack] [--force]
                                      [--root CHECKOUT --legacy]   # the same attacks on another checkout

Each case starts its own `cfvit serve` on 127.0.0.1 (a free port) and, while the attack runs, sends a
normal request (a small PNG) every 0.25 s and samples the server's RSS every 0.1 s:

- **slow**: 200 connections that drip bytes (100 send their headers, 100 their body, one byte every
  0.5 s) for 20 s, against ``--header-timeout 5 --body-timeout 10``;
- **headers**: 20 clients each send 8 MB of headers as fast as the server reads them (at most 15 s);
- **burst**: 40 clients each send a 20 MB body (``--max-bytes``) and hold its last byte, against
  ``--max-queue 8``: at most 8 bodies may be held, the other 32 must be refused (503) unread;
- **overload**: 400 clients send a normal request at once, twice, against ``--max-queue 64``.

Figures per case: the server's RSS before and at its peak, the attack requests answered by status
(503 = shed, 408 = timed out) and the connections the server closed, how long the attack connections
were held, and the latency of the normal requests sent during the attack (p50, max, failures).
Writes OUT/results.json and prints a table. With ``--root`` the server runs from another checkout
(``--legacy``: without the flags it does not have), for a before/after comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfvit_deploy.io import atomic_write_path  # noqa: E402

READY_S = 90  #: longest a server may take to get ready
PROBE_EVERY_S = 0.25
CHUNK = 1 << 20  #: bytes an attacker writes at once


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _request(body: bytes, length: int | None = None) -> bytes:
    head = (
        f"POST /v1/classify HTTP/1.1\r\nhost: attack\r\ncontent-type: image/png\r\n"
        f"content-length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


class Server:
    def __init__(self, export_dir: Path, root: Path, flags: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        python = root / ".venv" / "bin" / "python"  # the checkout's own environment, when it has one
        argv = [
            str(python) if python.exists() else sys.executable,
            "-c",
            "import sys, cli; sys.exit(cli.main())",
            "serve",
            str(export_dir),
        ]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port), *flags], cwd=root, env=env, stdout=f, stderr=f
            )
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {log}")
            try:
                if _exchange(self.port, b"GET /readyz HTTP/1.1\r\nhost: a\r\n\r\n", 2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server did not get ready in {READY_S} s; see {log}")

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _exchange(port: int, data: bytes, timeout: float) -> tuple[int, float]:
    """Send one request, read the status line: (status, seconds); status 0 when the server closed first."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                return 0, time.perf_counter() - start
            answer += chunk
    return int(answer.split()[1]), time.perf_counter() - start


class Watch:
    """While the attack runs: the server's RSS every 0.1 s, a normal request every 0.25 s."""

    def __init__(self, server: Server) -> None:
        self.server, self.stop = server, threading.Event()
        self.rss: list[int] = []
        self.latencies: list[float] = []
        self.failures: list[int] = []
        self.threads = [threading.Thread(target=self._sample), threading.Thread(target=self._probe)]

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            self.rss.append(self.server.rss())

    def _probe(self) -> None:
        request = _request(_png(1))
        while not self.stop.wait(PROBE_EVERY_S):
            try:
                status, seconds = _exchange(self.server.port, request, 30)
            except OSError:
                status, seconds = -1, 30.0
            (self.latencies if status == 200 else self.failures).append(seconds if status == 200 else status)

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def figures(self, before: int) -> dict:
        lat = sorted(self.latencies)
        return {
            "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(max(self.rss, default=before) / 2**20, 1),
            "rss_growth_mb": round((max(self.rss, default=before) - before) / 2**20, 1),
            "normal_requests_ok": len(lat),
            "normal_requests_failed": len(self.failures),
            "normal_failure_statuses": sorted(set(self.failures)),
            "normal_p50_ms": round(1000 * median(lat), 1) if lat else None,
            "normal_max_ms": round(1000 * lat[-1], 1) if lat else None,
        }


async def _attacker(port: int, payload: bytes, drip: bytes, every: float, hold_s: float) -> dict:
    """Send `payload`, then `drip` one byte every `every` s (at most `hold_s`); report how it ended."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, asyncio.TimeoutError):
        return {"outcome": "refused_connect", "held_s": 0.0}
    status, outcome = None, "held"
    answer = asyncio.ensure_future(reader.readline())
    try:
        view = memoryview(payload)
        for offset in range(0, len(view), CHUNK):  # in chunks: the transport never copies a whole body
            if answer.done() or time.monotonic() - start > hold_s:
                break
            writer.write(view[offset : offset + CHUNK])
            await asyncio.wait_for(writer.drain(), max(0.1, hold_s - (time.monotonic() - start)))
        for byte in drip:
            if answer.done() or time.monotonic() - start > hold_s:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait([answer], timeout=every)
        if not answer.done():
            await asyncio.wait([answer], timeout=max(0.0, hold_s - (time.monotonic() - start)))
    except (OSError, asyncio.TimeoutError):  # the server stopped reading (refused) or closed: its answer may be there
        outcome = "write_failed"
        await asyncio.wait([answer], timeout=2)
    if answer.done() and not answer.cancelled() and answer.exception() is None:
        line = answer.result()
        status, outcome = (int(line.split()[1]), "answered") if line else (None, "closed")
    else:
        answer.cancel()
    writer.close()
    return {"outcome": outcome, "status": status, "held_s": round(time.monotonic() - start, 2)}


def _attack_summary(results: list[dict]) -> dict:
    summary = _group_summary(results)
    kinds = sorted({r["kind"] for r in results if "kind" in r})
    if len(kinds) > 1:  # e.g. the slow case: header drippers and body drippers apart
        summary["by_kind"] = {k: _group_summary([r for r in results if r.get("kind") == k]) for k in kinds}
    return summary


def _group_summary(results: list[dict]) -> dict:
    statuses: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        if r.get("status") is not None:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    held = sorted(r["held_s"] for r in results)
    return {
        "connections": len(results),
        "outcomes": outcomes,
        "statuses": statuses,
        "shed_503": statuses.get("503", 0),
        "held_s_median": held[len(held) // 2],
        "held_s_max": held[-1],
    }


async def _slow(port: int) -> list[dict]:
    head = b"POST /v1/classify HTTP/1.1\r\nhost: a\r\n" + b"x-pad: slow\r\n" * 200
    body_head = _request(b"", 100_000)
    headers = await_all(_attacker(port, b"", head, 0.5, 20) for _ in range(100))
    bodies = await_all(_attacker(port, body_head, b"\0" * 1000, 0.5, 20) for _ in range(100))
    done = await asyncio.gather(headers, bodies)
    return [{**r, "kind": "headers"} for r in done[0]] + [{**r, "kind": "body"} for r in done[1]]


async def await_all(coroutines: Any) -> list[dict]:
    return list(await asyncio.gather(*coroutines))


async def _header_flood(port: int) -> list[dict]:
    flood = b"POST /v1/classify HTTP/1.1\r\nhost: a\r\n" + (b"x-pad: " + b"a" * 1000 + b"\r\n") * 8000  # ~8 MB
    return await asyncio.gather(*(_attacker(port, flood, b"", 1, 15) for _ in range(20)))


async def _burst(port: int, size: int) -> list[dict]:
    payload = _request(b"\x89PNG" + b"\0" * (size - 5), size)  # one byte short of the declared length: held
    return await asyncio.gather(*(_attacker(port, payload, b"", 1, 20) for _ in range(40)))


async def _overload(port: int) -> list[dict]:
    request = _request(_png(2))
    results: list[dict] = []
    for _ in range(2):
        results += await asyncio.gather(*(_attacker(port, request, b"", 1, 30) for _ in range(400)))
    return results


CASES = {
    "slow": (["--header-timeout", "5", "--body-timeout", "10"], lambda port: _slow(port)),
    "headers": ([], lambda port: _header_flood(port)),
    "burst": (["--max-queue", "8", "--max-bytes", str(20 * 2**20)], lambda port: _burst(port, 20 * 2**20)),
    "overload": (["--max-queue", "64"], lambda port: _overload(port)),
}
NEW_FLAGS = ("--header-timeout", "--body-timeout", "--drain-timeout", "--max-connections")


def run_case(name: str, export_dir: Path, root: Path, legacy: bool, logs: Path) -> dict:
    flags, attack = CASES[name]
    if legacy:  # a checkout without these flags: keep only the ones it has
        flags = [f for i, f in enumerate(flags) if f not in NEW_FLAGS and (i == 0 or flags[i - 1] not in NEW_FLAGS)]
    server = Server(export_dir, root, ["--threads", "1", *flags], logs / f"{name}.log")
    try:
        time.sleep(1.0)
        before = server.rss()
        start = time.monotonic()
        with Watch(server) as watch:
            results = asyncio.run(attack(server.port))
        seconds = time.monotonic() - start
    finally:
        server.stop()
    return {"flags": flags, "seconds": round(seconds, 1), **_attack_summary(results), **watch.figures(before)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_attack")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose `cfvit serve` is attacked")
    parser.add_argument("--legacy", action="store_true", help="the checkout lacks the timeout/connection flags")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if (args.out / "results.json").exists() and not args.force:
        print(f"error: {args.out / 'results.json'} already exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="serve_attack-logs-"))  # the servers' logs: not results
    print(f"server logs in {logs}")
    load_before = os.getloadavg()
    cases = {}
    for name in args.cases.split(","):
        print(f"case {name} ...", flush=True)
        cases[name] = run_case(name, args.export_dir.resolve(), args.root.resolve(), args.legacy, logs)
        print(json.dumps(cases[name]), flush=True)
    result = {
        "cases": cases,
        "server_root": str(args.root.resolve()),
        "legacy": args.legacy,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    with atomic_write_path(args.out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
