"""Docs that cannot drift (issue 23 item 6): every `--option` the docs give a `cfvit` command exists in that
command's --help, and every command's options are documented somewhere.

The options come from the merged CLI itself (click's parameters behind ``cfvit CMD --help``), so an option
added or renamed by any change is checked against whatever the docs say at that moment. An option is
attributed to a command when it follows ``cfvit CMD`` in a code span or a code-block line (with that
line's indented or backslash continuation lines), or when it stands alone in a code span of the
command's own page (``docs/serve.md`` for ``serve``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

import cli

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
COMMAND = re.compile(r"\bcfvit\s+(?:--debug\s+)?([a-z][a-z-]*)")


def cli_options() -> tuple[dict[str, set[str]], set[str]]:
    """(command -> its long options, the root's options), as --help lists them."""
    group = typer.main.get_command(cli.app)
    names = {p_opt for p in group.params for p_opt in (*p.opts, *p.secondary_opts)}
    commands = {
        name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }
    return commands, names | {"--help"}


def _code_block_lines(text: str) -> list[str]:
    """The command lines of fenced code blocks, each joined with its continuation lines."""
    lines: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for raw in block.splitlines():
            continues = lines and (lines[-1].endswith("\\") or (raw[:1].isspace() and "cfvit" in lines[-1]))
            if continues and raw.strip() and "cfvit" not in raw.split("#")[0][:12]:
                lines[-1] = lines[-1].rstrip("\\") + " " + raw.strip()
            else:
                lines.append(raw.split("  #")[0].rstrip())
    return lines


def documented_options(commands: set[str]) -> dict[tuple[str, str], list[str]]:
    """(command, option) -> where the docs give that option to that command."""
    found: dict[tuple[str, str], list[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        page_command = doc.stem if doc.parent.name == "docs" and doc.stem in commands else None
        pieces = _code_block_lines(text)
        # options of the page's scripts (`python benchmarks/x.py ... --opt`): a bare `--opt` may be theirs
        scripts = {o for line in pieces if re.match(r"\s*python\b", line) for o in OPTION.findall(line)}
        for paragraph in re.sub(r"```.*?```", "", text, flags=re.S).split("\n\n"):
            spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", paragraph)
            # a bare `--option` on a command's page is that command's, unless the paragraph is about a script
            own = page_command if page_command and not re.search(r"\bpython\b|benchmarks/|tools/", paragraph) else None
            pieces += [
                f"cfvit {own} {span}"
                if own and span.strip().startswith("--") and span.split()[0] not in scripts
                else span
                for span in spans
            ]
        for piece in pieces:
            starts = [(m.start(), m.group(1)) for m in COMMAND.finditer(piece) if m.group(1) in commands]
            for i, (start, command) in enumerate(starts):
                end = starts[i + 1][0] if i + 1 < len(starts) else len(piece)
                for option in OPTION.findall(piece[start:end]):
                    found.setdefault((command, option), []).append(doc.name)
    return found


def test_every_documented_option_exists_in_its_commands_help() -> None:
    commands, root = cli_options()
    found = documented_options(set(commands))
    assert len(found) > 50, "the docs scan found too little: has the docs' form changed?"
    missing = {
        f"cfvit {command} {option} ({', '.join(sorted(set(where)))})"
        for (command, option), where in found.items()
        if option not in commands[command] and option not in root
    }
    assert not missing, "documented but not in --help:\n" + "\n".join(sorted(missing))


#: The options a user of each command needs first: each must be in the command's --help AND given to
#: the command in the docs (the reverse check; the rest of --help is reference, not checked both ways).
MAIN_OPTIONS = {
    "make-data": ("--per-class",),
    "train": ("--synthetic", "--epochs", "--threads", "--resume", "--out"),
    "export": ("--out", "--precision", "--baseline", "--eta", "--calibration"),
    "validate": ("--checkpoint", "--images"),
    "infer": ("--eta", "--output", "--batch-size", "--provider", "--engine", "--overlay"),
    "bench": ("--providers", "--precisions", "--batch-sizes", "--repeats", "--quiet-below"),
    "sweep": ("--etas", "--max-drop", "--max-latency-ms", "--write-eta", "--repeats", "--quiet-below"),
    "demo": ("--out", "--quick", "--force"),
    "triton-repo": ("--out", "--max-batch-size", "--instances", "--force"),
    "serve": ("--host", "--port", "--eta", "--max-batch", "--max-wait-ms", "--engine", "--threads", "--shared-threads"),
}


def test_every_commands_main_options_are_documented() -> None:
    """The reverse: each command's main options exist in its --help and the docs give them to it."""
    commands, _ = cli_options()
    assert set(MAIN_OPTIONS) == set(commands), "a command was added or removed: list its main options"
    found = documented_options(set(commands))
    not_in_help = {f"cfvit {c} {o}" for c, options in MAIN_OPTIONS.items() for o in options if o not in commands[c]}
    assert not not_in_help, "main options missing from --help:\n" + "\n".join(sorted(not_in_help))
    undocumented = {f"cfvit {c} {o}" for c, options in MAIN_OPTIONS.items() for o in options if (c, o) not in found}
    assert not undocumented, "main options no doc gives to their command:\n" + "\n".join(sorted(undocumented))


@pytest.mark.parametrize(
    "doc, command, option",
    [
        ("`cfvit serve --per-session-threads`", "serve", "--per-session-threads"),
        (
            "```\ncfvit sweep EXPORT FOLDER [--etas 0:1:0.1]\n            [--no-such-flag]\n```",
            "sweep",
            "--no-such-flag",
        ),
    ],
)
def test_the_scan_attributes_options_to_their_command(tmp_path, monkeypatch, doc, command, option) -> None:
    """The scan itself: an option after `cfvit CMD` (inline, or on a usage block's continuation line) is CMD's."""
    page = tmp_path / "page.md"
    page.write_text(f"Some prose.\n\n{doc}\n")
    monkeypatch.setattr(f"{__name__}.DOCS", [page])
    assert (command, option) in documented_options({"serve", "sweep"})
