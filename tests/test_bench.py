"""`cfvit bench` / `runtimes.bench.run_bench`: schema, stage split, synthetic gate, skips, outputs.

Tiny upstream model; no timing thresholds (the machine may be loaded).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.errors import OutputExistsError, UsageError
from runtimes.bench import (
    ROW_FIELDS,
    BenchResult,
    BenchRow,
    eta_for_fine_fraction,
    latency_stats,
    pool_size,
    render_table,
    run_bench,
)

FRACTIONS = (0.24, 0.52, 1.0)
REQUIRED = {
    "runtime": str, "provider": str, "precision": str, "batch_size": int, "eta": float, "fine_fraction": float,
    "p50_ms": float, "p90_ms": float, "p99_ms": float, "mean_ms": float, "img_per_s": float, "coarse_ms": float,
    "gate_ms": float, "fine_ms": float, "speedup_vs_baseline": float,
}


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7", baseline=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench") / "out"


@pytest.fixture(scope="module")
def result(export_dir, out) -> BenchResult:
    """fp32 + int8 (built on the fly), cpu + an openvino that cannot be imported, batch 1 and 5, in-process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError -> ProviderError
        return run_bench(export_dir, providers=("cpu", "openvino"), precisions=("fp32", "int8"), batch_sizes=(1, 5),
                         fine_fractions=FRACTIONS, iterations=1, warmup=1, isolation="inline", out=out)


def _ok(result: BenchResult, **match) -> list[BenchRow]:
    return result.find(**match)


def test_cells_cover_the_grid(result):
    ok = _ok(result, runtime="onnxruntime")
    assert {(r.precision, r.batch_size, r.model) for r in ok} == {
        (p, b, m) for p in ("fp32", "int8") for b in (1, 5) for m in ("cfvit", "baseline")}
    pipe = [r for r in ok if r.model == "cfvit"]
    assert sorted({r.target_fine_fraction for r in pipe}) == sorted(FRACTIONS)
    assert len(pipe) == 2 * 2 * 3  # fraction 1.0 is the eta = 1 row: no extra cell
    assert all(r.eta == 1.0 for r in pipe if r.target_fine_fraction == 1.0)


def test_json_schema(result, out):
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"rows", "machine", "settings", "notes"}
    assert len(data["rows"]) == len(result.rows)
    for row in data["rows"]:
        assert set(row) == set(ROW_FIELDS)
        if row["status"] != "ok" or row["model"] != "cfvit":
            continue
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind) or (kind is float and isinstance(row[key], int)), (key, row[key])
            if kind is float:
                assert math.isfinite(row[key])
    machine = data["machine"]
    for key in ("cpu_model", "cpu_flags", "physical_cores", "ram_gb", "gpu", "versions", "matmul_peak_gflops",
                "threads", "spin", "ort_threading"):
        assert key in machine
    assert set(machine["versions"]) >= {"onnxruntime", "openvino", "torch", "numpy"}
    assert machine["matmul_peak_gflops"] > 0
    assert data["settings"]["threads"] >= 1 and data["settings"]["spin"] in (True, False)
    assert data["settings"]["isolation"] == "inline"
    measured = [row for row in data["rows"] if row["status"] == "ok"]
    assert all(isinstance(row["background_cpu_pct"], float) and row["background_cpu_pct"] >= 0 for row in measured)


def test_csv_and_plots(result, out):
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ROW_FIELDS and len(rows) == len(result.rows)
    for name in ("latency.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fine_fraction_gate_sends_that_share_to_fine(result):
    for r in _ok(result, model="cfvit", runtime="onnxruntime"):
        pool = pool_size(r.batch_size)
        assert abs(r.fine_fraction - r.target_fine_fraction) <= 0.5 / pool + 1e-9, r
        assert r.exit_rate == pytest.approx(1 - r.fine_fraction)
        assert (r.fine_ms > 0) == (r.fine_fraction > 0)
    assert any("synthetic gate" in n for n in result.notes)


def test_unavailable_provider_rows_are_skipped_with_a_reason(result):
    ov = [r for r in result.rows if r.provider == "openvino"]
    assert ov and all(r.status == "skipped" and "openvino" in r.reason for r in ov)
    assert all(r.mean_ms is None and r.speedup_vs_baseline is None for r in ov)
    caption = str(render_table(result).caption)
    assert "openvino" in caption


def test_missing_baseline_is_a_skip_row(export_dir_factory):
    r = run_bench(export_dir_factory("deit_g7"), batch_sizes=(2,), fine_fractions=(0.5,), iterations=1, warmup=0,
                  isolation="inline")
    base = [row for row in r.rows if row.model == "baseline"]
    assert base and all(row.status == "skipped" and "--baseline" in row.reason for row in base)
    assert all(row.speedup_vs_baseline is None for row in r.rows)
    assert [row.status for row in r.rows if row.model == "cfvit"] == ["ok", "ok"]  # f=0.5 and eta=1


def test_real_images_with_eta(export_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    r = run_bench(export_dir, batch_sizes=(2,), etas=(0.5,), images=folder, iterations=1, warmup=0, isolation="inline")
    pipe = r.find(model="cfvit")
    assert [(p.gate, p.eta) for p in pipe] == [("eta", 0.5), ("eta", 1.0)]
    assert pipe[1].fine_fraction == 1.0 and 0.0 <= pipe[0].fine_fraction <= 1.0
    assert r.settings["inputs"] == str(folder)
    assert not any("synthetic gate" in n for n in r.notes)


def test_process_isolation_reports_peak_rss_and_repeat_spread(export_dir):
    r = run_bench(export_dir, batch_sizes=(3,), fine_fractions=(0.5,), iterations=1, warmup=0, repeats=2)
    assert r.settings["isolation"] == "process" and r.settings["ort_threading"] == "shared"
    ok = r.find()
    assert len(ok) == 3 and all(row.isolation == "process" and row.peak_rss_mb > 10 for row in ok)
    assert all(row.repeat_spread_pct >= 0 for row in ok)


def test_eta_for_fine_fraction_is_exact():
    conf = np.random.default_rng(1).random(200).astype(np.float32)
    for f in (0.0, 0.01, 0.24, 0.5, 0.52, 0.999, 1.0):
        eta = eta_for_fine_fraction(conf, f)
        assert 0.0 <= eta <= 1.0
        assert (conf < np.float32(eta)).mean() == pytest.approx(round(f * 200) / 200)


def test_latency_stats():
    s = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=4)
    assert s["mean_ms"] == pytest.approx(25.0) and s["p50_ms"] == pytest.approx(25.0)
    assert s["img_per_s"] == pytest.approx(160.0)
    assert s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= 40.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(precisions=("fp64",)), "unknown precision"),
    (dict(providers=("gpu",)), "unknown provider"),
    (dict(batch_sizes=(0,)), "batch sizes"),
    (dict(fine_fractions=(1.5,)), "fine fractions"),
    (dict(etas=(2.0,)), "eta"),
    (dict(iterations=3, duration=1.0), "not both"),
    (dict(isolation="thread"), "isolation"),
    (dict(ort_threading="pooled"), "ort_threading"),
    (dict(repeats=0), "repeats"),
    (dict(ort_threading="shared", isolation="inline"), "process isolation"),
    (dict(torch=True, checkpoint="/nonexistent.pth"), "--torch"),
])
def test_usage_errors_come_before_any_work(export_dir, kwargs, message):
    with pytest.raises(UsageError, match=message):
        run_bench(export_dir, **kwargs)


