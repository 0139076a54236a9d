"""What reaches a terminal: ``cli.main`` in a fresh interpreter, as the console script runs it."""

from __future__ import annotations

from tests.app.cli.support import run_subprocess


# -- what reaches a terminal (fresh interpreter) -----------------------------------------------------------
def test_subprocess_usage_error_is_one_line(export_dir, inputs) -> None:
    proc = run_subprocess("infer", export_dir, inputs["img"], "--eta", "nan")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "error: --eta must lie in [0, 1], got nan\n")


def test_subprocess_debug_shows_the_traceback(export_dir, inputs) -> None:
    proc = run_subprocess("--debug", "infer", export_dir, inputs["img"], "--batch-size", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == [
        "cfvit_deploy.errors.UsageError: --batch-size must be a positive integer, got 0",
        "error: --batch-size must be a positive integer, got 0",
    ]
