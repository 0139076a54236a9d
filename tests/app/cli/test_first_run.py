"""Issue 23: what a new user met on the first run (wording, records, warnings), one regression test each."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.preprocessing import PreprocessConfig


def run(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_top_level_help_names_every_command(capfd) -> None:
    """`serve` (and `make-data`) were missing from the one-line description of `cfvit --help`."""
    code, out, _ = run(capfd, "--help")
    assert code == 0
    text = " ".join(out.split())
    description = text[text.index("toolkit") :].split(".")[0]
    for info in cli.app.registered_commands:
        assert info.name in description, info.name


def test_skipped_unreadable_image_names_the_path_once(tmp_path, caplog) -> None:
    from cfvit_deploy.data.reader import read_images

    good, empty = tmp_path / "good.png", tmp_path / "empty.png"
    Image.new("RGB", (40, 40)).save(good)
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cfvit_deploy.data.reader"):
        read = read_images([empty, good], PreprocessConfig(crop_size=32, resize_size=36))
    assert read.paths == [good]
    (message,) = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert message.count(str(empty)) == 1, message


def test_static_int8_calibration_on_few_images_warns(tmp_path, caplog) -> None:
    from exporters.quantize import MIN_CALIBRATION_IMAGES, Calibration

    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
    pp = PreprocessConfig(crop_size=32, resize_size=36)
    with caplog.at_level(logging.WARNING, logger="exporters.quantize"):
        calibration = Calibration.from_folder(tmp_path, pp)
    assert len(calibration.images) == 8 < MIN_CALIBRATION_IMAGES
    assert any("calibrated on only 8 image(s)" in r.getMessage() for r in caplog.records), caplog.text


def test_validate_checkpoint_that_is_no_checkpoint_says_so(tmp_path, capfd, export_dir_factory) -> None:
    """`validate --checkpoint text.jpg` said "checkpoint does not match this export" for a file that is
    not a checkpoint at all."""
    export = export_dir_factory("deit_g7")
    text = tmp_path / "text.jpg"
    text.write_text("just some text, not a checkpoint\n")
    code, _, err = run(capfd, "validate", export, "--checkpoint", text)
    assert code == 1 and err.count("\n") == 1
    assert "not a PyTorch checkpoint" in err and "does not match this export" not in err


def test_validate_warns_when_the_recorded_checkpoint_changed(tmp_path, capfd) -> None:
    """Issue 23 item 3: `cfvit train --resume` rewrote the checkpoint an export records; `validate EXPORT`
    then compared the graphs with another model without a word (an explicit --checkpoint warned)."""
    import torch

    from exporters import export
    from tests.conftest import UpstreamFixture

    fx = UpstreamFixture("deit_g7")
    ckpt = tmp_path / "model.pth"
    shutil.copyfile(fx.pth, ckpt)
    export(ckpt, tmp_path / "export", num_heads=fx.num_heads)
    args = ("validate", tmp_path / "export", "--batch-sizes", "1", "--etas", "0.5")
    code, _, err = run(capfd, *args)
    assert code == 0 and "warning:" not in err  # unchanged: nothing to say
    torch.save({"model": torch.load(fx.pth, weights_only=True)["model"], "epoch": 2}, ckpt)  # same path, new file
    code, _, err = run(capfd, *args)
    assert code == 0  # the same weights: the checks pass, but the user is told first
    first = err.splitlines()[0]
    assert first.startswith("warning: the checkpoint recorded in the manifest") and str(ckpt) in first


def test_overlay_clash_message_counts_in_the_singular(tmp_path, export_dir_factory) -> None:
    from cfvit_deploy.errors import OutputExistsError
    from runtimes.infer import infer

    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    overlays = tmp_path / "overlays"
    infer(export_dir_factory("deit_g7"), [image], eta=1.0, overlay=overlays)
    assert len(list(overlays.iterdir())) == 1
    with pytest.raises(OutputExistsError, match=r"\(1 overlay would be replaced\)"):
        infer(export_dir_factory("deit_g7"), [image], eta=1.0, overlay=overlays)


def test_plural() -> None:
    from cfvit_deploy.wording import plural

    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
