"""Every command's user errors through the CLI: one ``error: ...`` line on stderr, the right exit code.

Exit codes: 2 for a usage error (a bad flag, an output that exists or cannot be written), 1 for a
failure (unusable export, checkpoint or provider), 0 when the work was done. ``--debug`` adds the
traceback. stderr is captured at the file-descriptor level (``capfd``), so lines printed by native
code (ONNX Runtime's C++ logger) count too. The subprocess tests run ``cli.main`` in a fresh
interpreter, as the console script does, to show what reaches a terminal.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "import sys, cli; sys.exit(cli.main(sys.argv[1:]))"


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_GPU = _has_gpu()


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    """The deit_g7 fixture export (shared: tests copy it before damaging it)."""
    return export_dir_factory("deit_g7")


@pytest.fixture(scope="module")
def g9_export(export_dir_factory) -> Path:
    return export_dir_factory("deit_g9")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """img: one 40x40 PNG; lab: a labelled folder (lab/c0/a.png) for `sweep`."""
    root = tmp_path_factory.mktemp("inputs")
    img = root / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    (root / "lab" / "c0").mkdir(parents=True)
    shutil.copyfile(img, root / "lab" / "c0" / "a.png")
    return {"img": img, "lab": root / "lab"}


def run(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def run_subprocess(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def assert_one_error(err: str, pattern: str) -> None:
    """stderr is exactly one line, ``error: ...``, matching `pattern` (a regex) in full."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(pattern, lines[0]), lines[0]


def lit(text: str | Path) -> str:
    return re.escape(str(text))


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


# -- outputs: existing ones need --force and are left untouched; folders are not files ----------------
def _keep_file(path: Path) -> Callable[[], bool]:
    path.write_bytes(b"keep me\n")
    return lambda: path.read_bytes() == b"keep me\n"


def _keep_folder(path: Path) -> Callable[[], bool]:
    path.mkdir()
    (path / "keep.txt").write_text("keep me")
    return lambda: [p.name for p in path.iterdir()] == ["keep.txt"] and (path / "keep.txt").read_text() == "keep me"


EXISTING_CASES = {
    "infer": (["infer", "{export}", "{img}", "-o", "{out}"], "rows.csv", _keep_file),
    "export": (["export", "{ckpt}", "-o", "{out}", "--num-heads", "3"], "exp", _keep_folder),
    "bench": (["bench", "{export}", "--out", "{out}"], "bench", _keep_folder),
    "sweep": (["sweep", "{export}", "{lab}", "-o", "{out}"], "sw", _keep_folder),
    "train": (["train", "{tmp}/data", "--out", "{out}"], "model.pth", _keep_file),
    "make-data": (["make-data", "{out}"], "data", _keep_folder),
}


@pytest.mark.parametrize("command", list(EXISTING_CASES))
def test_existing_output_without_force_is_refused_and_untouched(capfd, tmp_path, export_dir, inputs, command) -> None:
    template, name, keep = EXISTING_CASES[command]
    out_path = tmp_path / name
    unchanged = keep(out_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    values = {
        "export": export_dir,
        "img": inputs["img"],
        "lab": inputs["lab"],
        "ckpt": FIXTURES / "deit_g7.pth",
        "tmp": tmp_path,
        "out": out_path,
    }
    code, out, err = run(capfd, *(arg.format(**values) for arg in template))
    assert code == 2
    assert_one_error(err, lit(f"error: {out_path} already exists; pass --force to overwrite it"))
    assert unchanged()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "data"})  # no temporary leftovers


def test_infer_output_that_is_a_folder_is_refused_even_with_force(capfd, tmp_path, export_dir, inputs) -> None:
    unchanged = _keep_folder(tmp_path / "rows.csv")
    code, out, err = run(capfd, "infer", export_dir, inputs["img"], "-o", tmp_path / "rows.csv", "--force")
    assert code == 2
    assert_one_error(err, lit(f"error: {tmp_path / 'rows.csv'} is a folder; give a file name for the output"))
    assert unchanged() and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_validate_report_that_is_a_folder_is_one_line(capfd, tmp_path, export_dir) -> None:
    unchanged = _keep_folder(tmp_path / "r.json")
    code, out, err = run(
        capfd, "validate", export_dir, "--batch-sizes", "1", "--etas", "0.5", "--report", tmp_path / "r.json"
    )
    assert code == 2
    assert_one_error(err, lit(f"error: {tmp_path / 'r.json'} is a folder; give a file name for the output"))
    assert unchanged()


