"""`cfvit bench` / `cfvit_deploy.app.bench.run_bench`: schema, stage split, synthetic gate, skips, outputs.

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
from cfvit_deploy.app.bench import ROW_FIELDS, BenchResult, BenchRow, NothingMeasuredError, render_table, run_bench
from cfvit_deploy.app.bench.plan import check_request, pool_size
from cfvit_deploy.app.bench.results import latency_stats
from cfvit_deploy.app.bench.worker import eta_for_fine_fraction
from cfvit_deploy.errors import OutputExistsError, UsageError

FRACTIONS = (0.24, 0.52, 1.0)
REQUIRED = {
    "runtime": str,
    "provider": str,
    "precision": str,
    "batch_size": int,
    "eta": float,
    "fine_fraction": float,
    "p50_ms": float,
    "p90_ms": float,
    "p99_ms": float,
    "mean_ms": float,
    "img_per_s": float,
    "coarse_ms": float,
    "gate_ms": float,
    "fine_ms": float,
    "speedup_vs_baseline": float,
}


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7", baseline=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench") / "out"


@pytest.fixture(scope="module")
def result(export_dir, out) -> BenchResult:
    """fp32 + int8 (built on the fly), cpu, batch 1 and 5, in-process."""
    return run_bench(
        export_dir,
        providers=("cpu",),
        precisions=("fp32", "int8"),
        batch_sizes=(1, 5),
        fine_fractions=FRACTIONS,
        iterations=1,
        warmup=1,
        isolation="inline",
        out=out,
    )


def _ok(result: BenchResult, **match) -> list[BenchRow]:
    return result.find(**match)


def test_cells_cover_the_grid(result):
    ok = _ok(result, runtime="onnxruntime")
    assert {(r.precision, r.batch_size, r.model) for r in ok} == {
        (p, b, m) for p in ("fp32", "int8") for b in (1, 5) for m in ("cfvit", "baseline")
    }
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
    for key in (
        "cpu_model",
        "cpu_flags",
        "physical_cores",
        "ram_gb",
        "gpu",
        "versions",
        "matmul_peak_gflops",
        "threads",
    ):
        assert key in machine
    assert set(machine["versions"]) >= {"onnxruntime", "openvino", "torch", "numpy"}
    assert machine["matmul_peak_gflops"] > 0
    settings = data["settings"]
    assert settings["threads"] >= 1 and settings["session_config"]["threads"] == settings["threads"]
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


def test_a_runtime_with_nothing_measured_fails_with_every_row_kept(export_dir, tmp_path, monkeypatch):
    """Issue 13.1: every requested cell of a runtime skipped is a failure (before: a result, exit 0)."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError -> ProviderError
    out = tmp_path / "out"
    with pytest.raises(NothingMeasuredError, match="nothing measured for openvino/openvino: every cell skipped") as err:
        run_bench(
            export_dir,
            providers=("cpu", "openvino"),
            batch_sizes=(2,),
            fine_fractions=(0.5,),
            iterations=1,
            warmup=0,
            isolation="inline",
            out=out,
        )
    result = err.value.result
    ov = [r for r in result.rows if r.provider == "openvino"]
    assert ov and all(r.status == "skipped" and "openvino" in r.reason for r in ov)
    assert all(r.mean_ms is None and r.speedup_vs_baseline is None for r in ov)
    assert len(result.find(provider="cpu")) == 2  # the cpu cells were measured and kept
    assert "openvino" in str(render_table(result).caption)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == len(result.rows)
    assert "\n" not in str(err.value)


def test_torch_cells_all_skipped_is_a_failure(export_dir, tmp_path):
    """Issue 13.1: an unusable --checkpoint skipped every torch row and still exited 0."""
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(NothingMeasuredError, match="torch/cpu") as err:
        run_bench(
            export_dir,
            batch_sizes=(2,),
            fine_fractions=(0.5,),
            iterations=1,
            warmup=0,
            torch=True,
            checkpoint=bad,
            isolation="inline",
        )
    assert err.value.exit_code == 1 and len(err.value.result.find(runtime="onnxruntime")) == 2


