"""Camera-size JPEGs with real high-frequency content: the demo's scenes re-rendered at 4000x3000.

A user's folder holds 12-megapixel photos, not 256-pixel PNGs. This generator draws the demo's
synthetic scenes (:mod:`cfvit_deploy.data.synthetic`: the same random draws, so class, outline,
colours, position and clutter are those of the demo image with the same seed) directly at camera
resolution, with every edge crisp at full resolution (nothing is upscaled but the smooth background
gradient), and adds textured noise (multi-scale 1/f texture plus per-pixel sensor noise), so the
JPEGs have a camera's entropy (about 2-5 MB at quality 92) rather than flat colour.

Geometry: the scene is laid out so that the evaluation preprocessing (shorter side resized to
``resize``, centre crop ``crop``) sees it where it sees the demo image: each 1 px cell of the class
pattern of the demo image is one pixel of the resized image, i.e. about 11.7 px here, aligned with
the resize grid. So the demo's trained model classifies these photos as it classifies the demo's
images, and only the decode path (exact full decode vs JPEG draft mode) differs between two runs.

    python benchmarks/camera_images.py FOLDER [--count 32] [--seed 0]

:func:`make_camera_jpegs` is the library twin (used by ``run_headline.py`` and ``serve_load.py``);
:func:`camera_image` renders one image (used by ``decode_accuracy.py``, which never writes them).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cfvit_deploy.data import synthetic as syn  # noqa: E402

CAMERA_SIZE = (4000, 3000)
JPEG_QUALITY = 92
#: Demo scene size, evaluation resize and crop of the demo's g=7 model.
SCENE, RESIZE, CROP = 256, 256, 224
#: Noise: 1/f texture amplitude and per-pixel sensor noise (grey levels, standard deviation).
TEXTURE_LEVELS, SENSOR_LEVELS = 10.0, 4.0


@dataclass(frozen=True)
class Layout:
    """Where the scene lands: full-resolution pixel <-> scene coordinate (the demo image's pixels)."""

    width: int
    height: int

    @cached_property
    def resized(self) -> tuple[int, int]:
        """The size the evaluation resize gives (shorter side RESIZE), as ``preprocess`` computes it."""
        w, h = self.width, self.height
        return (RESIZE, max(RESIZE, int(RESIZE * h / w))) if w <= h else (max(RESIZE, int(RESIZE * w / h)), RESIZE)

    @cached_property
    def offset(self) -> tuple[int, int]:
        """Scene origin in resized pixels: the resized crop starts where the demo image's crop starts."""
        rw, rh = self.resized
        scene_crop = int(round((SCENE - CROP) / 2.0))
        return int(round((rw - CROP) / 2.0)) - scene_crop, int(round((rh - CROP) / 2.0)) - scene_crop

    @property
    def scale(self) -> tuple[float, float]:
        """Full-resolution pixels per scene pixel (x, y)."""
        return self.width / self.resized[0], self.height / self.resized[1]

    def to_full(self, u: float, v: float) -> tuple[float, float]:
        return (u + self.offset[0]) * self.scale[0], (v + self.offset[1]) * self.scale[1]

    def scene_cells(self, x0: int, x1: int, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer scene pixel of each full-resolution column in [x0, x1) and row in [y0, y1)."""
        cols = np.floor((np.arange(x0, x1) + 0.5) / self.scale[0] - self.offset[0]).astype(np.int64)
        rows = np.floor((np.arange(y0, y1) + 0.5) / self.scale[1] - self.offset[1]).astype(np.int64)
        return cols, rows


def _background(rng: np.random.Generator, layout: Layout) -> Image.Image:
    """The demo's gradient (same draws), computed on the resized grid and upscaled: it is smooth."""
    a = syn._colour(rng)
    b = np.clip(a + rng.normal(0, 30, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    rw, rh = layout.resized
    u = (np.arange(rw) - layout.offset[0]) / (SCENE - 1) - 0.5
    v = (np.arange(rh) - layout.offset[1]) / (SCENE - 1) - 0.5
    ramp = np.clip(math.cos(angle) * u[None, :] + math.sin(angle) * v[:, None] + 0.5, 0, 1)
    rgb = a[None, None, :] + (b - a)[None, None, :] * ramp[..., None]
    small = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return small.resize((layout.width, layout.height), Image.Resampling.BICUBIC)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, layout: Layout, count: int) -> None:
    """The demo's distractors (same draws), drawn at full resolution."""
    sx = layout.scale[1]
    for _ in range(count):
        colour = syn._hue_colour(rng.choice(syn._HUES) + rng.uniform(-10, 10), rng.uniform(0.6, 1), rng.uniform(0.6, 1))
        x, y = rng.uniform(0, SCENE, 2)
        if rng.random() < 0.6:
            length, theta = rng.uniform(0.04, 0.14) * SCENE, rng.uniform(0, math.pi)
            end = layout.to_full(x + length * math.cos(theta), y + length * math.sin(theta))
            draw.line([layout.to_full(x, y), end], fill=colour, width=round(int(rng.integers(1, 3)) * sx))
        else:
            rad = rng.uniform(0.008, 0.02) * SCENE * sx
            cx, cy = layout.to_full(x, y)
            draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=colour)


def render_camera(label: int, hard: bool, rng: np.random.Generator, size: tuple[int, int] = CAMERA_SIZE) -> Image.Image:
    """The demo image of `label` drawn from `rng` (as :func:`synthetic.render` draws it), at `size`, noise-free."""
    layout = Layout(*size)
    img = _background(rng, layout)
    if hard:
        r = rng.uniform(0.13, 0.18) * SCENE
        cx, cy = rng.uniform(0.1 * SCENE + r, 0.9 * SCENE - r, 2)
        n_clutter = int(rng.integers(8, 15))
        dark, light = rng.uniform(0, 90), rng.uniform(170, 255)
        ink, paper = (int(dark),) * 3, (int(light),) * 3
    else:
        r = rng.uniform(0.24, 0.32) * SCENE
        cx, cy = SCENE / 2 + rng.uniform(-0.06, 0.06, 2) * SCENE
        n_clutter = int(rng.integers(0, 3))
        ink = syn._hue_colour(syn._HUES[label] + rng.uniform(-12, 12), rng.uniform(0.7, 1), rng.uniform(0.55, 0.9))
        paper = syn._hue_colour(rng.uniform(0, 360), rng.uniform(0, 0.15), rng.uniform(0.9, 1))
    _clutter(ImageDraw.Draw(img), rng, layout, n_clutter)
    # the pattern box of the demo image, in scene pixels, then in full-resolution pixels
    u0, v0 = max(0, int(cx - 1.3 * r)), max(0, int(cy - 1.3 * r))
    u1, v1 = min(SCENE, int(cx + 1.3 * r) + 2), min(SCENE, int(cy + 1.3 * r) + 2)
    (x0, y0), (x1, y1) = (tuple(math.ceil(c) for c in layout.to_full(u, v)) for u, v in ((u0, v0), (u1, v1)))
    tile = np.asarray(syn._TILES[syn.CLASSES[label]], dtype=bool).T  # [y parity, x parity]
    ox, oy = rng.integers(0, 2, 2)
    cols, rows = layout.scene_cells(x0, x1, y0, y1)
    texels = tile[((rows - v0 + oy) % 2)[:, None], ((cols - u0 + ox) % 2)[None, :]]
    pattern = np.where(texels[..., None], np.asarray(ink, np.uint8), np.asarray(paper, np.uint8))
    mask = Image.new("L", (x1 - x0, y1 - y0))
    fx, fy = layout.to_full(cx, cy)
    syn._outline(ImageDraw.Draw(mask), rng, fx - x0, fy - y0, r * layout.scale[1])
    img.paste(Image.fromarray(pattern), (x0, y0), mask=mask)
    return img


class Texture:
    """Seeded textured noise for many images: a 1/f texture bank made once, a random window per image."""

    def __init__(self, seed: int, size: tuple[int, int] = CAMERA_SIZE, margin: int = 512) -> None:
        rng = np.random.default_rng([seed, 77])
        w, h = size[0] + margin, size[1] + margin
        field = np.zeros((h, w), np.float32)
        for cells, weight in ((w // 2, 0.5), (w // 8, 0.8), (w // 32, 1.0), (w // 128, 1.0)):
            coarse = rng.standard_normal((max(2, cells * h // w), cells)).astype(np.float32)
            layer = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)
            field += weight * np.asarray(layer)
        field *= TEXTURE_LEVELS / field.std()
        # one RGB noise image (texture in every channel, sensor noise per channel) around grey 128: adding
        # a window of it to an image is one ImageChops.add, C speed (a numpy sum cost 0.1-0.2 s a photo)
        noise = [field + SENSOR_LEVELS * rng.standard_normal((h, w), np.float32) for _ in range(3)]
        self.noise = Image.fromarray(np.clip(np.rint(np.stack(noise, axis=-1)) + 128, 0, 255).astype(np.uint8))
        self.size = size

    def apply(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """`img` plus a random window of the noise image."""
        w, h = self.size
        fw, fh = self.noise.size
        x, y = (int(v) for v in rng.integers(0, (fw - w, fh - h)))
        return ImageChops.add(img, self.noise.crop((x, y, x + w, y + h)), scale=1.0, offset=-128)


def held_out(index: int, seed: int = 0, per_class: int | None = None) -> tuple[int, bool, np.random.Generator]:
    """(label, hard, rng) of held-out image `index`: the demo's validation draws ([seed, 1, label, j]), class by
    class in turn, hard for the first 60% of each class's `per_class` images (default: the demo's 50)."""
    label, j = index % len(syn.CLASSES), index // len(syn.CLASSES)
    n = per_class or syn.SyntheticSpec().n_val_per_class
    hard = (j % n) < round(n * syn.SyntheticSpec().hard_fraction)
    return label, hard, np.random.default_rng([seed, 1, label, j])


def camera_image(index: int, texture: Texture | None, seed: int = 0, per_class: int | None = None) -> Image.Image:
    """Held-out image `index` at camera size, with `texture`'s noise (None: noise-free)."""
    label, hard, rng = held_out(index, seed, per_class)
    img = render_camera(label, hard, rng, texture.size if texture else CAMERA_SIZE)
    return texture.apply(img, np.random.default_rng([seed, 2, index])) if texture else img


def jpeg_bytes(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_camera_jpegs(
    folder: str | Path, count: int = 32, seed: int = 0, size: tuple[int, int] = CAMERA_SIZE
) -> list[Path]:
    """`count` JPEGs of `size` (default: camera size) in `folder` (``<class>_<index>.jpg``), reused when there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texture: Texture | None = None
    paths = []
    for i in range(count):
        path = folder / f"{syn.CLASSES[i % len(syn.CLASSES)]}_{i:04d}.jpg"
        if not path.is_file():
            texture = texture or Texture(seed, size)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(jpeg_bytes(camera_image(i, texture, seed)))
            tmp.replace(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = make_camera_jpegs(args.folder, args.count, args.seed)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
    print(f"{len(paths)} JPEGs of {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} in {args.folder} ({mb:.1f} MB each on average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