# -- GPU providers on a machine without a GPU ---------------------------------------------------------
def _gpu_refusal(provider: str) -> str:
    """The three ways a missing GPU shows up (which one depends on the onnxruntime build and libraries)."""
    ep = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    return (
        rf"error: (onnxruntime fell back from {ep} to CPUExecutionProvider for coarse\.onnx \(GPU libraries "
        rf"missing\?\); pass --allow-fallback to accept"
        rf"|cannot create a {provider} session for coarse\.onnx: .+; pass --allow-fallback to run on the CPU instead"
        rf"|execution provider {provider} \({ep}\) is not available in this onnxruntime build .+--allow-fallback)"
    )


no_gpu = pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU")


@no_gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
@pytest.mark.parametrize("command", ["infer", "validate", "sweep"])
def test_gpu_provider_without_gpu_is_one_line(capfd, tmp_path, export_dir, inputs, command, provider) -> None:
    args = {
        "infer": ["infer", export_dir, inputs["img"]],
        "validate": ["validate", export_dir, "--report", tmp_path / "r.json"],
        "sweep": ["sweep", export_dir, inputs["lab"], "-o", tmp_path / "sw"],
    }[command]
    code, out, err = run(capfd, *args, "--provider", provider)
    assert code == 1
    assert_one_error(err, _gpu_refusal(provider))
    assert out == "" and list(tmp_path.iterdir()) == []


@no_gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_allow_fallback_runs_on_the_cpu(capfd, tmp_path, export_dir, inputs, provider) -> None:
    code, out, err = run(capfd, "infer", export_dir, inputs["img"], "--provider", provider, "--allow-fallback")
    assert code == 0
    assert out.splitlines()[0].startswith(f"{inputs['img']}\tfine\t") and len(out.splitlines()) == 1
    assert len(err.splitlines()) == 1 and err.startswith("files: 1  classified: 1  ")
    code, out, err = run(
        capfd,
        "validate",
        export_dir,
        "--provider",
        provider,
        "--allow-fallback",
        "--batch-sizes",
        "1",
        "--etas",
        "0.5",
        "--report",
        tmp_path / "r.json",
    )
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == f"PASSED: 11/11 checks passed (report: {tmp_path / 'r.json'})"


@no_gpu
def test_bench_skips_gpu_cells_without_log_noise(capfd, export_dir) -> None:
    code, out, err = run(
        capfd,
        "bench",
        export_dir,
        "--providers",
        "cuda",
        "--in-process",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--batch-sizes",
        "1",
        "--fine-fraction",
        "1.0",
    )
    assert code == 1  # nothing could be measured
    lines = err.splitlines()
    assert [line for line in lines if not line.startswith("[")] == [lines[-1]]  # progress lines, one error line
    assert lines[-1].startswith("error: nothing measured for onnxruntime/cuda: every cell skipped: ")
    first_reason = lines[-1].split("skipped: ", 1)[1].split("; also: ")[0]
    assert "cuda" in first_reason.lower()  # the provider failure first, not the missing baseline.onnx
    assert out.count("skipped [") == 2 and "--allow-fallback" in out


