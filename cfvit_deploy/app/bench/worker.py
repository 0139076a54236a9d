"""The per-cell worker: one cell's measurement and per-cell process isolation (timing loop: :mod:`.timing`).

A cell creates its sessions once, runs an untimed warm-up, then times whole calls on preallocated
inputs: for the pipeline the timer covers the orchestrator call (coarse run, gate, gather, fine run,
merge), and the pipeline's own split gives the per-stage times. The pipeline is built exactly as a
user builds it: ``CFViTPipeline(export_dir, provider, config=SessionConfig(threads=...))``, the
library's default threading included; bench has no tuning of its own.

Isolation is measurement hygiene, not tuning: by default every cell runs in a fresh Python process
(``python -m cfvit_deploy.app.bench.worker SPEC OUT``). Idle ONNX Runtime and PyTorch worker threads
keep spinning for a while after a call and slow whatever runs next in the same process, so runtimes
measured one after another in one process would penalise the later ones; a fresh process also gives
a per-cell peak RSS. Every path in the spec is absolute (resolved by the caller before the process
starts), so the worker's working directory does not matter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.errors import CFViTError, ManifestError, ProviderError
from cfvit_deploy.manifest import Manifest

from .schema import Cell, json_default
from .timing import MIN_ITERATIONS, eta_for_fine_fraction, timed_loop

#: the timing helpers live in .timing (below the cells that use them); re-exported here
__all__ = ["MIN_ITERATIONS", "eta_for_fine_fraction", "measure_cell", "peak_rss_mb", "run_isolated", "timed_loop"]

#: The package root, put on the worker's PYTHONPATH (the worker runs this same source tree).
_ROOT = Path(__file__).resolve().parents[3]


def peak_rss_mb() -> float | None:
    """This process's peak RSS: VmHWM (ru_maxrss would include the parent's RSS at fork on Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s*(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


def _batches(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(pool[i : i + batch_size]) for i in range(0, len(pool), batch_size)]


def _loop_args(spec: dict[str, Any]) -> tuple[int, int | None, float]:
    return spec["warmup"], spec["iterations"], spec["duration"]


def _measure_onnx(spec: dict[str, Any], cell: Cell, batches: list[np.ndarray]) -> dict[str, Any]:
    """A cell of ONNX Runtime or OpenVINO, through the same constructors users call."""
    from runtimes.backends import SessionConfig, create_backend
    from runtimes.pipeline import CFViTPipeline

    config = SessionConfig(threads=spec["threads"])
    n, (warmup, iterations, duration) = len(batches), _loop_args(spec)
    if cell.model == "baseline":
        manifest = Manifest.load(spec["export_dir"])
        if "baseline" not in manifest.graphs:
            raise ManifestError("the export has no baseline.onnx (re-export with --baseline)")
        backend = create_backend(manifest, cell.provider, config, graphs=("baseline",))
        times, _ = timed_loop(
            lambda i: backend.run("baseline", {"images": batches[i % n]}), n, warmup, iterations, duration
        )
        return {"times": times}
    pipe = CFViTPipeline(spec["export_dir"], cell.provider, config=config)
    eta = cell.value
    if cell.gate == "fine_fraction":
        confidence = np.concatenate([pipe.run(b, 0.0).confidence for b in batches])
        eta = eta_for_fine_fraction(confidence, float(cell.value))

    def call(i: int) -> tuple[float, float, float, int]:
        r = pipe.run(batches[i % n], eta)
        return r.timings.coarse_s, r.timings.gate_s, r.timings.fine_s, int(len(r.exited) - r.exited.sum())

    if warmup:
        pipe.run(batches[0], 1.0)  # both sessions run at least once, whatever the gate lets through
    times, stages = timed_loop(call, n, max(warmup - 1, 0), iterations, duration)
    return {"times": times, "stages": stages, "eta": eta}


def measure_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell described by `spec`; returns raw measurements, or ``status``/``reason`` when it cannot run."""
    try:
        if spec.get("kind") == "matmul":
            from .machine import measure_matmul

            return measure_matmul(spec)
        cell = Cell(**spec["cell"])
        pool = np.load(spec["inputs"])[: spec["pool"]]
        batches = _batches(pool, cell.batch_size)
        del pool
        if cell.runtime == "torch":
            from .torch_cells import measure_torch

            measured = measure_torch(spec, cell, batches)
        else:
            measured = _measure_onnx(spec, cell, batches)
        return {**measured, "peak_rss_mb": peak_rss_mb() if spec["isolation"] == "process" else None}
    except (CFViTError, ImportError) as exc:
        return {"status": "skipped", "reason": str(exc), "unavailable": isinstance(exc, (ProviderError, ImportError))}
    except Exception as exc:  # a benchmark reports a broken cell and goes on with the others
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_cell` in a fresh Python process (the same interpreter and source tree)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="cfvit-bench-cell.") as tmp:
        spec_path, out_path = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        # cwd=_ROOT: a file in the caller's folder must not shadow a module; the spec's paths are absolute
        proc = subprocess.run(
            [sys.executable, "-m", "cfvit_deploy.app.bench.worker", str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=_ROOT,
        )
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": "error", "reason": f"benchmark process exited with {proc.returncode}: {tail[:300]}"}
        return json.loads(out_path.read_text())


def main(argv: list[str]) -> int:
    """``python -m cfvit_deploy.app.bench.worker SPEC.json OUT.json`` (internal)."""
    spec_path, out_path = argv
    result = measure_cell(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
