"""A disk that refuses an output (full, read-only, over quota, not writable) is one `error:` line naming
the output and the reason, exit 1, no traceback; the old output is untouched and no temporary is left;
an overlay PNG that cannot be written does not cost the rows (issue 22, item 7).

The disk errors are injected where the kernel would report them (the temporary's creation for a
read-only or unwritable folder, a write or the final rename for a full disk); where this process may
mount a small tmpfs (root in a container that allows it) the same is checked on a really full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.errors import OutputError
from cfvit_deploy.io import atomic_directory, atomic_write_path
from tests.conftest import FIXTURES

REASONS = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EACCES: "Permission denied",
}


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disk-inputs")
    rng = np.random.default_rng(0)
    (root / "lab" / "c0").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "lab" / "c0" / f"{i}.png")
    return {"img": root / "lab" / "c0" / "0.png", "lab": root / "lab", "dir": root / "lab" / "c0"}


def _oserror(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), *(() if filename is None else (filename,)))


def refuse_folder(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Creating any temporary in `folder` fails with `code`, as on a read-only or unwritable mount."""
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def inside(directory: object) -> bool:
        return directory is not None and Path(str(directory)).resolve() == folder.resolve()

    def mkstemp(*args, **kwargs):
        if inside(kwargs.get("dir")):
            raise _oserror(code, str(folder / "x.tmp"))
        return real_mkstemp(*args, **kwargs)

    def mkdtemp(*args, **kwargs):
        if inside(kwargs.get("dir")):
            raise _oserror(code, str(folder / "x.tmp"))
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def one_error_line(capfd: pytest.CaptureFixture[str], code: int, pattern: str) -> str:
    """Exit 1 and one `error:` line matching `pattern`, the last line on stderr (bench's progress may come before)."""
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 1, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert re.fullmatch(pattern, lines[-1]), err
    assert "Traceback" not in err
    return lines[-1]


# -- the atomic writers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_failed_write_is_an_output_error_and_keeps_the_old_file(tmp_path, code):
    path = tmp_path / "rows.csv"
    path.write_text("old\n")
    match = f"^cannot write {re.escape(str(path))}: {REASONS[code]}$"
    with pytest.raises(OutputError, match=match), atomic_write_path(path) as tmp, open(tmp, "w") as f:
        f.write("new")
        raise _oserror(code)  # what f.write/flush raise on a full disk
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["rows.csv"]


