"""The one image decoder and the evaluation preprocessing, in PIL + numpy (torch-free).

One implementation for `infer`, `serve`, `validate`, `bench`, `sweep` and training's folder reader:
open the file or bytes with Pillow restricted to :data:`IMAGE_FORMATS` (nothing else is ever opened,
so no external program such as Ghostscript can run), check the size against the pixel limit from the
header, decode, apply EXIF orientation, convert to RGB, resize the shorter side to int(32g / crop_pct)
(bicubic), center-crop 32g, scale to [0, 1], normalize with the ImageNet mean/std, NCHW float32.
Every failure is an :class:`ImageError` with a machine-readable ``reason``.

``decode="fast"`` decodes JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the resize
and uses Pillow's reducing resize for the rest; the crop geometry, interpolation and normalisation
are those of ``"exact"``, which is the reference (``validate`` always uses it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .checks import check_choice
from .config import ModelConfig
from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
#: The only formats Pillow may open (Pillow's format ids; "PPM" covers PPM/PGM/PBM, "JPEG" also opens
#: multi-picture MPO files). EPS, PS, PDF and the rest are refused as ``not_an_image``: Pillow would
#: hand EPS/PS bodies to a Ghostscript found on PATH.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
#: How to decode: "exact" (the reference path) or "fast" (JPEG draft mode, reducing resize).
DECODE_MODES = ("exact", "fast")
#: Pillow's `reducing_gap` for the fast path: a cheap box reduction first, then the real filter over
#: at least 3x the output size (Pillow's docs: "indistinguishable from the result without it").
REDUCING_GAP = 3.0
#: PIL's own default decompression-bomb limit (pixels); `max_pixels` raises or lowers it per call.
DEFAULT_MAX_PIXELS = 89_478_485
#: a source to decode: a file path, or the bytes of an image (a request body)
ImageSource = str | Path | bytes
# load_image enforces `max_pixels` itself (an ImageError naming the size); PIL's warning for images
# between its limit and twice it would only repeat that, as extra lines on stderr. A warnings filter
# is process-wide (catch_warnings is not thread-safe, and images are decoded in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation transform; stored in every manifest and checkpoint so nothing is retyped."""

    crop_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("crop_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; expected one of {', '.join(_INTERPOLATION)}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not (
                isinstance(value, tuple)
                and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            ):
                raise ValueError(f"{name} must be three finite numbers, got {value!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> PreprocessConfig:
        size = cfg.fine_image_size
        return cls(crop_size=size, resize_size=int(size / cfg.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        d = dict(data)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)  # __post_init__ validates every field


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _label(source: ImageSource) -> str:
    """The prefix of a message: the path (so a row or log line names the file), or nothing for bytes."""
    return "" if isinstance(source, bytes) else f"{source}: "


@contextlib.contextmanager
def _opened(source: ImageSource, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image of an allowlisted format, opened (header read, no pixels decoded yet) within `max_pixels`.

    Any failure while opening it or inside the ``with`` body (decoding) becomes an :class:`ImageError`
    with its reason; PIL's bomb limit is lifted for the whole block when `max_pixels` is above it.
    """
    label = _label(source)
    if isinstance(source, bytes) and not source:
        raise ImageError("empty image data (0 bytes)", "empty")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        with _pil_pixel_limit(max_pixels), Image.open(fp, formats=IMAGE_FORMATS) as img:
            _check_pixels(img.size, max_pixels, label)
            yield img
    except ImageError:
        raise
    except Exception as exc:
        raise _image_error(exc, source, max_pixels) from None


def _check_pixels(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{label}image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
            "(possible decompression bomb; raise it with --max-pixels)",
            "too_many_pixels",
        )


def _image_error(exc: Exception, source: ImageSource, max_pixels: int | None) -> Exception:
    """The :class:`ImageError` (message and reason) for an exception raised opening or decoding `source`."""
    label = _label(source)
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{label}file not found (or a broken symlink)", "unreadable")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{label}is a directory", "unreadable")
    if isinstance(exc, PermissionError):
        return ImageError(f"{label}permission denied", "unreadable")
    if isinstance(exc, UnidentifiedImageError):
        if not isinstance(source, bytes) and Path(source).is_file() and Path(source).stat().st_size == 0:
            return ImageError(f"{label}empty file (0 bytes)", "empty")
        return ImageError(f"{label}not a recognised image format", "not_an_image")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return ImageError(f"{label}symlink loop", "unreadable")
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own check fired first (above twice its limit)
        limit = "" if max_pixels is None else f" of {max_pixels:,}"
        return ImageError(
            f"{label}{exc}; above the limit{limit} (possible decompression bomb; raise it with --max-pixels)",
            "too_many_pixels",
        )
    if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError, MemoryError)):
        # Pillow has no typed truncation error: a short read is an EOFError or says "truncated"
        truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
        detail = f"{exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        return ImageError(f"{label}cannot decode image ({detail})", "truncated" if truncated else "corrupt")
    return exc  # a bug, not bad input: let it surface


def image_size(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Width and height from the header alone (nothing decoded): the cost of decoding, known up front.

    Raises :class:`ImageError` exactly as :func:`load_image` would for the header (format, size).
    """
    with _opened(source, max_pixels) as img:
        return img.size


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file (or its bytes) to RGB with its EXIF orientation applied (first frame of animations).

    Raises :class:`ImageError` naming the reason for anything that cannot be decoded, including
    formats off :data:`IMAGE_FORMATS` and images above `max_pixels` (decompression bombs);
    `max_pixels=None` lifts the limit.
    """
    with _opened(source, max_pixels) as img:
        img.seek(0)
        return _to_rgb(ImageOps.exif_transpose(img))


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let PIL's own bomb check allow `max_pixels` (the decoder enforces it exactly).

    PIL's limit is a process-wide global: it is left alone when `max_pixels` is within it, and
    otherwise lifted only while holding a lock, so concurrent decodes cannot leave it lifted.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and limit is not None and max_pixels <= limit:
        yield
        return
    with _PIL_LIMIT_LOCK:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _to_rgb_or_gray(img: Image.Image) -> Image.Image:
    """`_to_rgb`, except that gray images stay 8-bit gray ("L"): resampling one band instead of three
    copies of it gives the same values at a third of the cost (the RGB conversion follows the crop)."""
    if img.mode == "L":
        img.load()
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        return Image.fromarray(_gray_to_8_bit(img))
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16/32-bit gray: rescale to 8 bit
        return Image.fromarray(_gray_to_8_bit(img)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _scale_table(top: int) -> np.ndarray:
    """uint8 of round(v / top * 255) for v in [0, top], computed as the float64 formula it replaces."""
    return np.clip(np.arange(top + 1, dtype=np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


_TABLE_16 = _scale_table(65535)
_TABLE_8 = _scale_table(255)
_BAND_PIXELS = 1 << 20  # rows converted at a time: bounds the int64 index copy numpy's gather makes


def _gray_to_8_bit(img: Image.Image) -> np.ndarray:
    """A 16/32-bit gray image scaled to uint8 by table look-up, in bands (no whole-image float copy).

    I;16 is always 16-bit (a dark image must stay dark); "I" has no declared depth, so it is taken as
    8-bit when no value is above 255. Values out of range clip.
    """
    arr = np.asarray(img)
    top = 65535 if img.mode != "I" or arr.max(initial=0) > 255 else 255
    table = _TABLE_16 if top == 65535 else _TABLE_8
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], rows):
        band = arr[r : r + rows]
        if band.dtype.kind == "i" or top == 255:  # signed or possibly above the table: clip first
            band = np.clip(band, 0, top)
        np.take(table, band, out=out[r : r + rows])
    return out


def _resize_size(w: float, h: float, resize: int) -> tuple[int, int]:
    """The size before the crop: the shorter side to `resize`, as torchvision's Resize(int)."""
    if w <= h:
        return resize, max(resize, int(resize * h / w))
    return max(resize, int(resize * w / h)), resize


def preprocess(img: Image.Image, pp: PreprocessConfig) -> np.ndarray:
    """PIL image (converted to RGB as `load_image` does) -> normalized (3, crop, crop) float32 array."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    return _transform(img, pp, img.size)


def _transform(
    img: Image.Image,
    pp: PreprocessConfig,
    full: tuple[int, int],
    extent: tuple[float, float] | None = None,
    reducing_gap: float | None = None,
) -> np.ndarray:
    """Resize, center-crop and normalize an RGB or gray ("L") image whose original size is `full`.

    `extent` is the region of `img` that holds the whole original (a JPEG drafted at 1/s holds it in
    (w/s, h/s)); the geometry is computed from `full`, so the crop is the same whatever the draft.
    """
    w, h = extent or img.size
    size = _resize_size(*full, pp.resize_size)
    crop, resample = pp.crop_size, _INTERPOLATION[pp.interpolation]
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    if size[0] * size[1] <= 4 * pp.resize_size**2:  # usual aspect ratios: exactly resize, then crop
        if extent is None and reducing_gap is None:
            resized = img.resize(size, resample)
        else:
            resized = img.resize(size, resample, box=(0, 0, w, h), reducing_gap=reducing_gap)
        img = resized.crop((left, top, left + crop, top + crop))
    else:  # extreme aspect ratios: the full resize can need gigabytes, so resample only what the crop needs:
        # the source rows under it (plus filter support), in PIL's order (horizontal pass first)
        x0, x1 = left * w / size[0], (left + crop) * w / size[0]
        y0, y1 = top * h / size[1], (top + crop) * h / size[1]
        margin = 3 * max(h / size[1], 1.0)  # more than the filter support (2 source pixels per scale step)
        r0, r1 = max(0, int(y0 - margin)), min(img.height, math.ceil(y1 + margin))
        band = img.crop((0, r0, img.width, r1)).resize((crop, r1 - r0), resample, box=(x0, 0, x1, r1 - r0))
        img = band.resize((crop, crop), resample, box=(0, y0 - r0, crop, y1 - r0))
    if img.mode != "RGB":  # gray, from _to_rgb_or_gray
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_and_preprocess(
    source: ImageSource,
    pp: PreprocessConfig,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    decode: str = "exact",
) -> np.ndarray:
    """Decode and preprocess one file (or the bytes of one image); raises :class:`ImageError` on any problem.

    `decode` is one of :data:`DECODE_MODES`: ``"exact"`` (the reference) or ``"fast"``.
    """
    if check_choice(decode, DECODE_MODES, "--decode") == "exact":  # = preprocess(load_image(source, max_pixels), pp)
        with _opened(source, max_pixels) as img:
            img.seek(0)
            img = _to_rgb_or_gray(ImageOps.exif_transpose(img))
        return _transform(img, pp, img.size)
    with _opened(source, max_pixels) as img:
        img.seek(0)
        source_size = img.size
        extent = None
        if img.format in ("JPEG", "MPO"):  # decode at 1/2, 1/4 or 1/8 scale while still covering the resize
            drafted = img.draft("RGB", _resize_size(*source_size, pp.resize_size))
            extent = drafted[1][2:] if drafted else None
        drafted_size = img.size
        img = _to_rgb_or_gray(ImageOps.exif_transpose(img))
    swapped = img.size != drafted_size  # EXIF rotated the image by 90 degrees
    full = source_size[::-1] if swapped else source_size
    if extent is not None and swapped:
        extent = extent[::-1]
    return _transform(img, pp, full, extent, REDUCING_GAP)
