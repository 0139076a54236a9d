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
