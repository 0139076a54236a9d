"""`cfvit` command line: a thin Typer layer over the library (every command has a Python twin).

User errors (:class:`cfvit_deploy.errors.CFViTError`) print one line ``error: ...`` and exit 1
(2 for usage errors); a traceback is shown only with ``--debug``. Internal errors keep theirs.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from cfvit_deploy.errors import CFViTError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="CF-ViT deployment toolkit: train, export, validate, infer, bench, sweep, demo.",
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too.")) -> None:
    _state["debug"] = debug


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        result = app(args=argv, standalone_mode=False)
    except CFViTError as exc:
        if _state["debug"] or "--debug" in (argv if argv is not None else sys.argv):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click's usage errors (typer vendors click): duck-typed
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