def test_existing_out_is_refused_without_force(export_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        run_bench(export_dir, out=out)


def test_cli_exit_codes(export_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["bench", str(export_dir), "--batch-sizes", "2", "--fine-fraction", "0.5", "--iterations", "1",
            "--warmup", "0", "--in-process", "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "cfvit bench" in captured.out and "synthetic gate" in captured.out
    assert json.loads((out / "results.json").read_text())["rows"]
    assert cli.main(args) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert cli.main(["bench", str(tmp_path / "nope")]) == 1
    assert cli.main(["bench", str(export_dir), "--precisions", "fp64"]) == 2
    assert cli.main(["bench", str(export_dir), "--iterations", "2", "--duration", "1"]) == 2
    assert cli.main(["bench", str(export_dir), "--batch-sizes", "x"]) == 2
    capsys.readouterr()


def test_cli_nothing_measured_exits_1(export_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert cli.main(["bench", str(export_dir), "--providers", "openvino", "--batch-sizes", "2", "--iterations", "1",
                     "--in-process"]) == 1
    assert "skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_torch_rows(export_dir, export_dir_factory):
    from tests.conftest import UpstreamFixture

    r = run_bench(export_dir, batch_sizes=(2,), fine_fractions=(0.5,), iterations=1, warmup=0, torch=True,
                  checkpoint=UpstreamFixture("deit_g7").pth)
    rows = r.find(runtime="torch")
    assert {(row.model, row.target_fine_fraction) for row in rows} == {("baseline", None), ("cfvit", 0.5),
                                                                      ("cfvit", None)}
    for row in rows:
        assert row.coarse_ms is None and row.speedup_vs_baseline > 0 and row.baseline_precision == "fp32"
    half = next(row for row in rows if row.target_fine_fraction == 0.5)
    assert abs(half.fine_fraction - 0.5) <= 0.5 / pool_size(2)


def test_disturbed_cells_are_measured_again(monkeypatch):
    import runtimes.bench as bench

    loads = iter([80.0, 40.0, 60.0, 99.0])
    monkeypatch.setattr(bench, "background_cpu_pct", lambda before: next(loads))
    monkeypatch.setattr(bench, "wait_for_quiet", lambda *a: 0.0)
    calls = []

    def measure(spec):
        calls.append(spec)
        return {"times": [len(calls)]}

    raw, background = bench._measure_quietly(measure, {}, 25.0, lambda msg: None)
    assert len(calls) == 1 + bench.QUIET_RETRIES and (raw, background) == ({"times": [2]}, 40.0)
    calls.clear()
    assert bench._measure_quietly(measure, {}, None, lambda msg: None)[0] == {"times": [1]}  # no retries


def test_shared_thread_pool_serves_both_graphs_with_one_size(export_dir):
    """In a fresh process: the coarse and fine sessions share one pool; a per-session pool or another
    size is refused afterwards (ONNX Runtime cannot mix them)."""
    code = f"""
import numpy as np
from cfvit_deploy.errors import UsageError
from runtimes import CFViTPipeline, SessionConfig
x = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
ref = CFViTPipeline({str(export_dir)!r}, config=SessionConfig(threads=2)).run(x, 1.0).logits
pipe = CFViTPipeline({str(export_dir)!r}, config=SessionConfig(threads=2, shared_threads=True))
np.testing.assert_allclose(pipe.run(x, 1.0).logits, ref, rtol=1e-5, atol=1e-5)
for config in (SessionConfig(threads=1, shared_threads=True), SessionConfig(threads=2)):
    try:
        CFViTPipeline({str(export_dir)!r}, config=config)
    except UsageError as exc:
        print("refused:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(cli.__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the shared ONNX Runtime thread pool of this process has 2 threads" in proc.stdout
    assert "refused: this process already runs ONNX Runtime sessions on the shared thread pool" in proc.stdout
