"""`cfvit serve` as a real process (uvicorn on 127.0.0.1): SIGTERM with requests in flight answers
every accepted request, stops accepting, and exits 0."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 90  # seconds for the whole server life; every wait below is bounded by it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(small).resize((240, 200), Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_and_exits_0(export_dir_factory, tmp_path):
    export_dir = export_dir_factory("deit_g7")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # --max-batch 1 and one thread: the requests queue up and take a while to drain
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, cli; sys.exit(cli.main())",
                "serve",
                str(export_dir),
                "--port",
                str(port),
                "--max-batch",
                "1",
                "--threads",
                "1",
                "--eta",
                "1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    n = 16
    try:
        deadline = time.monotonic() + TIMEOUT
        with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not get ready"
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)

            def post(seed: int) -> httpx.Response:
                with httpx.Client(base_url=base, timeout=TIMEOUT) as own:
                    return own.post("/v1/classify", content=_png(seed), headers={"content-type": "image/png"})

            with ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(post, i) for i in range(n)]
                while True:  # every request accepted by the engine or answered: then stop the server
                    text = c.get("/metrics").text
                    accepted = _metric(text, "cfvit_requests_in_engine") + _metric(text, "cfvit_requests_total")
                    assert time.monotonic() < deadline, "requests did not reach the server"
                    if accepted >= n:
                        break
                    time.sleep(0.01)
                in_flight = _metric(text, "cfvit_requests_in_engine")
                proc.send_signal(signal.SIGTERM)
                responses = [f.result(TIMEOUT) for f in futures]
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert in_flight >= 2, output  # the signal really came while requests were queued
    assert [r.status_code for r in responses] == [200] * n, output
    assert all(r.json()["stage"] == "fine" for r in responses)  # eta 1: both stages ran for each
    assert "draining" in output and "Traceback" not in output
    with pytest.raises(httpx.TransportError):  # nothing listens any more
        httpx.get(f"{base}/healthz", timeout=5)
