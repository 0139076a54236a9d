"""A real multi-node Ray cluster on this machine for tests and benchmarks: `ray start` head + workers on 127.0.0.1.

Each node is one ``ray start --block`` process in its own session (process group), with its own CPU
count, a private temporary folder and a free GCS port, so the cluster never touches another Ray on
the machine; :meth:`LocalCluster.stop` ends exactly the process groups it started (never
``ray stop``, which stops every Ray on the machine). With the installed Ray a worker joins only
when ``RAY_AUTH_MODE=disabled`` is set for every ``ray start`` (and the drivers).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

RAY = Path(sys.executable).with_name("ray")
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment for `ray start` and for drivers joining the cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, **ENV}


class LocalCluster:
    """A head node and `workers` worker nodes of `cpus` CPUs each, started and stopped as a whole."""

    def __init__(self, tmp: Path, workers: int = 1, cpus: int = 1, object_store_mb: int = 150) -> None:
        self.tmp, self.workers, self.cpus = tmp, workers, cpus
        self.object_store = object_store_mb * 2**20
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []  # [head, worker, ...]

    def _start_node(self, *args: str) -> subprocess.Popen:
        cmd = [
            str(RAY),
            "start",
            "--block",
            "--num-cpus",
            str(self.cpus),
            "--object-store-memory",
            str(self.object_store),
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(self.tmp),
            "--disable-usage-stats",
            *args,
        ]
        log = open(self.tmp.parent / f"node{len(self.nodes)}.log", "w")  # noqa: SIM115 (the node's lifetime)
        proc = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start(self, timeout: float = 120) -> LocalCluster:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._start_node("--head", "--port", str(self.port), "--include-dashboard", "false")
        self.wait_for_nodes(1, timeout)
        for _ in range(self.workers):
            self._start_node("--address", self.address)
        self.wait_for_nodes(1 + self.workers, timeout)
        return self

    def add_worker(self, timeout: float = 180) -> int:
        """Start one more worker node (e.g. after one was killed); its index in :attr:`nodes`.

        Waits until the cluster's alive nodes are exactly the nodes whose raylet runs (a killed node is
        marked dead by the GCS only after its health checks fail)."""
        self._start_node("--address", self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.raylets()
            if self.raylet(len(self.nodes) - 1) is not None and self.alive_nodes() == live:
                return len(self.nodes) - 1
            time.sleep(1)
        raise TimeoutError(f"the new worker node did not join in {timeout} s")

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (asked by a short-lived driver)."""
        code = (
            "import ray, sys\n"
            f"ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False)\n"
            "print(sum(n['Alive'] for n in ray.nodes()), flush=True)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=ray_env(), capture_output=True, text=True, timeout=60, check=False
        )
        counts = [line for line in proc.stdout.splitlines() if line.strip().isdigit()]  # Ray prints to stdout too
        return int(counts[-1]) if counts else 0

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"a ray start process exited; see {self.tmp.parent}/node*.log")
            if self.raylets() >= n and self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout} s")

    def raylets(self) -> int:
        return sum(self.raylet(i) is not None for i in range(len(self.nodes)))

    def raylet(self, node: int) -> psutil.Process | None:
        """The raylet of node `node` (0: the head), or None."""
        try:
            children = psutil.Process(self.nodes[node].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return next((c for c in children if _name(c) == "raylet"), None)

    def kill_node(self, node: int) -> None:
        """Lose node `node` as a machine would: SIGKILL its raylet and the worker processes it started, at once.

        Killing the raylet alone leaves its workers alive until they notice, still answering the actor calls
        other workers send them directly, so a short run could finish on the "lost" node."""
        raylet = self.raylet(node)
        assert raylet is not None, f"node {node} has no raylet"
        for proc in [raylet, *raylet.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process this cluster started: its process groups and their descendants
        (Ray's worker processes start their own groups)."""
        started: list[psutil.Process] = []
        for proc in self.nodes:
            with contextlib.suppress(psutil.NoSuchProcess):
                started += psutil.Process(proc.pid).children(recursive=True)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for proc in reversed(self.nodes):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            for child in started:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (
                any(_group_alive(p.pid) for p in self.nodes) or any(c.is_running() for c in started)
            ):
                time.sleep(0.2)
        for proc in self.nodes:
            proc.wait(timeout=5)


def post_image(port: int, body: bytes, timeout: float) -> tuple[int, dict[str, str], float]:
    """POST an image (every image goes through both stages: eta=1); (status, headers, seconds)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/classify?eta=1&topk=1", body=body, headers={"content-type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, time.monotonic() - started
    finally:
        conn.close()


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
