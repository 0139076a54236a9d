"""GPU providers on a machine without a GPU: one ``error: ...`` line, or a CPU run with --allow-fallback."""

from __future__ import annotations

import pytest

from tests.app.cli.support import assert_one_error, no_gpu, run, run_subprocess


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


@no_gpu
def test_subprocess_tensorrt_without_gpu_prints_nothing_else(export_dir, inputs) -> None:
    """ONNX Runtime's C++ log lines and its own 'EP Error' retry prints (on stdout) must not show."""
    proc = run_subprocess("infer", export_dir, inputs["img"], "--provider", "tensorrt")
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(proc.stderr, _gpu_refusal("tensorrt"))
