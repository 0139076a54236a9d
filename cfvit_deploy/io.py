"""Atomic writes and overwrite protection for every output the toolkit produces (torch-free).

Every output is built under a hidden temporary name beside it, ``.NAME.<pid>.<random>.tmp``, and
put in place by one rename at the end. Without ``force`` that rename is *no-clobber*
(``renameat2(RENAME_NOREPLACE)`` on Linux; ``link``/``mkdir`` elsewhere): when two runs write the
same output at once, exactly one wins and the other fails with :class:`OutputExistsError`, leaving
nothing behind. With ``force`` the replacement is atomic too (``rename`` for files,
``RENAME_EXCHANGE`` for folders where available).

The writer's pid in the temporary name lets the next run writing the same output remove what a
killed run (SIGKILL, power loss) left behind; temporaries of live processes are left alone.

A disk that refuses the output (full, read-only, over quota, not writable) is an :class:`OutputError`
naming the output and the reason, one line for the CLI; the temporary is removed and the previous
output, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError, OutputExistsError, UsageError

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output without --force, and an output in a missing directory."""
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    if not Path(path).parent.exists():
        raise UsageError(f"output directory {Path(path).parent} does not exist; create it first")


def _lost_race(path: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{path} already exists (another run created it while this one was writing); "
        "pass --force to overwrite it; nothing was written"
    )


def _umask_mode(base: int) -> int:
    """`base` (0o666 files, 0o777 folders) less the process umask, as open()/mkdir() would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


# -- disk errors -----------------------------------------------------------------------------------
#: errors that mean "this output cannot be written here", whatever wrote it
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})
#: of those, the ones that can only come from writing (EACCES/EPERM can come from reading an input too)
_WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def disk_error_reason(exc: BaseException) -> str | None:
    """Why a write failed ("No space left on device", ...) when `exc` is a disk error, else None.

    Also recognises libraries that report a failed write without an errno (pyarrow's OSError carries
    only the message) or wrap the OSError in their own exception (its ``__cause__`` or ``__context__``).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        reason = _own_disk_reason(exc)
        if reason is not None:
            return reason
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _own_disk_reason(exc: BaseException) -> str | None:
    if isinstance(exc, OSError):
        if exc.errno in DISK_ERRNOS:
            return exc.strerror or os.strerror(exc.errno)
        text = str(exc)
        return next((os.strerror(e) for e in sorted(DISK_ERRNOS) if os.strerror(e) in text), None)
    return None


def full_or_read_only(folder: Path) -> str | None:
    """ "No space left on device" or "Read-only file system" when `folder`'s file system is so now.

    For writers whose exception says nothing of the disk: torch.save on a full disk raises
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``.
    """
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail * st.f_frsize < 64 * 1024:  # not even one block of a write left
        return os.strerror(errno.ENOSPC)
    return None


def _is_output_file(file: Path, path: Path, temporary: Path | None) -> bool:
    """`file` is the output `path`, one of its temporaries, or inside the `temporary` folder."""
    file = Path(os.path.abspath(file))
    if file.name.startswith((path.name, f".{path.name}")):
        return True
    return temporary is not None and (
        file == Path(os.path.abspath(temporary)) or Path(os.path.abspath(temporary)) in file.parents
    )


@contextlib.contextmanager
def output_errors(path: Path, temporary: Path | None = None, only_output: bool = False) -> Iterator[None]:
    """Turn a disk error while writing `path` (or its `temporary`) into one :class:`OutputError` line.

    Unless the block touches nothing but the output (`only_output`: creating the temporary),
    EACCES/EPERM count only when they name no file or the output's own files: a permission error on
    some other file (an input) is not this output's problem.
    """
    try:
        yield
    except OSError as exc:
        reason = disk_error_reason(exc)
        named = only_output or exc.filename is None or _is_output_file(Path(os.fsdecode(exc.filename)), path, temporary)
        if reason is None or (exc.errno not in _WRITE_ONLY_ERRNOS and exc.errno in DISK_ERRNOS and not named):
            raise
        raise OutputError(f"cannot write {path}: {reason}") from exc
    except OutputError:
        raise
    except Exception as exc:  # a library's own exception around the OSError (torch.onnx), or none (torch.save)
        reason = disk_error_reason(exc) or full_or_read_only(path.parent)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason}") from exc


