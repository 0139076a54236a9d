"""The CLI's plumbing (cli.py keeps the commands): errors as one line, signals, logging, progress, extras.

Every command runs with SIGTERM handled like Ctrl-C, one rich logging handler on stderr, and its extras
checked before any work. User errors (:class:`~cfvit_deploy.errors.CFViTError`) print one line
``error: ...`` and exit with the error's code; a traceback only with ``--debug``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from ..errors import CFViTError
from ..extras import require
from ..io import disk_error_reason
from ..progress import ProgressHook
from ..signals import EXIT_SIGTERM, exit_code_for, sigterm_as_interrupt

LIBRARY_LOGGERS = ("cfvit_deploy", "exporters", "runtimes")


def version() -> str:
    """The installed distribution's version (the source tree's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cfvit-deploy")
    except PackageNotFoundError:
        from cfvit_deploy import __version__

        return __version__


class _LibraryOrWarning(logging.Filter):
    """Pass the toolkit's own records, and third-party records only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in LIBRARY_LOGGERS


def _stderr_handler() -> logging.Handler:
    """Rich's handler on a terminal; elsewhere (a log file, a pipe) plain ``LEVEL    message`` lines, so
    a redirected log is neither wrapped at 80 columns nor padded with trailing spaces."""
    console = Console(stderr=True)
    if console.is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=console, show_time=False, show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    return handler


@contextlib.contextmanager
def logging_to_stderr() -> Iterator[None]:
    """One rich handler on stderr for the duration of a command, removed afterwards.

    It sits on the root logger (pytest's caplog still sees every record) and passes the toolkit's
    loggers from INFO (DEBUG with --debug, set by the root callback) and other libraries from WARNING.
    """
    root = logging.getLogger()
    handler = _stderr_handler()
    handler._cfvit = True  # type: ignore[attr-defined]
    handler.addFilter(_LibraryOrWarning())
    levels = {name: logging.getLogger(name).level for name in ("", *LIBRARY_LOGGERS)}
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def print_table(table: Any) -> None:
    """A rich table on stdout: the terminal's width there; elsewhere (a file, a pipe) up to 200 columns,
    no colour codes, and no trailing spaces (rich pads titles and captions to the width)."""
    if sys.stdout.isatty():
        Console().print(table)
        return
    console = Console(width=200, no_color=True, highlight=False)
    with console.capture() as captured:
        console.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


@contextlib.contextmanager
def progress_bars(console: Console) -> Iterator[Optional[ProgressHook]]:
    """A :class:`ProgressHook` that draws rich bars on stderr, or None when stderr is not a terminal."""
    err = console
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bars:
        tasks: dict[str, Any] = {}

        def hook(task: str, done: int, total: Optional[int]) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        yield hook


def needs(extra: str, command: str, *modules: str) -> None:
    """Preflight: one `error:` line naming the extra, before the command does any work. `extra` may
    list several ("export,train,bench"): the one pip line then installs everything the command needs."""
    for module in modules:
        require(module, extra, f"cfvit {command}")


def needs_provider(command: str, *providers: str) -> None:
    if "openvino" in providers:
        require("openvino", "openvino", f"cfvit {command} --provider openvino")


def needs_infer(output: Optional[Path], engine: str, provider: str) -> None:
    if engine == "ray":
        require("ray", "ray", "cfvit infer --engine ray")
    if output is not None and output.suffix.lower() == ".parquet":
        require("pyarrow", "parquet", "cfvit infer -o *.parquet")
    needs_provider("infer", provider)


def bench_needs(export_dir: Path, precisions: Optional[str], torch: bool) -> None:
    """bench: psutil and matplotlib always; onnx only when a precision variant must be built; torch with --torch."""
    needs("bench", "bench", "psutil", "matplotlib")
    if torch:
        require("torch", "bench,export", "cfvit bench --torch")
    if precisions:
        from cfvit_deploy.errors import ManifestError
        from cfvit_deploy.manifest import Manifest

        try:
            manifest = Manifest.load(export_dir, verify=False)
        except ManifestError:
            return  # bench reports the unusable export itself
        label = manifest.precision
        if manifest.optimized:
            label = "optimized" if label == "fp32" else f"{label}-optimized"
        if any(p.strip() and p.strip() != label for p in precisions.split(",")):
            require("onnx", "bench", "cfvit bench --precisions (building a variant)")


class _Interrupted(Exception):
    """Carries a Ctrl-C / SIGTERM out of typer, which would turn it into a silent exit code 130."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__(str(interrupt))
        self.interrupt = interrupt


class _Command(typer.core.TyperCommand):
    """Every command: interrupts reach main(); usage lines read EXPORT_DIR INPUTS..., not {export_dir}."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted(exc) from exc

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def _interrupt_line(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for Ctrl-C (130) or SIGTERM (143); a command may attach its own summary."""
    code = exit_code_for(exc)
    message = str(exc) or ("terminated (SIGTERM)" if code == EXIT_SIGTERM else "interrupted")
    return message, code


def use_plain_commands(app: typer.Typer) -> None:
    """Give every command of `app` the :class:`_Command` class (interrupts reach main, plain usage lines)."""
    for info in app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):  # commands added with their own class keep it
            info.cls = _Command


def run_app(app: typer.Typer, argv: Optional[list[str]], debug: dict[str, bool]) -> int:
    """Run `app` like the console script: the exit code, errors as one line on stderr.

    Every command runs with SIGTERM handled like Ctrl-C (what is done is kept), then one line on
    stderr: ``error: interrupted`` and exit 130, or ``error: terminated (SIGTERM)`` and exit 143.
    """
    with sigterm_as_interrupt(), logging_to_stderr():
        try:
            return _run(app, argv, debug)
        except KeyboardInterrupt as exc:  # also a SIGTERM arriving while an error is being reported
            message, code = _interrupt_line(exc)
            print(f"error: {message}", file=sys.stderr)
            return code


def disk_error_line(exc: OSError) -> str | None:
    """``cannot write PATH: REASON`` for a full, read-only, over-quota or unwritable disk, else None (a bug)."""
    reason = disk_error_reason(exc)
    if reason is None:
        return None
    return f"cannot write {os.fsdecode(exc.filename) if exc.filename else 'an output'}: {reason}"


def _run(app: typer.Typer, argv: Optional[list[str]], debug: dict[str, bool]) -> int:
    try:
        result = app(args=argv, prog_name="cfvit", standalone_mode=False)
    except CFViTError as exc:
        if debug["debug"] or "--debug" in (argv if argv is not None else sys.argv):
            traceback.print_exc()  # then the same line and exit code as without --debug
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        message, code = _interrupt_line(exc)
        print(f"error: {message}", file=sys.stderr)
        return code
    except _Interrupted as exc:
        message, code = _interrupt_line(exc.interrupt)
        print(f"error: {message}", file=sys.stderr)
        return code
    except typer.Exit as exc:
        return exc.exit_code
    except OSError as exc:  # a disk error outside the atomic writers (which raise OutputError themselves)
        line = disk_error_line(exc)
        if line is None:
            raise
        if debug["debug"] or "--debug" in (argv if argv is not None else sys.argv):
            traceback.print_exc()
        print(f"error: {line}", file=sys.stderr)
        return 1
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click's usage errors (typer vendors click): duck-typed
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            message = exc.format_message()
            if type(exc).__name__ == "NoArgsIsHelpError":  # `cfvit` (or a command) alone: the help, no error
                print(message)
            elif message:
                print(f"error: {message}", file=sys.stderr)
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0
