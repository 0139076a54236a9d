"""The built-in synthetic set and ImageFolder listing/datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cfvit_deploy import ModelConfig
from cfvit_deploy.data.folder import (
    ImageFolderDataset,
    find_splits,
    normalize,
    random_crop,
    random_resized_crop,
)
from cfvit_deploy.data.synthetic import (
    CLASSES,
    ensure_synthetic_dataset,
    make_synthetic_dataset,
    pattern_texels,
    read_meta,
)
from cfvit_deploy.errors import OutputExistsError, UsageError
from cfvit_deploy.preprocessing import PreprocessConfig, load_image, preprocess

PP = PreprocessConfig.for_model(ModelConfig.named("deit", "micro"))


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", 4, 2, seed=0)


def test_synthetic_layout_labels_and_difficulties(synthetic: Path) -> None:
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (synthetic / split).iterdir() if p.is_dir()) == sorted(CLASSES)
        rows = list(csv.DictReader((synthetic / split / "labels.csv").read_text().splitlines()))
        assert len(rows) == n * len(CLASSES)
        assert {r["difficulty"] for r in rows} == {"easy", "hard"}
        for r in rows:
            assert (synthetic / split / r["file"]).is_file() and r["file"].startswith(r["class"] + "/")
    meta = json.loads((synthetic / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["seed"] == 0
    with Image.open(next((synthetic / "train" / "checker").glob("*.png"))) as img:
        assert img.size == (256, 256) and img.mode == "RGB"


def test_patterns_vanish_at_half_resolution() -> None:
    """Sampled at every second pixel, as the coarse input is, every pattern is flat; at full
    resolution every class differs (for any phase)."""
    for seed in range(4):
        full = set()
        for label in range(len(CLASSES)):
            texels = pattern_texels(label, 32, 32, np.random.default_rng(seed))
            assert len(np.unique(texels[::2, ::2])) == 1
            full.add(texels.tobytes())
        assert len(full) == len(CLASSES)


def test_synthetic_is_deterministic_per_seed(tmp_path: Path, synthetic: Path) -> None:
    same = make_synthetic_dataset(tmp_path / "same", 4, 2, seed=0)
    other = make_synthetic_dataset(tmp_path / "other", 4, 2, seed=1)
    assert _bytes(same) == _bytes(synthetic)
    a, b = _bytes(other), _bytes(synthetic)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".png"))


def test_synthetic_reuses_identical_set_and_refuses_others(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", 1, 1, image_size=64)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert make_synthetic_dataset(root, 1, 1, image_size=64) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError):
        make_synthetic_dataset(root, 2, 1, image_size=64)
    make_synthetic_dataset(root, 2, 1, image_size=64, force=True)
    assert read_meta(root)["n_train_per_class"] == 2  # type: ignore[index]
    with pytest.raises(UsageError):
        make_synthetic_dataset(tmp_path / "bad", 0, 1)


def test_find_splits_train_val(synthetic: Path) -> None:
    splits = find_splits(synthetic)
    assert splits.classes == sorted(CLASSES)
    assert len(splits.train) == 4 * len(CLASSES) and len(splits.val) == 2 * len(CLASSES)
    for path, label in splits.train + splits.val:
        assert path.parent.name == splits.classes[label]


def test_find_splits_fraction_is_stratified_and_deterministic(synthetic: Path) -> None:
    flat = synthetic / "train"
    a, b = find_splits(flat, 0.25, seed=3), find_splits(flat, 0.25, seed=3)
    assert a == b and len(a.val) == len(CLASSES) and len(a.train) == 3 * len(CLASSES)
    assert sorted(label for _, label in a.val) == list(range(len(CLASSES)))
    assert not {p for p, _ in a.val} & {p for p, _ in a.train}
    assert find_splits(flat, 0.25, seed=4).val != a.val


@pytest.mark.parametrize(
    "layout,fraction,message",
    [
        ({}, None, "no class folders"),
        ({"a.png": None}, 0.5, "put them in one sub-folder per class"),
        ({"cat/x.png": None, "dog/readme.txt": None}, 0.5, "without image files in .*: dog$"),
        ({"cat/x.png": None}, None, "pass --val-fraction"),
        ({"cat/x.png": None}, 1.5, r"must lie in \(0, 1\)"),
        ({"train/cat/x.png": None}, None, "no val/ folder"),
        ({"train/cat/x.png": None, "val/cat/y.png": None}, 0.2, "only splits a flat"),
        ({"train/cat/x.png": None, "val/dog/y.png": None}, None, "missing from train/: dog"),
    ],
)
def test_find_splits_errors(tmp_path: Path, layout: dict[str, None], fraction: float | None, message: str) -> None:
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            Image.new("RGB", (8, 8)).save(tmp_path / rel)
        else:
            (tmp_path / rel).write_text("x")
    with pytest.raises(UsageError, match=message):
        find_splits(tmp_path, fraction)


def test_find_splits_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        find_splits(tmp_path / "nope")


def test_eval_dataset_is_exactly_preprocess(synthetic: Path) -> None:
    splits = find_splits(synthetic)
    ds = ImageFolderDataset(splits.val, PP, train=False)
    for i in (0, 7):
        x, label = ds[i]
        assert label == splits.val[i][1]
        np.testing.assert_array_equal(x.numpy(), preprocess(load_image(splits.val[i][0]), PP))
        np.testing.assert_array_equal(ds[i][0].numpy(), x.numpy())  # cached copy


def test_train_dataset_augments_deterministically(synthetic: Path) -> None:
    samples = find_splits(synthetic).train
    ds = ImageFolderDataset(samples, PP, train=True, seed=1)
    x0 = ds[3][0]
    assert x0.shape == (3, 224, 224) and x0.dtype.is_floating_point
    assert np.array_equal(ImageFolderDataset(samples, PP, train=True, seed=1)[3][0].numpy(), x0.numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[3][0].numpy(), x0.numpy())


def test_normalize_matches_preprocess_bitwise() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pp = PreprocessConfig(crop_size=32, resize_size=32)
    np.testing.assert_array_equal(normalize(img, pp), preprocess(img, pp))


def test_random_crop_keeps_pixels_at_the_resize_size() -> None:
    """crop_scale=1: the evaluation resize (a no-op for 256 px images), a translation and maybe a flip."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for seed in range(6):
        out = np.asarray(random_crop(Image.fromarray(pixels), PP, np.random.default_rng(seed)))
        assert out.shape == (224, 224, 3)
        windows = [pixels[y : y + 224, x : x + 224] for y in range(33) for x in range(33)]
        assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)


