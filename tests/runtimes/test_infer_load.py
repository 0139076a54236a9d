"""Load: `infer` streams a folder of 5,000 images with flat memory and exactly one row per file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
N_FILES = 5000
BAD_EVERY = 500  #: every 500th file is not an image: 10 error rows among the 5,000
BASELINE_ROW = 1000
SAMPLE_EVERY = 250
MAX_GROWTH_BYTES = 50_000_000

#: Runs in a fresh interpreter: infer() on the folder with a CSV output, sampling this process's RSS
#: every SAMPLE_EVERY rows from the on_row callback; prints the samples and the summary as JSON.
WORKER = textwrap.dedent("""
    import json, sys
    import psutil
    from runtimes.infer import infer

    export_dir, folder, output, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    proc = psutil.Process()
    rows = [0]
    rss = {}

    def on_row(row):
        rows[0] += 1
        if rows[0] % every == 0:
            rss[rows[0]] = proc.memory_info().rss

    s = infer(export_dir, [folder], output=output, on_row=on_row)
    print(json.dumps({"rss": rss, "rows": s.rows, "images": s.images, "errors": s.errors}))
""")


def _make_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """N_FILES 32x32 PNGs (64 random tiles reused) of which every BAD_EVERY-th is text; (all, bad)."""
    folder.mkdir()
    tiles = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    paths, bad = [], []
    for i in range(N_FILES):
        path = folder / f"img_{i:05d}.png"
        if i % BAD_EVERY == BAD_EVERY - 1:
            path.write_text("not an image")
            bad.append(path)
        else:
            Image.fromarray(tiles[i % 64]).save(path, compress_level=1)
        paths.append(path)
    return paths, bad


@pytest.mark.slow
def test_infer_streams_5000_images_with_flat_memory(export_dir_factory, tmp_path) -> None:
    """RSS grows by less than 50 MB between the 1,000th and the 5,000th row, and no row is lost or doubled.

    Method: one run of ``runtimes.infer.infer`` in a fresh process (the test process's own memory
    does not count), with the RSS read every 250 rows from the ``on_row`` callback. Rows are
    emitted as each batch finishes, so by row 1,000 the sessions, the decode threads, the batch
    buffer and the look-ahead queue exist and 31 batches have run: that sample is the baseline,
    and the bound applies to every later sample up to the last row. Anything kept per image would
    show: a decoded image is 3x224x224 float32 = 602 KB, so holding the 4,000 later ones would
    add 2.4 GB. One run compared against itself avoids comparing the peaks of two runs, which
    differ by allocator and warm-up noise. The only timed quantity asserted is this memory bound.
    """
    export_dir = export_dir_factory("deit_g7")
    paths, bad = _make_folder(tmp_path / "images")
    output = tmp_path / "rows.csv"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(export_dir), str(tmp_path / "images"), str(output), str(SAMPLE_EVERY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rss = {int(k): v for k, v in result["rss"].items()}
    assert sorted(rss) == list(range(SAMPLE_EVERY, N_FILES + 1, SAMPLE_EVERY))
    growth = max(v for k, v in rss.items() if k >= BASELINE_ROW) - rss[BASELINE_ROW]
    print(
        f"RSS at row {BASELINE_ROW}: {rss[BASELINE_ROW] / 1e6:.1f} MB, at row {N_FILES}: {rss[N_FILES] / 1e6:.1f} MB, "
        f"largest growth after row {BASELINE_ROW}: {growth / 1e6:.1f} MB"
    )
    assert growth < MAX_GROWTH_BYTES

    assert (result["rows"], result["images"], result["errors"]) == (N_FILES, N_FILES - len(bad), len(bad))
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # each file once, in name order
    assert [r["path"] for r in rows if r["error"]] == [str(p) for p in bad]
    assert {r["error"] for r in rows if r["error"]} == {"not a recognised image format"}
    assert all((r["stage"], r["patches"]) in {("coarse", "0"), ("fine", "25")} for r in rows if not r["error"])
