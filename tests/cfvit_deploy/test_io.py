"""Overwrite protection and atomic writes (cfvit_deploy.io)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cfvit_deploy.errors import OutputExistsError, UsageError
from cfvit_deploy.io import atomic_directory, atomic_write_path, check_output


class Boom(Exception):
    pass


def entries(directory: Path) -> list[str]:
    """Everything in a folder, hidden temporaries included."""
    return sorted(p.name for p in directory.iterdir())


# -- check_output ------------------------------------------------------------------------------------
def test_check_output_accepts_a_new_path(tmp_path):
    check_output(tmp_path / "out.csv", force=False)
    check_output(tmp_path / "out.csv", force=True)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_check_output_refuses_existing_output_without_force(tmp_path, kind):
    path = tmp_path / "out"
    if kind == "file":
        path.write_text("old")
    else:
        path.mkdir()
    with pytest.raises(OutputExistsError, match=r"out already exists; pass --force to overwrite it") as info:
        check_output(path, force=False)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    check_output(path, force=True)


@pytest.mark.parametrize("force", [False, True])
def test_check_output_refuses_a_missing_parent_dir(tmp_path, force):
    with pytest.raises(UsageError, match=r"output directory .*missing does not exist; create it first") as info:
        check_output(tmp_path / "missing" / "out.csv", force=force)
    assert not isinstance(info.value, OutputExistsError) and info.value.exit_code == 2
    assert not (tmp_path / "missing").exists()


# -- atomic_write_path -----------------------------------------------------------------------------------
def test_atomic_write_path_replaces_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old"  # not visible before the body finishes
    assert path.read_text() == "new"
    assert entries(tmp_path) == ["out.txt"]


def test_atomic_write_path_creates_a_new_file(tmp_path):
    with atomic_write_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"
    assert entries(tmp_path) == ["new.bin"]


def test_atomic_write_path_keeps_the_old_file_when_the_body_raises(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Boom), atomic_write_path(path) as tmp:
        tmp.write_text("half-written")
        raise Boom
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["out.txt"]  # no temporary left behind


def test_atomic_write_path_leaves_nothing_when_a_new_file_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_write_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_atomic_write_path_body_may_remove_its_temporary(tmp_path):
    with pytest.raises(Boom), atomic_write_path(tmp_path / "new.txt") as tmp:
        tmp.unlink()
        raise Boom
    assert entries(tmp_path) == []


# -- atomic_directory ---------------------------------------------------------------------------------
def make_old(path: Path) -> None:
    path.mkdir()
    (path / "old.txt").write_text("old")
    (path / "sub").mkdir()
    (path / "sub" / "x").write_text("x")


def test_atomic_directory_creates_a_new_folder(tmp_path):
    with atomic_directory(tmp_path / "export") as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir()
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "export").exists()  # not visible before the body finishes
    assert entries(tmp_path / "export") == ["a.txt"]
    assert entries(tmp_path) == ["export"]


def test_atomic_directory_refuses_an_existing_folder_without_force(tmp_path):
    make_old(tmp_path / "export")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"), atomic_directory(tmp_path / "export"):
        pytest.fail("the body must not run")
    assert (tmp_path / "export" / "old.txt").read_text() == "old"
    assert entries(tmp_path) == ["export"]


def test_atomic_directory_replaces_an_existing_folder_with_force(tmp_path):
    make_old(tmp_path / "export")
    with atomic_directory(tmp_path / "export", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (tmp_path / "export" / "old.txt").exists()  # the old one stays until the end
    assert entries(tmp_path / "export") == ["new.txt"]  # replaced, not merged
    assert entries(tmp_path) == ["export"]  # no .tmp or .old left behind


def test_atomic_directory_replaces_an_existing_file_with_force(tmp_path):
    (tmp_path / "export").write_text("a file")
    with atomic_directory(tmp_path / "export", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert entries(tmp_path / "export") == ["new.txt"]
    assert entries(tmp_path) == ["export"]


@pytest.mark.parametrize("force", [False, True])
def test_atomic_directory_keeps_the_old_folder_when_the_body_raises(tmp_path, force):
    if force:
        make_old(tmp_path / "export")
    with pytest.raises(Boom), atomic_directory(tmp_path / "export", force=force) as tmp:
        (tmp / "partial.txt").write_text("partial")
        raise Boom
    if force:
        assert entries(tmp_path / "export") == ["old.txt", "sub"]
        assert (tmp_path / "export" / "sub" / "x").read_text() == "x"
        assert entries(tmp_path) == ["export"]
    else:
        assert entries(tmp_path) == []


def test_atomic_directory_refuses_a_missing_parent(tmp_path):
    with (
        pytest.raises(UsageError, match="does not exist; create it first"),
        atomic_directory(tmp_path / "missing" / "export"),
    ):
        pytest.fail("the body must not run")
    assert entries(tmp_path) == []


# -- known problem (reported, not fixed here): mkstemp/mkdtemp create 0600/0700, and the rename keeps it ----
def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "a").write_text("a")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755


# -- races: "never overwrite without --force" holds when two runs finish together (issue 13 item 2) ----
RACER = r"""
import sys, time
from pathlib import Path
from cfvit_deploy.io import atomic_directory, atomic_write_path
kind, target, tag, gate = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
writer = atomic_directory(target) if kind == "dir" else atomic_write_path(target, force=False)
try:
    with writer as tmp:
        if kind == "dir":
            (tmp / "who.txt").write_text(tag)
        else:
            tmp.write_text(tag)
        (gate / tag).touch()  # both runs have passed the existence check and written their output ...
        deadline = time.monotonic() + 30
        while len(list(gate.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # ... before either renames it into place
except Exception as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 1))
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "portable"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_two_concurrent_writers_exactly_one_wins(tmp_path, kind, fallback):
    import subprocess
    import sys

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gate = tmp_path / "gate"
    gate.mkdir()
    target = out_dir / ("export" if kind == "dir" else "out.csv")
    code = RACER if not fallback else "import cfvit_deploy.io as io; io.USE_RENAMEAT2 = False\n" + RACER
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, kind, str(target), tag, str(gate)], env=env, stderr=subprocess.PIPE, text=True
        )
        for tag in ("a", "b")
    ]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser_err = next(err for code, err in results if code == 2)
    assert re.search(r"^error: .*out.* already exists", loser_err, re.M), loser_err
    winner = "ab"[[c for c, _ in results].index(0)]
    written = (target / "who.txt") if kind == "dir" else target
    assert written.read_text() == winner  # the winner's output, not replaced by the loser's
    assert entries(out_dir) == [target.name]  # the loser left nothing behind


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "portable"])
def test_force_replaces_a_folder_that_appeared_meanwhile(tmp_path, monkeypatch, fallback):
    import cfvit_deploy.io as io

    monkeypatch.setattr(io, "USE_RENAMEAT2", not fallback)
    with atomic_directory(tmp_path / "export", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        make_old(tmp_path / "export")  # another run finished first
    assert entries(tmp_path / "export") == ["new.txt"]
    assert entries(tmp_path) == ["export"]


def test_a_folder_appearing_meanwhile_is_not_replaced_without_force(tmp_path):
    with (
        pytest.raises(OutputExistsError, match="already exists .*another run"),
        atomic_directory(tmp_path / "export") as tmp,
    ):
        (tmp / "new.txt").write_text("new")
        (tmp_path / "export").mkdir()  # an empty folder: a plain rename(2) would replace it
    assert entries(tmp_path / "export") == []
    assert entries(tmp_path) == ["export"]


def test_a_file_appearing_meanwhile_is_not_replaced_without_force(tmp_path):
    with (
        pytest.raises(OutputExistsError, match="already exists"),
        atomic_write_path(tmp_path / "out.csv", force=False) as tmp,
    ):
        tmp.write_text("mine")
        (tmp_path / "out.csv").write_text("theirs")
    assert (tmp_path / "out.csv").read_text() == "theirs"
    assert entries(tmp_path) == ["out.csv"]


# -- temporaries of killed runs (issue 13 item 3) ------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_carry_the_writer_pid(tmp_path):
    with atomic_write_path(tmp_path / "out.csv") as tmp:
        assert re.fullmatch(rf"\.out\.csv\.{os.getpid()}\.\w+\.tmp", tmp.name)
    with atomic_directory(tmp_path / "export") as tmp:
        assert re.fullmatch(rf"\.export\.{os.getpid()}\.\w+\.tmp", tmp.name)


def test_a_sigkilled_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path, caplog):
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom pathlib import Path\nfrom cfvit_deploy.io import atomic_write_path\n"
        "with atomic_write_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_text('partial'); print(tmp, flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out.csv")], env=env, stdout=subprocess.PIPE, text=True
    )
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert left.exists() and entries(tmp_path) == [left.name]  # what SIGKILL leaves behind
    with caplog.at_level("WARNING", logger="cfvit_deploy.io"), atomic_write_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("complete")
    assert entries(tmp_path) == ["out.csv"]
    assert str(left) in caplog.text and "killed" in caplog.text


