"""Helpers for the CLI error tests (test_errors_*.py): run a command in process or in a fresh interpreter,
and check that stderr is one ``error: ...`` line.

Every command's user errors through the CLI: one ``error: ...`` line on stderr, the right exit code.

Exit codes: 2 for a usage error (a bad flag, an output that exists or cannot be written), 1 for a
failure (unusable export, checkpoint or provider), 0 when the work was done. ``--debug`` adds the
traceback. stderr is captured at the file-descriptor level (``capfd``), so lines printed by native
code (ONNX Runtime's C++ logger) count too. The subprocess tests run ``cli.main`` in a fresh
interpreter, as the console script does, to show what reaches a terminal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[3]
ENTRY = "import sys, cli; sys.exit(cli.main(sys.argv[1:]))"


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_GPU = _has_gpu()


no_gpu = pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU")


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