# -- export folders -------------------------------------------------------------------------------------
def _damage(kind: str, root: Path, export_dir: Path, g9_export: Path, img: Path) -> tuple[Path, str]:
    """A broken export folder (or path) of `kind`, and the regex of the error line it must give."""
    if kind == "missing folder":
        return root / "nope", lit(f"error: export folder not found: {root / 'nope'}")
    if kind == "a file":
        return img, lit(f"error: export folder not found: {img}")
    d = root / "export"
    shutil.copytree(export_dir, d)
    manifest = d / "manifest.json"
    data = json.loads(manifest.read_text())
    checksum = (
        r"error: checksum mismatch for {}: manifest says [0-9a-f]{{12}}…, file is [0-9a-f]{{12}}… "
        r"\(the graph was modified or comes from another export\)"
    )
    if kind == "no manifest":
        manifest.unlink()
        return d, lit(f"error: {d} is not an export folder: manifest.json is missing (run `cfvit export`)")
    if kind == "invalid JSON":
        manifest.write_text('{"format_version": 1,\n')
        return d, lit(f"error: {manifest} is not valid JSON: JSONDecodeError: ") + ".+"
    if kind == "JSON list":
        manifest.write_text("[]")
        return d, lit("error: manifest must be a JSON object, got list")
    if kind in ("version 99", "no version"):
        if kind == "version 99":
            data["format_version"] = 99
        else:
            del data["format_version"]
        manifest.write_text(json.dumps(data))
        if kind == "version 99":  # the fix is a newer cfvit-deploy, not a re-export (issue 13 item 19)
            return d, lit(
                "error: this export has format_version 99; this cfvit-deploy reads up to 1: upgrade "
                "cfvit-deploy (pip install -U cfvit-deploy)"
            )
        return d, lit(
            "error: manifest.json has no format_version key (this cfvit-deploy reads format_version 1 to "
            "1); it was not written by `cfvit export`, or was edited: re-export it"
        )
    if kind in ("no coarse graph", "no fine graph"):
        graph = kind.split()[1]
        (d / f"{graph}.onnx").unlink()
        return d, lit(f"error: export is incomplete: {graph} graph {d / f'{graph}.onnx'} is missing")
    if kind == "tampered coarse graph":
        blob = bytearray((d / "coarse.onnx").read_bytes())
        blob[-1] ^= 0xFF
        (d / "coarse.onnx").write_bytes(bytes(blob))
        return d, checksum.format(r"coarse\.onnx")
    if kind == "fine graph of another export":
        shutil.copyfile(g9_export / "fine.onnx", d / "fine.onnx")
        return d, checksum.format(r"fine\.onnx")
    if kind == "manifest of another export":
        shutil.copyfile(g9_export / "manifest.json", manifest)
        return d, checksum.format(r"coarse\.onnx")
    raise AssertionError(kind)


DAMAGE = [
    "missing folder",
    "a file",
    "no manifest",
    "invalid JSON",
    "JSON list",
    "version 99",
    "no version",
    "no coarse graph",
    "no fine graph",
    "tampered coarse graph",
    "fine graph of another export",
    "manifest of another export",
]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["infer", "validate", "bench", "sweep"])
def test_unusable_export_folder_is_one_line_exit_1(
    capfd, tmp_path, export_dir, g9_export, inputs, command, kind
) -> None:
    d, pattern = _damage(kind, tmp_path, export_dir, g9_export, inputs["img"])
    args = {
        "infer": ["infer", d, inputs["img"], "-o", tmp_path / "rows.csv"],
        "validate": ["validate", d, "--report", tmp_path / "r.json"],
        "bench": ["bench", d, "--in-process", "--out", tmp_path / "bench"],
        "sweep": ["sweep", d, inputs["lab"], "-o", tmp_path / "sw"],
    }[command]
    code, out, err = run(capfd, *args)
    assert code == 1
    assert_one_error(err, pattern)
    assert out == ""
    assert not any((tmp_path / n).exists() for n in ("rows.csv", "r.json", "bench", "sw"))


