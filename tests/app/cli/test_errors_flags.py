"""Bad flags of every command through the CLI: exit 2, one ``error: ...`` line, nothing written."""

from __future__ import annotations

import pytest

from tests.app.cli.support import assert_one_error, lit, run
from tests.conftest import FIXTURES

# -- flags -----------------------------------------------------------------------------------------------
# {export}, {img}, {lab}, {ckpt} and {tmp} are filled in per test.
FLAG_CASES = [
    # infer
    (["infer", "{export}", "{img}", "--eta", "-0.1"], "error: --eta must lie in [0, 1], got -0.1"),
    (["infer", "{export}", "{img}", "--eta", "1.5"], "error: --eta must lie in [0, 1], got 1.5"),
    (["infer", "{export}", "{img}", "--eta", "nan"], "error: --eta must lie in [0, 1], got nan"),
    (["infer", "{export}", "{img}", "--batch-size", "0"], "error: --batch-size must be a positive integer, got 0"),
    (["infer", "{export}", "{img}", "--batch-size", "-3"], "error: --batch-size must be a positive integer, got -3"),
    (
        ["infer", "{export}", "{img}", "--provider", "tpu"],
        "error: unknown provider 'tpu'; available: cpu, cuda, tensorrt, openvino",
    ),
    (
        ["infer", "{export}", "{img}", "-o", "{tmp}/missing/rows.csv"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    (
        ["infer", "{export}", "{img}", "--overlay", "{tmp}/missing/overlays"],
        "error: overlay folder's parent {tmp}/missing does not exist; create it first",
    ),
    (["infer", "{export}", "{img}", "--max-pixels", "-5"], "error: --max-pixels must be a positive integer, got -5"),
    (["infer", "{export}", "{img}", "--engine", "spark"], "error: --engine must be one of local, ray, got 'spark'"),
    (
        ["infer", "{export}", "{img}", "--batch-size", "many"],
        "error: Invalid value for '--batch-size': Input should be a valid integer, unable to parse string as an integer",
    ),
    (["infer", "{export}"], "error: Missing argument 'inputs'."),
    (["frobnicate"], "error: No such command 'frobnicate'."),
    # validate: the shared checks' wording; every flag is checked before any work (issue 13 item 7)
    (["validate", "{export}", "--etas=-0.5"], "error: --etas must lie in [0, 1], got -0.5"),
    (["validate", "{export}", "--etas", "0.5,1.5"], "error: --etas must lie in [0, 1], got 1.5"),
    (["validate", "{export}", "--etas", "nan"], "error: --etas must lie in [0, 1], got nan"),
    (
        ["validate", "{export}", "--etas", "0:1"],
        "error: --etas expects comma-separated float values (a,b,c) or start:stop:step, got '0:1'",
    ),
    (["validate", "{export}", "--batch-sizes", "0"], "error: --batch-sizes must be a positive integer, got 0"),
    (["validate", "{export}", "--batch-sizes=-2"], "error: --batch-sizes must be a positive integer, got -2"),
    (["validate", "{export}", "--min-top1", "1.5"], "error: --min-top1 must lie in [0, 1], got 1.5"),
    (
        ["validate", "{export}", "--provider", "tpu"],
        "error: unknown provider 'tpu'; available: cpu, cuda, tensorrt, openvino",
    ),
    (
        ["validate", "{export}", "--report", "{tmp}/missing/r.json"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    (["validate", "{export}", "--images", "{tmp}/nope"], "error: --images must be a folder of images, got {tmp}/nope"),
    (["validate", "{tmp}/no-export", "--etas", "2"], "error: --etas must lie in [0, 1], got 2.0"),  # flags first
    # export: flag checks before the checkpoint is even read (a missing one is not reported first)
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--num-heads", "3", "--eta", "1.5"],
        "error: --eta must lie in [0, 1], got 1.5",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--num-heads", "3", "--eta", "nan"],
        "error: --eta must lie in [0, 1], got nan",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--num-heads", "3", "--eta=-1"],
        "error: --eta must lie in [0, 1], got -1.0",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--num-heads", "0"],
        "error: --num-heads must be a positive integer, got 0",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--num-heads=-3"],
        "error: --num-heads must be a positive integer, got -3",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/exp", "--precision", "fp8"],
        "error: --precision must be one of fp32, fp16, int8, got 'fp8'",
    ),
    (
        ["export", "{tmp}/no.pth", "-o", "{tmp}/exp", "--precision", "fp16", "--optimize"],
        "error: fp16 cannot be combined with --optimize: ORT's float16 converter breaks the fused graph (SSA error); "
        "export fp16 and optimized separately",
    ),
    (
        ["export", "{tmp}/no.pth", "-o", "{tmp}/exp", "--weights", "best"],
        "error: --weights must be one of auto, model, ema, got 'best'",
    ),
    (
        ["export", "{tmp}/no.pth", "-o", "{tmp}/exp", "--opset", "9"],
        "error: opset 9 is not supported; use 13..21 (default 17)",
    ),
    (
        ["export", "{ckpt}", "-o", "{tmp}/missing/exp", "--num-heads", "3"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    # bench
    (["bench", "{export}", "--eta", "nan"], "error: --eta must lie in [0, 1], got nan"),
    (["bench", "{export}", "--eta=-0.2"], "error: --eta must lie in [0, 1], got -0.2"),
    (["bench", "{export}", "--eta", "2"], "error: --eta must lie in [0, 1], got 2.0"),
    (["bench", "{export}", "--batch-sizes", "0"], "error: --batch-sizes must be a positive integer, got 0"),
    (["bench", "{export}", "--batch-sizes=-1"], "error: --batch-sizes must be a positive integer, got -1"),
    (
        ["bench", "{export}", "--providers", "cpu,tpu"],
        "error: unknown provider 'tpu'; available: cpu, cuda, tensorrt, openvino",
    ),
    (
        ["bench", "{export}", "--out", "{tmp}/missing/bench"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    # sweep
    (["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--etas", "nan"], "error: --etas must lie in [0, 1], got nan"),
    (["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--etas=-0.5"], "error: --etas must lie in [0, 1], got -0.5"),
    (
        ["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--etas", "0.5,1.5"],
        "error: --etas must lie in [0, 1], got 1.5",
    ),
    (
        ["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--batch-size", "0"],
        "error: --batch-size must be a positive integer, got 0",
    ),
    (
        ["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--batch-size=-2"],
        "error: --batch-size must be a positive integer, got -2",
    ),
    (
        ["sweep", "{export}", "{lab}", "-o", "{tmp}/sw", "--provider", "tpu"],
        "error: unknown provider 'tpu'; available: cpu, cuda, tensorrt, openvino",
    ),
    (
        ["sweep", "{export}", "{lab}", "-o", "{tmp}/missing/sw"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    # train and make-data
    (["train", "{tmp}", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["train", "{tmp}", "--batch-size=-1"], "error: --batch-size must be >= 1, got -1"),
    (
        ["train", "{tmp}", "--out", "{tmp}/missing/m.pth"],
        "error: output directory {tmp}/missing does not exist; create it first",
    ),
    (["make-data", "{tmp}/data", "--per-class", "0"], "error: images per class must be >= 1 for both splits"),
]


@pytest.mark.parametrize("template, expected", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags_exit_2_with_one_line(capfd, tmp_path, export_dir, inputs, template, expected) -> None:
    values = {
        "export": export_dir,
        "img": inputs["img"],
        "lab": inputs["lab"],
        "ckpt": FIXTURES / "deit_g7.pth",
        "tmp": tmp_path,
    }
    before = sorted(tmp_path.iterdir())
    code, out, err = run(capfd, *(arg.format(**values) for arg in template))
    assert code == 2
    assert_one_error(err, lit(expected.format(**values)))
    assert out == ""
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_no_arguments_prints_the_help_and_no_error_line(capfd) -> None:
    code, out, err = run(capfd)
    assert code == 2 and err == ""
    assert "Usage:" in out and "infer" in out