def test_missing_baseline_is_a_skip_row(export_dir_factory):
    r = run_bench(
        export_dir_factory("deit_g7"),
        batch_sizes=(2,),
        fine_fractions=(0.5,),
        iterations=1,
        warmup=0,
        isolation="inline",
    )
    base = [row for row in r.rows if row.model == "baseline"]
    assert base and all(row.status == "skipped" and "--baseline" in row.reason for row in base)
    assert all(row.speedup_vs_baseline is None for row in r.rows)
    assert [row.status for row in r.rows if row.model == "cfvit"] == ["ok"]  # f=0.5 only


def test_real_images_with_eta(export_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    r = run_bench(
        export_dir, batch_sizes=(2,), etas=(0.5, 1.0), images=folder, iterations=1, warmup=0, isolation="inline"
    )
    pipe = r.find(model="cfvit")
    assert [(p.gate, p.eta) for p in pipe] == [("eta", 0.5), ("eta", 1.0)]
    assert pipe[1].fine_fraction == 1.0 and 0.0 <= pipe[0].fine_fraction <= 1.0
    assert r.settings["inputs"] == str(folder)
    assert not any("synthetic gate" in n for n in r.notes)
    # the one folder reader: the broken file is skipped and reported, not silently dropped
    assert [Path(p).name for p, _ in r.settings["skipped_images"]] == ["broken.jpg"]
    assert any("1 unreadable files" in n for n in r.notes)


def test_process_isolation_reports_peak_rss_and_repeat_spread(export_dir):
    r = run_bench(export_dir, batch_sizes=(3,), fine_fractions=(0.5,), iterations=1, warmup=0, repeats=2)
    assert r.settings["isolation"] == "process"
    ok = r.find()
    assert len(ok) == 2 and all(row.isolation == "process" and row.peak_rss_mb > 10 for row in ok)
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precisions=("fp64",)), "--precisions must be one of"),
        (dict(providers=("gpu",)), "unknown provider"),
        (dict(batch_sizes=(0,)), "--batch-sizes must be a positive integer"),
        (dict(batch_sizes="1,x"), "--batch-sizes expects"),
        (dict(fine_fractions=(1.5,)), "--fine-fraction must lie in"),
        (dict(fine_fractions="0:2:0.5"), "--fine-fraction must lie in"),
        (dict(etas=(2.0,)), "--eta must lie in"),
        (dict(iterations=3, duration=1.0), "not both"),
        (dict(iterations=0), "--iterations must be a positive integer"),
        (dict(warmup=-1), "--warmup"),
        (dict(isolation="thread"), "isolation"),
        (dict(repeats=0), "--repeats"),
        (dict(torch=True, checkpoint="/nonexistent.pth"), "--torch"),
        (dict(images="/nonexistent-folder"), "--images must be a folder"),
    ],
)
def test_usage_errors_come_before_any_work(export_dir, kwargs, message):
    with pytest.raises(UsageError, match=message):
        run_bench(export_dir, **kwargs)


