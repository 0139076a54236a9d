"""load_image on bad and unusual files: the exact decoded result, or an ImageError naming the reason.

Every file is generated in tmp_path by the test itself.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cfvit_deploy import preprocessing
from cfvit_deploy.errors import CFViTError, ImageError
from cfvit_deploy.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, load_and_preprocess, load_image

PP = PreprocessConfig(crop_size=224, resize_size=256)
ORIENTATION = 0x0112


def noise_bytes(fmt: str, w: int = 64, h: int = 48, **save) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **save)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def stored_mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# -- files that must not decode ------------------------------------------------------------------
def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")


@pytest.mark.parametrize("fmt, name", [("JPEG", "cut.jpg"), ("PNG", "cut.png")])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, fmt, name, keep):
    data = noise_bytes(fmt)
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match=rf"{name}: cannot decode image \(.*truncated"):
        load_image(tmp_path / name)


def test_png_cut_inside_header(tmp_path):
    (tmp_path / "head.png").write_bytes(noise_bytes("PNG")[:20])
    with pytest.raises(ImageError, match=r"head\.png: (cannot decode image|not a recognised image format)"):
        load_image(tmp_path / "head.png")


@pytest.mark.parametrize("name", ["noise.png", "noise.jpg", "noise.gif", "noise.webp"])
def test_random_bytes_with_image_extension(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ImageError, match=rf"{name}: not a recognised image format"):
        load_image(tmp_path / name)


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not the pixels you are looking for\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not a recognised image format"):
        load_image(tmp_path / "notes.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_broken_symlink(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match=r"dangling\.jpg: file not found \(or a broken symlink\)"):
        load_image(tmp_path / "dangling.jpg")


def test_symlink_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageError, match=r"a\.jpg: symlink loop"):
        load_image(tmp_path / "a.jpg")


@pytest.mark.parametrize("name", ["folder", "folder.jpg"])
def test_directory_passed_as_image(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ImageError, match=rf"{name}: is a directory"):
        load_image(tmp_path / name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions (see the simulated test)")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(noise_bytes("PNG"))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"secret\.png: permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    path.write_bytes(noise_bytes("PNG"))

    def denied(fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))

    monkeypatch.setattr(preprocessing.Image, "open", denied)
    with pytest.raises(ImageError, match=r"secret\.png: permission denied"):
        load_image(path)


# -- decompression bombs ----------------------------------------------------------------------------
def test_header_claiming_a_huge_size(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb\.png: .*above the limit of 89,478,485 .*--max-pixels"):
        load_image(tmp_path / "bomb.png")


def test_header_above_a_lowered_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(5000, 5000))
    with pytest.raises(ImageError, match=r"5000x5000 = 25,000,000 pixels, above the limit of 1,000,000 .*--max-pixels"):
        load_image(tmp_path / "bomb.png", max_pixels=1_000_000)


def test_real_image_above_a_lowered_limit(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "big.png")
    with pytest.raises(
        ImageError,
        match=r"big\.png: image is 100x50 = 5,000 pixels, above the limit of 4,999 "
        r"\(possible decompression bomb; raise it with --max-pixels\)",
    ):
        load_image(tmp_path / "big.png", max_pixels=4999)
    assert load_image(tmp_path / "big.png", max_pixels=5000).size == (100, 50)


def test_lifting_the_limit_gets_past_the_size_check(tmp_path):
    """max_pixels=None lifts PIL's own check too: the fake header then fails as missing data, not as a bomb."""
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 10_000))  # 2e8 pixels, above 2x PIL's default
    with pytest.raises(ImageError, match=r"bomb\.png: cannot decode image") as info:
        load_image(tmp_path / "bomb.png", max_pixels=None)
    assert "above the limit" not in str(info.value) and "--max-pixels" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == preprocessing.DEFAULT_MAX_PIXELS


# -- unusual files that must decode exactly ------------------------------------------------------------
def test_cmyk_jpeg_decodes_to_sane_rgb(tmp_path):
    img = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    img.paste((255, 255, 0, 0), (16, 0, 32, 16))  # blue
    img.save(tmp_path / "cmyk.jpg", quality=95)
    assert stored_mode(tmp_path / "cmyk.jpg") == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.size == (32, 16)
    px = rgb(out)
    np.testing.assert_allclose(px[4:12, 2:10], np.broadcast_to([255, 0, 0], (8, 8, 3)), atol=12)
    np.testing.assert_allclose(px[4:12, 22:30], np.broadcast_to([0, 0, 255], (8, 8, 3)), atol=12)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 100, 257, 32768, 65535]], np.uint16)  # 100/65535 is black, not 100/255
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert stored_mode(tmp_path / "g16.png") == "I;16"
    out = load_image(tmp_path / "g16.png")
    assert out.size == (5, 1)
    np.testing.assert_array_equal(rgb(out)[0], np.repeat(np.array([0, 0, 1, 128, 255])[:, None], 3, axis=1))


def test_dark_16_bit_png_stays_dark(tmp_path):
    """All values below 256 are still 16-bit values: nearly black, not full 8-bit brightness."""
    Image.fromarray(np.array([[0, 100, 200, 255]], np.uint16)).save(tmp_path / "dark.png")
    assert stored_mode(tmp_path / "dark.png") == "I;16"
    np.testing.assert_array_equal(
        rgb(load_image(tmp_path / "dark.png"))[0], np.array([[0] * 3, [0] * 3, [1] * 3, [1] * 3])
    )


