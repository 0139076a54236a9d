"""Behaviour that the mutation run (`make mutation`) found unpinned by any fast test."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cfvit_deploy.errors import ImageError
from cfvit_deploy.preprocessing import PreprocessConfig, load_and_preprocess

PP = PreprocessConfig(crop_size=32, resize_size=36)


def test_load_and_preprocess_applies_max_pixels(tmp_path):
    """The decompression-bomb limit reaches the decoder through load_and_preprocess (the infer path)."""
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"image is 100x50 = 5,000 pixels, above the limit of 4,999"):
        load_and_preprocess(tmp_path / "big.png", PP, max_pixels=4999)
    assert load_and_preprocess(tmp_path / "big.png", PP, max_pixels=5000).shape == (3, 32, 32)
