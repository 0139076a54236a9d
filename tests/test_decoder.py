"""The one image decoder (cfvit_deploy.preprocessing): the format allowlist, reason codes, bounded
16-bit conversion, and the ``fast`` decode mode against ``exact``. Every image is generated here."""

from __future__ import annotations

import io
import pickle
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from cfvit_deploy import preprocessing
from cfvit_deploy.errors import ImageError, UsageError
from cfvit_deploy.preprocessing import (
    DECODE_MODES,
    IMAGE_FORMATS,
    IMAGENET_STD,
    PreprocessConfig,
    image_size,
    load_and_preprocess,
    load_image,
)

PP = PreprocessConfig(crop_size=224, resize_size=256)
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one 8-bit step after normalization, at its largest


def encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image: low-frequency colour waves plus mild noise (what a draft decode keeps)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    waves = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    arr = np.stack(waves, -1) * 100 + 128 + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# -- the allowlist ------------------------------------------------------------------------------------
ALLOWED = [
    ("JPEG", "RGB", {}),
    ("PNG", "RGB", {}),
    ("WEBP", "RGB", {"lossless": True}),
    ("GIF", "P", {}),
    ("BMP", "RGB", {}),
    ("TIFF", "RGB", {}),
    ("PPM", "RGB", {}),
    ("PPM", "L", {}),  # a PGM
]


@pytest.mark.parametrize(("fmt", "mode", "save"), ALLOWED)
@pytest.mark.parametrize("decode", DECODE_MODES)
def test_every_allowlisted_format_decodes(tmp_path, fmt, mode, save, decode):
    img = smooth(300, 200).convert(mode)
    data = encoded(img, fmt, **save)
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == fmt and check.format in IMAGE_FORMATS
    path = tmp_path / "image.bin"  # the extension does not matter: the bytes decide
    path.write_bytes(data)
    from_file = load_and_preprocess(path, PP, decode=decode)
    assert from_file.shape == (3, 224, 224) and np.isfinite(from_file).all()
    np.testing.assert_array_equal(load_and_preprocess(data, PP, decode=decode), from_file)


REFUSED = ["EPS", "ICO", "TGA", "PCX", "SGI", "IM", "DDS", "QOI"]


@pytest.mark.parametrize("fmt", REFUSED)
@pytest.mark.parametrize("decode", DECODE_MODES)
def test_formats_off_the_allowlist_are_not_an_image(tmp_path, monkeypatch, fmt, decode):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):  # Pillow's hand-off to the gs binary
        raise AssertionError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    data = encoded(Image.new("RGB", (40, 30), (200, 10, 10)), fmt)
    with Image.open(io.BytesIO(data)) as check:  # Pillow itself would open it
        assert check.format == fmt
    path = tmp_path / "photo.png"  # an allowlisted name does not help
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(ImageError, match="^(.*: )?not a recognised image format$") as info:
            load_and_preprocess(source, PP, decode=decode)
        assert info.value.reason == "not_an_image"


def test_the_pixel_limit_is_checked_from_the_header_of_bytes_too():
    with pytest.raises(ImageError, match="5000x5000 = 25,000,000 pixels, above the limit of 1,000,000") as info:
        image_size(png_header(5000, 5000), max_pixels=1_000_000)
    assert info.value.reason == "too_many_pixels"
    assert image_size(png_header(5000, 5000), max_pixels=None) == (5000, 5000)


def test_a_limit_above_pils_own_works_for_bytes(monkeypatch):
    """Serve's limit goes through the same lift of PIL's global bomb check as infer's."""
    small = PreprocessConfig(crop_size=16, resize_size=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2000 pixels by itself
    data = encoded(smooth(60, 50), "PNG")  # 3,000 pixels
    for decode in DECODE_MODES:
        with pytest.raises(ImageError, match="above the limit of 2,500") as info:
            load_and_preprocess(data, small, 2500, decode=decode)
        assert info.value.reason == "too_many_pixels"
        assert load_and_preprocess(data, small, max_pixels=5000, decode=decode).shape == (3, 16, 16)
    assert Image.MAX_IMAGE_PIXELS == 1000


def truncated_png() -> bytes:
    return encoded(smooth(200, 100), "PNG")[:300]


def corrupt_png() -> bytes:
    data = bytearray(encoded(smooth(100, 100), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 20] = b"x" * 20
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not_an_image"),
        (png_header(20000, 20000), "too_many_pixels"),
        (truncated_png(), "truncated"),
        (corrupt_png(), "corrupt"),
    ],
)
def test_each_failure_has_its_reason(data, reason):
    with pytest.raises(ImageError) as info:
        load_and_preprocess(data, PP)
    assert info.value.reason == reason and info.value.reason in ImageError.REASONS
    copy = pickle.loads(pickle.dumps(info.value))  # a process pool or Ray keeps the reason
    assert copy.reason == reason and str(copy) == str(info.value)


