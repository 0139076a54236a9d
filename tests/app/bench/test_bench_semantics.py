"""Bench numbers against known inputs: a fake clock and fixed stage timings, so every figure has one right value.

The bench module's clock is replaced by one that advances exactly 1 ms per reading, so every timed
call lasts exactly 1 ms whatever the model; the pipeline's own stage split is replaced by fixed
timings. The rows must then carry those numbers (not just be consistent with their own formulas).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from types import ModuleType

import numpy as np
import pytest

import cfvit_deploy.app.bench as bench
from cfvit_deploy.app.bench.results import latency_stats
from cfvit_deploy.manifest import Manifest
from runtimes.pipeline import CFViTPipeline, StageTimings

#: stage split reported by every pipeline call (the fine part scaled by the share of the batch sent to fine)
COARSE_S, GATE_S, FINE_S = 0.0003, 0.0001, 0.0002


def _bench_modules() -> list[ModuleType]:
    prefix = bench.__name__
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == prefix or name.startswith(prefix + "."))
    ]


@pytest.fixture
def fake_clock(monkeypatch):
    """Every perf_counter reading in the bench modules advances 1 ms: each timed call is exactly 1 ms."""
    now = [1000.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    patched = 0
    for module in _bench_modules():
        if hasattr(module, "perf_counter"):
            monkeypatch.setattr(module, "perf_counter", clock)
            patched += 1
    assert patched, "no perf_counter found in the bench modules"

    real_run = CFViTPipeline.run

    def run(self, images, eta=None):
        res = real_run(self, images, eta)
        fine = FINE_S * float((~res.exited).mean())  # proportional to the sub-batch
        return replace(res, timings=StageTimings(COARSE_S, GATE_S, fine))

    monkeypatch.setattr(CFViTPipeline, "run", run)


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7", baseline=True)


def test_latency_stats_against_the_standard_library():
    rng = np.random.default_rng(3)
    seconds = list(rng.uniform(0.001, 0.050, 101))
    stats = latency_stats(seconds, batch_size=4)
    ms = [s * 1e3 for s in seconds]
    q = statistics.quantiles(ms, n=100, method="inclusive")  # q[k-1] is the k-th percentile
    assert stats["p50_ms"] == pytest.approx(statistics.median(ms))
    assert stats["p90_ms"] == pytest.approx(q[89]) and stats["p99_ms"] == pytest.approx(q[98])
    assert stats["mean_ms"] == pytest.approx(statistics.fmean(ms))
    assert stats["img_per_s"] == pytest.approx(4 / statistics.fmean(seconds))
    assert stats["p50_ms"] < stats["p90_ms"] < stats["p99_ms"]  # 101 distinct values: strict


def test_stage_times_add_up_to_the_whole_call(export_dir, fake_clock):
    result = bench.run_bench(
        export_dir, batch_sizes=(2,), fine_fractions=(0.0, 0.5, 1.0), iterations=2, warmup=0, isolation="inline"
    )
    rows = [r for r in result.rows if r.model == "cfvit" and r.status == "ok"]
    assert len(rows) == 3  # fractions 0, 0.5 and 1
    for r in rows:
        assert r.mean_ms == pytest.approx(1.0) and r.p50_ms == pytest.approx(1.0) and r.p99_ms == pytest.approx(1.0)
        assert r.coarse_ms == pytest.approx(COARSE_S * 1e3) and r.gate_ms == pytest.approx(GATE_S * 1e3)
        fine_ms = FINE_S * 1e3 * r.fine_fraction  # mean over calls of FINE_S x (share sent to fine)
        assert r.fine_ms == pytest.approx(fine_ms)
        # overhead: the share of the 1 ms call spent outside the two graphs
        assert r.overhead_pct == pytest.approx(100 * (1.0 - COARSE_S * 1e3 - fine_ms))
    assert {r.fine_fraction for r in rows} == {0.0, 0.5, 1.0}


def test_speedups_refer_to_the_baseline_of_the_same_cell(export_dir, fake_clock):
    """Every call lasts 1 ms: img/s is the batch size x 1000, and the speedup against the baseline of the
    same batch size is exactly 1 (a baseline of another batch size would give 2 or 0.5)."""
    result = bench.run_bench(
        export_dir, batch_sizes=(1, 2), fine_fractions=(0.5,), iterations=2, warmup=0, isolation="inline"
    )
    gmacs = Manifest.load(export_dir).gmacs
    ok = [r for r in result.rows if r.status == "ok"]
    assert {(r.model, r.batch_size) for r in ok} >= {("baseline", 1), ("baseline", 2), ("cfvit", 1), ("cfvit", 2)}
    for r in ok:
        assert r.img_per_s == pytest.approx(r.batch_size * 1000.0)
        if r.model == "baseline":
            assert r.gflops == pytest.approx(2 * gmacs["baseline"] * r.batch_size * 1000.0, rel=1e-3)
            continue
        assert r.speedup_vs_baseline == pytest.approx(1.0) and r.baseline_precision == r.precision
        expected = gmacs["coarse"] + r.fine_fraction * (gmacs["fine"] - gmacs["coarse"])
        assert r.gflops == pytest.approx(2 * expected * r.batch_size * 1000.0, rel=1e-3)
