"""What the serve tests send: small generated photos and an η that splits them between the two stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import load_and_preprocess
from runtimes import CFViTPipeline


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` images upscaled from 6x6 noise, JPEG and PNG in turn, at three sizes."""
    paths = []
    for seed in range(count):
        small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        size = [(240, 200), (300, 180), (224, 224)][seed % 3]
        path = folder / f"img{seed:02d}.{'png' if seed % 2 else 'jpg'}"
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def midpoint_eta(export_dir: Path, images: list[Path]) -> float:
    """Between the two middle coarse confidences (a float32 value, as the gate compares): about half the
    images exit, half go on to the fine stage."""
    manifest = Manifest.load(export_dir)
    batch = np.stack([load_and_preprocess(p, manifest.preprocessing) for p in images])
    c = np.sort(CFViTPipeline(manifest).run(batch, 0.0).confidence.astype(np.float64))
    mid = len(c) // 2
    assert c[mid] - c[mid - 1] > 1e-4
    return float(np.float32((c[mid - 1] + c[mid]) / 2))