def test_stale_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".export.{_dead_pid()}.abc123.tmp"
    dead.mkdir()
    (dead / "coarse.onnx").write_text("half")
    live = tmp_path / f".export.{os.getppid()}.def456.tmp"  # a live process (pytest's parent)
    live.mkdir()
    other = tmp_path / f".other.{_dead_pid()}.abc123.tmp"  # another output's temporary: not ours to touch
    other.write_text("x")
    with atomic_directory(tmp_path / "export") as tmp:
        (tmp / "a").write_text("a")
    assert entries(tmp_path) == sorted([live.name, other.name, "export"])


def test_a_temporary_without_a_pid_is_named_in_a_warning(tmp_path, caplog):
    legacy = tmp_path / ".out.csv.k2j4h5g1.tmp"  # the name format before pids were added
    legacy.write_text("x")
    with caplog.at_level("WARNING", logger="cfvit_deploy.io"), atomic_write_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("y")
    assert legacy.exists() and str(legacy) in caplog.text


# -- the primitives under the no-clobber rename (issue 16: mutation survivors) ------------------------------
def test_renameat2_is_found_and_used_on_linux(tmp_path):
    """glibc >= 2.28 has renameat2: the no-clobber move must use it, not silently fall back to link."""
    import sys

    import cfvit_deploy.io as io

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    assert io._load_renameat2() is not None
    (tmp_path / "a").write_text("a")
    assert io._rename2(tmp_path / "a", tmp_path / "b", io._RENAME_NOREPLACE) is True
    assert entries(tmp_path) == ["b"]


