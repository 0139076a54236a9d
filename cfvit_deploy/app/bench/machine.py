"""What the numbers were measured on: the machine, its fp32 GEMM peak, and the load of other processes.

Shared machines: every row records the CPU share other processes used while the cell ran
(``background_cpu_pct``); with ``quiet_below`` a disturbed cell waits for quiet and is re-measured.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from cfvit_deploy.extras import require

#: Side of the square fp32 GEMM that measures the machine's matmul peak.
MATMUL_N = 2048
#: Re-measurements of a cell disturbed by other processes, and the longest wait for quiet (s).
QUIET_RETRIES, QUIET_WAIT_S = 2, 60.0
_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse|ssse|vnni|avx512)")


def _psutil() -> Any:
    return require("psutil", "bench", purpose="cfvit bench")


def measure_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """Best and median fp32 GFLOP/s of an N^3 ONNX Runtime MatMul on `spec["threads"]` threads (B is a
    constant, prepacked like the graphs' weights). Needs onnx to build the graph (the export extra)."""
    import onnxruntime as ort

    from .timing import timed_loop

    onnx = require("onnx", purpose="measuring the GEMM peak")
    helper, numpy_helper, tensor = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    n = spec["n"]
    rng = np.random.default_rng(0)
    info = [helper.make_tensor_value_info(name, tensor.FLOAT, [n, n]) for name in ("a", "c")]
    weight = numpy_helper.from_array(rng.random((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", info[:1], info[1:], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = spec["threads"], 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"a": rng.random((n, n), dtype=np.float32)}
    times, _ = timed_loop(lambda i: session.run(None, feeds), 1, 2, spec["iterations"], 0.0)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / float(np.median(times)) / 1e9}


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if _FLAG.match(f))
    return (model.group(1).strip() if model else platform.processor()), simd


#: CPU features that decide int8 GEMM speed, fastest first (ONNX Runtime's MLAS and OpenVINO's oneDNN
#: use the best they find): /proc/cpuinfo flag -> name.
INT8_UNITS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))


def int8_units(flags: list[str]) -> str:
    """The int8 matrix units of a CPU, by its flags ("none" when it multiplies int8 with plain AVX2 / AVX-512)."""
    found = [name for flag, name in INT8_UNITS if flag in flags]
    return " + ".join(found) if found else "none (no VNNI)"


def gpu_name() -> str | None:
    """The GPU nvidia-smi reports (name, memory, driver), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _version(dist: str, *alternatives: str) -> str | None:
    for name in (dist, *alternatives):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """CPU model and SIMD flags, cores, RAM, GPU, library versions, load average."""
    psutil = _psutil()
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "int8_units": int8_units(flags),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
            "openvino": _version("openvino"),
            "torch": _version("torch"),
            "numpy": np.__version__,
        },
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def default_threads() -> int:
    """Physical cores (the default for every runtime's intra-op threads), at most the CPUs this process
    may run on (`taskset`, a cpuset)."""
    from runtimes.backends import pinned_cpus

    physical = _psutil().cpu_count(logical=False) or os.cpu_count() or 1
    return min(physical, pinned_cpus() or physical)


# -- concurrent load ----------------------------------------------------------------------------------
def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its finished children)."""
    psutil = _psutil()
    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


def cpu_snapshot() -> tuple[float, float, float]:
    """The snapshot :func:`background_cpu_pct` measures from (wall s, machine busy CPU s, own CPU s)."""
    return _cpu_snapshot()


def background_cpu_pct(before: tuple[float, float, float]) -> float:
    """CPU time other processes used since `before`, as % of all cores' wall time."""
    wall, busy, own = (b - a for a, b in zip(before, _cpu_snapshot(), strict=True))
    return max(0.0, 100.0 * (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_for_quiet(threshold_pct: float, max_wait_s: float, say: Callable[[str], None]) -> float:
    """Wait (up to `max_wait_s`) until the machine's CPU use over one second is below `threshold_pct`."""
    psutil = _psutil()
    start = perf_counter()
    while (busy := psutil.cpu_percent(interval=1.0)) >= threshold_pct and perf_counter() - start < max_wait_s:
        say(f"waiting for a quieter machine (CPU {busy:.0f}% busy)")
    return busy


def measure_quietly(
    measure: Callable[[dict[str, Any]], dict[str, Any]],
    spec: dict[str, Any],
    quiet_below: float | None,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], float]:
    """Measure a cell; with `quiet_below`, wait for a quiet machine and retry while others interfered."""
    best: tuple[dict[str, Any], float] | None = None
    for _ in range(1 + (QUIET_RETRIES if quiet_below is not None else 0)):
        if quiet_below is not None:
            wait_for_quiet(quiet_below, QUIET_WAIT_S, say)
        before = _cpu_snapshot()
        raw = measure(spec)
        background = background_cpu_pct(before)
        if best is None or background < best[1]:
            best = (raw, background)
        if quiet_below is None or background < quiet_below or "times" not in raw:
            break
        say(f"other processes used {background:.0f}% of the CPUs during the cell: measuring it again")
    assert best is not None
    return best