# -- checkpoints through `cfvit export` ------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _checkpoint(kind: str, d: Path) -> tuple[Path, list[str], str]:
    """A bad checkpoint of `kind`, extra export flags, and the regex of the error line it must give."""
    p = d / "model.pth"
    if kind == "missing file":
        return p, [], lit(f"error: checkpoint not found: {p}")
    if kind == "directory":
        p.mkdir()
        return p, [], lit(f"error: checkpoint path is a directory, not a file: {p}")
    if kind == "empty file":
        p.write_bytes(b"")
        return (
            p,
            [],
            lit(f"error: not a readable PyTorch checkpoint (corrupt or truncated?): {p} is an empty file (0 bytes)"),
        )
    if kind == "text file":
        p.write_text("hello, I am a text file\n")  # no stray pickle opcode number (issue 13 item 9)
        return (
            p,
            [],
            lit(f"error: not a PyTorch checkpoint: {p} is a text file (24 bytes, starting 'hello, I am a text file')"),
        )
    if kind == "random bytes":
        p.write_bytes(b"\x0f" + np.random.default_rng(0).bytes(4095))
        return (
            p,
            [],
            lit(
                f"error: not a PyTorch checkpoint: {p} is binary data of 4,096 bytes that is not a "
                "PyTorch checkpoint (random or damaged bytes)"
            ),
        )
    if kind == "truncated":
        data = (FIXTURES / "deit_g7.pth").read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return (
            p,
            [],
            lit(
                f"error: not a readable PyTorch checkpoint (corrupt or truncated?): {p} is a zip archive of "
                f"{len(data) // 2:,} bytes that torch cannot read (truncated, or not made by torch.save)"
            ),
        )
    if kind == "a bare tensor":
        torch.save(torch.zeros(3), p)
        return p, [], lit("error: checkpoint holds a Tensor, not a dict of tensors")
    if kind == "ResNet keys":
        torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, p)
        return (
            p,
            [],
            lit(
                "error: checkpoint is not a CF-ViT: missing patch_embed.proj.weight, pos_embed_list.0, pos_embed_list.1"
            ),
        )
    if kind == "plain DeiT keys":
        torch.save(
            {"model": {"pos_embed": torch.zeros(1, 197, 48), "patch_embed.proj.weight": torch.zeros(48, 3, 16, 16)}}, p
        )
        return (
            p,
            [],
            lit(
                "error: checkpoint is a plain ViT/DeiT (single pos_embed, no pos_embed_list.0/1), not a "
                "CF-ViT: cfvit-deploy exports CF-ViT models only; train one with `cfvit train` (or fine-tune "
                "these weights into a CF-ViT with the original CF-ViT code) and export that"
            ),
        )
    if kind == "g=9 weights, --num-heads 5":
        return (
            FIXTURES / "deit_g9.pth",
            ["--num-heads", "5"],
            lit("error: num_heads 5 does not divide the checkpoint's width (embed_dim 48)"),
        )
    if kind == "g=9 weights, metadata claims g=7":
        state = torch.load(FIXTURES / "deit_g9.pth", weights_only=True)["model"]
        g7 = json.loads((FIXTURES / "deit_g7.json").read_text())
        keys = ("arch", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "num_classes", "coarse_grid")
        torch.save({"model": state, "cfvit_deploy": {"config": {k: g7[k] for k in keys}}}, p)
        return (
            p,
            [],
            lit(
                "error: checkpoint does not match CF-ViT deit (embed 48, depth 12, g=7): 2 shape mismatches "
                "(pos_embed_list.0: checkpoint (1, 82, 48) vs model (1, 50, 48); "
                "pos_embed_list.1: checkpoint (1, 325, 48) vs model (1, 197, 48))"
            ),
        )
    raise AssertionError(kind)


CHECKPOINTS = [
    "missing file",
    "directory",
    "empty file",
    "text file",
    "random bytes",
    "truncated",
    "a bare tensor",
    "ResNet keys",
    "plain DeiT keys",
    "g=9 weights, --num-heads 5",
    "g=9 weights, metadata claims g=7",
]


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_bad_checkpoint_is_one_line_exit_1(capfd, tmp_path, kind) -> None:
    path, flags, pattern = _checkpoint(kind, tmp_path)
    code, out, err = run(capfd, "export", path, "-o", tmp_path / "exp", *flags)
    assert code == (2 if "--num-heads" in kind else 1)  # a flag that does not fit is a usage error
    assert_one_error(err, pattern)
    assert out == "" and not (tmp_path / "exp").exists()


