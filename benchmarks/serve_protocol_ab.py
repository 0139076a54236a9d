"""What the limits of `app/serve/protocol.py` cost a normal request: uvicorn's own protocol against the
subclass with the header deadline and caps, interleaved on the same app (issue 22, item 4).

    python benchmarks/serve_protocol_ab.py EXPORT_DIR [--rounds 6] [--requests 100] [--out FILE]

Two uvicorn servers run in this process's children, one per protocol, on 127.0.0.1, serving the same
export; each round sends `--requests` sequential GET /healthz and POST /v1/classify requests (a small
PNG) on one kept-alive connection to one server, then the other, alternating which goes first. The
figure is the median over rounds of the paired ratio limited/plain of the median latency, so a busy
machine disturbs both sides of a pair alike. Writes JSON (default:
benchmarks/results/serve_attack/protocol_ab.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, uvicorn
from cfvit_deploy.app.serve import ServeOptions, build_app
from cfvit_deploy.app.serve.protocol import limited_protocol
export, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
http = limited_protocol(10.0, 512) if kind == "limited" else "httptools"
app = build_app(export, ServeOptions(threads=1, max_batch=1))
uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_level="warning", lifespan="on")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _read_answer(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def _round(port: int, request: bytes, n: int) -> float:
    """Median seconds of `n` sequential requests on one kept-alive connection."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(request)
            assert _read_answer(sock) == 200
            times.append(time.perf_counter() - start)
    return median(times)


def _start(export_dir: Path, kind: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(export_dir), str(port), kind], cwd=ROOT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nhost: a\r\n\r\n")
                if _read_answer(sock) == 200:
                    return proc, port
        except (OSError, StopIteration):
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{kind} server not ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_attack" / "protocol_ab.json"
    )
    args = parser.parse_args(argv)
    png = _png()
    requests = {
        "healthz": b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n",
        "classify": b"POST /v1/classify HTTP/1.1\r\nhost: a\r\ncontent-type: image/png\r\n"
        + f"content-length: {len(png)}\r\n\r\n".encode()
        + png,
    }
    servers = {kind: _start(args.export_dir, kind) for kind in ("plain", "limited")}
    load_before = os.getloadavg()
    try:
        figures: dict[str, dict] = {}
        for name, request in requests.items():
            pairs = []
            for r in range(args.rounds):
                order = ("plain", "limited") if r % 2 == 0 else ("limited", "plain")
                got = {kind: _round(servers[kind][1], request, args.requests) for kind in order}
                pairs.append(got)
            ratios = sorted(p["limited"] / p["plain"] for p in pairs)
            figures[name] = {
                "plain_median_ms": round(1000 * median(p["plain"] for p in pairs), 3),
                "limited_median_ms": round(1000 * median(p["limited"] for p in pairs), 3),
                "ratio_limited_over_plain_median": round(median(ratios), 3),
                "ratios": [round(x, 3) for x in ratios],
            }
            print(name, json.dumps(figures[name]), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait(30)
    result = {
        "figures": figures,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
