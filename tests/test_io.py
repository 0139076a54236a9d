"""Overwrite protection and atomic writes (cfvit_deploy.io)."""

from __future__ import annotations

import os
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
    with pytest.raises(Boom):
        with atomic_write_path(path) as tmp:
            tmp.write_text("half-written")
            raise Boom
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["out.txt"]  # no temporary left behind


def test_atomic_write_path_leaves_nothing_when_a_new_file_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_atomic_write_path_body_may_remove_its_temporary(tmp_path):
    with pytest.raises(Boom):
        with atomic_write_path(tmp_path / "new.txt") as tmp:
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
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        with atomic_directory(tmp_path / "export"):
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
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "export", force=force) as tmp:
            (tmp / "partial.txt").write_text("partial")
            raise Boom
    if force:
        assert entries(tmp_path / "export") == ["old.txt", "sub"]
        assert (tmp_path / "export" / "sub" / "x").read_text() == "x"
        assert entries(tmp_path) == ["export"]
    else:
        assert entries(tmp_path) == []


def test_atomic_directory_refuses_a_missing_parent(tmp_path):
    with pytest.raises(UsageError, match="does not exist; create it first"):
        with atomic_directory(tmp_path / "missing" / "export"):
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
