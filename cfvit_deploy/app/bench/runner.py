"""Benchmarks: latency, throughput and per-stage cost of the gated pipeline next to the plain ViT.

A *cell* is runtime/provider x precision x model (CF-ViT pipeline or plain-ViT baseline) x batch
size x gate. Each cell creates its sessions once, runs an untimed warm-up, then times whole calls
on preallocated inputs: for the pipeline the timer covers the orchestrator call (coarse run, gate,
gather, fine run, merge), and the pipeline's own split gives the per-stage times.

Isolation: by default every cell runs in a fresh Python process. Idle ONNX Runtime and PyTorch
worker threads keep spinning for a while after a call and slow whatever runs next in the same
process, so running runtimes one after another in one process would penalise the later ones; a
fresh process also gives a per-cell peak RSS. The same trap exists inside the pipeline (the coarse
session's pool spins while the fine session runs), so by default the ONNX Runtime sessions of a
cell share one thread pool (``ort_threading="shared"``). ``isolation="inline"`` runs the cells in
this process (fast, for smoke tests; numbers may be biased and peak RSS is not reported).

Shared machines: every row records the CPU share other processes used while the cell ran
(``background_cpu_pct``); with ``quiet_below`` a disturbed cell waits for quiet and is re-measured.

Fine-fraction gating is *synthetic*: η is set, per cell, to the coarse-confidence quantile of the
benchmark inputs that sends the requested fraction f to the fine stage (confidences from the same
runtime, precision and batch size). It measures what a given exit rate costs on any model, trained
or random. With real images (``images=``) and ``etas=``, the measured fine fraction is reported.

Torch-free: PyTorch is imported only by the cells of ``torch=True``. ``python -m runtimes.bench
SPEC OUT`` is the per-cell worker (internal).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from cfvit_deploy.errors import CFViTError, ManifestError, ProviderError, UsageError
from cfvit_deploy.flops import baseline_gmacs, stage_gmacs
from cfvit_deploy.io import atomic_directory, atomic_write_path, check_output
from cfvit_deploy.manifest import Manifest

from .backends import SessionConfig, check_provider, create_backend
from .pipeline import CFViTPipeline, check_eta

#: ``--precisions`` names: a variant of the fp32 export (built with :func:`exporters.variants.make_variant`).
PRECISIONS = {
    "fp32": ("fp32", False),
    "fp16": ("fp16", False),
    "int8": ("int8", False),
    "optimized": ("fp32", True),
    "int8-optimized": ("int8", True),
}
DEFAULT_FINE_FRACTIONS = (0.24, 0.52, 1.0)
#: Smallest input pool (images); batch 1 cycles through it, so fractions are exact to 1/25.
MIN_POOL = 25
#: Most images read from an ``images`` folder.
MAX_IMAGES = 256
#: Fewest timed calls in duration mode.
MIN_ITERATIONS = 5
DEFAULT_DURATION_S = 3.0
#: Re-measurements of a cell disturbed by other processes, and the longest wait for quiet (s).
QUIET_RETRIES, QUIET_WAIT_S = 2, 60.0
#: Side of the square fp32 GEMM that measures the machine's matmul peak.
MATMUL_N = 2048
SYNTHETIC_GATE_NOTE = (
    "fine_fraction rows use a synthetic gate: eta is set per cell to the coarse-confidence quantile of the "
    "benchmark inputs that sends that fraction of the images to the fine stage"
)
#: ``ort_threading`` modes -> SessionConfig settings. "shared": the coarse and fine sessions share one
#: spinning pool; "spin": a spinning pool per session (the idle one spins against the busy one);
#: "no-spin": a pool per session whose idle threads sleep (robust on a loaded machine).
ORT_THREADING: dict[str, dict[str, bool]] = {
    "shared": {"shared_threads": True},
    "spin": {"spin": True},
    "no-spin": {"spin": False},
}
ISOLATION_NOTES = {
    "process": "each cell ran in its own Python process (no spinning worker threads left by another runtime)",
    "inline": "all cells ran in one process (smoke-test mode; idle worker threads of earlier cells may bias "
    "later ones; no per-cell peak RSS)",
}


@dataclass(frozen=True)
class Cell:
    """What one measurement runs (JSON-able: it is the spec handed to the worker)."""

    runtime: str  #: onnxruntime | openvino | torch
    provider: str  #: cpu | cuda | tensorrt | openvino
    precision: str  #: a key of PRECISIONS
    model: str  #: "cfvit" (gated pipeline) | "baseline" (plain ViT on all fine tokens)
    batch_size: int
    gate: str  #: "eta" | "fine_fraction" | "none" (baseline)
    value: float | None = None  #: η or the target fine fraction


@dataclass
class BenchRow:
    """One line of the results (times in ms per batch; None where it does not apply)."""

    runtime: str
    provider: str
    precision: str
    model: str
    batch_size: int
    gate: str
    eta: float | None = None
    target_fine_fraction: float | None = None
    fine_fraction: float | None = None  #: measured share of images that ran the fine stage
    exit_rate: float | None = None
    status: str = "ok"  #: ok | skipped | error
    reason: str = ""
    iterations: int = 0
    mean_ms: float | None = None
    std_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    img_per_s: float | None = None
    coarse_ms: float | None = None  #: coarse session run
    gate_ms: float | None = None  #: host: softmax, gate, sub-batch gather, merge
    fine_ms: float | None = None  #: fine session run
    overhead_pct: float | None = None  #: share of the call outside the two session runs
    fine_batch: float | None = None  #: mean images per fine run
    gmacs_per_image: float | None = None
    gflops: float | None = None  #: achieved 2*GMACs*img/s of the whole call
    pct_peak: float | None = None  #: gflops as % of the measured fp32 matmul peak
    coarse_gflops: float | None = None
    fine_gflops: float | None = None
    fine_pct_peak: float | None = None
    peak_rss_mb: float | None = None
    #: CPU used by other processes while the cell ran, % of all cores (concurrent load inflates the times)
    background_cpu_pct: float | None = None
    #: with repeats > 1: spread of the repeats' mean latencies, 100 * (slowest - fastest) / fastest
    repeat_spread_pct: float | None = None
    speedup_vs_baseline: float | None = None
    baseline_precision: str | None = None  #: precision of the baseline row the speedup refers to
    isolation: str = "process"

    @classmethod
    def for_cell(cls, cell: Cell, isolation: str, **values: Any) -> "BenchRow":
        row = cls(cell.runtime, cell.provider, cell.precision, cell.model, cell.batch_size, cell.gate,
                  isolation=isolation)
        if cell.gate == "eta":
            row.eta = cell.value
        elif cell.gate == "fine_fraction":
            row.target_fine_fraction = cell.value
        return replace(row, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FIELDS = tuple(f.name for f in fields(BenchRow))


@dataclass
class BenchResult:
    """Rows plus the machine and settings they were measured on."""

    rows: list[BenchRow]
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "machine": self.machine, "settings": self.settings,
                "notes": self.notes}

    def find(self, **match: Any) -> list[BenchRow]:
        """Measured rows whose fields equal `match`."""
        return [r for r in self.rows if r.status == "ok" and all(getattr(r, k) == v for k, v in match.items())]

    def write_files(self, directory: str | Path) -> list[Path]:
        """results.json, results.csv, latency.png and throughput.png in `directory`, each replaced atomically."""
        directory = Path(directory)
        with atomic_write_path(directory / "results.json") as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, default=_json_default) + "\n")
        with atomic_write_path(directory / "results.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(r.to_dict() for r in self.rows)
        return [directory / "results.json", directory / "results.csv", *plot(self, directory)]

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write :meth:`write_files` into a new folder `out` (replaced only with `force`), atomically."""
        with atomic_directory(Path(out), force=force) as tmp:
            self.write_files(tmp)
        return Path(out)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- gate and statistics ----------------------------------------------------------------------------
