"""`cfvit infer` on huge images: decompression bombs are error rows; --max-pixels raises and lowers the limit."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.app.cli.support import run, run_subprocess


# -- huge images -------------------------------------------------------------------------------------------
def _png(path: Path, width: int, height: int, row: bytes | None) -> Path:
    """A 1-bit grayscale PNG of `height` copies of the scanline `row`, zlib-compressed as a stream
    (a few KB however large the image); `row=None` writes no pixel data at all."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if row is not None:
        z = zlib.compressobj(9)
        idat = b"".join(z.compress(b"\x00" + row) for _ in range(height)) + z.flush()
        png += chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("bomb", ["zlib bomb", "header only"])
def test_decompression_bomb_is_an_error_row(capfd, tmp_path, export_dir, inputs, bomb) -> None:
    """A 20000 x 20000 PNG (400 Mpixels, 49 KB of zlib) or a bare header claiming 100000 x 100000."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(inputs["img"], folder / "a.png")
    if bomb == "zlib bomb":
        _png(folder / "bomb.png", 20_000, 20_000, bytes(2500))
        pixels = "400000000"
    else:
        _png(folder / "bomb.png", 100_000, 100_000, None)
        pixels = "10000000000"
    code, out, err = run(capfd, "infer", export_dir, folder, "-o", tmp_path / "rows.jsonl")
    assert code == 1
    assert err.startswith("files: 2  classified: 1  ") and "errors: 1" in err and len(err.splitlines()) == 1
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "bomb.png"]
    assert rows[0]["error"] == "" and rows[0]["stage"] in ("coarse", "fine")
    assert rows[1]["stage"] is None and rows[1]["topk"] == []
    assert re.fullmatch(
        rf"Image size \({pixels} pixels\) exceeds limit of 178956970 pixels, could be decompression "
        r"bomb DOS attack\.; above the limit of 89,478,485 \(possible decompression bomb; raise it "
        r"with --max-pixels\)",
        rows[1]["error"],
    )


def test_max_pixels_raises_and_lowers_the_limit(capfd, tmp_path, export_dir, inputs) -> None:
    """A real 9473 x 9473 image (89,737,729 pixels) is just above the default limit of 89,478,485."""
    big = tmp_path / "big.png"
    Image.new("L", (9473, 9473), 128).save(big)
    proc = run_subprocess("infer", export_dir, big)  # a fresh process: PIL's own warning must not show either
    assert proc.returncode == 1
    assert proc.stdout == (
        f"{big}\terror: image is 9473x9473 = 89,737,729 pixels, above the limit of 89,478,485 "
        "(possible decompression bomb; raise it with --max-pixels)\n"
    )
    assert re.fullmatch(
        r"files: 1  classified: 0  exited at coarse: 0 \(0\.0%\)  went to fine: 0  errors: 1  "
        r"0\.0 img/s\n",
        proc.stderr,
    )
    code, out, err = run(capfd, "infer", export_dir, big, "--max-pixels", "90000000")
    assert code == 0
    assert out.startswith(f"{big}\tcoarse\t") or out.startswith(f"{big}\tfine\t")
    assert err.startswith("files: 1  classified: 1  ")
    code, out, err = run(capfd, "infer", export_dir, inputs["img"], "--max-pixels", "1599")
    assert code == 1
    assert out == (
        f"{inputs['img']}\terror: image is 40x40 = 1,600 pixels, above the limit of 1,599 "
        "(possible decompression bomb; raise it with --max-pixels)\n"
    )
