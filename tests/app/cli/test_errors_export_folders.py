"""Unusable export folders given to infer/validate/bench/sweep: one ``error: ...`` line, exit 1."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.app.cli.support import assert_one_error, lit, run, run_subprocess


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


def test_subprocess_unusable_export_is_one_line(tmp_path, export_dir, g9_export, inputs) -> None:
    d, pattern = _damage("manifest of another export", tmp_path, export_dir, g9_export, inputs["img"])
    proc = run_subprocess("validate", d)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(proc.stderr, pattern)
