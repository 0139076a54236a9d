"""benchmarks/serve_load.py's verdicts: the issue-15 goals computed from a load test's cells."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import serve_load
finally:
    sys.path.pop(0)


def _cell(concurrency: int, throughput: float, p50: float, server_p50: float) -> dict:
    return {"concurrency": concurrency, "throughput": throughput, "p50_ms": p50, "server_p50_ms": server_p50}


def _result(batching_32: float, no_batching_32: float, server_p50_c1: float) -> dict:
    return {
        "offline": {"infer_images_per_s": 30.0, "pipeline_p50_ms": 40.0, "batching_ceiling": 1.2},
        "servers": {
            "batching": {"cells": [_cell(1, 20, 43.0, server_p50_c1), _cell(32, batching_32, 900, 880)]},
            "no-batching": {"cells": [_cell(1, 20, 43.0, 41.0), _cell(32, no_batching_32, 1200, 1190)]},
        },
    }


def _verdicts(result: dict) -> dict[str, tuple[float, bool | None]]:
    return {g["goal"]: (g["value"], g["met"]) for g in serve_load.goals(result)}


def test_goals_judge_each_ratio_against_its_target():
    v = _verdicts(_result(batching_32=24.0, no_batching_32=12.0, server_p50_c1=41.5))
    assert v["c=32 batching / no batching"] == (2.0, True)  # exactly 2x meets ">= 2x"
    assert v["c=32 batching / offline infer"] == (0.8, True)
    assert v["c=1 added latency, server's clock (ms)"] == (1.5, True)  # 41.5 - 40.0
    assert v["c=1 added latency, client's clock (ms)"] == (3.0, None)  # reported, not judged
    assert v["ceiling: offline batch-32 / batch-1 throughput"] == (1.2, None)


def test_goals_miss_below_their_targets():
    v = _verdicts(_result(batching_32=20.0, no_batching_32=12.0, server_p50_c1=42.5))
    assert v["c=32 batching / no batching"][1] is False
    assert v["c=32 batching / offline infer"] == (pytest.approx(0.667, abs=1e-3), False)
    assert v["c=1 added latency, server's clock (ms)"] == (2.5, False)


@pytest.mark.parametrize("folder", ["serve", "serve-int8"])
def test_committed_results_carry_their_verdicts(folder):
    # the README and docs/serve.md quote these files: their goals must be the script's own verdicts
    result = json.loads((ROOT / "benchmarks" / "results" / folder / "results.json").read_text())
    assert result["goals"] == serve_load.goals(result)
    assert result["precision"] in ("fp32", "int8")
    assert "| c=32 batching / no batching |" in serve_load.table(result)


# -- --protocol v2 / both (issue 27) ------------------------------------------------------------------
def test_v2_load_requests_are_what_the_server_parses():
    from cfvit_deploy.app.serve.v2_codec import parse_infer_request

    (path, body, headers), *_ = serve_load.requests_for([b"\x89PNG fake"], "v2")
    assert path == "/v2/models/cfvit/infer"
    request = parse_infer_request(body, headers["Inference-Header-Content-Length"])
    assert request.inputs["IMAGE"].data == [b"\x89PNG fake"] and request.binary_data_output


def test_protocol_comparison_judges_the_c32_ratio_on_medians():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_protocols
    finally:
        sys.path.pop(0)

    def runs(*rates):
        cell = {"p50_ms": 1, "p95_ms": 2, "p99_ms": 3, "server_p50_ms": 1, "errors": 0}
        return [{**cell, "throughput": r, "server_cpu_ms_per_request": 100 / r} for r in rates]

    cells = {  # the rounds drift (a busy machine): each round's v2 cell is judged against its own v1 cell
        "v1": {1: runs(10, 10, 10), 8: runs(20, 20, 20), 32: runs(30, 100, 20)},
        "v2": {1: runs(9, 9, 9), 8: runs(21, 21, 21), 32: runs(27, 95, 17)},  # ratios 0.9, 0.95, 0.85
    }
    goals = {g["goal"]: (g["value"], g["rounds"], g["met"]) for g in serve_protocols.goals(cells)}
    assert goals["c=32 v2 binary / v1 throughput"] == (0.9, [0.9, 0.95, 0.85], True)  # median of the ratios
    assert goals["c=1 v2 binary / v1 throughput"][2] is None  # reported only
    assert goals["c=32 server CPU per request, v1 / v2"] == (0.9, [0.9, 0.95, 0.85], None)
    cells["v2"][32] = runs(26, 95, 17)  # ratios 0.867, 0.95, 0.85
    assert serve_protocols.goals(cells)[2]["met"] is False  # c=32
    summary = {(r["protocol"], r["concurrency"]): r for r in serve_protocols.summary(cells)}
    assert summary[("v1", 32)]["throughput"] == 30  # the median of the rounds, not the mean


def test_committed_protocol_comparison_carries_its_verdicts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_protocols
    finally:
        sys.path.pop(0)
    result = json.loads((ROOT / "benchmarks" / "results" / "serve-v2" / "results.json").read_text())
    assert result["goals"] == serve_protocols.goals(result["cells"])
    assert result["summary"] == serve_protocols.summary(result["cells"])
    assert "| c=32 v2 binary / v1 throughput |" in serve_protocols.table(result)
