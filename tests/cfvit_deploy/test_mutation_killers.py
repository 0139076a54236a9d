"""Behaviour that the mutation run (`make mutation`) found unpinned by any fast test."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_decoder_errors_name_their_type(tmp_path, monkeypatch):
    """A decoder's ValueError/SyntaxError/EOFError is reported with its type and message."""
    from PIL import ImageOps

    from cfvit_deploy.preprocessing import load_image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")

    def broken(img):
        raise SyntaxError("broken PNG file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "a.png")
    assert str(caught.value) == f"{tmp_path / 'a.png'}: cannot decode image (SyntaxError: broken PNG file)"


# -- colour modes: what is composited on white, and what converts like PIL's convert("RGB") ---------------
def test_a_transparency_key_on_a_gray_image_is_ignored_like_pil_convert():
    from cfvit_deploy.preprocessing import _to_rgb

    gray = Image.fromarray(np.array([[0, 200]], np.uint8), "L")
    gray.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(_to_rgb(gray)), np.asarray(gray.convert("RGB")))
    assert np.asarray(_to_rgb(gray))[0, 0].tolist() == [0, 0, 0]  # black, not composited on white


def test_palette_with_alpha_is_composited_on_white():
    from cfvit_deploy.preprocessing import _to_rgb

    pa = Image.new("PA", (2, 1))
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((0, 0), (0, 0))  # fully transparent
    pa.putpixel((1, 0), (0, 255))  # opaque palette colour 0
    assert np.asarray(_to_rgb(pa)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


# -- renameat2 as loaded: errno reaches Python, the return code is an int ---------------------------------
def test_loaded_renameat2_reports_eexist_through_errno(tmp_path):
    import ctypes
    import errno
    import sys

    import cfvit_deploy.io as io

    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    func = io._load_renameat2()
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    ctypes.set_errno(0)
    rc = func(io._AT_FDCWD, bytes(tmp_path / "a"), io._AT_FDCWD, bytes(tmp_path / "b"), io._RENAME_NOREPLACE)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST


# -- --force on folders without RENAME_EXCHANGE: the old output goes to a pid-tagged temporary beside it ----
def test_portable_force_replace_parks_the_old_folder_beside_it(tmp_path, monkeypatch):
    import re
    import tempfile

    import cfvit_deploy.io as io

    monkeypatch.setattr(io, "USE_RENAMEAT2", False)
    made = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_text("old")
    with io.atomic_directory(tmp_path / "export", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(tempfile, "mkdtemp", spy)
    parked = [p for p in made if p.endswith(".old")]
    assert len(parked) == 1 and Path(parked[0]).parent == tmp_path
    assert re.fullmatch(rf"\.export\.{os.getpid()}\.\w+\.old", Path(parked[0]).name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["new.txt"]


def test_force_replace_of_a_folder_that_vanished_moves_the_new_one_in(tmp_path):
    import cfvit_deploy.io as io

    if io._renameat2 is None:
        pytest.skip("no renameat2 here")
    new = tmp_path / ".export.tmp"
    new.mkdir()
    (new / "a").write_text("a")
    io._replace_dir(new, tmp_path / "export")  # RENAME_EXCHANGE finds no target: FileNotFoundError path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "a").read_text() == "a"


# -- io's small pieces ---------------------------------------------------------------------------------------
def test_remove_of_a_missing_path_is_quiet(tmp_path):
    import cfvit_deploy.io as io

    io._remove(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    io._remove(tmp_path / "f")
    io._remove(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_rename2_falls_back_on_an_unsupported_flag_and_names_other_errors(tmp_path):
    import errno

    import cfvit_deploy.io as io

    if io._renameat2 is None:
        pytest.skip("no renameat2 here")
    (tmp_path / "a").write_text("a")
    # NOREPLACE | EXCHANGE together is EINVAL: treated like an unsupported flag (use the fallback)
    assert io._rename2(tmp_path / "a", tmp_path / "b", io._RENAME_NOREPLACE | io._RENAME_EXCHANGE) is False
    with pytest.raises(FileNotFoundError) as caught:
        io._rename2(tmp_path / "missing", tmp_path / "b", io._RENAME_NOREPLACE)
    err = caught.value
    assert (err.errno, err.strerror, err.filename) == (errno.ENOENT, os.strerror(errno.ENOENT), str(tmp_path / "b"))


def test_portable_force_replace_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    import cfvit_deploy.io as io

    monkeypatch.setattr(io, "USE_RENAMEAT2", False)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new folder's move into place fails
            raise OSError(5, "Input/output error")
        return real(src, dst)

    with (
        pytest.raises(OSError, match="Input/output error"),
        io.atomic_directory(tmp_path / "export", force=True) as tmp,
    ):
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(io.os, "replace", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["old.txt"]


def test_portable_force_replace_of_a_folder_that_vanished(tmp_path, monkeypatch):
    import cfvit_deploy.io as io

    monkeypatch.setattr(io, "USE_RENAMEAT2", False)
    new = tmp_path / ".export.tmp"
    new.mkdir()
    (new / "a").write_text("a")
    io._replace_dir(new, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "a").read_text() == "a"


def test_stale_temporaries_are_returned_and_logged_exactly(tmp_path, caplog):
    import subprocess
    import sys

    import cfvit_deploy.io as io

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".out.csv.{proc.pid}.abc123.tmp"
    stale.write_text("x")
    legacy = tmp_path / ".out.csv.k2j4h5g1.tmp"
    legacy.write_text("x")
    with caplog.at_level("WARNING", logger="cfvit_deploy.io"):
        removed = io.clean_stale_temporaries(tmp_path / "out.csv")
    assert removed == [stale] and not stale.exists() and legacy.exists()
    assert sorted(caplog.messages) == sorted(
        [
            f"removed {stale}, left behind by a run (pid {proc.pid}) that was killed while writing out.csv",
            f"{legacy} looks like a temporary file of an earlier interrupted run; remove it if no run is "
            "writing out.csv",
        ]
    )
