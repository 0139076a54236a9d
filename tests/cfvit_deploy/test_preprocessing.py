"""Evaluation preprocessing: config, resize/crop geometry, normalization, mode handling, properties."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cfvit_deploy import preprocessing
from cfvit_deploy.config import ModelConfig
from cfvit_deploy.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    is_image_file,
    load_and_preprocess,
    load_image,
    preprocess,
)

PP = PreprocessConfig(crop_size=224, resize_size=256)
MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
#: Normalized values of 0 and 255 per channel: every output must lie in between.
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one 8-bit step after normalization, at its largest


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> normalized (3, H, W), computed independently of the module."""
    return ((rgb.astype(np.float64) / 255.0).transpose(2, 0, 1) - MEAN) / STD


# -- config ---------------------------------------------------------------------------------------
def test_for_model_uses_crop_pct():
    assert PreprocessConfig.for_model(ModelConfig()) == PreprocessConfig(224, 256, "bicubic")
    assert PreprocessConfig.for_model(ModelConfig(arch="lvvit", coarse_grid=7)).resize_size == 248  # int(224 / 0.9)
    assert PreprocessConfig.for_model(ModelConfig(coarse_grid=9)) == PreprocessConfig(288, 329)  # int(288 / 0.875)


def test_dict_round_trip():
    pp = PreprocessConfig(96, 110, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert PreprocessConfig.from_dict(pp.to_dict()) == pp
    assert PreprocessConfig.from_dict({**pp.to_dict(), "mean": [0.5, 0.5, 0.5]}).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"crop_size": 0}, "crop_size must be a positive integer"),
        ({"crop_size": 224.0}, "crop_size must be a positive integer"),
        ({"resize_size": True}, "resize_size must be a positive integer"),
        ({"resize_size": 200}, "smaller than crop_size"),
        ({"interpolation": "lanczos"}, "unknown interpolation"),
        ({"interpolation": ["bicubic"]}, "unknown interpolation"),
        ({"mean": [0.5, 0.5]}, "mean must be three finite numbers"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean must be three finite numbers"),
        ({"std": [0.2, "0.2", 0.2]}, "std must be three finite numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ],
)
def test_invalid_config_is_rejected(change, reason):
    with pytest.raises(ValueError, match=reason):
        PreprocessConfig.from_dict({**PP.to_dict(), **change})


def test_is_image_file():
    assert is_image_file(Path("a/b.JPG")) and is_image_file(Path("x.webp")) and is_image_file(Path("x.tiff"))
    assert not is_image_file(Path("x.txt")) and not is_image_file(Path("jpg")) and not is_image_file(Path("x.jpg.gz"))


# -- geometry and normalization ------------------------------------------------------------------
@pytest.mark.parametrize("value", [(0, 0, 0), (255, 255, 255), (10, 128, 250)])
def test_constant_image_is_mean_std_normalized(value):
    out = preprocess(Image.new("RGB", (317, 203), value), PP)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = (np.asarray(value, np.float64) / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], out.shape), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "w, h, resized, box",
    [
        # shorter side -> 256, longer int(256 * long / short); crop offsets int(round((size - 224) / 2))
        (300, 400, (256, 341), (16, 58, 240, 282)),  # round(58.5) == 58 (as torchvision)
        (400, 300, (341, 256), (58, 16, 282, 240)),
        (256, 256, (256, 256), (16, 16, 240, 240)),
        (100, 130, (256, 332), (16, 54, 240, 278)),
        (640, 480, (341, 256), (58, 16, 282, 240)),
        (224, 500, (256, 571), (16, 174, 240, 398)),
    ],
)
def test_resize_then_center_crop_matches_explicit_pil(w, h, resized, box):
    img = noise(w, h, seed=w * h)
    expected = normalize(np.asarray(img.resize(resized, Image.Resampling.BICUBIC).crop(box)))
    np.testing.assert_allclose(preprocess(img, PP), expected, rtol=0, atol=1e-5)


def test_bilinear_interpolation_is_used_when_configured():
    img = noise(300, 400, seed=5)
    expected = normalize(np.asarray(img.resize((256, 341), Image.Resampling.BILINEAR).crop((16, 58, 240, 282))))
    np.testing.assert_allclose(preprocess(img, PreprocessConfig(224, 256, "bilinear")), expected, atol=1e-5)


# (6000, 600) downscales across the band too: its margin must cover the filter's support
@pytest.mark.parametrize("w, h", [(2000, 7), (5, 1500), (1200, 40), (6000, 600)])
def test_extreme_aspect_ratio_matches_full_resize(w, h):
    """Very wide/tall images resample only the cropped region; the result equals the full resize + crop."""
    img = noise(w, h, seed=w + h)
    size = (int(256 * w / h), 256) if w > h else (256, int(256 * h / w))
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    expected = normalize(
        np.asarray(img.resize(size, Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224)))
    )
    out = preprocess(img, PP)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2.01 * ONE_LEVEL)  # sub-pixel filter rounding only
    assert np.abs(out - expected).mean() < 0.05 * ONE_LEVEL


