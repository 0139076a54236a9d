"""benchmarks/camera_images.py: camera-size JPEGs of the demo's scenes (issue 25's end-to-end and accuracy
sets). The evaluation preprocessing must see the demo image (so the demo model can classify them), and the
files must carry a photo's entropy (not flat colour)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfvit_deploy.data import synthetic as syn
from cfvit_deploy.preprocessing import PreprocessConfig, preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import camera_images as cam
finally:
    sys.path.pop(0)

PP = PreprocessConfig(crop_size=224, resize_size=256)  # the demo model's evaluation transform (g=7)


@pytest.mark.parametrize("index", [0, 7, 40, 250])  # hard and easy images of several classes
@pytest.mark.parametrize("size", [cam.CAMERA_SIZE, (1200, 1600)])  # landscape camera, portrait phone
def test_preprocessing_sees_the_demo_image(index, size):
    label, hard, rng = cam.held_out(index)
    camera = preprocess(cam.render_camera(label, hard, rng, size), PP)
    demo = preprocess(syn.render(label, hard, cam.held_out(index)[2]), PP)
    assert camera.shape == demo.shape == (3, 224, 224)
    assert np.corrcoef(camera.ravel(), demo.ravel())[0, 1] > 0.85
    # the class pattern's 1 px cells survive, in place: the pixel-to-pixel differences follow the demo
    # image's (the antialiased resize of a real photo attenuates them: to about 40% for the checker)
    for axis in (1, 2):
        d_camera, d_demo = (np.diff(x, axis=axis).ravel() for x in (camera, demo))
        assert np.corrcoef(d_camera, d_demo)[0, 1] > 0.6
        assert np.abs(d_camera).mean() > 0.3 * np.abs(d_demo).mean()


def test_held_out_draws_are_the_demo_validation_images():
    spec = syn.SyntheticSpec()
    for index in (0, 5, 6, 299):
        label, hard, rng = cam.held_out(index)
        j = index // len(syn.CLASSES)
        assert label == index % len(syn.CLASSES)
        assert hard == (j < round(spec.n_val_per_class * spec.hard_fraction))
        expected = np.random.default_rng([spec.seed, 1, label, j])
        assert rng.integers(0, 2**32) == expected.integers(0, 2**32)


def test_make_camera_jpegs_writes_textured_camera_size_photos_once(tmp_path):
    paths = cam.make_camera_jpegs(tmp_path, count=2)
    assert [p.name for p in paths] == ["solid_0000.jpg", "dots_0001.jpg"]
    for p in paths:
        with Image.open(p) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", cam.CAMERA_SIZE, "RGB")
            grey = np.asarray(img.convert("L"), np.float32)
        assert p.stat().st_size > 1.5 * 2**20  # a camera's entropy, not flat colour (that would be ~0.3 MB)
        # texture everywhere: neighbouring pixels differ by several grey levels even in the background
        assert np.abs(np.diff(grey[:200, :200], axis=1)).mean() > 2.0
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert cam.make_camera_jpegs(tmp_path, count=2) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # reused, not rewritten


def test_the_same_seed_gives_the_same_image():
    texture = cam.Texture(0, size=(800, 600))
    a, b = (np.asarray(cam.camera_image(3, texture)) for _ in range(2))
    assert a.shape == (600, 800, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(cam.camera_image(4, texture)))
