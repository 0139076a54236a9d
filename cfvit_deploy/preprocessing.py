"""Image decoding and evaluation preprocessing in PIL + numpy (torch-free).

One implementation for `infer`, `validate`, `bench`, `sweep` and training evaluation:
decode, apply EXIF orientation, convert to RGB, resize the shorter side to int(32g / crop_pct)
(bicubic), center-crop 32g, scale to [0, 1], normalize with the ImageNet mean/std, NCHW float32.
"""

from __future__ import annotations

import warnings
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

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation transform; stored in every manifest and checkpoint so nothing is retyped."""

    crop_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "PreprocessConfig":
        size = cfg.fine_image_size
        return cls(crop_size=size, resize_size=int(size / cfg.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        d = dict(data)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        if d.get("interpolation") not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {d.get('interpolation')!r}")
        return cls(**d)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied (first frame of animations).

    Raises :class:`ImageError` naming the reason for anything that cannot be decoded, including
    images above `max_pixels` (decompression bombs); `max_pixels=None` lifts the limit.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as img:
                    w, h = img.size
                    if max_pixels is not None and w * h > max_pixels:
                        raise ImageError(
                            f"{path}: image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                            "(possible decompression bomb; raise it with --max-pixels)"
                        )
                    img.seek(0)
                    img = ImageOps.exif_transpose(img)
                    return _to_rgb(img)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found (or a broken symlink)") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a recognised image format") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise ImageError(f"{path}: symlink loop") from None
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError, MemoryError) as exc:
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit gray: rescale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
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
    """RGB PIL image -> normalized (3, crop, crop) float32 array."""
    w, h = img.size  # shorter side -> resize_size, as torchvision's Resize(int)
    if w <= h:
        size = (pp.resize_size, max(pp.resize_size, int(pp.resize_size * h / w)))
    else:
        size = (max(pp.resize_size, int(pp.resize_size * w / h)), pp.resize_size)
    img = img.resize(size, _INTERPOLATION[pp.interpolation])
    left = int(round((size[0] - pp.crop_size) / 2.0))
    top = int(round((size[1] - pp.crop_size) / 2.0))
    img = img.crop((left, top, left + pp.crop_size, top + pp.crop_size))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_and_preprocess(path: str | Path, pp: PreprocessConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess one file; raises :class:`ImageError` on any decoding problem."""
    return preprocess(load_image(path, max_pixels), pp)