def eta_for_fine_fraction(confidence: np.ndarray, fraction: float) -> float:
    """The η that sends round(fraction * n) of the n images (the least confident) to the fine stage.

    η is one of the float32 confidences itself, so ``confidence >= η`` splits exactly at it (barring ties).
    """
    c = np.sort(np.asarray(confidence, dtype=np.float32).ravel())
    m = int(math.floor(fraction * c.size + 0.5))
    if m <= 0:
        return 0.0
    if m >= c.size:
        return 1.0
    return float(c[m])


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """mean/std/P50/P90/P95/P99 in ms per batch, and images per second."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    stats = {"mean_ms": float(ms.mean()), "std_ms": float(ms.std())}
    for p in (50, 90, 95, 99):
        stats[f"p{p}_ms"] = float(np.percentile(ms, p))
    stats["img_per_s"] = batch_size * 1e3 / stats["mean_ms"]
    return stats


def pool_size(batch_size: int, available: int | None = None) -> int:
    """Images per input pool: whole batches, at least MIN_POOL images (or all `available` real images)."""
    return batch_size * math.ceil(max(available or MIN_POOL, 1) / batch_size)


# -- the measurement (runs in the worker process, or inline) ------------------------------------------
def _timed_loop(call: Callable[[int], Any], n_batches: int, warmup: int, iterations: int | None,
                duration: float) -> tuple[list[float], list[Any]]:
    """`warmup` untimed calls, then timed calls (`iterations`, or at least `duration` seconds and
    MIN_ITERATIONS calls) ending on a whole pass over the `n_batches` input batches."""
    for i in range(warmup):
        call(i)
    times: list[float] = []
    outputs: list[Any] = []
    start = perf_counter()
    i = 0
    while True:
        t0 = perf_counter()
        out = call(i)
        times.append(perf_counter() - t0)
        outputs.append(out)
        i += 1
        done = i >= iterations if iterations else (i >= MIN_ITERATIONS and perf_counter() - start >= duration)
        if done and i % n_batches == 0:
            return times, outputs


def _peak_rss_mb() -> float | None:
    """This process's peak RSS: VmHWM (ru_maxrss would include the parent's RSS at fork on Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s*(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


def _batches(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(pool[i : i + batch_size]) for i in range(0, len(pool), batch_size)]


def _measure_onnx(spec: dict[str, Any], cell: Cell, batches: list[np.ndarray]) -> dict[str, Any]:
    manifest = Manifest.load(spec["export_dir"])
    config = SessionConfig(threads=spec["threads"], **ORT_THREADING[spec["ort_threading"]])
    n, warmup, iterations, duration = len(batches), spec["warmup"], spec["iterations"], spec["duration"]
    if cell.model == "baseline":
        if "baseline" not in manifest.graphs:
            raise ManifestError("the export has no baseline.onnx (re-export with --baseline)")
        backend = create_backend(manifest, cell.provider, config, graphs=("baseline",))
        times, _ = _timed_loop(lambda i: backend.run("baseline", {"images": batches[i % n]}), n, warmup,
                               iterations, duration)
        return {"times": times}
    pipe = CFViTPipeline(manifest, cell.provider, config)
    eta = cell.value
    if cell.gate == "fine_fraction":
        confidence = np.concatenate([pipe.run(b, 0.0).confidence for b in batches])
        eta = eta_for_fine_fraction(confidence, float(cell.value))

    def call(i: int) -> tuple[float, float, float, int]:
        r = pipe.run(batches[i % n], eta)
        return r.timings.coarse_s, r.timings.gate_s, r.timings.fine_s, int(len(r.exited) - r.exited.sum())

    if warmup:
        pipe.run(batches[0], 1.0)  # both sessions run at least once, whatever the gate lets through
    times, stages = _timed_loop(call, n, max(warmup - 1, 0), iterations, duration)
    return {"times": times, "stages": stages, "eta": eta}


def _measure_torch(spec: dict[str, Any], cell: Cell, batches: list[np.ndarray]) -> dict[str, Any]:
    import torch

    from cfvit_deploy.checkpoints import load_checkpoint
    from cfvit_deploy.model import confidence

    torch.set_num_threads(spec["threads"])
    manifest = Manifest.load(spec["export_dir"], verify=False)
    model = load_checkpoint(spec["checkpoint"], config=manifest.model)
    tensors = [torch.from_numpy(b) for b in batches]
    n, warmup, iterations, duration = len(tensors), spec["warmup"], spec["iterations"], spec["duration"]
    with torch.inference_mode():
        if cell.model == "baseline":
            times, _ = _timed_loop(lambda i: model.fine_stage_dense(tensors[i % n], None), n, warmup, iterations,
                                   duration)
            return {"times": times}
        eta = cell.value
        if cell.gate == "fine_fraction":
            conf = torch.cat([confidence(model.coarse_stage(t).logits) for t in tensors]).numpy()
            eta = eta_for_fine_fraction(conf, float(cell.value))

        def call(i: int) -> tuple[None, None, None, int]:
            exited = model.predict(tensors[i % n], eta).exited
            return None, None, None, int(len(exited) - int(exited.sum()))

        if warmup:
            model.predict(tensors[0], 1.0)
        times, stages = _timed_loop(call, n, max(warmup - 1, 0), iterations, duration)
    return {"times": times, "stages": stages, "eta": eta}


def _measure_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """Best fp32 GFLOP/s of an N^3 ONNX Runtime MatMul with the benchmark's thread settings (B is a
    constant, prepacked like the graphs' weights)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = spec["n"]
    rng = np.random.default_rng(0)
    info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "c")]
    weight = numpy_helper.from_array(rng.random((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", info[:1], info[1:], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = spec["threads"], 1
    if spec["ort_threading"] == "no-spin":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"a": rng.random((n, n), dtype=np.float32)}
    times, _ = _timed_loop(lambda i: session.run(None, feeds), 1, 2, spec["iterations"], 0.0)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / float(np.median(times)) / 1e9}


def measure_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell described by `spec`; returns raw measurements, or ``status``/``reason`` when it cannot run."""
    try:
        if spec.get("kind") == "matmul":
            return _measure_matmul(spec)
        cell = Cell(**spec["cell"])
        pool = np.load(spec["inputs"])[: spec["pool"]]
        batches = _batches(pool, cell.batch_size)
        del pool
        measured = (_measure_torch if cell.runtime == "torch" else _measure_onnx)(spec, cell, batches)
        return {**measured, "peak_rss_mb": _peak_rss_mb() if spec["isolation"] == "process" else None}
    except (CFViTError, ImportError) as exc:
        return {"status": "skipped", "reason": str(exc), "unavailable": isinstance(exc, (ProviderError, ImportError))}
    except Exception as exc:  # a benchmark reports a broken cell and goes on with the others
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}


