"""Image decoding and evaluation preprocessing in PIL + numpy (torch-free).

One implementation for `infer`, `validate`, `bench`, `sweep` and training evaluation:
decode, apply EXIF orientation, convert to RGB, resize the shorter side to int(32g / crop_pct)
(bicubic), center-crop 32g, scale to [0, 1], normalize with the ImageNet mean/std, NCHW float32.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ModelConfig
from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
#: PIL's own default decompression-bomb limit (pixels); `max_pixels` raises or lowers it per call.
DEFAULT_MAX_PIXELS = 89_478_485
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


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied (first frame of animations).

    Raises :class:`ImageError` naming the reason for anything that cannot be decoded, including
    images above `max_pixels` (decompression bombs); `max_pixels=None` lifts the limit.
    """
    path = Path(path)
    try:
        with _pil_pixel_limit(max_pixels), Image.open(path) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(
                    f"{path}: image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                    "(possible decompression bomb; raise it with --max-pixels)"
                )
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found (or a broken symlink)") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)") from None
        raise ImageError(f"{path}: not a recognised image format") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{path}: symlink loop") from None
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    except Image.DecompressionBombError as exc:  # PIL's own check fired first (above twice its limit)
        limit = "" if max_pixels is None else f" of {max_pixels:,}"
        raise ImageError(
            f"{path}: {exc}; above the limit{limit} (possible decompression bomb; raise it with --max-pixels)"
        ) from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let PIL's own bomb check allow `max_pixels` (load_image enforces it exactly).

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


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16/32-bit gray: rescale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is always 16-bit (a dark image must stay dark); "I" has no declared depth, so guess.
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def preprocess(img: Image.Image, pp: PreprocessConfig) -> np.ndarray:
    """PIL image (converted to RGB as `load_image` does) -> normalized (3, crop, crop) float32 array."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size  # shorter side -> resize_size, as torchvision's Resize(int)
    if w <= h:
        size = (pp.resize_size, max(pp.resize_size, int(pp.resize_size * h / w)))
    else:
        size = (max(pp.resize_size, int(pp.resize_size * w / h)), pp.resize_size)
    crop, resample = pp.crop_size, _INTERPOLATION[pp.interpolation]
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    if size[0] * size[1] <= 4 * pp.resize_size**2:  # usual aspect ratios: exactly resize, then crop
        img = img.resize(size, resample).crop((left, top, left + crop, top + crop))
    else:  # extreme aspect ratios: the full resize can need gigabytes, so resample only what the crop needs:
        # the source rows under it (plus filter support), in PIL's order (horizontal pass first)
        x0, x1 = left * w / size[0], (left + crop) * w / size[0]
        y0, y1 = top * h / size[1], (top + crop) * h / size[1]
        margin = 3 * max(h / size[1], 1.0)  # more than the filter support (2 source pixels per scale step)
        r0, r1 = max(0, int(y0 - margin)), min(h, math.ceil(y1 + margin))
        band = img.crop((0, r0, w, r1)).resize((crop, r1 - r0), resample, box=(x0, 0, x1, r1 - r0))
        img = band.resize((crop, crop), resample, box=(0, y0 - r0, crop, y1 - r0))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_and_preprocess(
    path: str | Path, pp: PreprocessConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and preprocess one file; raises :class:`ImageError` on any decoding problem."""
    return preprocess(load_image(path, max_pixels), pp)
