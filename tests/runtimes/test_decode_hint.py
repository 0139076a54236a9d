"""The `--decode fast` hint of `cfvit infer` (issue 25): printed only when decode is exact and most inputs are
JPEGs large enough for draft mode, decided from headers alone."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cfvit_deploy.preprocessing import PreprocessConfig
from runtimes.decode_hint import fast_decode_hint, is_large_jpeg, large_jpeg_share

PP = PreprocessConfig(crop_size=224, resize_size=256)


def _save(path, size, fmt=None):
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path, format=fmt)
    return path


def test_large_jpeg_is_decided_by_format_and_shorter_side(tmp_path):
    assert is_large_jpeg(_save(tmp_path / "big.jpg", (1024, 512)), PP)  # shorter side 2x the resize
    assert not is_large_jpeg(_save(tmp_path / "small.jpg", (1024, 511)), PP)
    assert not is_large_jpeg(_save(tmp_path / "big.png", (1024, 768)), PP)  # not a JPEG: no draft mode
    assert is_large_jpeg(_save(tmp_path / "named.png", (600, 600), "JPEG"), PP)  # the header, not the name
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert not is_large_jpeg(tmp_path / "broken.jpg", PP)


def test_hint_only_for_exact_decode_of_mostly_large_jpegs(tmp_path):
    big = [_save(tmp_path / f"b{i}.jpg", (800, 600)) for i in range(3)]
    small = [_save(tmp_path / f"s{i}.png", (300, 300)) for i in range(3)]
    assert large_jpeg_share(big + small[:1], PP) == 0.75
    hint = fast_decode_hint(big + small[:1], PP, "exact")
    assert hint.startswith("hint:") and "--decode fast" in hint and "\n" not in hint
    assert fast_decode_hint(big + small[:1], PP, "fast") is None  # already fast
    assert fast_decode_hint(big + small, PP, "exact") is None  # half are large JPEGs: not "mostly"
    assert fast_decode_hint([], PP, "exact") is None


def test_the_sample_spreads_over_the_whole_run(tmp_path):
    small = _save(tmp_path / "s.png", (300, 300))
    big = _save(tmp_path / "b.jpg", (800, 600))
    paths = [small] * 100 + [big] * 300  # the large JPEGs come after the first hundred files
    assert large_jpeg_share(paths, PP, sample=8) > 0.5


def test_cfvit_infer_prints_the_hint_once_for_large_jpegs_decoded_exactly(export_dir_factory, tmp_path, capsys):
    import cli

    export_dir = export_dir_factory("deit_g7")
    photos = [_save(tmp_path / f"p{i}.jpg", (640, 520)) for i in range(2)]
    assert cli.main(["infer", str(export_dir), *map(str, photos)]) == 0
    err = capsys.readouterr().err
    assert err.count("hint:") == 1 and "--decode fast" in err
    assert cli.main(["infer", str(export_dir), *map(str, photos), "--decode", "fast"]) == 0
    assert "hint:" not in capsys.readouterr().err
    small = [_save(tmp_path / f"s{i}.jpg", (300, 300)) for i in range(2)]
    assert cli.main(["infer", str(export_dir), *map(str, small)]) == 0
    assert "hint:" not in capsys.readouterr().err
