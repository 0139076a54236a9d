"""`cfvit demo --quick`: every step of the demo end to end on tiny data (the CI version of `make demo`)."""

from __future__ import annotations

import csv
import json

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from cli import main

    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation_passed"] is True
    val_images = sorted((out / "data" / "val").rglob("*.png"))
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in val_images)
    fine_rows = [r for r in rows if r["stage"] == "fine"]
    assert len(list((out / "overlays").glob("*.png"))) == len(fine_rows)
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [round(r["eta"], 1) for r in sweep["rows"]] == [round(0.1 * i, 1) for i in range(11)]
    assert sweep["rows"][0]["exit_rate"] == 1.0
    bench = json.loads((out / "bench" / "results.json").read_text())
    assert {r["model"] for r in bench["rows"] if r["status"] == "ok"} >= {"cfvit", "baseline"}
    report = (out / "report.md").read_text()
    for part in ("## Trained model", "PASSED", "sweep/sweep.png", "## Short benchmark", "| generate the image set and train |"):
        assert part in report, part
    # the folder is not replaced without --force
    assert main(["demo", "--out", str(out), "--quick"]) == 2