def test_1_bit_png(tmp_path):
    bits = (np.indices((8, 12)).sum(axis=0) % 2).astype(bool)  # checkerboard
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert stored_mode(tmp_path / "bits.png") == "1"
    out = load_image(tmp_path / "bits.png")
    assert out.size == (12, 8)
    np.testing.assert_array_equal(rgb(out), np.repeat(bits[..., None] * 255, 3, axis=2))


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (6, 4), 1)
    img.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)  # 0: red (transparent), 1: green
    img.paste(0, (0, 0, 3, 4))
    img.save(tmp_path / "pal.png", transparency=0)
    assert stored_mode(tmp_path / "pal.png") == "P"
    px = rgb(load_image(tmp_path / "pal.png"))
    assert px.shape == (4, 6, 3)
    assert (px[:, :3] == [255, 255, 255]).all() and (px[:, 3:] == [0, 200, 0]).all()


def test_la_grayscale_alpha_is_composited_on_white(tmp_path):
    gray = np.array([[50, 50, 0]], np.uint8)
    alpha = np.array([[255, 0, 128]], np.uint8)
    Image.fromarray(np.stack([gray, alpha], axis=-1), "LA").save(tmp_path / "la.png")
    assert stored_mode(tmp_path / "la.png") == "LA"
    px = rgb(load_image(tmp_path / "la.png"))[0]
    assert px[0].tolist() == [50] * 3 and px[1].tolist() == [255] * 3
    assert abs(px[2] - 127).max() <= 1 and len(set(px[2])) == 1  # half-transparent black over white


def test_l_grayscale(tmp_path):
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(gray).save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png")
    assert out.size == (6, 4)
    np.testing.assert_array_equal(rgb(out), np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "orientation, size, corner",
    [
        (1, (40, 20), "top-left"),
        (3, (40, 20), "bottom-right"),
        (6, (20, 40), "top-right"),  # stored rotated 90 CCW: shown after 90 CW
        (8, (20, 40), "bottom-left"),  # stored rotated 90 CW: shown after 90 CCW
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, corner):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # mark the stored top-left corner red
    img.save(tmp_path / "rot.jpg", exif=exif_bytes(orientation), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == size
    px, w, h = rgb(out), size[0], size[1]
    corners = {
        "top-left": px[1:6, 1:6],
        "top-right": px[1:6, w - 6 : w - 1],
        "bottom-left": px[h - 6 : h - 1, 1:6],
        "bottom-right": px[h - 6 : h - 1, w - 6 : w - 1],
    }
    for name, patch in corners.items():
        red = patch.mean(axis=(0, 1))[0] > 200 and patch.mean(axis=(0, 1))[1:].max() < 50
        assert red == (name == corner), (name, patch.mean(axis=(0, 1)))


def test_one_by_one_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    out = load_image(tmp_path / "dot.png")
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)
    arr = load_and_preprocess(tmp_path / "dot.png", PP)
    expected = (np.array([10, 20, 30]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, np.broadcast_to(expected[:, None, None], arr.shape), atol=1e-5)


@pytest.mark.parametrize("w, h", [(5000, 3), (3, 5000)])
def test_very_wide_or_tall_image(tmp_path, w, h):
    ramp = np.linspace(0, 255, max(w, h)).round().astype(np.uint8)  # gradient along the long side
    arr = np.broadcast_to(ramp[None, :, None], (h, w, 3)) if w > h else np.broadcast_to(ramp[:, None, None], (h, w, 3))
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / "strip.png")
    img = load_image(tmp_path / "strip.png")
    assert img.size == (w, h)
    out = load_and_preprocess(tmp_path / "strip.png", PP)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and np.isfinite(out).all()
    # the centre crop covers ~2.6 source pixels around the middle of the ramp, value ~127.5
    centre = (127.5 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out, np.broadcast_to(centre[:, None, None], out.shape), atol=2 / 255 / min(IMAGENET_STD))


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as stored:
        assert stored.n_frames == 3
    out = load_image(tmp_path / "anim.gif")
    assert out.size == (10, 6)
    assert (rgb(out) == [255, 0, 0]).all()


@pytest.mark.parametrize("name", ["my photo.png", "фото café 猫.png", " leading space.jpg", "ünïcødé dir/x.png"])
def test_non_ascii_and_space_names(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path, **({"quality": 100} if name.endswith(".jpg") else {}))
    out = load_image(str(path))
    assert out.size == (7, 5)
    assert np.abs(rgb(out) - [1, 2, 3]).max() <= (2 if name.endswith(".jpg") else 0)


# -- fuzz: mutated real files never escape as anything but ImageError -----------------------------
SEEDS = {
    "jpg": noise_bytes("JPEG", exif=exif_bytes(6)),
    "png": noise_bytes("PNG"),
    "gif": noise_bytes("GIF"),
    "bmp": noise_bytes("BMP"),
    "tif": noise_bytes("TIFF"),
    "webp": noise_bytes("WEBP"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt TIFF tags
@settings(max_examples=80, deadline=None)
@given(
    ext=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_images_decode_or_raise_image_error(tmp_path_factory, ext, edits):
    data = bytearray(SEEDS[ext])
    for kind, where, payload in edits:
        pos = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[pos] ^= payload[0] or 1
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = payload
    path = tmp_path_factory.mktemp("fuzz") / f"x.{ext}"
    path.write_bytes(bytes(data))
    try:
        img = load_image(path)
    except ImageError as exc:
        assert str(exc).startswith(f"{path}: ")
        assert isinstance(exc, CFViTError)
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def test_image_error_is_a_cfvit_error():
    assert issubclass(ImageError, CFViTError) and ImageError.exit_code == 1


def test_path_argument_may_be_str_or_path(tmp_path):
    Image.new("RGB", (3, 2), (9, 9, 9)).save(tmp_path / "s.png")
    assert load_image(str(tmp_path / "s.png")).size == load_image(Path(tmp_path / "s.png")).size == (3, 2)
