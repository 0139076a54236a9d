"""The Typer app that `cfvit` runs: its root options, the stderr console and the progress bars.

The commands live in :mod:`cfvit_deploy.app.commands_model` (export, validate, train, make-data) and
:mod:`cfvit_deploy.app.commands_serving` (infer, bench, sweep, demo, serve); ``cli.py`` is the entry point.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import typer
from rich.console import Console

from cfvit_deploy.app.cli_support import (
    LIBRARY_LOGGERS,
    progress_bars,
    version,
)
from cfvit_deploy.progress import ProgressHook

# rich_markup_mode=None: help is plain text, so "pip install 'cfvit-deploy[ray]'" keeps its brackets
# (rich markup would eat them) and flags get no "<bool>" placeholder.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="CF-ViT deployment toolkit: make-data, train, export, validate, infer, serve, bench, sweep, demo, triton-repo.",
)
console = Console(stderr=True)
# off a terminal (a log file, a pipe) nothing is wrapped at rich's default 80 columns: one message, one line
console.soft_wrap = not console.is_terminal
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        print(f"cfvit-deploy {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug
    if debug:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


def progress_hook() -> contextlib.AbstractContextManager[Optional[ProgressHook]]:
    """Rich progress bars on stderr as a :class:`ProgressHook` (None when stderr is not a terminal)."""
    return progress_bars(console)
