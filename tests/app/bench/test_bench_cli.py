"""`cfvit bench` from the command line and from other folders, the gates it measures, the headline report,
and the import boundary of the bench package (issues 12, 13.1, 13.17, 14.4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.app.bench import BenchResult, BenchRow, run_bench


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7", baseline=True)


def test_cli_exit_codes(export_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "bench",
        str(export_dir),
        "--batch-sizes",
        "2",
        "--fine-fraction",
        "0.5",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--in-process",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "cfvit bench" in captured.out and "synthetic gate" in captured.out
    assert json.loads((out / "results.json").read_text())["rows"]
    assert cli.main(args) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert cli.main(["bench", str(tmp_path / "nope")]) == 1
    assert cli.main(["bench", str(export_dir), "--precisions", "fp64"]) == 2
    assert cli.main(["bench", str(export_dir), "--fine-fraction", "0:1.5:0.5"]) == 2
    assert cli.main(["bench", str(export_dir), "--iterations", "2", "--duration", "1"]) == 2
    assert cli.main(["bench", str(export_dir), "--batch-sizes", "x"]) == 2
    capsys.readouterr()


def test_cli_nothing_measured_exits_1(export_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert (
        cli.main(
            [
                "bench",
                str(export_dir),
                "--providers",
                "cpu,openvino",
                "--batch-sizes",
                "2",
                "--iterations",
                "1",
                "--fine-fraction",
                "0.5",
                "--in-process",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "skipped" in captured.out  # the table with the reasons
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing measured for openvino/openvino" in errors[0]


def test_relative_paths_work_from_any_working_directory(export_dir, tmp_path):
    """Issue 13.1: `cfvit bench exp ...` outside the repository root skipped every cell (the cell process
    ran in the package root, where `exp` does not exist) and exited 1. Run the CLI from a temporary
    folder with a relative export, --images and --out."""
    import shutil

    shutil.copytree(export_dir, tmp_path / "exp")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "imgs" / "a.png")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(cli.__file__).parent)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cli; sys.exit(cli.main())",
            "bench",
            "exp",
            "--batch-sizes",
            "1",
            "--eta",
            "0.5",
            "--images",
            "imgs",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "-o",
            "b1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "b1" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows  # baseline and eta=0.5, both measured
    assert all(r["isolation"] == "process" for r in rows)


def test_only_the_requested_gates_are_measured(export_dir):
    """Issue 13.17: `--fine-fraction 0.5` also measured an unrequested eta=1 row; now exactly the gates
    asked for (1.0 is one more value away), and --help says so."""
    r = run_bench(export_dir, batch_sizes=(2,), fine_fractions="0.5", iterations=1, warmup=0, isolation="inline")
    assert [(row.model, row.gate, row.target_fine_fraction, row.eta is not None) for row in r.rows] == [
        ("baseline", "none", None, False),
        ("cfvit", "fine_fraction", 0.5, True),
    ]
    with_reference = run_bench(
        export_dir, batch_sizes=(2,), fine_fractions="0.5,1", iterations=1, warmup=0, isolation="inline"
    )
    assert [row.eta for row in with_reference.find(model="cfvit")][-1] == 1.0
    import typer

    bench = typer.main.get_command(cli.app).commands["bench"]
    text = next(p.help for p in bench.params if p.name == "fine_fraction")
    assert "Only the values given are measured" in text and "eta=1" in text


@pytest.mark.slow
def test_relative_torch_checkpoint_from_another_directory(export_dir, tmp_path):
    """Issue 13.1: a relative --checkpoint with --torch skipped every torch row (and exited 0)."""
    import os
    import shutil

    from tests.conftest import UpstreamFixture

    shutil.copy(UpstreamFixture("deit_g7").pth, tmp_path / "model.pth")
    os.chdir(tmp_path)
    try:
        r = run_bench(
            export_dir,
            batch_sizes=(2,),
            fine_fractions=(0.5,),
            iterations=1,
            warmup=0,
            torch=True,
            checkpoint="model.pth",
            providers=(),
        )
    finally:
        os.chdir(Path(cli.__file__).parent)
    assert len(r.find(runtime="torch")) == 2


def test_headline_marks_the_fastest_runtime_and_judges_the_targets():
    """benchmarks/headline_report.py on made-up rows: the fastest runtime of a column is starred, GPU rows
    read "not measured: no GPU", ratios and the infer agreement are judged against their goals."""
    sys.path.insert(0, str(Path(cli.__file__).parent / "benchmarks"))
    try:
        import headline_report as hr
    finally:
        sys.path.pop(0)

    def row(runtime, provider, precision, b, model, f, img_per_s, status="ok", reason=""):
        r = BenchRow(
            runtime,
            provider,
            precision,
            model,
            b,
            "none" if model == "baseline" else "fine_fraction",
            target_fine_fraction=f,
            status=status,
            reason=reason,
        )
        if status == "ok":
            r.img_per_s, r.mean_ms = img_per_s, b * 1e3 / img_per_s
        return r

    rows = []
    for runtime, provider, scale in (("onnxruntime", "cpu", 1.0), ("openvino", "openvino", 1.5)):
        for b in (1, 32):
            rows += [
                row(runtime, provider, "fp32", b, "baseline", None, 10 * scale),
                row(runtime, provider, "fp32", b, "cfvit", 0.24, 30 * scale),
                row(runtime, provider, "fp32", b, "cfvit", 0.52, 19 * scale),
                row(runtime, provider, "fp32", b, "cfvit", 1.0, 9 * scale),
                row(runtime, provider, "int8", b, "cfvit", 0.24, 60 * scale),
            ]
    rows.append(row("onnxruntime", "cuda", "fp32", 1, "cfvit", 0.24, 0, "skipped", "not measured: no GPU"))
    result = BenchResult(rows, {}, {"isolation": "process"})
    infer_runs = [
        {"batch_size": 1, "images": 64, "img_per_s": 8.5},
        {"batch_size": 32, "images": 256, "img_per_s": 7.0},
    ]
    goals = {t.name: t for t in hr.targets(result, infer_runs)}
    assert goals["fp32 pipeline / DeiT-S fp32, batch 1 latency, f=0.24"].value == pytest.approx(3.0)
    assert goals["fp32 pipeline / DeiT-S fp32, batch 1 latency, f=0.24"].met is True
    assert goals["fp32 pipeline / DeiT-S fp32, batch 32 img/s, f=0.52"].met is True  # 1.9 >= 1.8
    assert goals["int8 pipeline / fp32 pipeline, batch 32 img/s, f=0.24"].met is False  # 2.0 < 2.5
    assert goals["`cfvit infer` / bench row, fp32 eta=1, batch 1 (img/s)"].met is True  # 8.5 / 9: within 10%
    assert goals["`cfvit infer` / bench row, fp32 eta=1, batch 32 (img/s)"].met is False  # 7 / 9: 22% off
    table = hr.headline_table(result)
    ort, ov = (
        next(line for line in table if line.startswith(f"| {name}"))
        for name in ("ONNX Runtime CPU fp32", "OpenVINO CPU fp32")
    )
    assert "★" in ov and "★" not in ort  # OpenVINO is 1.5x faster in every column
    cuda = next(line for line in table if line.startswith("| ONNX Runtime CUDA"))
    assert "not measured: no GPU" in cuda and "★" not in cuda


def test_bench_modules_import_without_torch_onnx_or_exporters():
    """Only torch_cells imports torch (issue 12): the rest of bench loads on the base install."""
    code = (
        "import sys\n"
        "import cfvit_deploy.app.bench, cfvit_deploy.app.bench.worker, cfvit_deploy.app.bench.machine\n"
        "import cfvit_deploy.app.bench.plan, cfvit_deploy.app.bench.runner, cfvit_deploy.app.bench.results\n"
        "print(sorted(m for m in ('torch', 'onnx', 'exporters', 'matplotlib', 'psutil', 'cfvit_deploy.model')"
        " if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(cli.__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