def test_random_crop_keeps_every_pixels_parity() -> None:
    """A 1 px pattern keeps its phase through the training crop, flipped or not (the built-in set's aligned
    images rely on it); both flips and several offsets occur."""
    x_parity = np.broadcast_to((np.arange(256) % 2 * 255).astype(np.uint8)[None, :], (256, 256))
    y_parity = x_parity.T
    column = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :], (256, 256))  # tells offset and flip apart
    marked = Image.fromarray(np.stack([x_parity, y_parity, column], axis=-1))
    seen = set()
    for seed in range(40):
        out = np.asarray(random_crop(marked, PP, np.random.default_rng(seed)))
        assert np.array_equal(out[:, :, 0], x_parity[:224, :224]) and np.array_equal(out[:, :, 1], y_parity[:224, :224])
        seen.add((int(out[0, 0, 2]), bool(out[0, 1, 2] < out[0, 0, 2])))
    assert {flipped for _, flipped in seen} == {False, True} and len(seen) > 10


def test_aligned_texels_follow_the_image_grid() -> None:
    """Given its box's origin, a pattern's tile cell (0, 0) sits on even image coordinates whatever the
    rng draws; without one, both phases occur."""
    for label in range(len(CLASSES)):
        tile = pattern_texels(label, 2, 2, np.random.default_rng(0), origin=(0, 0))
        for origin in ((0, 0), (3, 0), (0, 5), (7, 9)):
            got = pattern_texels(label, 6, 6, np.random.default_rng(origin), origin=origin)
            ys, xs = np.arange(6)[:, None] + origin[1], np.arange(6)[None, :] + origin[0]
            assert np.array_equal(got, tile[ys % 2, xs % 2])
    phases = {pattern_texels(2, 4, 4, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(phases) == 2  # hstripes at both phases


def test_every_second_training_image_is_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training images 0, 2, 4, ... of each class are aligned; held-out images never are."""
    from cfvit_deploy.data import synthetic as syn

    calls: list[tuple[int, bool]] = []
    real = syn.render

    def spy(label: int, hard: bool, rng: np.random.Generator, size: int = 256, aligned: bool = False) -> Image.Image:
        calls.append((label, aligned))
        return real(label, hard, rng, 32, aligned)

    monkeypatch.setattr(syn, "render", spy)
    make_synthetic_dataset(tmp_path / "d", 4, 3, seed=0)
    per_class_train = [aligned for _, aligned in calls[: 4 * len(CLASSES)]]
    assert per_class_train == [True, False, True, False] * len(CLASSES)
    assert not any(aligned for _, aligned in calls[4 * len(CLASSES) :]) and len(calls) == 7 * len(CLASSES)


@settings(max_examples=30, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_random_resized_crop_size(w: int, h: int, seed: int) -> None:
    out = random_resized_crop(Image.new("RGB", (w, h)), 24, np.random.default_rng(seed))
    assert out.size == (24, 24)


def test_make_data_again_says_nothing_was_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 13 item 15: a second `cfvit make-data` printed "wrote N images" though it wrote nothing."""
    import cli

    args = ["make-data", str(tmp_path / "d"), "--per-class", "1", "--val-per-class", "1", "--image-size", "64"]
    assert cli.main(args) == 0
    assert "wrote 1 training and 1 validation images per class" in capsys.readouterr().out
    stamp = (tmp_path / "d" / "meta.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "nothing written" in out and "wrote" not in out
    assert (tmp_path / "d" / "meta.json").stat().st_mtime_ns == stamp


def test_make_data_repairs_a_deleted_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import cli

    args = ["make-data", str(tmp_path / "d"), "--per-class", "2", "--val-per-class", "1", "--image-size", "64"]
    assert cli.main(args) == 0
    want = _bytes(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "train" / CLASSES[2])
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "2 file(s) of this set missing: regenerated" in capsys.readouterr().out
    assert _bytes(tmp_path / "d") == want  # the same bytes as the first run, class folder included
    # the Python twin, and train --synthetic's path, repair too
    shutil.rmtree(tmp_path / "d" / "val" / CLASSES[0])
    assert ensure_synthetic_dataset(tmp_path / "d") == tmp_path / "d" and _bytes(tmp_path / "d") == want


def test_make_data_help_places_labels_csv_in_the_splits() -> None:
    """The help said labels.csv is at the top level; it is in train/ and val/ (what the generator writes)."""
    import inspect

    from cfvit_deploy.app import commands_model

    help_text = inspect.signature(commands_model.make_data_cmd).parameters["out"].default.help
    assert "train/ and val/ (class folders + labels.csv each) and meta.json" in help_text
