"""benchmarks/decode_accuracy.py's summary and decision rule (issue 25: fast may become the default only if
top-1 and stage agree on >= 99% of the images and top-1 moves by <= 0.5 points). Made-up rows, no model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import decode_accuracy as da
finally:
    sys.path.pop(0)


def _rows(n: int, flips: int, stage_flips: int = 0) -> list[dict]:
    """n images, all right with exact; the first `flips` get a wrong top-1 with fast, the next `stage_flips`
    another stage."""
    rows = []
    for i in range(n):
        fast_top1 = 1 if i < flips else 0
        fast_stage = "fine" if flips <= i < flips + stage_flips else "coarse"
        rows.append(
            {
                "label": 0,
                "exact_top1": 0,
                "fast_top1": fast_top1,
                "exact_stage": "coarse",
                "fast_stage": fast_stage,
                "mean_abs_diff_levels": 1.0,
                "max_abs_diff_levels": 10.0 + i,
                "exact_decode_ms": 100.0,
                "fast_decode_ms": 20.0,
                "jpeg_bytes": 2**20,
            }
        )
    return rows


def test_summary_counts_agreement_of_top1_and_stage():
    s = da.summarize(_rows(1000, flips=3, stage_flips=4))
    assert s["agreement"] == pytest.approx(0.993)
    assert (s["top1_agreement"], s["stage_agreement"]) == (pytest.approx(0.997), pytest.approx(0.996))
    assert s["exact_top1"] == 1.0 and s["fast_top1"] == pytest.approx(0.997)
    assert s["top1_diff_points"] == pytest.approx(-0.3)
    assert s["exit_rate_diff_points"] == pytest.approx(-0.4)
    assert s["pixel_max_abs_diff_levels"]["max"] == 1009.0 and s["mean_jpeg_mb"] == 1.0
    assert s["fast_may_be_default"] is True
    assert "fast **meets** it" in da.report(s, {"eta": 0.7, "machine": "test"})


@pytest.mark.parametrize(
    ("flips", "stage_flips"),
    [(6, 0), (0, 11)],  # top-1 down 0.6 points (agreement 99.4%); agreement 98.9% with top-1 unchanged
)
def test_either_condition_failing_keeps_exact_the_default(flips, stage_flips):
    s = da.summarize(_rows(1000, flips, stage_flips))
    assert s["fast_may_be_default"] is False
    assert "does NOT meet" in da.report(s, {"eta": 0.7, "machine": "test"})


def test_report_labels_decode_times_busy_only_when_told():
    s = da.summarize(_rows(1000, 0, 0))
    assert "BUSY machine" in da.report(s, {"eta": 0.7, "machine": "m", "busy": True})
    assert "BUSY" not in da.report(s, {"eta": 0.7, "machine": "m", "busy": False})
    assert "BUSY machine" in da.report(s, {"eta": 0.7, "machine": "m"})  # results written before --busy existed