# -- renameat2 ---------------------------------------------------------------------------------------
def _load_renameat2():
    """libc's renameat2 (glibc >= 2.28), or None where the platform has none."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
#: Tests set this to False to exercise the portable fallbacks.
USE_RENAMEAT2 = True


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the call or the flag is not supported (then use a fallback).

    Raises FileExistsError when RENAME_NOREPLACE finds `dst`; other OSErrors propagate.
    """
    if _renameat2 is None or not USE_RENAMEAT2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel or a file system without the flag
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace_file(tmp: Path, path: Path) -> None:
    """Move file `tmp` to `path` only if `path` does not exist, atomically."""
    try:
        if _rename2(tmp, path, _RENAME_NOREPLACE):
            return
        os.link(tmp, path)  # link(2) never replaces: the portable no-clobber step
    except FileExistsError:
        raise _lost_race(path) from None
    os.unlink(tmp)


def _rename_noreplace_dir(tmp: Path, path: Path) -> None:
    """Move folder `tmp` to `path` only if `path` does not exist, atomically."""
    try:
        if _rename2(tmp, path, _RENAME_NOREPLACE):
            return
        os.mkdir(path)  # claim the name: only one mkdir succeeds ...
    except FileExistsError:
        raise _lost_race(path) from None
    os.replace(tmp, path)  # ... and rename(2) may replace the empty folder this run just made


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder `tmp` in `path`'s place (--force); the old content is removed afterwards."""
    try:
        if _rename2(tmp, path, _RENAME_EXCHANGE):  # one atomic swap; `tmp` now holds the old output
            _remove(tmp)
            return
    except FileNotFoundError:  # `path` vanished meanwhile: a plain no-clobber move will do
        _rename_noreplace_dir(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(old / path.name, path)  # put the previous output back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- temporaries of dead runs ---------------------------------------------------------------------------
def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # pragma: no mutate (another signal number would kill a live process: the mutation run itself)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries that dead runs left for `path`; returns what was removed.

    A temporary ``.NAME.<pid>.<random>.tmp`` (or ``.old``) whose pid is not a live process is removed
    with a warning. One without a pid (written by cfvit-deploy before 0.3) is only named in a warning.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+\.(tmp|old)$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match:
            continue
        stale = Path(entry.path)
        if match.group(1) is None:
            log.warning(
                "%s looks like a temporary file of an earlier interrupted run; remove it if no run is writing %s",
                stale,
                path.name,
            )
        elif not _pid_alive(int(match.group(1))):
            _remove(stale)
            removed.append(stale)
            log.warning(
                "removed %s, left behind by a run (pid %s) that was killed while writing %s",
                stale,
                match.group(1),
                path.name,
            )
    return removed


# -- the context managers -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write_path(path: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary file beside `path`; on success it takes `path`'s place in one rename.

    With ``force=False`` the rename is no-clobber: if `path` exists by then (another run created it),
    :class:`OutputExistsError` is raised and the temporary is removed. The default ``force=True``
    replaces `path` atomically (callers that checked with :func:`check_output` pass their --force).
    A `path` that is a folder, or in a missing folder, is a :class:`UsageError` before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name for the output")
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist; create it first")
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    clean_stale_temporaries(path)
    with output_errors(path, only_output=True):
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with output_errors(path, Path(tmp)):
            yield Path(tmp)
            os.chmod(tmp, _umask_mode(0o666))
            if force:
                os.replace(tmp, path)
            else:
                _rename_noreplace_file(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place.

    An existing `path` is only replaced with `force`, and only after everything was written. Without
    `force`, a `path` that appeared meanwhile (a concurrent run) is an :class:`OutputExistsError` and
    this run's folder is removed.
    """
    path = Path(path)
    check_output(path, force)
    clean_stale_temporaries(path)
    with output_errors(path, only_output=True):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with output_errors(path, tmp):
            yield tmp
            os.chmod(tmp, _umask_mode(0o777))
            if force and os.path.lexists(path):
                _replace_dir(tmp, path)
            elif force:
                try:
                    _rename_noreplace_dir(tmp, path)
                except OutputExistsError:  # appeared meanwhile: --force replaces it
                    _replace_dir(tmp, path)
            else:
                _rename_noreplace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