def test_file_system_errors_are_unreadable(tmp_path):
    for path in (tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert info.value.reason == "unreadable"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as info:
        load_image(tmp_path / "empty.png")
    assert info.value.reason == "empty"


def test_an_unknown_decode_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="--decode"):
        load_and_preprocess(encoded(smooth(20, 20), "PNG"), PP, decode="quick")


# -- 16-bit and 32-bit gray: table look-up, the same values as the float64 formula, bounded memory ----
def old_formula(arr: np.ndarray, mode: str) -> np.ndarray:
    """The float64 conversion the table replaced (the reference for its values)."""
    a = arr.astype(np.float64)
    top = 65535.0 if mode != "I" or a.max(initial=0) > 255 else 255.0
    return np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I;16", np.arange(65536, dtype=np.uint16)),
        ("I;16B", np.arange(65536, dtype=np.uint16)),
        ("I", np.arange(-300, 70000, dtype=np.int32)),  # out of range on both sides: clipped
        ("I", np.arange(-5, 256, dtype=np.int32)),  # 8-bit content in a 32-bit image
    ],
)
def test_gray_table_gives_the_float64_formulas_values(mode, values):
    side = int(np.ceil(np.sqrt(values.size)))
    arr = np.resize(values, side * side).reshape(side, side)
    if mode == "I;16B":
        img = Image.frombytes(mode, (side, side), arr.astype(">u2").tobytes())
    elif mode == "I;16":
        img = Image.frombytes(mode, (side, side), arr.astype("<u2").tobytes())
    else:
        img = Image.fromarray(arr.astype(np.int32), "I")
    np.testing.assert_array_equal(preprocessing._gray_to_8_bit(img), old_formula(arr, mode))