def _run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_cell` in a fresh Python process (the same interpreter and source tree)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="cfvit-bench-cell.") as tmp:
        spec_path, out_path = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "runtimes.bench", str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": "error", "reason": f"benchmark process exited with {proc.returncode}: {tail[:300]}"}
        return json.loads(out_path.read_text())


# -- machine description ----------------------------------------------------------------------------
_FLAG = re.compile(r"^(avx|amx|fma|f16c|sse|ssse|vnni|avx512)")


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if _FLAG.match(f))
    return (model.group(1).strip() if model else platform.processor()), simd


def _gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
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
    import psutil

    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu(),
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


# -- concurrent load ----------------------------------------------------------------------------------
def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its finished children)."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


def background_cpu_pct(before: tuple[float, float, float]) -> float:
    """CPU time other processes used since `before`, as % of all cores' wall time."""
    wall, busy, own = (b - a for a, b in zip(before, _cpu_snapshot()))
    return max(0.0, 100.0 * (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_for_quiet(threshold_pct: float, max_wait_s: float, say: Callable[[str], None]) -> float:
    """Wait (up to `max_wait_s`) until the machine's CPU use over one second is below `threshold_pct`."""
    import psutil

    start = perf_counter()
    while (busy := psutil.cpu_percent(interval=1.0)) >= threshold_pct and perf_counter() - start < max_wait_s:
        say(f"waiting for a quieter machine (CPU {busy:.0f}% busy)")
    return busy


# -- planning ---------------------------------------------------------------------------------------
def _precision_label(manifest: Manifest) -> str:
    if manifest.optimized:
        return "optimized" if manifest.precision == "fp32" else f"{manifest.precision}-optimized"
    return manifest.precision


def _variant(export_dir: Path, manifest: Manifest, precision: str, cache: Path) -> Path:
    """The export folder holding `precision`: the export itself, or a variant built (once) in `cache`."""
    if precision == _precision_label(manifest):
        return export_dir
    from exporters.variants import make_variant

    target = cache / manifest.graphs["coarse"].sha256[:16] / precision
    try:
        Manifest.load(target)
        return target
    except ManifestError:
        target.parent.mkdir(parents=True, exist_ok=True)
    prec, optimize = PRECISIONS[precision]
    make_variant(export_dir, target, prec, optimize, force=True)
    return target


def _load_pool(manifest: Manifest, images: Path | None, batch_sizes: Sequence[int]) -> tuple[np.ndarray, int | None]:
    """(pool, number of real images): preprocessed files from `images` (repeated to whole batches), else
    seeded normal noise; large enough for :func:`pool_size` of every batch size."""
    s = manifest.image_size
    if images is None:
        size = max(pool_size(b) for b in batch_sizes)
        return np.random.default_rng(0).standard_normal((size, 3, s, s), dtype=np.float32), None
    from cfvit_deploy.preprocessing import load_and_preprocess

    from .infer import collect_inputs

    if not Path(images).is_dir():
        raise UsageError(f"--images must be a folder of images, got {images}")
    arrays = []
    for path in collect_inputs([images], recursive=True):
        try:
            arrays.append(load_and_preprocess(path, manifest.preprocessing))
        except CFViTError:
            continue
        if len(arrays) == MAX_IMAGES:
            break
    if not arrays:
        raise UsageError(f"no readable images in {images}")
    n = len(arrays)
    return np.stack([arrays[i % n] for i in range(max(pool_size(b, n) for b in batch_sizes))]), n


def _cells(runtimes: list[tuple[str, str]], precisions: Sequence[str], batch_sizes: Sequence[int],
           gates: list[tuple[str, float]], torch: bool) -> list[Cell]:
    cells = []
    for runtime, provider in runtimes:
        for precision in precisions:
            for b in batch_sizes:
                cells.append(Cell(runtime, provider, precision, "baseline", b, "none"))
                cells.extend(Cell(runtime, provider, precision, "cfvit", b, g, v) for g, v in gates)
    if torch:
        for b in batch_sizes:
            cells.append(Cell("torch", "cpu", "fp32", "baseline", b, "none"))
            cells.extend(Cell("torch", "cpu", "fp32", "cfvit", b, g, v) for g, v in gates)
    return cells


def _check_args(providers: Sequence[str], precisions: Sequence[str], batch_sizes: Sequence[int],
                etas: Sequence[float], fine_fractions: Sequence[float], warmup: int, iterations: int | None,
                duration: float | None, threads: int | None) -> None:
    for p in providers:
        check_provider(p)
    for p in precisions:
        if p not in PRECISIONS:
            raise UsageError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if not batch_sizes or any(isinstance(b, bool) or int(b) != b or b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    for e in etas:
        check_eta(e)
    for f in fine_fractions:
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise UsageError(f"fine fractions must lie in [0, 1], got {f}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if iterations is not None and duration is not None:
        raise UsageError("give either --iterations or --duration, not both")
    if iterations is not None and iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {iterations}")
    if duration is not None and not duration > 0:
        raise UsageError(f"--duration must be > 0 seconds, got {duration}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")


# -- results ------------------------------------------------------------------------------------------
def _row(cell: Cell, raw: dict[str, Any], manifest: Manifest, peak: float | None, isolation: str) -> BenchRow:
    if "times" not in raw:
        return BenchRow.for_cell(cell, isolation, status=raw.get("status", "error"), reason=raw.get("reason", ""))
    b = cell.batch_size
    stats = latency_stats(raw["times"], b)
    row = BenchRow.for_cell(cell, isolation, iterations=len(raw["times"]), peak_rss_mb=raw.get("peak_rss_mb"), **stats)
    gm = stage_gmacs(manifest.model)
    if cell.model == "baseline":
        row.gmacs_per_image = baseline_gmacs(manifest.model)
    else:
        stages = raw["stages"]
        n_fine = np.array([s[3] for s in stages], dtype=np.float64)
        row.eta = raw["eta"]
        row.fine_fraction = float(n_fine.sum() / (b * len(stages)))
        row.exit_rate = 1.0 - row.fine_fraction
        row.fine_batch = float(n_fine[n_fine > 0].mean()) if n_fine.any() else 0.0
        row.gmacs_per_image = gm.expected(row.fine_fraction)
        if stages[0][0] is not None:  # the ONNX pipeline reports its own split
            coarse, gate, fine = (np.array([s[k] for s in stages]) for k in range(3))
            row.coarse_ms, row.gate_ms, row.fine_ms = (float(x.mean() * 1e3) for x in (coarse, gate, fine))
            row.overhead_pct = 100.0 * (stats["mean_ms"] - row.coarse_ms - row.fine_ms) / stats["mean_ms"]
            row.coarse_gflops = 2 * gm.coarse * b / float(coarse.mean())
            if fine.sum() > 0:
                row.fine_gflops = 2 * (gm.fine - gm.coarse) * float(n_fine.sum()) / float(fine.sum())
    row.gflops = 2 * row.gmacs_per_image * row.img_per_s
    if peak:
        row.pct_peak = 100 * row.gflops / peak
        row.fine_pct_peak = None if row.fine_gflops is None else 100 * row.fine_gflops / peak
    return row


def _speedups(rows: list[BenchRow]) -> None:
    """speedup_vs_baseline: the baseline of the same runtime/provider/precision/batch, else its fp32 one."""
    base = {(r.runtime, r.provider, r.precision, r.batch_size): r.img_per_s
            for r in rows if r.model == "baseline" and r.status == "ok"}
    for r in rows:
        if r.status != "ok":
            continue
        for precision in (r.precision, "fp32"):
            ref = base.get((r.runtime, r.provider, precision, r.batch_size))
            if ref:
                r.speedup_vs_baseline, r.baseline_precision = r.img_per_s / ref, precision  # type: ignore[operator]
                break


def _measure_quietly(measure: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any],
                     quiet_below: float | None, say: Callable[[str], None]) -> tuple[dict[str, Any], float]:
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


def run_bench(
    export_dir: str | Path,
    *,
    providers: Sequence[str] = ("cpu",),
    precisions: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    etas: Sequence[float] = (),
    fine_fractions: Sequence[float] | None = None,
    images: str | Path | None = None,
    warmup: int = 3,
    iterations: int | None = None,
    duration: float | None = None,
    threads: int | None = None,
    ort_threading: str | None = None,
    torch: bool = False,
    checkpoint: str | Path | None = None,
    isolation: str = "process",
    cache_dir: str | Path | None = None,
    quiet_below: float | None = None,
    repeats: int = 1,
    out: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark an export: pipeline and baseline cells per provider x precision x batch size x gate.

    `precisions` default to the export's own; others are built from the (fp32) export into
    `cache_dir` (default: a temporary folder). `fine_fractions` default to (0.24, 0.52, 1.0) when no
    `etas` are given; an η = 1 row (everything through both stages) is always added. `threads`
    defaults to the physical core count and is the same for every runtime; `ort_threading` picks
    how ONNX Runtime sessions use them (see ORT_THREADING; default "shared", or "no-spin" in
    process-wide "inline" isolation, where the shared pool would bind every later session). `torch` adds PyTorch eager rows (gated
    ``predict`` and the plain ViT ``fine_stage_dense``) from `checkpoint` (default: the checkpoint
    recorded in the manifest). With `quiet_below` (a CPU %), each cell waits (up to a minute) for
    other processes to use less than that share of the CPUs, and is measured again (up to
    QUIET_RETRIES times, keeping the cleanest) when they used more while it ran. With `repeats` > 1,
    all cells are measured that many times, in separate passes (fresh processes, minutes apart), and
    each cell keeps its fastest run: runs differ (slow spells of a shared host, memory placement),
    which ``repeat_spread_pct`` shows. With `out`, results
    are saved there (see :meth:`BenchResult.save`); an existing `out` is refused unless `force`.
    """
    import psutil

    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    providers = [p.strip() for p in providers]
    precisions = [p.strip() for p in precisions or [_precision_label(manifest)]]
    fine_fractions = list(DEFAULT_FINE_FRACTIONS if fine_fractions is None and not etas else fine_fractions or [])
    _check_args(providers, precisions, batch_sizes, etas, fine_fractions, warmup, iterations, duration, threads)
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    ort_threading = ort_threading or ("shared" if isolation == "process" else "no-spin")
    if ort_threading not in ORT_THREADING:
        raise UsageError(f"ort_threading must be one of {', '.join(ORT_THREADING)}, got {ort_threading!r}")
    if ort_threading == "shared" and isolation != "process":
        raise UsageError("ort_threading 'shared' needs process isolation (the pool would bind this whole process)")
    if isolation not in ISOLATION_NOTES:
        raise UsageError(f"isolation must be one of {', '.join(ISOLATION_NOTES)}, got {isolation!r}")
    if out is not None:
        check_output(Path(out), force)
    if torch:
        checkpoint = checkpoint or (manifest.source.get("checkpoint") or {}).get("path")
        if not checkpoint or not Path(checkpoint).is_file():
            raise UsageError(f"--torch needs the PyTorch checkpoint (--checkpoint); {checkpoint or 'none'} not found")
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    gates = [("fine_fraction", float(f)) for f in fine_fractions] + [("eta", float(e)) for e in etas]
    if 1.0 not in fine_fractions and 1.0 not in [float(e) for e in etas]:
        gates.append(("eta", 1.0))
    runtimes = [("openvino" if p == "openvino" else "onnxruntime", p) for p in providers]
    cells = _cells(runtimes, precisions, batch_sizes, gates, torch)
    say = progress or (lambda msg: None)
    spin = ort_threading != "no-spin"
    machine = {**machine_info(), "threads": threads, "spin": spin, "ort_threading": ort_threading}
    settings = {"threads": threads, "spin": spin, "ort_threading": ort_threading, "isolation": isolation, "warmup": warmup, "quiet_below": quiet_below,
                "repeats": repeats,
                "iterations": iterations, "duration_s": None if iterations else duration or DEFAULT_DURATION_S,
                "inputs": str(images) if images else "synthetic (seeded standard normal)", "export": str(export_dir),
                "export_precision": _precision_label(manifest), "model": manifest.model.to_dict()}
    base_spec = {"threads": threads, "ort_threading": ort_threading, "isolation": isolation, "warmup": warmup,
                 "iterations": iterations, "duration": duration or DEFAULT_DURATION_S, "checkpoint": str(checkpoint)}
    measure = _run_isolated if isolation == "process" else measure_cell
    with tempfile.TemporaryDirectory(prefix="cfvit-bench.") as tmp:
        peaks = []  # measured in every pass; the best counts (a slow spell lowers one)
        pool, n_real = _load_pool(manifest, Path(images) if images else None, batch_sizes)
        inputs = Path(tmp) / "inputs.npy"
        np.save(inputs, pool)
        del pool
        cache = Path(cache_dir) if cache_dir else Path(tmp) / "variants"
        variants: dict[str, Path | str] = {}
        unavailable: dict[tuple[str, str, str], str] = {}
        skipped: dict[int, BenchRow] = {}
        runs: dict[int, list[tuple[float, dict[str, Any], float]]] = {}
        for rep in range(repeats):  # repeats as separate passes: a slow spell of the machine hits one run
            say(f"measuring the fp32 matmul peak ({MATMUL_N}^3 ONNX Runtime MatMul, {threads} threads)")
            mm, background = _measure_quietly(
                measure, {**base_spec, "kind": "matmul", "n": MATMUL_N, "iterations": 4}, quiet_below, say)
            if "gflops" in mm:
                peaks.append((mm["gflops"], mm["median_gflops"], background))
            for i, cell in enumerate(cells):
                key = (cell.runtime, cell.provider, cell.precision)
                if cell.runtime != "torch" and cell.precision not in variants:
                    try:
                        if cell.precision != settings["export_precision"]:
                            say(f"building the {cell.precision} variant from the fp32 export")
                        variants[cell.precision] = _variant(export_dir, manifest, cell.precision, cache)
                    except CFViTError as exc:
                        variants[cell.precision] = f"cannot build the {cell.precision} variant: {exc}"
                where = export_dir if cell.runtime == "torch" else variants[cell.precision]
                if i in skipped:
                    continue
                if isinstance(where, str) or key in unavailable:
                    skipped[i] = BenchRow.for_cell(cell, isolation, status="skipped",
                                                   reason=unavailable.get(key) or str(where))
                    continue
                label = f"{cell.runtime}/{cell.provider} {cell.precision} {cell.model} b{cell.batch_size}" + (
                    f" {cell.gate}={cell.value:g}" if cell.value is not None else "")
                say(f"[{f'pass {rep + 1}/{repeats}, ' if repeats > 1 else ''}{i + 1}/{len(cells)}] {label}")
                spec = {**base_spec, "cell": asdict(cell), "export_dir": str(where), "inputs": str(inputs),
                        "pool": pool_size(cell.batch_size, n_real)}
                raw, background = _measure_quietly(measure, spec, quiet_below, say)
                if "times" not in raw:
                    if raw.get("unavailable"):
                        unavailable[key] = raw["reason"]
                    skipped[i] = _row(cell, raw, manifest, None, isolation)
                    continue
                runs.setdefault(i, []).append((float(np.mean(raw["times"])), raw, background))
    best = max(peaks) if peaks else (None, None, None)
    peak = best[0]
    machine["matmul_peak_gflops"], machine["matmul_median_gflops"], machine["matmul_background_cpu_pct"] = best
    rows: list[BenchRow] = []
    for i, cell in enumerate(cells):
        if i in skipped:
            rows.append(skipped[i])
            continue
        ordered = sorted(runs[i], key=lambda run: run[0])  # the fastest run of the cell
        rows.append(_row(cell, ordered[0][1], manifest, peak, isolation))
        rows[-1].background_cpu_pct = ordered[0][2]
        if repeats > 1:
            rows[-1].repeat_spread_pct = 100 * (ordered[-1][0] - ordered[0][0]) / ordered[0][0]
    _speedups(rows)
    machine["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    notes = [ISOLATION_NOTES[isolation]]
    if fine_fractions:
        notes.append(SYNTHETIC_GATE_NOTE)
    notes.append("coarse_ms/fine_ms: the session runs; gate_ms: host softmax, gate, gather and merge; overhead_pct: "
                 "everything outside the two session runs, from the whole-call timer")
    if peak:
        notes.append(f"pct_peak: achieved 2*GMACs*img/s against the measured fp32 matmul peak of {peak:.0f} GFLOP/s "
                     "(int8 and fp16 rows too)")
    result = BenchResult(rows, machine, settings, notes)
    if out is not None:
        result.save(out, force=force)
    return result


# -- presentation ---------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(result: BenchResult) -> Any:
    """A rich Table of every row; a skipped row points to its reason, listed in the caption."""
    from rich.markup import escape
    from rich.table import Table

    peak = result.machine.get("matmul_peak_gflops")
    table = Table(title=f"cfvit bench ({result.settings['threads']} threads, "
                        f"matmul peak {_fmt(peak, '.0f')} GFLOP/s)")
    for col in ("runtime", "prec", "model", "batch", "gate", "fine", "mean ms", "p50", "p99", "img/s",
                "coarse/gate/fine ms", "ovh %", "GFLOP/s (%pk)", "speedup", "RSS MB", "bg cpu %"):
        table.add_column(col, justify="left" if col in ("runtime", "prec", "model", "gate") else "right")
    reasons: dict[str, int] = {}
    for r in result.rows:
        gate = "-" if r.gate == "none" else (f"f={r.target_fine_fraction:g}" if r.gate == "fine_fraction"
                                             else f"eta={_fmt(r.eta, 'g')}")
        head = [f"{r.runtime}/{r.provider}", r.precision, r.model, str(r.batch_size), gate]
        if r.status != "ok":
            n = reasons.setdefault(r.reason, len(reasons) + 1)
            table.add_row(*head, f"[yellow]{r.status} [{n}][/yellow]", *[""] * 10)
            continue
        split = "-" if r.coarse_ms is None else f"{r.coarse_ms:.1f}/{r.gate_ms:.2f}/{r.fine_ms:.1f}"
        table.add_row(*head, _fmt(r.fine_fraction, ".2f"), f"{r.mean_ms:.1f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
                      f"{r.img_per_s:.1f}", split, _fmt(r.overhead_pct, ".1f"),
                      f"{r.gflops:.0f} ({_fmt(r.pct_peak, '.0f')})", _fmt(r.speedup_vs_baseline, ".2f") + "x",
                      _fmt(r.peak_rss_mb, ".0f"), _fmt(r.background_cpu_pct, ".0f"))
    if reasons:
        table.caption = "\n".join(f"[{n}] {escape(reason)}" for reason, n in reasons.items())
        table.caption_justify = "left"
    return table


def plot(result: BenchResult, directory: Path) -> list[Path]:
    """latency.png and throughput.png: per batch size, one line per runtime/precision over the fine
    fraction, the baseline of the same runtime/precision as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({r.batch_size for r in result.rows})
    paths = []
    for metric, name, label in (("mean_ms", "latency.png", "latency per batch (ms)"),
                                ("img_per_s", "throughput.png", "images/s")):
        fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4.2), squeeze=False)
        for ax, b in zip(axes[0], batch_sizes):
            series = sorted({(r.runtime, r.provider, r.precision) for r in result.find(batch_size=b)})
            for j, (runtime, provider, precision) in enumerate(series):
                color = f"C{j % 10}"
                key = dict(runtime=runtime, provider=provider, precision=precision, batch_size=b)
                points = sorted((r.fine_fraction, getattr(r, metric)) for r in result.find(model="cfvit", **key))
                name_ = f"{runtime}/{provider} {precision}"
                if points:
                    ax.plot(*zip(*points), marker="o", color=color, label=f"CF-ViT {name_}")
                for r in result.find(model="baseline", **key):
                    ax.axhline(getattr(r, metric), color=color, linestyle="--", label=f"baseline {name_}")
            ax.set(title=f"batch {b}", xlabel="fine fraction (measured)", ylabel=label, xlim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write_path(directory / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(directory / name)
    return paths


def _worker_main(argv: list[str]) -> int:
    spec_path, out_path = argv
    result = measure_cell(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