def test_existing_out_is_refused_without_force(export_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        run_bench(export_dir, out=out)


@pytest.mark.slow
def test_torch_rows(export_dir, export_dir_factory):
    from tests.conftest import UpstreamFixture

    r = run_bench(
        export_dir,
        batch_sizes=(2,),
        fine_fractions=(0.5,),
        iterations=1,
        warmup=0,
        torch=True,
        checkpoint=UpstreamFixture("deit_g7").pth,
    )
    rows = r.find(runtime="torch")
    assert {(row.model, row.target_fine_fraction) for row in rows} == {("baseline", None), ("cfvit", 0.5)}
    for row in rows:
        assert row.coarse_ms is None and row.speedup_vs_baseline > 0 and row.baseline_precision == "fp32"
    half = next(row for row in rows if row.target_fine_fraction == 0.5)
    assert abs(half.fine_fraction - 0.5) <= 0.5 / pool_size(2)


def test_disturbed_cells_are_measured_again(monkeypatch):
    import cfvit_deploy.app.bench.machine as bench

    loads = iter([80.0, 40.0, 60.0, 99.0])
    monkeypatch.setattr(bench, "background_cpu_pct", lambda before: next(loads))
    monkeypatch.setattr(bench, "wait_for_quiet", lambda *a: 0.0)
    calls = []

    def measure(spec):
        calls.append(spec)
        return {"times": [len(calls)]}

    raw, background = bench.measure_quietly(measure, {}, 25.0, lambda msg: None)
    assert len(calls) == 1 + bench.QUIET_RETRIES and (raw, background) == ({"times": [2]}, 40.0)
    calls.clear()
    assert bench.measure_quietly(measure, {}, None, lambda msg: None)[0] == {"times": [1]}  # no retries


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


def test_flags_share_the_number_list_grammar():
    """--batch-sizes, --eta and --fine-fraction accept a,b,c and start:stop:step like every command."""
    providers, precisions, sizes, etas, fractions = check_request(
        "cpu", "fp32,int8", "1:9:4", "0:1:0.5", "0.25:0.75:0.25"
    )
    assert (providers, precisions, sizes) == (["cpu"], ["fp32", "int8"], [1, 5, 9])
    assert etas == [0.0, 0.5, 1.0] and fractions == [0.25, 0.5, 0.75]
    assert check_request(("cpu",), None, (1, 32), (), None)[4] == [0.24, 0.52, 1.0]  # the default
    assert check_request(("cpu",), None, (1,), (0.7,), None)[4] == []  # --eta alone: no fraction rows


def test_bench_builds_the_pipeline_users_get(export_dir, monkeypatch):
    """Issue 14.1: the pipeline is CFViTPipeline(dir, provider, config=SessionConfig(threads=N)) -- the
    library default; bench has no threading knobs of its own."""
    import inspect

    from runtimes import pipeline as pipeline_module
    from runtimes.backends import SessionConfig

    assert not any("thread" in p and p != "threads" for p in inspect.signature(run_bench).parameters)
    seen = []
    original = pipeline_module.CFViTPipeline.__init__

    def spy(self, source, provider="cpu", config=None):
        seen.append((source, provider, config))
        original(self, source, provider, config)

    monkeypatch.setattr(pipeline_module.CFViTPipeline, "__init__", spy)
    r = run_bench(
        export_dir, batch_sizes=(2,), fine_fractions=(0.5,), iterations=1, warmup=0, threads=2, isolation="inline"
    )
    assert seen == [(str(export_dir), "cpu", SessionConfig(threads=2))]
    assert r.settings["session_config"]["threads"] == 2


def test_latency_plot_shows_p50_like_the_tables(tmp_path, monkeypatch):
    """Issue 23 item 8: the plot drew mean latencies under a bare "latency" axis while the tables give p50."""
    import cfvit_deploy.app.bench.plots as results
    from cfvit_deploy.app.bench import BenchResult, BenchRow

    drawn = []
    real = results._plot_batch
    monkeypatch.setattr(
        results,
        "_plot_batch",
        lambda ax, r, b, metric, label: drawn.append((metric, label)) or real(ax, r, b, metric, label),
    )
    row = BenchRow("onnxruntime", "cpu", "fp32", "cfvit", 1, "fine_fraction", fine_fraction=0.5,
                   mean_ms=3.0, p50_ms=2.0, img_per_s=333.0)  # fmt: skip
    results.plot(BenchResult([row], {}, {}), tmp_path)
    assert ("p50_ms", "p50 latency per batch (ms)") in drawn
