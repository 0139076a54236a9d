"""Outputs through the CLI: existing ones need --force and stay untouched; folders are not files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.app.cli.support import assert_one_error, lit, run
from tests.conftest import FIXTURES


# -- outputs: existing ones need --force and are left untouched; folders are not files ----------------
def _keep_file(path: Path) -> Callable[[], bool]:
    path.write_bytes(b"keep me\n")
    return lambda: path.read_bytes() == b"keep me\n"


def _keep_folder(path: Path) -> Callable[[], bool]:
    path.mkdir()
    (path / "keep.txt").write_text("keep me")
    return lambda: [p.name for p in path.iterdir()] == ["keep.txt"] and (path / "keep.txt").read_text() == "keep me"


EXISTING_CASES = {
    "infer": (["infer", "{export}", "{img}", "-o", "{out}"], "rows.csv", _keep_file),
    "export": (["export", "{ckpt}", "-o", "{out}", "--num-heads", "3"], "exp", _keep_folder),
    "bench": (["bench", "{export}", "--out", "{out}"], "bench", _keep_folder),
    "sweep": (["sweep", "{export}", "{lab}", "-o", "{out}"], "sw", _keep_folder),
    "train": (["train", "{tmp}/data", "--out", "{out}"], "model.pth", _keep_file),
    "make-data": (["make-data", "{out}"], "data", _keep_folder),
}


@pytest.mark.parametrize("command", list(EXISTING_CASES))
def test_existing_output_without_force_is_refused_and_untouched(capfd, tmp_path, export_dir, inputs, command) -> None:
    template, name, keep = EXISTING_CASES[command]
    out_path = tmp_path / name
    unchanged = keep(out_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    values = {
        "export": export_dir,
        "img": inputs["img"],
        "lab": inputs["lab"],
        "ckpt": FIXTURES / "deit_g7.pth",
        "tmp": tmp_path,
        "out": out_path,
    }
    code, out, err = run(capfd, *(arg.format(**values) for arg in template))
    assert code == 2
    assert_one_error(err, lit(f"error: {out_path} already exists; pass --force to overwrite it"))
    assert unchanged()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "data"})  # no temporary leftovers


def test_infer_output_that_is_a_folder_is_refused_even_with_force(capfd, tmp_path, export_dir, inputs) -> None:
    unchanged = _keep_folder(tmp_path / "rows.csv")
    code, out, err = run(capfd, "infer", export_dir, inputs["img"], "-o", tmp_path / "rows.csv", "--force")
    assert code == 2
    assert_one_error(err, lit(f"error: {tmp_path / 'rows.csv'} is a folder; give a file name for the output"))
    assert unchanged() and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_validate_report_that_is_a_folder_is_one_line(capfd, tmp_path, export_dir) -> None:
    unchanged = _keep_folder(tmp_path / "r.json")
    code, out, err = run(
        capfd, "validate", export_dir, "--batch-sizes", "1", "--etas", "0.5", "--report", tmp_path / "r.json"
    )
    assert code == 2
    assert_one_error(err, lit(f"error: {tmp_path / 'r.json'} is a folder; give a file name for the output"))
    assert unchanged()
