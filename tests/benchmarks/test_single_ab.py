"""benchmarks/single_ab.py: issue 26's batch-1 goals judged from the medians, and a real (tiny) run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import single_ab  # noqa: E402


def _medians(single: float, pair: float, shared: float, baseline: float, single0: float, pair0: float):
    return {
        ("f=0.24", "single"): single,
        ("f=0.24", "pair"): pair,
        ("f=0.24", "pair-shared"): shared,
        ("f=0.24", "baseline"): baseline,
        ("eta=0", "single"): single0,
        ("eta=0", "pair"): pair0,
    }


def test_goals_compare_against_the_best_pair_threading() -> None:
    met = single_ab.goals(_medians(4.0, 5.0, 4.5, 10.0, 2.0, 2.0))
    assert [g["met"] for g in met] == [True, True, None, True]
    assert met[0]["value"] == round(4.0 / 4.5, 3) and met[1]["value"] == 2.5
    missed = single_ab.goals(_medians(4.6, 5.0, 4.5, 9.0, 2.2, 2.0))
    assert [g["met"] for g in missed] == [False, False, None, False]  # slower than the shared pair; 1.96x; +10%


@pytest.mark.slow
def test_one_round_on_an_export_with_single_graph(export_dir_factory, tmp_path: Path) -> None:
    export = export_dir_factory("deit_g7", baseline=True, single_graph=True)
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "single_ab.py"), str(export), "--rounds", "1", "--cycles", "1"]
    subprocess.run([*cmd, "--threads", "1", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    doc = json.loads(out.read_text())
    cells = {(r["workload"], r["candidate"]) for r in doc["rows"]}
    assert cells == {(w, c) for w in single_ab.WORKLOADS for c in single_ab.CANDIDATES} - {("eta=0", "pair-shared")}
    assert all(r["median_ms"] > 0 for r in doc["rows"]) and len(doc["goals"]) == 4
    assert doc["machine"]["cpu_model"] and len(doc["machine"]["load_1min_per_round"]) == 2