def test_16_bit_conversion_makes_no_whole_image_float_copy():
    """A 16-MP I;16 image converts with well under 8 bytes per pixel (one float64 copy) allocated."""
    side = 4000
    img = Image.frombytes("I;16", (side, side), np.full((side, side), 40000, "<u2").tobytes())
    tracemalloc.start()
    try:
        out = preprocessing._gray_to_8_bit(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out[0, 0] == round(40000 / 65535 * 255)
    assert peak < 5 * side * side, f"{peak / side / side:.1f} bytes per pixel"


# -- fast vs exact ------------------------------------------------------------------------------------
def draft_scales(monkeypatch) -> list[float]:
    """Record the scale of every JPEG draft decode (1 = no reduction)."""
    scales: list[float] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        width = self.size[0]
        result = real(self, mode, size)
        scales.append(width / self.size[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return scales


def assert_close(fast: np.ndarray, exact: np.ndarray, mean_levels: float = 4.0, max_levels: float = 48.0) -> None:
    """Same shape, and a pixel difference bounded in 8-bit levels (a shifted crop would exceed it)."""
    assert fast.shape == exact.shape == (3, PP.crop_size, PP.crop_size)
    diff = np.abs(fast - exact) / ONE_LEVEL
    assert diff.mean() < mean_levels and diff.max() < max_levels, (diff.mean(), diff.max())


@pytest.mark.parametrize(("w", "h", "scale"), [(2100, 1500, 4), (1500, 2100, 4), (4000, 3000, 8), (700, 520, 2)])
def test_fast_jpeg_drafts_to_the_smallest_scale_covering_the_resize(monkeypatch, w, h, scale):
    data = encoded(smooth(w, h), "JPEG", quality=95)
    scales = draft_scales(monkeypatch)
    fast = load_and_preprocess(data, PP, decode="fast")
    assert scales == [scale]
    assert min(w, h) / scale >= PP.resize_size > min(w, h) / (2 * scale)  # covers it; the next scale would not
    assert_close(fast, load_and_preprocess(data, PP))


def test_fast_keeps_the_crop_geometry():
    """A sharp vertical bar at the centre lands on the same columns in both modes."""
    arr = np.full((1500, 2000, 3), 40, np.uint8)
    arr[:, 990:1010] = 230  # 20 px of 2000: about 2.6 px after the resize to 256 high
    data = encoded(Image.fromarray(arr), "JPEG", quality=95)
    fast, exact = (load_and_preprocess(data, PP, decode=d)[1].mean(axis=0) for d in ("fast", "exact"))

    def centre(profile: np.ndarray) -> float:
        weight = profile - profile.min()
        return float((weight * np.arange(profile.size)).sum() / weight.sum())

    assert abs(centre(fast) - centre(exact)) < 0.1 and abs(centre(exact) - (PP.crop_size - 1) / 2) < 1
    np.testing.assert_allclose(fast, exact, atol=10 * ONE_LEVEL)


def test_fast_non_jpeg_uses_the_reducing_resize():
    img = smooth(3000, 2000)  # more than 2 x 3 times the resize: Pillow first halves it by a box filter
    data = encoded(img, "PNG")
    fast = load_and_preprocess(data, PP, decode="fast")
    assert_close(fast, load_and_preprocess(data, PP), mean_levels=1.0)
    assert not np.array_equal(fast, load_and_preprocess(data, PP))  # the reduction did happen


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_fast_applies_exif_orientation(monkeypatch, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(smooth(2000, 1200), "JPEG", quality=95, exif=exif.tobytes())
    scales = draft_scales(monkeypatch)
    fast, exact = load_and_preprocess(data, PP, decode="fast"), load_and_preprocess(data, PP)
    assert scales == [4]
    assert_close(fast, exact)
    unrotated = load_and_preprocess(encoded(smooth(2000, 1200), "JPEG", quality=95), PP)
    assert np.abs(exact - unrotated).mean() > 10 * ONE_LEVEL  # the rotation matters for this image


def test_fast_cmyk_jpeg(monkeypatch):
    data = encoded(smooth(1600, 1200).convert("CMYK"), "JPEG", quality=95)
    scales = draft_scales(monkeypatch)
    fast = load_and_preprocess(data, PP, decode="fast")
    assert scales == [4]
    assert_close(fast, load_and_preprocess(data, PP))


def test_fast_16_bit_png():
    ramp = (np.add.outer(np.arange(1200), np.arange(1600)) * 17).astype("<u2")
    data = encoded(Image.frombytes("I;16", (1600, 1200), ramp.tobytes()), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"
    assert_close(load_and_preprocess(data, PP, decode="fast"), load_and_preprocess(data, PP), mean_levels=1.0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(1, 1), (100, 80), (300, 200)])
def test_tiny_images_decode_the_same_in_both_modes(monkeypatch, fmt, size):
    """No draft or reduction applies below twice the resize: fast is exact, bit for bit."""
    data = encoded(smooth(*size), fmt, quality=95)
    scales = draft_scales(monkeypatch)
    np.testing.assert_array_equal(load_and_preprocess(data, PP, decode="fast"), load_and_preprocess(data, PP))
    assert scales == ([1.0] if fmt == "JPEG" else [])


@pytest.mark.parametrize(("w", "h"), [(6000, 300), (300, 6000)])
def test_fast_extreme_aspect_ratio(w, h):
    data = encoded(smooth(w, h), "JPEG", quality=95)
    assert_close(load_and_preprocess(data, PP, decode="fast"), load_and_preprocess(data, PP))


def test_exact_is_the_default_everywhere(tmp_path):
    data = encoded(smooth(1600, 1200), "JPEG", quality=95)
    (tmp_path / "a.jpg").write_bytes(data)
    exact = preprocessing.preprocess(load_image(tmp_path / "a.jpg"), PP)
    np.testing.assert_array_equal(load_and_preprocess(tmp_path / "a.jpg", PP), exact)
    np.testing.assert_array_equal(load_and_preprocess(tmp_path / "a.jpg", PP, None), exact)  # old positional form


@pytest.mark.parametrize(("w", "h"), [(1, 1), (37, 300), (640, 480), (3000, 200), (257, 2600)])
@pytest.mark.parametrize("mode", ["L", "I;16", "I"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_gray_images_resampled_as_one_band_equal_the_rgb_path_bit_for_bit(tmp_path, w, h, mode, interpolation):
    """load_and_preprocess resamples gray as "L" (a third of the work); preprocess(load_image()) as RGB."""
    pp = PreprocessConfig(crop_size=224, resize_size=256, interpolation=interpolation)
    rng = np.random.default_rng(w * h)
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    elif mode == "I;16":
        img = Image.frombytes(mode, (w, h), rng.integers(0, 65536, (h, w), dtype=np.uint16).astype("<u2").tobytes())
    else:
        img = Image.fromarray(rng.integers(-10, 70000, (h, w), dtype=np.int32), "I")
    path = tmp_path / "gray.png" if mode != "I" else tmp_path / "gray.tif"
    img.save(path)
    np.testing.assert_array_equal(load_and_preprocess(path, pp), preprocessing.preprocess(load_image(path), pp))


# -- the decode mode through infer, sweep and serve ------------------------------------------------------
def test_decode_mode_reaches_infer_and_its_summary(export_dir_factory, tmp_path):
    import json

    from runtimes.infer import infer

    export_dir = export_dir_factory("deit_g7")
    (tmp_path / "photo.jpg").write_bytes(encoded(smooth(1600, 1200), "JPEG", quality=95))
    rows = {}
    for decode in DECODE_MODES:
        out = tmp_path / f"{decode}.csv"
        s = infer(export_dir, [tmp_path / "photo.jpg"], decode=decode, output=out)
        assert s.errors == 0 and s.decode == decode
        assert json.loads((tmp_path / f"{decode}.csv.summary.json").read_text())["decode"] == decode
        rows[decode] = out.read_text().splitlines()[1]
    assert rows["fast"] != rows["exact"]  # the mode was really used (the confidences differ slightly)
    with pytest.raises(UsageError, match="--decode"):
        infer(export_dir, [tmp_path / "photo.jpg"], decode="quick")


@pytest.mark.parametrize("command", ["infer", "sweep", "serve"])
def test_cli_refuses_an_unknown_decode_mode(export_dir_factory, tmp_path, capsys, command):
    import cli

    export_dir = export_dir_factory("deit_g7")
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "a.png").write_bytes(encoded(smooth(64, 64), "PNG"))
    extra = {"infer": [str(tmp_path)], "sweep": [str(tmp_path), "--out", str(tmp_path / "s")], "serve": []}
    assert cli.main([command, str(export_dir), *extra[command], "--decode", "quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--decode" in err and "Traceback" not in err


def test_pixel_budget_admits_alone_sheds_beyond_and_gives_back():
    from cfvit_deploy.app.serve.decoding import REASON_CODES, PixelBudget
    from cfvit_deploy.app.serve.requests import BadRequest

    budget = PixelBudget(100)
    budget.take(150)  # alone: always admitted, whatever its size
    with pytest.raises(BadRequest) as info:
        budget.take(1)
    assert (info.value.status, info.value.code) == (503, "decode_busy")
    budget.give_back(150)
    budget.take(60)
    budget.take(40)  # exactly the limit
    with pytest.raises(BadRequest):
        budget.take(1)
    budget.give_back(60)
    budget.give_back(40)
    assert budget.in_flight == 0
    assert set(REASON_CODES) == set(ImageError.REASONS)  # every reason has its answer


def test_serve_decodes_in_the_mode_it_was_given(export_dir_factory, tmp_path):
    """`serve --decode fast` answers what `infer --decode fast` computes for the same JPEG."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from cfvit_deploy.app.serve import ServeOptions, build_app
    from runtimes.infer import infer

    export_dir = export_dir_factory("deit_g7")
    data = encoded(smooth(1600, 1200, seed=3), "JPEG", quality=95)
    (tmp_path / "photo.jpg").write_bytes(data)
    want = {}
    for decode in DECODE_MODES:
        infer(
            export_dir, [tmp_path / "photo.jpg"], decode=decode, eta=0.0, on_row=lambda r, d=decode: want.update({d: r})
        )
    assert want["fast"].confidence != want["exact"].confidence
    for decode in DECODE_MODES:
        with TestClient(build_app(export_dir, ServeOptions(decode=decode))) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "server not ready in time"
                time.sleep(0.05)
            answer = client.post("/v1/classify?eta=0", content=data, headers={"content-type": "image/jpeg"}).json()
        assert answer["confidence"] == pytest.approx(want[decode].confidence, abs=1e-6)
