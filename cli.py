"""`cfvit` command line: a thin Typer layer over the library (every command has a Python twin).

User errors (:class:`cfvit_deploy.errors.CFViTError`) print one line ``error: ...`` and exit 1
(2 for usage errors); a traceback is shown only with ``--debug``. Internal errors keep theirs.
"""

from __future__ import annotations

from typing import Optional

import cfvit_deploy.app.commands_model  # noqa: F401  (registers export, validate, train, make-data)
import cfvit_deploy.app.commands_serving  # noqa: F401  (registers infer, bench, sweep, demo, serve)
from cfvit_deploy.app.cli_app import _state, app, console, progress_hook  # noqa: F401  (the API of this module)
from cfvit_deploy.app.cli_support import bench_needs, run_app, use_plain_commands, version  # noqa: F401

use_plain_commands(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit code (errors as one line, SIGTERM like Ctrl-C)."""
    return run_app(app, argv, _state)


if __name__ == "__main__":
    raise SystemExit(main())
