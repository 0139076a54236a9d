"""benchmarks/headline_targets.py and headline_report.py: the target plumbing of `run_headline.py`
(median and min-max range over ``--runs``, met/missed of every goal rule, the parts' targets, the
median-run merge of bench results). Pure Python on made-up numbers: no model, no runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cfvit_deploy.app.bench import BenchResult, BenchRow

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import headline_report as hr
    import headline_targets as ht
    import run_headline as rh
finally:
    sys.path.pop(0)


def test_aggregate_takes_the_median_and_the_range_and_judges_the_median():
    runs = [[ht.Target("speed", v, 2.5, detail=f"run {i}")] for i, v in enumerate((2.0, 3.0, 2.6))]
    (t,) = ht.aggregate(runs)
    assert t.value == pytest.approx(2.6)
    assert t.range == (2.0, 3.0)
    assert t.values == (2.0, 3.0, 2.6)
    assert t.runs == 3 and t.runs_met == 2
    assert t.met is True  # the median meets the goal ...
    assert t.verdict() == "met (2/3 runs met)"  # ... but not every run did, and the verdict says so
    assert t.detail == "run 2"  # the note of the run closest to the median
    j = t.to_json()
    assert (j["value"], j["range"], j["runs"], j["met"], j["rule"]) == (
        pytest.approx(2.6),
        [2.0, 3.0],
        3,
        True,
        ">= 2.5",
    )
    assert t.line() == "| speed | 2.60 | 2.00–3.00 | >= 2.5 | met (2/3 runs met) | run 2 |"


def test_aggregate_even_runs_missing_values_and_order():
    a = [ht.Target("a", 1.0, 2.0), ht.Target("b", None, 1.0)]
    b = [ht.Target("a", 3.0, 2.0), ht.Target("b", None, 1.0), ht.Target("c", 5.0, None)]
    a_t, b_t, c_t = ht.aggregate([a, b])
    assert (a_t.name, b_t.name, c_t.name) == ("a", "b", "c")
    assert a_t.value == 2.0 and a_t.range == (1.0, 3.0) and a_t.met is True
    assert b_t.value is None and b_t.range is None and b_t.met is None and b_t.verdict() == "not measured"
    assert c_t.values == (None, 5.0) and c_t.value == 5.0 and c_t.verdict() == "reported"
    assert b_t.to_json()["range"] is None and "| b | n/a | - |" in b_t.line()


def test_one_run_has_a_degenerate_range():
    (t,) = ht.aggregate([[ht.Target("x", 1.5, 2.0)]])
    assert t.range == (1.5, 1.5) and t.runs == 1 and t.met is False and t.verdict() == "**MISSED**"
    assert t.to_json()["values"] == [1.5]


@pytest.mark.parametrize(
    ("goal", "kwargs", "value", "met"),
    [
        (2.5, {}, 2.5, True),
        (2.5, {}, 2.49, False),
        (1.0, {"at_most": True}, 1.0, True),
        (1.0, {"at_most": True}, 1.01, False),
        (0.1, {"within": True}, 1.05, True),  # |1.05 - 1| <= 0.1 (centre 1 by default)
        (0.1, {"within": True}, 0.85, False),
        (2.0, {"within": True, "center": 0.0}, -2.0, True),
        (2.0, {"within": True, "center": 0.0}, 2.5, False),
    ],
)
def test_goal_rules(goal, kwargs, value, met):
    assert ht.Target("t", value, goal, **kwargs).met is met
    assert ht.Target("t", value, None, **kwargs).met is None


def test_part_targets():
    ab = {
        "rounds": 3,
        "rows": [
            {"attention": m, "graph": "pipeline", "batch": 1, "fine_fraction": 0.24, "median_ms_per_batch": ms}
            for m, ms in (("fused", 17.0), ("plain", 20.0))
        ],
        "ratios": {"fused_vs_plain_b1_latency_reduction_pct": 15.0},
    }
    (att,) = ht.attention_targets(ab)
    assert att.met is True and "17.0 ms fused vs 20.0 ms plain" in att.detail
    acc = [
        {"variant": "fp32", "top1": 0.7, "exit_rate": 0.15, "images": 300, "eta": 0.7},
        {
            "variant": "int8-static",
            "top1": 0.69,
            "exit_rate": 0.18,
            "images": 300,
            "eta": 0.7,
            "top1_drop_points": 1.0,
            "exit_rate_change_points": 3.0,
        },
    ]
    drop, exit_change = ht.int8_accuracy_targets(acc)
    assert drop.met is True and exit_change.met is False
    speed = [
        {"variant": v, "fine_fraction": 0.24, "img_per_s": x, "speed_vs_fp32": x / 10, "rounds_img_per_s": [x]}
        for v, x in (("fp32", 10.0), ("int8-dynamic", 26.0), ("int8-static", 20.0))
    ]
    assert [t.met for t in ht.int8_speed_targets(speed)] == [True, False]


def test_merge_runs_keeps_each_cells_median_run():
    def result(img_per_s: float, load_end: float) -> BenchResult:
        row = BenchRow("onnxruntime", "cpu", "fp32", "baseline", 1, "none")
        row.img_per_s = img_per_s
        skipped = BenchRow("onnxruntime", "cuda", "fp32", "baseline", 1, "none", status="skipped", reason="no GPU")
        return BenchResult([row, skipped], {"load_avg_end": [load_end]}, {"isolation": "process"})

    merged = hr.merge_runs([result(10.0, 1.0), result(30.0, 2.0), result(20.0, 3.0)])
    assert merged.rows[0].img_per_s == 20.0 and merged.rows[1].status == "skipped"
    assert merged.settings["runs"] == 3 and merged.machine["load_avg_end"] == [3.0]
    assert hr.merge_runs([result(10.0, 1.0), result(30.0, 2.0)]).rows[0].img_per_s == 10.0  # even: the slower


def test_run_headline_options_and_a_failed_part():
    quick = rh.parse_args(["--quick", "--skip", "attention, int8-speed"])
    assert (quick.size, quick.rounds, quick.ab_duration, quick.runs) == ("micro", 1, 0.3, 1)
    assert quick.skip == {"attention", "int8-speed"}
    full = rh.parse_args(["--runs", "3"])
    assert (full.size, full.rounds, full.ab_duration, full.runs, full.skip) == ("small", 3, 3.0, 3, set())
    with pytest.raises(SystemExit):
        rh.parse_args(["--skip", "attention,bogus"])
    raw: dict = {}
    (failed,) = rh._part("attention", raw, lambda: 1 / 0, ht.attention_targets)  # the run goes on
    assert failed.value is None and failed.met is None and "ZeroDivisionError" in failed.detail
    assert raw == {"errors": [{"part": "attention", "error": "ZeroDivisionError: division by zero"}]}
    speed = [
        {"variant": "fp32", "fine_fraction": 0.24, "img_per_s": 1.0, "speed_vs_fp32": 1.0, "rounds_img_per_s": [1]}
    ]
    assert rh._part("int8-speed", raw, lambda: speed, ht.int8_speed_targets) == []
    assert raw["int8_speed"] == [speed]


@pytest.mark.parametrize(
    ("flags", "units"),
    [
        (["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"], "AMX + AVX-512 VNNI"),
        (["avx2", "avx512f", "avx512_vnni"], "AVX-512 VNNI"),
        (["avx2", "avx_vnni"], "AVX-VNNI"),
        (["avx2", "fma"], "none (no VNNI)"),
    ],
)
def test_machine_line_names_the_int8_units(flags, units):
    # int8 speed depends on them (2.9x fp32 with AMX, 1.4x with AVX2 alone), so the report must say which
    assert hr.int8_units(flags) == units