def test_extreme_aspect_ratio_never_materializes_the_full_resize(monkeypatch):
    """A 5000x3 strip would resize to 426666x256 (and a 1e7x1 one to gigabytes) before cropping."""
    sizes, real = [], Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    assert preprocess(noise(5000, 3), PP).shape == (3, 224, 224)
    assert preprocess(noise(2, 4000), PP).shape == (3, 224, 224)
    assert preprocess(noise(100, 1000), PP).shape == (3, 224, 224)  # 10:1 already takes the banded path
    assert sizes and max(w * h for w, h in sizes) <= 4 * 256 * 256, sizes


def test_preprocess_converts_non_rgb_like_load_image(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    img.save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess(img, PP), preprocess(load_image(tmp_path / "a.png"), PP))
    np.testing.assert_array_equal(load_and_preprocess(tmp_path / "a.png", PP), preprocess(img, PP))


# -- properties -----------------------------------------------------------------------------------
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"]


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), rng.bytes(w * h * 4))
    if mode == "P":
        img = Image.frombytes("P", (w, h), rng.bytes(w * h))
        img.putpalette(rng.bytes(768))
        if seed % 2:
            img.info["transparency"] = 0
        return img
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 600),
    h=st.integers(1, 600),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    crop=st.sampled_from([(224, 256), (224, 248), (32, 37), (288, 329)]),
)
def test_any_size_and_mode_gives_normalized_crop(w, h, mode, seed, crop):
    pp = PreprocessConfig(*crop)
    img = make_image(mode, w, h, seed)
    assert img.mode == mode and img.size == (w, h)
    out = preprocess(img, pp)
    assert out.shape == (3, pp.crop_size, pp.crop_size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert (out >= LOW - 1e-5).all() and (out <= HIGH + 1e-5).all()


@settings(max_examples=25, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_any_saved_image_decodes_and_preprocesses(tmp_path_factory, w, h, mode, seed):
    path = tmp_path_factory.mktemp("img") / ("x.jpg" if mode == "CMYK" else "x.png")
    make_image(mode, w, h, seed).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (w, h)
    out = load_and_preprocess(path, PP)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and np.isfinite(out).all()
    assert (out >= LOW - 1e-5).all() and (out <= HIGH + 1e-5).all()


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(0, 65535), min_size=1, max_size=64))
def test_16_bit_gray_is_scaled_to_8_bit(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("i16") / "g.png"
    Image.fromarray(np.asarray([values], np.uint16)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    got = np.asarray(load_image(path))
    expected = np.floor(np.asarray(values, np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[None, :, None], 3, axis=2))


# -- PIL's process-wide pixel limit -------------------------------------------------------------------
def test_pixel_limit_is_restored_and_never_left_lifted_by_concurrent_decodes(tmp_path, monkeypatch):
    """Lifting PIL's global limit (max_pixels above it) is serialized: overlapping decodes restore it."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    original = Image.MAX_IMAGE_PIXELS
    first_inside, release_first, release_second = threading.Event(), threading.Event(), threading.Event()
    real_transpose, calls = preprocessing.ImageOps.exif_transpose, []

    def slow_transpose(img):
        calls.append(Image.MAX_IMAGE_PIXELS)
        if len(calls) == 1:
            first_inside.set()
            release_first.wait(10)
        else:
            release_second.wait(10)
        return real_transpose(img)

    monkeypatch.setattr(preprocessing.ImageOps, "exif_transpose", slow_transpose)
    first = threading.Thread(target=load_image, args=(tmp_path / "a.png", None))
    second = threading.Thread(target=load_image, args=(tmp_path / "a.png", None))
    first.start()
    assert first_inside.wait(10)
    second.start()  # starts while the first one has the limit lifted
    second.join(0.2)
    release_first.set()
    first.join(10)
    release_second.set()
    second.join(10)
    assert calls == [None, None]  # PIL's check was lifted while decoding with max_pixels=None
    assert original == Image.MAX_IMAGE_PIXELS


def test_default_limit_leaves_pil_global_alone(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    seen = []
    real = preprocessing.ImageOps.exif_transpose
    monkeypatch.setattr(
        preprocessing.ImageOps, "exif_transpose", lambda img: seen.append(Image.MAX_IMAGE_PIXELS) or real(img)
    )
    load_image(tmp_path / "a.png")
    load_image(tmp_path / "a.png", max_pixels=1000)
    assert seen == [Image.MAX_IMAGE_PIXELS] * 2 and Image.MAX_IMAGE_PIXELS is not None
