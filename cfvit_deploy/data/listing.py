"""Torch-free listing of labelled image folders (``root/<class>/**/<image>``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..preprocessing import is_image_file


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_image_folder(root: str | Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Class names (sorted) and their image files of ``root/<class>/**/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    dirs = _class_dirs(root)
    if not dirs:
        loose = " (it holds image files directly: put them in one sub-folder per class)" if _images(root) else ""
        raise UsageError(f"no class folders in {root}; expected {root}/<class>/<image files>{loose}")
    files = {d.name: _images(d) for d in dirs}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise UsageError(f"class folder(s) without image files in {root}: {', '.join(empty[:5])}")
    return [d.name for d in dirs], files