def test_a_failed_rename_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def replace(src, dst):
        raise _oserror(errno.EDQUOT, str(src))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="Disk quota exceeded"), atomic_write_path(path) as tmp:
        Path(tmp).write_text("new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_folder_is_an_output_error_before_anything_is_written(tmp_path, monkeypatch, code):
    refuse_folder(monkeypatch, tmp_path, code)
    match = f"cannot write .*out.csv: {REASONS[code]}"
    with pytest.raises(OutputError, match=match), atomic_write_path(tmp_path / "out.csv"):
        pytest.fail("the body must not run")
    with pytest.raises(OutputError, match=REASONS[code]), atomic_directory(tmp_path / "export"):
        pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_inside_an_output_folder_keeps_the_old_folder(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("old")
    match = rf"cannot write {re.escape(str(tmp_path / 'export'))}: No space"
    with pytest.raises(OutputError, match=match), atomic_directory(tmp_path / "export", force=True) as tmp:
        raise _oserror(errno.ENOSPC, str(tmp / "coarse.onnx"))
    assert os.listdir(tmp_path) == ["export"] and (tmp_path / "export" / "keep.txt").read_text() == "old"


def test_permission_denied_on_another_file_is_not_this_outputs_error(tmp_path):
    """EACCES reading an input inside the block is the input's problem: it is not renamed a write error."""
    with pytest.raises(PermissionError), atomic_write_path(tmp_path / "out.csv"):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/input.png")
    assert os.listdir(tmp_path) == []


def test_an_exception_that_says_nothing_of_the_disk_is_named_by_the_disk(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('[enforce fail ...] unexpected pos 576 vs 534')."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_write_path(tmp_path / "model.pth"):
        raise error  # the disk has room: a bug, not a disk error
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((*real(p)[:4], 0, *real(p)[5:])))  # f_bavail 0
    match = "cannot write .*model.pth: No space left on device"
    with pytest.raises(OutputError, match=match), atomic_write_path(tmp_path / "model.pth"):
        raise error
    assert os.listdir(tmp_path) == []


# -- the commands ------------------------------------------------------------------------------------------
def _commands(export_dir: Path, inputs: dict[str, Path], out: Path) -> dict[str, tuple[list, Path]]:
    """command -> (argv, the output named in the error), every output in the folder `out`."""
    ckpt = FIXTURES / "deit_g7.pth"
    return {
        "infer rows": (["infer", export_dir, inputs["img"], "-o", out / "rows.csv"], out / "rows.csv"),
        "export": (["export", ckpt, "-o", out / "exp", "--num-heads", "3"], out / "exp"),
        "validate --report": (["validate", export_dir, "--report", out / "v.json"], out / "v.json"),
        "sweep": (["sweep", export_dir, inputs["lab"], "-o", out / "sw", "--etas", "0.5"], out / "sw"),
        "bench": (
            ["bench", export_dir, "--out", out / "b", "--in-process", "--batch-sizes", "1", "--iterations", "1"]
            + ["--warmup", "0", "--eta", "0.5", "--precisions", "fp32"],
            out / "b",
        ),
    }


@pytest.mark.parametrize("command", ["infer rows", "export", "validate --report", "sweep", "bench"])
def test_read_only_output_folder_is_one_line_exit_1(capfd, tmp_path, monkeypatch, export_dir, inputs, command):
    out = tmp_path / "ro"
    out.mkdir()
    argv, target = _commands(export_dir, inputs, out)[command]
    refuse_folder(monkeypatch, out, errno.EROFS)
    code = cli.main([str(a) for a in argv])
    one_error_line(capfd, code, rf"error: cannot write {re.escape(str(target))}: Read-only file system")
    assert os.listdir(out) == []


def test_infer_summary_on_a_full_disk_is_one_line_and_keeps_nothing_half_written(
    capfd, tmp_path, monkeypatch, export_dir, inputs
):
    import runtimes.sinks as sinks

    rows, real = tmp_path / "rows.csv", sinks.atomic_write_path

    @contextlib.contextmanager
    def full_for_summary(path, force=True):
        with real(path, force) as tmp:
            if str(path).endswith(".summary.json"):
                raise _oserror(errno.ENOSPC)  # the disk filled up after the rows
            yield tmp

    monkeypatch.setattr(sinks, "atomic_write_path", full_for_summary)
    code = cli.main(["infer", str(export_dir), str(inputs["img"]), "-o", str(rows)])
    one_error_line(capfd, code, rf"error: cannot write {re.escape(str(rows))}\.summary\.json: No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["rows.csv"]  # the rows are kept, no temporary is left


def test_overlays_on_a_full_disk_keep_every_row(capfd, tmp_path, monkeypatch, export_dir, inputs):
    """A full disk under --overlay threw away the rows CSV that was on another disk."""
    overlays, rows = tmp_path / "overlays", tmp_path / "rows.csv"
    overlays.mkdir()
    refuse_folder(monkeypatch, overlays, errno.ENOSPC)
    code = cli.main(
        ["infer", str(export_dir), str(inputs["dir"]), "-o", str(rows), "--overlay", str(overlays), "--eta", "1"]
    )
    _, err = capfd.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(error_lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(overlays))}/\S+\.png: No space left on device \(every row was written.*",
        error_lines[0],
    )
    import pandas as pd

    table = pd.read_csv(rows)
    assert len(table) == 3 and (table["stage"] == "fine").all()  # eta 1: every image wanted an overlay
    assert os.listdir(overlays) == []


# -- a really full and a really read-only disk (a tmpfs, where this process may mount one) -------------------
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_really_full_and_read_only_disks(capfd, small_disk, export_dir, inputs):
    (small_disk / "v.json").write_text("old report")
    _fill(small_disk)
    code = cli.main(["infer", str(export_dir), str(inputs["dir"]), "-o", str(small_disk / "rows.csv")])
    one_error_line(
        capfd, code, rf"error: cannot write {re.escape(str(small_disk / 'rows.csv'))}: No space left on device"
    )
    code = cli.main(["export", str(FIXTURES / "deit_g7.pth"), "-o", str(small_disk / "exp"), "--num-heads", "3"])
    one_error_line(capfd, code, rf"error: cannot write {re.escape(str(small_disk / 'exp'))}: No space left on device")
    torch = pytest.importorskip("torch")
    with pytest.raises(OutputError, match="No space left on device"), atomic_write_path(small_disk / "m.pth") as tmp:
        torch.save({"w": torch.zeros(50_000)}, tmp)  # RuntimeError('... unexpected pos ...') from torch
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code = cli.main(["validate", str(export_dir), "--report", str(small_disk / "v.json")])
    one_error_line(capfd, code, rf"error: cannot write {re.escape(str(small_disk / 'v.json'))}: Read-only file system")
    assert sorted(os.listdir(small_disk)) == ["v.json"] and (small_disk / "v.json").read_text() == "old report"


@pytest.mark.slow
def test_train_onto_a_read_only_folder_is_one_line_exit_1(capfd, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    out = tmp_path / "ro"
    out.mkdir()
    refuse_folder(monkeypatch, out, errno.EROFS)
    argv = ["train", tmp_path / "data", "--synthetic", "--coarse-grid", "2", "--epochs", "1", "--batch-size", "10"]
    code = cli.main([str(a) for a in [*argv, "--out", out / "m.pth", "--no-progress", "--threads", "1"]])
    one_error_line(capfd, code, rf"error: cannot write {re.escape(str(out / 'm.pth'))}: Read-only file system")
    assert os.listdir(out) == []
