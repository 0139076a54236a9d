"""The one folder reader (validate, bench, sweep): one policy for unreadable files.

Policy: **skip and report**. A file that cannot be decoded is left out, named in a ``logging`` warning
and listed in :attr:`FolderImages.skipped` (so reports can count it); only a folder with no readable
image at all is an error. ``cfvit infer`` follows the same policy per file (an error row).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImageError, UsageError
from ..preprocessing import PreprocessConfig, is_image_file, load_and_preprocess

log = logging.getLogger(__name__)


@dataclass
class FolderImages:
    """Preprocessed images (N, 3, S, S) float32, the files they came from, and the files skipped."""

    images: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(folder: str | Path, name: str = "--images") -> list[Path]:
    """Image files below `folder` (recursive, hidden entries ignored), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{name} must be a folder of images, got {root}")
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).parts,
    )
    if not files:
        raise UsageError(f"{name} {root} holds no image files")
    return files


def read_images(
    paths: Iterable[Path],
    pp: PreprocessConfig,
    limit: int | None = None,
    name: str = "--images",
    *,
    decode: str = "exact",
) -> FolderImages:
    """Decode and preprocess `paths` (at most `limit` readable ones), skipping and reporting bad files.

    `decode` is the decode mode (``validate`` always reads with ``"exact"``, the reference)."""
    arrays: list[np.ndarray] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(load_and_preprocess(path, pp, decode=decode))
        except ImageError as exc:
            # the decoder's message names the file already ("P: empty file"); else name it here
            where = "" if str(path) in str(exc) else f"{path}: "
            log.warning("skipped unreadable image %s%s", where, exc)
            skipped.append((Path(path), str(exc)))
            continue
        kept.append(Path(path))
    if not arrays:
        raise UsageError(f"no readable images in {name} ({len(skipped)} unreadable)")
    return FolderImages(np.stack(arrays), kept, skipped)
