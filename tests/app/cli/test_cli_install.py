"""The CLI's shell: missing extras, signals, help texts, --version, logging (issue 12 item 2, issue 13 items 3, 8, 12).

A missing optional module is simulated with ``sys.modules[name] = None`` (``import`` then raises
``ModuleNotFoundError`` exactly as on a base install); the real base install is checked by
``.ci/base_install_check.sh``. Signals are sent to a real ``cfvit`` subprocess whose command is held
at a known point (its library function replaced by one that says "ready" and sleeps), so the test is
exact about when the signal lands.
"""

from __future__ import annotations

import importlib
import logging
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[3]
COMMANDS = ("export", "validate", "train", "make-data", "infer", "bench", "sweep", "demo")


def run(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


# -- missing extras: one line naming the extra, exit 1, nothing done ---------------------------------------
MISSING = {
    "export": (["export", "{tmp}/x.pth", "-o", "{tmp}/out"], "torch", "export"),
    "export-onnxsim": (["export", "{tmp}/x.pth", "-o", "{tmp}/out"], "onnxsim", "export"),
    "validate": (["validate", "{tmp}/exp"], "torch", "export"),
    "validate-openvino": (["validate", "{tmp}/exp", "--provider", "openvino"], "openvino", "openvino"),
    "train": (["train", "{tmp}/data", "--out", "{tmp}/out"], "torch", "train"),
    "bench": (["bench", "{tmp}/exp", "--out", "{tmp}/out"], "psutil", "bench"),
    "bench-plots": (["bench", "{tmp}/exp", "--out", "{tmp}/out"], "matplotlib", "bench"),
    "bench-torch": (["bench", "{tmp}/exp", "--torch"], "torch", "bench,export"),
    "sweep": (["sweep", "{tmp}/exp", "{tmp}/lab", "-o", "{tmp}/out"], "matplotlib", "bench"),
    # issue 23 item 7: every extra the demo needs in one pip line, whichever module is missing
    "demo-export": (["demo", "--out", "{tmp}/out"], "onnx", "export,train,bench"),
    "demo-torch": (["demo", "--out", "{tmp}/out"], "torch", "export,train,bench"),
    "demo-bench": (["demo", "--out", "{tmp}/out"], "psutil", "export,train,bench"),
    "infer-parquet": (["infer", "{tmp}/exp", "{tmp}/img.png", "-o", "{tmp}/out.parquet"], "pyarrow", "parquet"),
    "infer-ray": (["infer", "{tmp}/exp", "{tmp}/img.png", "--engine", "ray"], "ray", "ray"),
    "infer-openvino": (["infer", "{tmp}/exp", "{tmp}/img.png", "--provider", "openvino"], "openvino", "openvino"),
}


@pytest.mark.parametrize("case", MISSING)
def test_missing_extra_is_one_line_naming_it(capfd, monkeypatch, tmp_path, case) -> None:
    template, module, extra = MISSING[case]
    monkeypatch.setitem(sys.modules, module, None)  # what a base install looks like to `import`
    code, out, err = run(capfd, *[a.format(tmp=tmp_path) for a in template])
    assert code == 1, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{module} is not installed" in lines[0] and f"pip install 'cfvit-deploy[{extra}]'" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.parquet").exists()  # checked before any work


def test_bench_needs_onnx_only_to_build_a_variant(capfd, monkeypatch, tmp_path, export_dir_factory) -> None:
    export = export_dir_factory("deit_g7")  # an fp32 export: int8 must be built (onnx), fp32 must not
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, _, err = run(capfd, "bench", export, "--precisions", "int8", "--in-process", "--iterations", "1")
    assert code == 1 and err.splitlines() == [
        "error: onnx is not installed (needed for cfvit bench --precisions (building a variant)): "
        "pip install 'cfvit-deploy[bench]'"
    ], err
    cli.bench_needs(export, "fp32", torch=False)  # the export's own precision needs no onnx: no raise


def test_sweep_checks_matplotlib_before_it_computes(capfd, monkeypatch, tmp_path) -> None:
    computed = []
    import cfvit_deploy.app.sweep

    monkeypatch.setattr(cfvit_deploy.app.sweep, "sweep", lambda *a, **k: computed.append(1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capfd, "sweep", tmp_path / "exp", tmp_path, "-o", tmp_path / "out")
    assert code == 1 and "cfvit-deploy[bench]" in err and computed == []


@pytest.mark.parametrize(
    "module",
    [
        "cfvit_deploy.model",
        "cfvit_deploy.checkpoints",
        "cfvit_deploy.training",
        "exporters.onnx_export",
        "exporters.validation",
    ],
)
def test_torch_side_modules_name_the_extra_without_torch(monkeypatch, module) -> None:
    from cfvit_deploy.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "torch", None)
    for name in [m for m in sys.modules if m == module or m.startswith(("cfvit_deploy.", "exporters"))]:
        if name not in ("cfvit_deploy.errors", "cfvit_deploy.extras"):
            monkeypatch.delitem(sys.modules, name)  # restored afterwards by monkeypatch
    import cfvit_deploy

    monkeypatch.delattr(cfvit_deploy, "_torch_guard", raising=False)  # else `from . import` finds the old one
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'cfvit-deploy[export]'")):
        importlib.import_module(module)


