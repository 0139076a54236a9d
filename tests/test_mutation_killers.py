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


# -- gray images of more than 8 bits (preprocessing._to_rgb) ---------------------------------------------
def _half_up(values: np.ndarray, top: int) -> np.ndarray:
    """round(v * 255 / top) with halves rounded up, in integers (independent of the float formula)."""
    v = np.clip(values.astype(np.int64), 0, top)
    return ((v * 510 + top) // (2 * top)).astype(np.uint8)


def _gray(img: Image.Image) -> np.ndarray:
    from cfvit_deploy.preprocessing import _to_rgb

    out = _to_rgb(img)
    assert out.mode == "RGB"
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    return arr[..., 0]


def test_every_16_bit_value_maps_to_its_rounded_8_bit_level():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    np.testing.assert_array_equal(_gray(img), _half_up(values, 65535))


@pytest.mark.parametrize(
    "values, top",
    [
        ([0, 7, 128, 255], 255),  # 32-bit gray with 8-bit content (max exactly 255): kept as is
        ([0, 7, 128, 256], 65535),  # one value above 255: the image is 16-bit content
        ([0, 300, 40000, 65535], 65535),
    ],
)
def test_32_bit_gray_guesses_its_depth_from_its_maximum(values, top):
    arr = np.array([values], np.int32)
    img = Image.fromarray(arr, "I")
    assert img.mode == "I"
    np.testing.assert_array_equal(_gray(img)[0], _half_up(arr[0], top))


def test_32_bit_gray_out_of_range_values_are_clipped():
    img = Image.fromarray(np.array([[-5000, 0, 65535, 200000]], np.int32), "I")
    np.testing.assert_array_equal(_gray(img)[0], [0, 0, 255, 255])


def test_a_32_bit_gray_image_is_preprocessed_like_its_8_bit_copy():
    """preprocess() converts non-RGB input itself: mode "I" with 8-bit content equals the "L" image."""
    from cfvit_deploy.preprocessing import preprocess

    levels = np.random.default_rng(1).integers(0, 256, (40, 50)).astype(np.int32)
    gray8 = Image.fromarray(levels.astype(np.uint8), "L")
    np.testing.assert_array_equal(preprocess(Image.fromarray(levels, "I"), PP), preprocess(gray8, PP))


# -- the banded resize of extreme aspect ratios honours the configured filter ----------------------------
@pytest.mark.parametrize("w, h", [(1500, 9), (7, 1300)])
def test_extreme_aspect_ratio_uses_the_configured_filter(w, h):
    from cfvit_deploy.preprocessing import preprocess

    pp = PreprocessConfig(crop_size=32, resize_size=36, interpolation="bilinear")
    img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    size = (int(36 * w / h), 36) if w > h else (36, int(36 * h / w))
    left, top = round((size[0] - 32) / 2), round((size[1] - 32) / 2)
    full = np.asarray(img.resize(size, Image.Resampling.BILINEAR).crop((left, top, left + 32, top + 32)))
    expected = ((full / np.float32(255) - np.float32(pp.mean)) / np.float32(pp.std)).transpose(2, 0, 1)
    one_level = 1 / 255 / min(pp.std)
    np.testing.assert_allclose(preprocess(img, pp), expected, rtol=0, atol=2.01 * one_level)
    assert np.abs(preprocess(img, pp) - expected).mean() < 0.05 * one_level
