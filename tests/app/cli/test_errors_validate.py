"""`cfvit validate`'s printed results: one table, each result once, the summary last."""

from __future__ import annotations

import json
import re

from tests.app.cli.support import run


def test_validate_prints_each_result_once_with_its_input_and_batch(capfd, tmp_path, export_dir) -> None:
    """One table with input/batch columns (no second list of PASSED lines), the summary last (item 10)."""
    code, out, err = run(
        capfd,
        "validate",
        export_dir,
        "--batch-sizes",
        "1:3:2",
        "--etas",
        "0.25:0.75:0.5",
        "--report",
        tmp_path / "r.json",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch_sizes"] == [1, 3] and report["etas"] == [0.25, 0.75]  # start:stop:step grammar
    lines = out.strip().splitlines()
    assert re.search(r"\binput\b.*\bbatch\b.*\bcheck\b", out)
    assert not any(line.startswith("PASSED |") for line in lines)  # the old duplicate presentation
    rows = [line for line in lines if "PASSED" in line and "│" in line]
    assert len(rows) == len(report["checks"]) == 2 * 12  # 10 checks + one per eta, per input
    assert lines[-1] == f"PASSED: 24/24 checks passed (report: {tmp_path / 'r.json'})"