# -- signals: every command, one line, 130 / 143 -----------------------------------------------------------
HOLD = {  # command line, and the library function the CLI calls (replaced by "say ready, then wait")
    "make-data": (["make-data", "{tmp}/data"], "cfvit_deploy.data.synthetic", "generate_synthetic"),
    "train": (["train", "{tmp}/data", "--out", "{tmp}/m.pth"], "cfvit_deploy.training", "train"),
    "validate": (["validate", "{tmp}/exp"], "exporters", "validate"),
    "demo": (["demo", "--out", "{tmp}/demo"], "cfvit_deploy.app.demo", "run_demo"),
}


def _held_cli(tmp_path: Path, case: str) -> subprocess.Popen[str]:
    argv, module, name = HOLD[case]
    script = textwrap.dedent(f"""
        import sys, time, importlib
        import cli
        def held(*args, **kwargs):
            print("ready", flush=True)
            time.sleep(120)
        setattr(importlib.import_module({module!r}), {name!r}, held)
        sys.exit(cli.main({[a.format(tmp=tmp_path) for a in argv]!r}))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("case", HOLD)
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGTERM, 143, "error: terminated (SIGTERM)"), (signal.SIGINT, 130, "error: interrupted")],
)
def test_signal_is_one_line_and_its_exit_code(tmp_path, case, sig, code, line) -> None:
    proc = _held_cli(tmp_path, case)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.splitlines() == [line]


def test_sigterm_during_a_real_training_run(tmp_path) -> None:
    """Not held: SIGTERM lands inside torch's training loop and still gives the one line and 143."""
    from cfvit_deploy.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", 4, 2, 0, 64, 0.5, False)
    script = textwrap.dedent(f"""
        import sys, cfvit_deploy.training as t, cli
        real = t.train
        def train(*args, **kwargs):
            print("ready", flush=True)
            return real(*args, **kwargs)
        t.train = train
        sys.exit(cli.main(["train", {str(data)!r}, "--epochs", "500", "--no-progress", "--threads", "1",
                           "--out", {str(tmp_path / "m.pth")!r}]))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "error: terminated (SIGTERM)" and "Traceback" not in err
    assert not (tmp_path / "m.pth").exists()


# -- help and version ---------------------------------------------------------------------------------------
def _help(capfd, *argv: str) -> str:
    code, out, err = run(capfd, *argv)
    assert code == 0 and err == "", err
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_placeholders_and_dash_h_works(capfd, command) -> None:
    text = _help(capfd, command, "-h")
    assert text == _help(capfd, command, "--help")
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: cfvit {command} [OPTIONS]") and "{" not in usage, usage
    assert "<bool>" not in text


def test_help_keeps_the_brackets_of_an_extra(capfd) -> None:
    text = re.sub(r"-\n\s+", "-", _help(capfd, "infer", "-h"))  # undo the line wrap at "cfvit-"
    assert "pip install 'cfvit-deploy[ray]'" in text


def test_version(capfd) -> None:
    from importlib.metadata import version

    assert _help(capfd, "--version").strip() == f"cfvit-deploy {version('cfvit-deploy')}"
    assert "-h, --help" in _help(capfd, "-h")


# -- one logging handler, one progress hook -----------------------------------------------------------------
def test_library_logs_go_to_stderr_and_third_party_info_does_not(capfd, monkeypatch, tmp_path) -> None:
    import cfvit_deploy.data.synthetic as synthetic

    def noisy(*args, **kwargs):
        logging.getLogger("runtimes.something").info("library says hello")
        logging.getLogger("some_dependency").info("dependency chatter")
        logging.getLogger("some_dependency").warning("dependency warning")
        return synthetic.SyntheticResult(tmp_path, "written")

    monkeypatch.setattr(synthetic, "generate_synthetic", noisy)
    code, out, err = run(capfd, "make-data", tmp_path / "d")
    assert code == 0
    assert "library says hello" in err and "dependency warning" in err and "dependency chatter" not in err
    assert "hello" not in out
    assert not any(getattr(h, "_cfvit", False) for h in logging.getLogger().handlers)  # removed after the command


def test_progress_hook_draws_nothing_off_a_terminal(capfd) -> None:
    with cli.progress_hook() as hook:
        assert hook is None  # stderr is captured here: no bars, callers pass None to the library
    assert capfd.readouterr() == ("", "")
