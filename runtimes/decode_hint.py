"""The hint `cfvit infer` prints when a run decodes large JPEGs the exact (slow) way.

With ``--decode exact`` (the default) a 12-megapixel JPEG costs more than 100 ms to decode and resize,
several times the model's own time per image; ``--decode fast`` (JPEG draft mode) decodes it at a
fraction of that (issue 25; accuracy: benchmarks/results/decode_accuracy). Whether to suggest it is
decided from the headers of a sample of the inputs (no pixel is decoded): when most of them are JPEGs
whose shorter side is at least twice the model's resize (so draft mode can shrink them while decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from cfvit_deploy.errors import CFViTError
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import PreprocessConfig

from .inference import collect_inputs

#: Inputs whose headers are read (spread over the run: every k-th file).
SAMPLE = 32
#: "Mostly": more than this share of the sample.
MOSTLY = 0.5


def is_large_jpeg(path: Path, pp: PreprocessConfig) -> bool:
    """Whether `path` is a JPEG whose shorter side is at least twice `pp.resize_size` (header only)."""
    try:
        with Image.open(path) as img:
            return img.format == "JPEG" and min(img.size) >= 2 * pp.resize_size
    except Exception:  # noqa: BLE001 - an unreadable file is not a large JPEG; infer reports it itself
        return False


def large_jpeg_share(paths: Sequence[Path], pp: PreprocessConfig, sample: int = SAMPLE) -> float:
    """The share of large JPEGs among (a spread sample of) `paths`."""
    if not paths:
        return 0.0
    step = max(1, len(paths) // sample)
    picked = list(paths[::step])[:sample]
    return sum(is_large_jpeg(Path(p), pp) for p in picked) / len(picked)


def fast_decode_hint(paths: Sequence[Path], pp: PreprocessConfig, decode: str) -> str | None:
    """One hint line suggesting ``--decode fast`` when `decode` is exact and most `paths` are large JPEGs."""
    if decode != "exact" or large_jpeg_share(paths, pp) <= MOSTLY:
        return None
    return (
        "hint: most of these images are large JPEGs; --decode fast decodes them several times faster "
        "(JPEG draft mode; accuracy against exact: benchmarks/results/decode_accuracy)"
    )


def infer_hint(export_dir: str | Path, inputs: Sequence[str | Path], recursive: bool, decode: str) -> str | None:
    """:func:`fast_decode_hint` for an `infer` run (None when the export or the inputs are unusable: infer
    itself reports those)."""
    if decode != "exact":
        return None
    try:
        pp = Manifest.load(export_dir, verify=False).preprocessing
        return fast_decode_hint(collect_inputs(list(inputs), recursive), pp, decode)
    except (CFViTError, OSError):
        return None
