"""The headline's field rows (issue 25): each runtime's int8 row is its fastest int8 form, named; end-to-end
rows on camera JPEGs per decode mode stand beside the model-only rows, with the machine; the
end-to-end/model-only targets. Pure Python on made-up rows: no model, no runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cfvit_deploy.app.bench import BenchResult, BenchRow

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import camera_images
    import headline_report as hr
    import headline_targets as ht
    import run_headline as rh
finally:
    sys.path.pop(0)

MACHINE = {
    "cpu_model": "Intel(R) Xeon(R) Platinum 8480+ CPU",
    "physical_cores": 2,
    "int8_units": "AMX + AVX-512 VNNI",
    "cpu_flags": ["avx512_vnni", "amx_int8"],
}


def _row(runtime, provider, precision, img_per_s, batch=32, f=0.24, decode=None, model="cfvit") -> BenchRow:
    row = BenchRow(runtime, provider, precision, model, batch, "fine_fraction" if model == "cfvit" else "none")
    row.target_fine_fraction = f if model == "cfvit" else None
    row.img_per_s, row.mean_ms = img_per_s, 1000 * batch / img_per_s
    row.decode, row.end_to_end = decode, decode is not None
    return row


def _result() -> BenchResult:
    rows = [
        _row("onnxruntime", "cpu", "fp32", 60.0),
        _row("onnxruntime", "cpu", "int8", 200.0),  # ORT: dynamic is its fastest form
        _row("onnxruntime", "cpu", "int8-static", 150.0),
        _row("openvino", "openvino", "fp32", 80.0),
        _row("openvino", "openvino", "int8", 50.0),
        _row("openvino", "openvino", "int8-static", 190.0),  # OpenVINO: static QDQ
        _row("onnxruntime", "cpu", "fp32", 20.0, f=1.0),
        _row("onnxruntime", "cpu", "fp32", 17.0, f=1.0, decode="fast"),
        _row("onnxruntime", "cpu", "fp32", 5.0, f=1.0, decode="exact"),
        _row("onnxruntime", "cpu", "fp32", 40.0, decode="fast"),
        _row("onnxruntime", "cpu", "fp32", 7.0, decode="exact"),
        _row("openvino", "openvino", "int8-static", 45.0, decode="fast"),
    ]
    return BenchResult(rows, MACHINE, {"threads": 2, "isolation": "process"})


def test_each_runtimes_int8_row_is_its_fastest_form_and_names_it():
    r = _result()
    assert ht.best_int8(r, "onnxruntime", "cpu") == "int8"
    assert ht.best_int8(r, "openvino", "openvino") == "int8-static"
    assert ht.best_int8(BenchResult([], MACHINE, {}), "openvino", "openvino") == "int8"  # nothing measured
    labels = {label: prec for label, _, _, prec, _ in hr.headline_rows(r)}
    assert labels["ONNX Runtime CPU int8 (dynamic): model only (tensors)"] == "int8"
    assert labels["OpenVINO CPU int8 (static QDQ): model only (tensors)"] == "int8-static"
    assert labels["OpenVINO CPU int8 (static QDQ): camera JPEGs end to end, decode fast"] == "int8-static"


def test_end_to_end_rows_stand_beside_the_model_only_rows_with_the_machine():
    lines = hr.headline_table(_result())
    assert lines[0].startswith("| runtime: input | machine |")
    fast = next(
        line for line in lines if line.startswith("| ONNX Runtime CPU fp32: camera JPEGs end to end, decode fast")
    )
    exact = next(line for line in lines if "CPU fp32: camera JPEGs end to end, decode exact" in line)
    model = next(line for line in lines if line.startswith("| ONNX Runtime CPU fp32: model only"))
    assert "Xeon Platinum 8480+, 2 cores, int8: AMX + AVX-512 VNNI" in fast
    assert "40.0 img/s" in fast and "7.0 img/s" in exact and "★" not in fast + exact
    ov = next(
        line
        for line in lines
        if line.startswith("| OpenVINO CPU int8 (static QDQ): camera JPEGs end to end, decode fast")
    )
    assert "**45.0 img/s** ★" in ov  # the fastest end-to-end row of the column
    assert "60.0 img/s" in model and "★" not in model  # ORT int8 is the fastest model-only row of the column
    assert any("ONNX Runtime CPU int8 (dynamic): model only" in line and "**200.0 img/s** ★" in line for line in lines)
    # no end-to-end rows measured: none shown
    model_only = BenchResult([r for r in _result().rows if not r.end_to_end], MACHINE, {})
    assert not any("end to end" in label for label, *_ in hr.headline_rows(model_only))


def test_single_onnx_rows_stand_with_the_model_only_rows_beside_the_end_to_end_rows():
    """Issue 25 x 26: a run with single.onnx cells and end-to-end cells shows both; the single.onnx row's
    CF-ViT columns are the cfvit-single cells, its DeiT-S column the common baseline."""
    single = _row("onnxruntime", "cpu", "fp32", 99.0)
    single.model = "cfvit-single"
    baseline = _row("onnxruntime", "cpu", "fp32", 30.0, model="baseline")
    r = _result()
    r.rows += [single, baseline]
    labels = [label for label, *_ in hr.headline_rows(r)]
    first_e2e = next(i for i, label in enumerate(labels) if "end to end" in label)
    assert labels.index("ONNX Runtime CPU fp32, single.onnx: model only (tensors)") < first_e2e
    lines = hr.headline_table(r)
    row = next(line for line in lines if line.startswith("| ONNX Runtime CPU fp32, single.onnx: model only"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "99.0 img/s" and cells[6] == "30.0 img/s"  # b32 f=0.24 from single.onnx; DeiT-S baseline
    pair = next(line for line in lines if line.startswith("| ONNX Runtime CPU fp32: model only"))
    assert [c.strip() for c in pair.strip("|").split("|")][4] == "60.0 img/s"
    assert any(line.startswith("| ONNX Runtime CPU fp32: camera JPEGs end to end, decode fast") for line in lines)
    # without cfvit-single cells, no single.onnx rows
    assert not any("single.onnx" in label for label, *_ in hr.headline_rows(_result()))


def test_end_to_end_targets_judge_fast_decode_at_eta_1():
    targets = {t.name: t for t in ht.end_to_end_targets(_result())}
    fast = targets["end-to-end / model-only, fp32 batch 32 f=1, decode fast (camera JPEGs)"]
    assert fast.value == pytest.approx(17.0 / 20.0) and fast.goal == 0.80 and fast.met is True
    exact = targets["end-to-end / model-only, fp32 batch 32 f=1, decode exact (camera JPEGs)"]
    assert exact.value == pytest.approx(0.25) and exact.goal is None  # reported beside it
    low = targets["end-to-end / model-only, fp32 batch 32 f=0.24, decode fast (camera JPEGs)"]
    assert low.value == pytest.approx(40.0 / 60.0) and low.goal is None
    assert not any("int8" in name for name in targets)  # no int8 end-to-end rows in this result


def test_fastest_int8_over_fp32_per_runtime_with_the_vnni_goal():
    by_name = {t.name: t for t in ht.targets(_result(), [])}
    ov = by_name["OpenVINO fastest int8 (int8-static) / its fp32, batch 32 img/s, f=0.24"]
    assert ov.value == pytest.approx(190.0 / 80.0) and ov.goal == 2.0 and ov.met is True
    ort = by_name["ONNX Runtime fastest int8 (int8) / its fp32, batch 32 img/s, f=0.24"]
    assert ort.value == pytest.approx(200.0 / 60.0) and ort.goal is None
    no_vnni = BenchResult(_result().rows, {**MACHINE, "cpu_flags": ["avx2"]}, {})
    assert {t.name: t for t in ht.targets(no_vnni, [])}[ov.name].goal is None  # the goal is for VNNI CPUs


@pytest.mark.slow
def test_run_headline_end_to_end_rows_come_from_bench_on_camera_jpegs(export_dir_factory, tmp_path, monkeypatch):
    """run_headline's end-to-end pass: bench's end-to-end cells on the camera JPEGs, every int8 form (static
    calibrated on the same photos), only the end-to-end rows kept (small grid, cells in-process)."""
    import argparse
    import functools

    camera = tmp_path / "camera"
    camera_images.make_camera_jpegs(camera, 3, size=(1200, 900))  # a smaller "camera": the same code path
    monkeypatch.setattr(rh, "BATCHES", (2,))
    monkeypatch.setattr(rh, "E2E_FRACTIONS", (1.0,))
    monkeypatch.setattr(rh, "run_bench", functools.partial(rh.run_bench, isolation="inline", iterations=1))
    args = argparse.Namespace(warmup=0, duration=None, threads=1, quiet_below=None, work=tmp_path)
    rows = rh.measure_end_to_end(args, export_dir_factory("deit_g7", baseline=True), camera)
    measured = {(r.runtime, r.precision, r.decode) for r in rows if r.status == "ok"}
    assert {("onnxruntime", p, d) for p in ("fp32", "int8", "int8-static") for d in ("exact", "fast")} <= measured
    assert all(r.end_to_end and r.model == "cfvit" for r in rows)