def test_renameat2_reports_an_existing_destination_as_file_exists(tmp_path):
    """The errno must reach Python (use_errno): EEXIST becomes FileExistsError, the lost-race signal."""
    import cfvit_deploy.io as io

    if io._renameat2 is None:
        pytest.skip("no renameat2 here")
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        io._rename2(tmp_path / "a", tmp_path / "b", io._RENAME_NOREPLACE)
    assert (tmp_path / "b").read_text() == "b"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_portable_no_clobber_moves_and_refuses(tmp_path, monkeypatch, kind):
    """The link/mkdir fallback (no renameat2) puts the output in place, leaves no temporary, and
    refuses an output that appeared meanwhile with the lost-race message."""
    import cfvit_deploy.io as io

    monkeypatch.setattr(io, "USE_RENAMEAT2", False)
    writer = atomic_write_path if kind == "file" else atomic_directory
    with writer(tmp_path / "out", force=False) as tmp:
        if kind == "file":
            tmp.write_text("mine")
        else:
            (tmp / "x").write_text("mine")
    assert entries(tmp_path) == ["out"]
    assert (tmp_path / "out" if kind == "file" else tmp_path / "out" / "x").read_text() == "mine"
    with pytest.raises(OutputExistsError) as caught, writer(tmp_path / "again", force=False) as tmp:
        if kind == "file":
            tmp.write_text("late")
            (tmp_path / "again").write_text("first")
        else:
            (tmp / "x").write_text("late")
            (tmp_path / "again").mkdir()
    assert str(caught.value) == (
        f"{tmp_path / 'again'} already exists (another run created it while this one was writing); "
        "pass --force to overwrite it; nothing was written"
    )
    assert entries(tmp_path) == ["again", "out"]


def test_pid_alive_distinguishes_live_dead_and_invalid_pids(monkeypatch):
    import cfvit_deploy.io as io

    assert io._pid_alive(os.getpid()) is True
    assert io._pid_alive(1) is True  # init (or the container's first process) always runs
    assert io._pid_alive(_dead_pid()) is False
    assert io._pid_alive(0) is False  # kill(0) would signal our own process group: not a pid
    assert io._pid_alive(-1) is False
    assert io._pid_alive(2**70) is False  # OverflowError from os.kill

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io.os, "kill", denied)
    assert io._pid_alive(12345) is True  # someone else's live process