@pytest.mark.parametrize("fmt", ["raw pickle", "torch.save zip"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(capfd, tmp_path, fmt) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "raw pickle":
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    code, out, err = run(capfd, "export", path, "-o", tmp_path / "exp")
    assert code == 1
    assert_one_error(
        err,
        lit(
            f"error: refusing to load {path}: it contains Python objects that would run code when "
            "unpickled (posix.system); only plain tensors and containers are accepted"
        ),
    )
    assert not marker.exists() and not (tmp_path / "exp").exists()
    # control: the payload is real, an unrestricted unpickler runs it
    if fmt == "raw pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_validate_with_a_checkpoint_of_another_model(capfd, tmp_path, export_dir) -> None:
    code, out, err = run(
        capfd, "validate", export_dir, "--checkpoint", FIXTURES / "deit_g9.pth", "--report", tmp_path / "r.json"
    )
    assert code == 1
    assert_one_error(
        err,
        lit(
            "error: checkpoint does not match this export: checkpoint does not match CF-ViT deit "
            "(embed 48, depth 12, g=7): 2 shape mismatches (pos_embed_list.0: checkpoint (1, 82, 48) "
            "vs model (1, 50, 48); pos_embed_list.1: checkpoint (1, 325, 48) vs model (1, 197, 48))"
        ),
    )
    assert out == "" and not (tmp_path / "r.json").exists()


def test_validate_refuses_a_malicious_checkpoint(capfd, tmp_path, export_dir) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    code, out, err = run(
        capfd, "validate", export_dir, "--checkpoint", tmp_path / "evil.pth", "--report", tmp_path / "r.json"
    )
    assert code == 1
    assert_one_error(
        err,
        lit(
            f"error: refusing to load {tmp_path / 'evil.pth'}: "  # not "does not match": it is no checkpoint
            "it contains Python objects that would run code when unpickled (posix.system); only plain "
            "tensors and containers are accepted"
        ),
    )
    assert not marker.exists()


# -- --debug ------------------------------------------------------------------------------------------------
def test_debug_adds_the_traceback_and_keeps_the_exit_code(capfd, tmp_path, export_dir, g9_export, inputs) -> None:
    d, pattern = _damage("fine graph of another export", tmp_path, export_dir, g9_export, inputs["img"])
    code, out, err = run(capfd, "--debug", "infer", d, inputs["img"])
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert re.fullmatch(pattern.replace("error: ", "cfvit_deploy.errors.ManifestError: ", 1), lines[-2])
    assert re.fullmatch(pattern, lines[-1])
    code, out, err = run(capfd, "--debug", "infer", export_dir, inputs["img"], "--eta", "2")
    assert code == 2
    assert err.splitlines()[0] == "Traceback (most recent call last):"
    assert err.splitlines()[-2:] == [
        "cfvit_deploy.errors.UsageError: --eta must lie in [0, 1], got 2.0",
        "error: --eta must lie in [0, 1], got 2.0",
    ]


# -- what reaches a terminal (fresh interpreter) -----------------------------------------------------------
def test_subprocess_usage_error_is_one_line(export_dir, inputs) -> None:
    proc = run_subprocess("infer", export_dir, inputs["img"], "--eta", "nan")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "error: --eta must lie in [0, 1], got nan\n")


def test_subprocess_unusable_export_is_one_line(tmp_path, export_dir, g9_export, inputs) -> None:
    d, pattern = _damage("manifest of another export", tmp_path, export_dir, g9_export, inputs["img"])
    proc = run_subprocess("validate", d)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(proc.stderr, pattern)


@no_gpu
def test_subprocess_tensorrt_without_gpu_prints_nothing_else(export_dir, inputs) -> None:
    """ONNX Runtime's C++ log lines and its own 'EP Error' retry prints (on stdout) must not show."""
    proc = run_subprocess("infer", export_dir, inputs["img"], "--provider", "tensorrt")
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(proc.stderr, _gpu_refusal("tensorrt"))


def test_subprocess_malicious_checkpoint_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    proc = run_subprocess("export", tmp_path / "evil.pth", "-o", tmp_path / "exp")
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(
        proc.stderr,
        r"error: refusing to load .+ \(posix\.system\); only plain tensors and containers "
        r"are accepted",
    )
    assert not marker.exists()


def test_subprocess_debug_shows_the_traceback(export_dir, inputs) -> None:
    proc = run_subprocess("--debug", "infer", export_dir, inputs["img"], "--batch-size", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == [
        "cfvit_deploy.errors.UsageError: --batch-size must be a positive integer, got 0",
        "error: --batch-size must be a positive integer, got 0",
    ]


# -- huge images -------------------------------------------------------------------------------------------
def _png(path: Path, width: int, height: int, row: bytes | None) -> Path:
    """A 1-bit grayscale PNG of `height` copies of the scanline `row`, zlib-compressed as a stream
    (a few KB however large the image); `row=None` writes no pixel data at all."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if row is not None:
        z = zlib.compressobj(9)
        idat = b"".join(z.compress(b"\x00" + row) for _ in range(height)) + z.flush()
        png += chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("bomb", ["zlib bomb", "header only"])
def test_decompression_bomb_is_an_error_row(capfd, tmp_path, export_dir, inputs, bomb) -> None:
    """A 20000 x 20000 PNG (400 Mpixels, 49 KB of zlib) or a bare header claiming 100000 x 100000."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(inputs["img"], folder / "a.png")
    if bomb == "zlib bomb":
        _png(folder / "bomb.png", 20_000, 20_000, bytes(2500))
        pixels = "400000000"
    else:
        _png(folder / "bomb.png", 100_000, 100_000, None)
        pixels = "10000000000"
    code, out, err = run(capfd, "infer", export_dir, folder, "-o", tmp_path / "rows.jsonl")
    assert code == 1
    assert err.startswith("files: 2  classified: 1  ") and "errors: 1" in err and len(err.splitlines()) == 1
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "bomb.png"]
    assert rows[0]["error"] == "" and rows[0]["stage"] in ("coarse", "fine")
    assert rows[1]["stage"] is None and rows[1]["topk"] == []
    assert re.fullmatch(
        rf"Image size \({pixels} pixels\) exceeds limit of 178956970 pixels, could be decompression "
        r"bomb DOS attack\.; above the limit of 89,478,485 \(possible decompression bomb; raise it "
        r"with --max-pixels\)",
        rows[1]["error"],
    )


def test_max_pixels_raises_and_lowers_the_limit(capfd, tmp_path, export_dir, inputs) -> None:
    """A real 9473 x 9473 image (89,737,729 pixels) is just above the default limit of 89,478,485."""
    big = tmp_path / "big.png"
    Image.new("L", (9473, 9473), 128).save(big)
    proc = run_subprocess("infer", export_dir, big)  # a fresh process: PIL's own warning must not show either
    assert proc.returncode == 1
    assert proc.stdout == (
        f"{big}\terror: image is 9473x9473 = 89,737,729 pixels, above the limit of 89,478,485 "
        "(possible decompression bomb; raise it with --max-pixels)\n"
    )
    assert re.fullmatch(
        r"files: 1  classified: 0  exited at coarse: 0 \(0\.0%\)  went to fine: 0  errors: 1  "
        r"0\.0 img/s\n",
        proc.stderr,
    )
    code, out, err = run(capfd, "infer", export_dir, big, "--max-pixels", "90000000")
    assert code == 0
    assert out.startswith(f"{big}\tcoarse\t") or out.startswith(f"{big}\tfine\t")
    assert err.startswith("files: 1  classified: 1  ")
    code, out, err = run(capfd, "infer", export_dir, inputs["img"], "--max-pixels", "1599")
    assert code == 1
    assert out == (
        f"{inputs['img']}\terror: image is 40x40 = 1,600 pixels, above the limit of 1,599 "
        "(possible decompression bomb; raise it with --max-pixels)\n"
    )


# -- two exports to the same folder at once (issue 13 item 2) ---------------------------------------------
@pytest.mark.slow
def test_two_concurrent_exports_exactly_one_wins(tmp_path) -> None:
    """Both runs pass the existence check at start; the no-clobber rename at the end lets only one win."""
    from cfvit_deploy.manifest import Manifest

    out = tmp_path / "same"
    argv = [sys.executable, "-c", ENTRY, "export", str(FIXTURES / "deit_g7.pth"), "--out", str(out), "--num-heads", "3"]
    procs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert re.search(rf"^error: {re.escape(str(out))} already exists", loser, re.M), loser
    assert "exported CF-ViT" not in loser  # the loser does not claim success
    Manifest.load(out)  # the winner's export, complete and consistent
    assert [p.name for p in tmp_path.iterdir()] == ["same"]  # the loser left nothing behind


def test_export_says_which_weights_it_loaded(capfd, tmp_path) -> None:
    """timm's saver keeps trained and EMA weights: the default takes the EMA, says so and records it (item 20)."""
    state = torch.load(FIXTURES / "deit_g7.pth", weights_only=True)["model"]
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, tmp_path / "last.pth.tar")
    code, out, err = run(
        capfd, "export", tmp_path / "last.pth.tar", "-o", tmp_path / "exp", "--num-heads", "3", "--no-simplify"
    )
    assert code == 0, err
    assert f"loaded the EMA weights (state_dict_ema) of {tmp_path / 'last.pth.tar'}" in err
    source = json.loads((tmp_path / "exp" / "manifest.json").read_text())["source"]
    assert source["checkpoint"]["weights"] == "state_dict_ema"
    code, out, err = run(
        capfd,
        "export",
        tmp_path / "last.pth.tar",
        "-o",
        tmp_path / "exp2",
        "--num-heads",
        "3",
        "--no-simplify",
        "--weights",
        "model",
    )
    assert code == 0 and "loaded the trained weights (state_dict)" in err


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
