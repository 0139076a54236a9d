"""ImageFolder listing (``DATA/train``, ``DATA/val`` or one split by fraction) and a torch Dataset."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UsageError
from ..preprocessing import PreprocessConfig, load_image, preprocess
from .listing import list_image_folder

Sample = tuple[Path, int]
#: Decoded images kept in memory per dataset (bytes); beyond it, files are decoded on every access.
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class FolderSplits:
    """Sorted class names and the (path, label) samples of the two splits."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]


def find_splits(data_dir: str | Path, val_fraction: float | None = None, seed: int = 0) -> FolderSplits:
    """The training and validation samples of `data_dir`.

    ``DATA/train`` and ``DATA/val`` are used as they are; a flat ``DATA/<class>/`` folder is split
    per class by `val_fraction` (deterministic given `seed`). Class indices follow ``train``.
    """
    data = Path(data_dir)
    if not data.exists():
        raise UsageError(f"data directory not found: {data}")
    if not data.is_dir():
        raise UsageError(f"data path is not a directory: {data}")
    if (data / "train").is_dir():
        if val_fraction is not None:
            raise UsageError(f"{data} has a train/ folder; --val-fraction only splits a flat class-folder directory")
        if not (data / "val").is_dir():
            raise UsageError(f"{data} has train/ but no val/ folder")
        classes, train_files = list_image_folder(data / "train")
        val_classes, val_files = list_image_folder(data / "val")
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise UsageError(f"classes in {data / 'val'} missing from train/: {', '.join(extra[:5])}")
        index = {name: i for i, name in enumerate(classes)}
        train = [(p, index[c]) for c in classes for p in train_files[c]]
        val = [(p, index[c]) for c in val_classes for p in val_files[c]]
        return FolderSplits(classes, train, val)
    classes, files = list_image_folder(data)
    if val_fraction is None:
        raise UsageError(f"{data} has no train/ and val/ folders; pass --val-fraction F to split its class folders")
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        paths = files[name]
        order = rng.permutation(len(paths))
        n_val = min(len(paths) - 1, max(1, math.floor(len(paths) * val_fraction + 0.5))) if len(paths) > 1 else 0
        val += [(paths[i], label) for i in sorted(order[:n_val])]
        train += [(paths[i], label) for i in sorted(order[n_val:])]
    if not val:
        raise UsageError(f"--val-fraction {val_fraction} leaves no validation images in {data}")
    return FolderSplits(classes, train, val)


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop (area fraction `scale`, aspect `ratio`), bicubic, with a numpy RNG."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


def random_crop(img: Image.Image, pp: PreprocessConfig, rng: np.random.Generator) -> Image.Image:
    """The evaluation resize (shorter side to `resize_size`, a no-op at that size), a random crop and a
    horizontal flip half of the time, the crop's offsets chosen so that every output pixel keeps the
    parity of its image coordinates (even offsets; odd horizontally when flipped): a 1 px pattern keeps
    its phase, as the built-in set's aligned images need (:mod:`cfvit_deploy.data.synthetic`)."""
    w, h = img.size
    scale = pp.resize_size / min(w, h)
    size = (max(pp.resize_size, int(w * scale)), max(pp.resize_size, int(h * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    flip = bool(rng.random() < 0.5)
    # flipped, output column u shows input column left + crop - 1 - u, of u's parity when left + crop - 1 is
    # even: an odd left for the usual even crop (no room for one when the resize equals the crop)
    shift = int(flip and pp.crop_size % 2 == 0 and size[0] > pp.crop_size)
    left = 2 * int(rng.integers(0, (size[0] - pp.crop_size - shift) // 2 + 1)) + shift
    top = 2 * int(rng.integers(0, (size[1] - pp.crop_size) // 2 + 1))
    img = img.crop((left, top, left + pp.crop_size, top + pp.crop_size))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def normalize(img: Image.Image, pp: PreprocessConfig) -> np.ndarray:
    """RGB image -> normalized (3, H, W) float32, bit-identical to the end of :func:`preprocess`.

    Uses a per-channel lookup table of the 256 values (the same float32 arithmetic), which is
    several times faster than computing every pixel.
    """
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    lut = ((levels - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)).T  # (3, 256)
    pixels = np.asarray(img)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], pixels[..., c], out=out[c])
    return out


class ImageFolderDataset(Dataset):
    """(path, label) samples as normalized tensors.

    ``train=True``: random resized crop (area fraction >= `crop_scale`; at 1, the evaluation
    resize and a random crop, no rescaling) + horizontal flip, drawn from (seed, epoch, index) so a
    resumed run sees the same images; call :meth:`set_epoch` each epoch. ``train=False``: exactly
    :func:`preprocess`. Decoded images (train) or preprocessed arrays (eval) are cached in memory
    up to :data:`CACHE_BYTES`.
    """

    def __init__(
        self, samples: list[Sample], pp: PreprocessConfig, train: bool, seed: int = 0, crop_scale: float = 0.5
    ) -> None:
        self.samples, self.pp, self.train, self.seed = samples, pp, train, seed
        self.crop_scale = crop_scale
        self.epoch = 0
        self._cache: dict[int, Image.Image | np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> Image.Image | np.ndarray:
        item = self._cache.get(index)
        if item is None:
            img = load_image(self.samples[index][0])
            item = img if self.train else preprocess(img, self.pp)
            nbytes = item.width * item.height * 3 if isinstance(item, Image.Image) else item.nbytes
            if self._cached_bytes + nbytes <= CACHE_BYTES:
                self._cache[index] = item
                self._cached_bytes += nbytes
        return item

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self._load(index)
        if isinstance(item, Image.Image):
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.crop_scale < 1.0:
                img = random_resized_crop(item, self.pp.crop_size, rng, (self.crop_scale, 1.0))
            else:
                img = random_crop(item, self.pp, rng)
            if self.crop_scale < 1.0 and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            item = normalize(img, self.pp)
        return torch.from_numpy(item), self.samples[index][1]
