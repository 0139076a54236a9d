"""`cfvit infer` and its library twin: inputs, rows, formats, overlays, exit codes, interrupts."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.errors import OutputExistsError, UsageError
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import load_and_preprocess
from cfvit_deploy.signals import Terminated
from runtimes import CFViTPipeline
from runtimes import infer as infer_mod
from runtimes import inference as inference_mod
from runtimes.infer import InferInterrupted, collect_inputs, infer, overlay_names
from runtimes.sinks import summary_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7")


def _image(path: Path, seed: int, size: tuple[int, int] = (240, 200)) -> Path:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # smooth: a blown-up 6x6 pattern
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """a.png, b.JPG, c.jpeg (good), d.jpg (corrupt), notes.txt, sub/s.png, sub/deeper/t.bmp."""
    d = tmp_path / "in"
    (d / "sub" / "deeper").mkdir(parents=True)
    _image(d / "a.png", 1)
    _image(d / "b.JPG", 2, (300, 180))
    _image(d / "c.jpeg", 3, (224, 224))
    (d / "d.jpg").write_bytes(b"garbage: not an image at all")
    (d / "notes.txt").write_text("not an image")
    _image(d / "sub" / "s.png", 4)
    _image(d / "sub" / "deeper" / "t.bmp", 5)
    return d


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _names(rows: list[dict[str, str]], root: Path) -> list[str]:
    return [Path(r["path"]).relative_to(root).as_posix() for r in rows]


def _mixed_eta(export_dir: Path, paths: list[Path]) -> float:
    """An eta between the lowest two confidences of `paths`: some exit, some go to fine."""
    manifest = Manifest.load(export_dir)
    images = np.stack([load_and_preprocess(p, manifest.preprocessing) for p in paths])
    c = np.sort(CFViTPipeline(manifest).run(images, 0.0).confidence.astype(np.float64))
    assert c[1] - c[0] > 1e-4
    return float((c[0] + c[1]) / 2)


# -- inputs ------------------------------------------------------------------------------------------
def test_collect_inputs(folder):
    flat = collect_inputs([folder])
    assert [p.relative_to(folder).as_posix() for p in flat] == ["a.png", "b.JPG", "c.jpeg", "d.jpg"]
    deep = collect_inputs([folder], recursive=True)
    assert [p.relative_to(folder).as_posix() for p in deep] == [
        "a.png",
        "b.JPG",
        "c.jpeg",
        "d.jpg",
        "sub/deeper/t.bmp",
        "sub/s.png",
    ]
    named = collect_inputs([folder / "notes.txt", folder / "a.png", folder, folder / "missing.png"])
    assert [p.name for p in named] == ["notes.txt", "a.png", "b.JPG", "c.jpeg", "d.jpg", "missing.png"]


def test_overlay_names_are_unique():
    names = overlay_names([Path("x/cat.jpg"), Path("y/cat.png"), Path("y/Cat.bmp"), Path("dog.png")])
    assert list(names.values()) == ["cat.png", "cat-1.png", "Cat-2.png", "dog.png"]


def test_folder_rows_and_summary(export_dir, folder, tmp_path):
    out = tmp_path / "r.csv"
    s = infer(export_dir, [folder], output=out, batch_size=2)
    rows = _csv_rows(out)
    assert _names(rows, folder) == ["a.png", "b.JPG", "c.jpeg", "d.jpg"]  # no notes.txt, no sub-folder
    assert [r["error"] != "" for r in rows] == [False, False, False, True]
    assert rows[3]["error"] == "not a recognised image format" and rows[3]["stage"] == rows[3]["label_1"] == ""
    assert (s.inputs, s.errors, s.images, s.exited + s.fine, s.output) == (4, 1, 3, 3, out)
    assert s.exited == sum(r["stage"] == "coarse" for r in rows) and s.fine == sum(r["stage"] == "fine" for r in rows)

    s = infer(export_dir, [folder], output=out, force=True, recursive=True)
    assert _names(_csv_rows(out), folder) == ["a.png", "b.JPG", "c.jpeg", "d.jpg", "sub/deeper/t.bmp", "sub/s.png"]
    assert (s.inputs, s.errors) == (6, 1)


def test_explicit_files_are_always_attempted(export_dir, folder, tmp_path):
    out = tmp_path / "r.csv"
    infer(export_dir, [folder / "notes.txt", folder / "a.png", folder / "missing.png", folder / "sub"], output=out)
    rows = _csv_rows(out)
    assert [Path(r["path"]).name for r in rows] == ["notes.txt", "a.png", "missing.png", "s.png"]
    assert rows[0]["error"] == "not a recognised image format"
    assert rows[1]["error"] == "" and rows[1]["stage"] in ("coarse", "fine")
    assert rows[2]["error"].startswith("file not found")


def test_unexpected_decode_failure_is_an_error_row(export_dir, folder, tmp_path, monkeypatch):
    real = inference_mod.load_and_preprocess

    def flaky(path, pp, max_pixels, **kwargs):
        if Path(path).name == "b.JPG":
            raise RuntimeError("boom")
        return real(path, pp, max_pixels, **kwargs)

    monkeypatch.setattr(inference_mod, "load_and_preprocess", flaky)
    out = tmp_path / "r.jsonl"
    s = infer(export_dir, [folder], output=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in rows] == ["", "RuntimeError: boom", "", "not a recognised image format"]
    assert s.errors == 2 and s.images == 2


def test_csv_cells_match_an_independent_computation(export_dir, tmp_path):
    paths = [_image(tmp_path / "one.png", 11), _image(tmp_path / "two.png", 12, (180, 260))]
    eta = _mixed_eta(export_dir, paths)
    out = tmp_path / "r.csv"
    assert infer(export_dir, paths, eta=eta, topk=3, output=out).errors == 0

    # the reference is the PyTorch model's predict on the fixture checkpoint, not the ONNX pipeline
    torch = pytest.importorskip("torch")
    from cfvit_deploy import load_checkpoint
    from cfvit_deploy.model import confidence
    from tests.conftest import UpstreamFixture

    fx = UpstreamFixture("deit_g7")
    model = load_checkpoint(fx.pth, num_heads=fx.num_heads).eval()
    manifest = Manifest.load(export_dir)
    images = np.stack([load_and_preprocess(p, manifest.preprocessing) for p in paths])
    with torch.no_grad():
        pred = model.predict(torch.from_numpy(images), eta)
        probs = torch.softmax(pred.logits.double(), dim=1).numpy()
        conf = confidence(pred.coarse_logits).numpy()
    exited = pred.exited.numpy()
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == [
        "path",
        "stage",
        "confidence",
        "patches",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
        "overlay",
        "error",
    ]
    assert len(table) == 3
    for i, cells in enumerate(table[1:]):
        order = np.argsort(-probs[i])[:3]
        assert cells[0] == str(paths[i])
        assert cells[1] == ("coarse" if exited[i] else "fine")
        assert float(cells[2]) == pytest.approx(float(conf[i]), abs=1e-5)
        assert int(cells[3]) == (0 if cells[1] == "coarse" else manifest.model.k)
        for r in range(3):
            assert cells[4 + 2 * r] == manifest.labels()[order[r]]
            assert float(cells[5 + 2 * r]) == pytest.approx(probs[i, order[r]], abs=1e-5)
        assert cells[10] == cells[11] == ""
    assert {c[1] for c in table[1:]} == {"coarse", "fine"}


def test_jsonl_format(export_dir, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    infer(export_dir, [folder], output=out, topk=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for r in rows[:3]:
        assert set(r) == {"path", "stage", "confidence", "patches", "topk", "overlay", "error"}
        assert r["stage"] in ("coarse", "fine") and r["error"] == "" and 0 < r["confidence"] <= 1
        assert [set(t) for t in r["topk"]] == [{"label", "prob"}] * 2
        assert r["topk"][0]["prob"] >= r["topk"][1]["prob"]
    assert rows[3] == {
        "path": str(folder / "d.jpg"),
        "stage": None,
        "confidence": None,
        "patches": None,
        "topk": [],
        "overlay": "",
        "error": "not a recognised image format",
    }


def test_topk_is_capped_at_the_number_of_classes(export_dir, folder, tmp_path):
    out = tmp_path / "r.csv"
    infer(export_dir, [folder / "a.png"], output=out, topk=50)
    row = _csv_rows(out)[0]
    assert "label_10" in row and "label_11" not in row
    assert sum(float(row[f"prob_{i}"]) for i in range(1, 11)) == pytest.approx(1.0, abs=1e-4)


def test_overlays_only_for_fine_stage_images(export_dir, folder, tmp_path):
    paths = collect_inputs([folder], recursive=True)
    good = [p for p in paths if p.name != "d.jpg"]
    eta = _mixed_eta(export_dir, good)
    out, overlay = tmp_path / "r.csv", tmp_path / "overlays"
    s = infer(export_dir, [folder], recursive=True, eta=eta, output=out, overlay=overlay)
    rows = _csv_rows(out)
    fine = {Path(r["path"]).stem + ".png" for r in rows if r["stage"] == "fine"}
    assert fine and len(fine) < len(good)
    assert {p.name for p in overlay.iterdir()} == fine and s.overlays == len(fine)
    for p in overlay.iterdir():
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (224, 224) and img.mode == "RGB"
    with pytest.raises(OutputExistsError, match="--force"):
        infer(export_dir, [folder], recursive=True, eta=eta, output=tmp_path / "r2.csv", overlay=overlay)
    assert not (tmp_path / "r2.csv").exists()
    infer(export_dir, [folder], recursive=True, eta=eta, output=tmp_path / "r2.csv", overlay=overlay, force=True)


def test_render_overlay_highlights_the_refined_cells(export_dir):
    manifest = Manifest.load(export_dir)
    image = np.zeros((3, 224, 224), np.float32)  # normalized 0 = the mean colour
    img = np.asarray(infer_mod.render_overlay(image, np.array([0, 8, -1]), 7, manifest.preprocessing))
    mean = np.round(np.asarray(manifest.preprocessing.mean) * 255)
    np.testing.assert_allclose(img[16, 16], mean, atol=1)  # refined cell 0 keeps its colours
    np.testing.assert_allclose(img[32 + 16, 32 + 16], mean, atol=1)  # cell 8 = row 1, col 1
    assert (img[16, 32 + 16] > mean + 20).all()  # cell 1 is washed out
    assert tuple(img[0, 0]) == (255, 64, 0)  # outline


def test_progress_hook_is_called_per_row(export_dir, folder):
    calls = []
    infer(export_dir, [folder], batch_size=2, progress=lambda task, done, total: calls.append((task, done, total)))
    assert calls == [("infer", n, 4) for n in range(5)]  # 0 at the start, then once per row


def test_decoding_look_ahead_is_bounded(export_dir, tmp_path, monkeypatch):
    src = _image(tmp_path / "src.png", 7, (64, 64))
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"{i:02d}.png")
        paths[-1].write_bytes(src.read_bytes())
    decoded, emitted, batch = [0], [0], 3
    real = inference_mod.load_and_preprocess

    def counting(*args, **kwargs):
        decoded[0] += 1
        return real(*args, **kwargs)

    class Watching(CFViTPipeline):
        def run(self, images, eta=None):
            assert decoded[0] <= emitted[0] + 3 * batch  # at most ~two batches decoded ahead
            return super().run(images, eta)

    monkeypatch.setattr(inference_mod, "load_and_preprocess", counting)
    s = infer(
        Watching(export_dir), [tmp_path], batch_size=batch, on_row=lambda row: emitted.__setitem__(0, emitted[0] + 1)
    )
    assert s.images == 31 and emitted[0] == 31


def read_table(path: Path):
    """`path` read by pandas and by pyarrow with their defaults; both must agree on the rows."""
    import pandas as pd
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = path.suffix
    frame = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}[suffix](
        path
    )
    arrow = {".csv": pyarrow.csv.read_csv, ".jsonl": pyarrow.json.read_json, ".parquet": pyarrow.parquet.read_table}[
        suffix
    ](path)
    assert arrow.num_rows == len(frame) and arrow.column_names == list(frame.columns)
    return frame


CSV_COLUMNS = [
    "path",
    "stage",
    "confidence",
    "patches",
    *[f"{c}_{i}" for i in range(1, 6) for c in ("label", "prob")],
    "overlay",
    "error",
]
JSON_COLUMNS = ["path", "stage", "confidence", "patches", "topk", "overlay", "error"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize(
    "interrupt, signal_name, code", [(KeyboardInterrupt, "SIGINT", 130), (Terminated, "SIGTERM", 143)]
)
def test_interrupt_leaves_a_clean_table_and_a_summary(
    export_dir, folder, tmp_path, monkeypatch, capsys, suffix, interrupt, signal_name, code
):
    """Issue 13 item 4: no `# interrupted` row, no extra columns; "N of M" goes to the summary JSON."""
    calls = [0]
    real = CFViTPipeline.run

    def interrupted(self, images, eta=None):
        calls[0] += 1
        if calls[0] == 2:
            raise interrupt
        return real(self, images, eta)

    monkeypatch.setattr(CFViTPipeline, "run", interrupted)
    out = tmp_path / f"r{suffix}"
    with pytest.raises(InferInterrupted) as info:
        infer(export_dir, [folder], recursive=True, batch_size=2, output=out)
    assert info.value.summary.rows == 2 and info.value.summary.interrupted
    assert info.value.signal_name == signal_name
    table = read_table(out)
    assert list(table.columns) == (CSV_COLUMNS if suffix == ".csv" else JSON_COLUMNS)
    assert list(table["path"]) == [str(folder / "a.png"), str(folder / "b.JPG")]
    assert str(table["patches"].dtype) == "int64" and set(table["stage"]) <= {"coarse", "fine"}
    summary = json.loads(summary_path(out).read_text())
    assert (summary["status"], summary["signal"], summary["rows"], summary["inputs"]) == (
        "interrupted",
        signal_name,
        2,
        6,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", out.name, summary_path(out).name])

    calls[0] = 0
    assert (
        cli.main(["infer", str(export_dir), str(folder), "-r", "--batch-size", "2", "-o", str(out), "--force"]) == code
    )
    assert capsys.readouterr().err.splitlines() == [f"error: interrupted, 2 of 6 inputs written to {out}"]
    assert len(read_table(out)) == 2


def test_summary_json_on_success(export_dir, folder, tmp_path):
    out = tmp_path / "r.parquet"
    s = infer(export_dir, [folder], output=out, batch_size=3)
    summary = json.loads(summary_path(out).read_text())
    assert summary["status"] == "complete" and summary["signal"] is None
    assert (summary["inputs"], summary["rows"], summary["classified"], summary["errors"]) == (4, 4, 3, 1)
    assert summary["exited"] + summary["fine"] == 3 and summary["engine"] == "local" and summary["batch_size"] == 3
    manifest = Manifest.load(export_dir)
    assert summary["export"]["graphs"] == {g: manifest.graphs[g].sha256 for g in ("coarse", "fine")}
    assert summary["output"] == str(out) and summary["seconds"] == pytest.approx(s.seconds, abs=1e-3)
    assert list(read_table(out)["path"]) == [str(p) for p in collect_inputs([folder])]


def test_an_existing_summary_needs_force(export_dir, folder, tmp_path):
    out = tmp_path / "r.csv"
    summary_path(out).write_text("{}")
    with pytest.raises(OutputExistsError, match="summary.json already exists"):
        infer(export_dir, [folder], output=out)
    assert not out.exists()
    infer(export_dir, [folder], output=out, force=True)
    assert json.loads(summary_path(out).read_text())["rows"] == 4


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_force(export_dir, folder, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert cli.main(["infer", str(export_dir), str(folder), "-o", str(out)]) == 1  # d.jpg failed
    err = capsys.readouterr().err
    assert "files: 4" in err and "classified: 3" in err and "errors: 1" in err and "img/s" in err
    assert "exited at coarse" in err and "went to fine" in err
    assert cli.main(["infer", str(export_dir), str(folder / "a.png"), "-o", str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert len(_csv_rows(out)) == 4
    assert cli.main(["infer", str(export_dir), str(folder / "a.png"), "-o", str(out), "--force"]) == 0
    assert len(_csv_rows(out)) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eta", "1.5"], "eta must lie in"),
        (["--eta", "nan"], "eta must lie in"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--topk", "0"], "--topk must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--max-pixels", "0"], "--max-pixels must be a positive integer"),
        (["--provider", "tpu"], "available: cpu, cuda, tensorrt, openvino"),
        (["-o", "r.txt"], "must end in .csv, .jsonl, .parquet"),
        (["--engine", "spark"], "--engine must be one of local, ray"),
        (["--num-actors", "2"], "need --engine ray"),
        (["-o", "missing/r.csv"], "does not exist"),
        (["--batch-size", "many"], ""),
    ],
)
def test_cli_bad_flags_exit_2(export_dir, folder, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["infer", str(export_dir), str(folder / "a.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_no_images_and_bad_export(export_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["infer", str(export_dir), str(empty)]) == 2
    assert "no image files found" in capsys.readouterr().err
    img = _image(tmp_path / "x.png", 3)
    assert cli.main(["infer", str(tmp_path / "nope"), str(img)]) == 1
    assert "export folder not found" in capsys.readouterr().err


def test_cli_rows_on_stdout(export_dir, folder, capsys):
    assert cli.main(["infer", str(export_dir), str(folder), "--topk", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == [str(folder / n) for n in ("a.png", "b.JPG", "c.jpeg", "d.jpg")]
    assert out[3].endswith("error: not a recognised image format")
    assert out[0].split("\t")[1] in ("coarse", "fine") and out[0].count(",") == 1


def test_cli_jsonl_and_openvino(export_dir, folder, tmp_path):
    pytest.importorskip("openvino")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli.main(["infer", str(export_dir), str(folder / "a.png"), "-o", str(a), "--eta", "0.5"]) == 0
    assert (
        cli.main(
            [
                "infer",
                str(export_dir),
                str(folder / "a.png"),
                "-o",
                str(b),
                "--eta",
                "0.5",
                "--provider",
                "openvino",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["stage"] == rb["stage"] and ra["confidence"] == pytest.approx(rb["confidence"], abs=1e-4)


def test_library_usage_errors_come_before_any_work(export_dir, folder, tmp_path):
    with pytest.raises(UsageError, match="eta"):
        infer(tmp_path / "not-an-export", [folder], eta=2.0)
    with pytest.raises(UsageError, match="--batch-size"):
        infer(export_dir, [folder], batch_size=True)
    with pytest.raises(UsageError, match="overlay folder's parent"):
        infer(export_dir, [folder], overlay=tmp_path / "no" / "such")


def test_inference_only_install_never_imports_torch(export_dir, folder, tmp_path):
    out = tmp_path / "r.csv"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from runtimes import CFViTPipeline
        res = CFViTPipeline({str(export_dir)!r}).run(np.zeros((2, 3, 224, 224), np.float32), 0.5)
        import cli
        rc = cli.main(["infer", {str(export_dir)!r}, {str(folder / "a.png")!r}, "-o", {str(out)!r}])
        assert rc == 0, rc
        assert sys.modules["torch"] is None
        assert not [m for m in sys.modules if m.startswith("torch.")]
        print("ok", res.logits.shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2, 10)" in proc.stdout
    assert len(_csv_rows(out)) == 1


# -- batch size and memory (issue 13 item 5) ---------------------------------------------------------
def test_batch_size_is_capped_at_the_number_of_inputs(export_dir, folder, tmp_path):
    """`--batch-size 100000` on 4 files ran a 100000-image buffer (56 GiB on 24 files); now 4."""
    out = tmp_path / "r.csv"
    s = infer(export_dir, [folder], batch_size=100_000, output=out)
    assert s.batch_size == 4 and s.rows == 4
    assert json.loads(summary_path(out).read_text())["batch_size"] == 4


def test_batch_that_cannot_fit_is_refused_before_any_work(export_dir, folder, tmp_path, monkeypatch, capsys):
    manifest = Manifest.load(export_dir)
    image_bytes = 3 * 224 * 224 * 4
    assert inference_mod.batch_memory(4, manifest) >= 4 * 3 * image_bytes  # buffer + two batches decoded ahead
    monkeypatch.setattr(inference_mod, "available_memory", lambda: 2**20)  # 1 MiB free

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was built before the batch size was checked")

    monkeypatch.setattr(CFViTPipeline, "__init__", no_pipeline)
    out = tmp_path / "r.csv"
    with pytest.raises(UsageError, match="a batch of 4 images needs about .* GiB of buffers, more than the 0.0 GiB"):
        infer(export_dir, [folder], batch_size=100_000, output=out)
    assert cli.main(["infer", str(export_dir), str(folder), "--batch-size", "100000", "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: a batch of 4 images needs") and "--batch-size" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written
    monkeypatch.setattr(inference_mod, "available_memory", lambda: inference_mod.batch_memory(1, manifest))
    with pytest.raises(AssertionError, match="pipeline was built"):  # batch 1 fits: the check lets it through
        infer(export_dir, [folder / "a.png"], output=out)


# -- overlays of name-clashing inputs (issue 13 item 18) ---------------------------------------------
def test_overlay_column_names_each_inputs_overlay(export_dir, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    paths = [_image(tmp_path / "x" / "gh.png", 21), _image(tmp_path / "y" / "gh.png", 22, (180, 260))]
    out, overlay = tmp_path / "r.csv", tmp_path / "ov"
    infer(export_dir, paths, eta=1.0, output=out, overlay=overlay)  # eta 1: both go to the fine stage
    rows = _csv_rows(out)
    assert [r["stage"] for r in rows] == ["fine", "fine"]
    assert [r["overlay"] for r in rows] == [str(overlay / "gh.png"), str(overlay / "gh-1.png")]
    manifest = Manifest.load(export_dir)
    for row in rows:  # each named PNG is the overlay of that row's input, rendered independently here
        image = load_and_preprocess(Path(row["path"]), manifest.preprocessing)
        res = CFViTPipeline(manifest).run(image[None], 1.0)
        want = np.asarray(infer_mod.render_overlay(image, res.informative_idx[0], 7, manifest.preprocessing))
        with Image.open(row["overlay"]) as got:
            np.testing.assert_array_equal(np.asarray(got), want)


# -- real signals and racing writers, in separate processes ------------------------------------------
#: Runs `cli.main(argv)` with every pipeline call from the third on slowed down, after touching READY.
SLOW_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from runtimes.pipeline import CFViTPipeline
    ready, calls, real = pathlib.Path(sys.argv[1]), [0], CFViTPipeline.run

    def slow(self, images, eta=None):
        calls[0] += 1
        if calls[0] >= 3:
            ready.touch()
            time.sleep(0.5)
        return real(self, images, eta)

    CFViTPipeline.run = slow
    import cli
    sys.exit(cli.main(sys.argv[2:]))
""")


def _many_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    src = _image(folder / "img_000.png", 5, (32, 32)).read_bytes()
    for i in range(1, n):
        (folder / f"img_{i:03d}.png").write_bytes(src)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("signum, code, suffix", [(signal.SIGTERM, 143, ".csv"), (signal.SIGINT, 130, ".jsonl")])
def test_real_signal_mid_run_keeps_a_clean_partial_table(export_dir, tmp_path, signum, code, suffix):
    """Issue 13 items 3 and 4: SIGTERM (as `timeout`/docker/k8s send) behaves as Ctrl-C: rows kept, one line, 143."""
    paths = _many_images(tmp_path / "in", 40)
    out, ready = tmp_path / f"r{suffix}", tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_CHILD,
            str(ready),
            "infer",
            str(export_dir),
            str(tmp_path / "in"),
            "--batch-size",
            "4",
            "-o",
            str(out),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():  # two batches (8 rows) are done, the third is running
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    summary = json.loads(summary_path(out).read_text())
    n = summary["rows"]
    assert summary["status"] == "interrupted" and summary["signal"] == signum.name and 8 <= n < 40
    assert stderr.splitlines() == [f"error: interrupted, {n} of 40 inputs written to {out}"]
    table = read_table(out)
    assert list(table["path"]) == [str(p) for p in paths[:n]] and (table["error"].fillna("") == "").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "ready", out.name, summary_path(out).name])


#: Two writers of the same output: each waits in its first pipeline call until the other got there too,
#: so both passed the up-front "already exists" check before either renames its output into place.
RACE_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from runtimes.pipeline import CFViTPipeline
    me, other, real = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), CFViTPipeline.run

    def gated(self, images, eta=None):
        me.touch()
        deadline = time.monotonic() + 120
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return real(self, images, eta)

    CFViTPipeline.run = gated
    import cli
    sys.exit(cli.main(sys.argv[3:]))
""")


def test_two_writers_of_one_output_exactly_one_wins(export_dir, folder, tmp_path):
    """Issue 13 item 2: both runs used to exit 0 and the file kept one run's rows.

    NOTE for the merge: the no-clobber final rename lives in cfvit_deploy/io.py (the `userpath` branch);
    on a branch without it this test fails (both exit 0) - that is the bug it pins.
    """
    out, gates = tmp_path / "same.csv", tmp_path / "gates"
    gates.mkdir()
    argv = ["infer", str(export_dir), str(folder), "-o", str(out)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, str(gates / me), str(gates / other), *argv],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [1, 2], results  # the winner: exit 1 (d.jpg is corrupt); the loser: exit 2
    loser = next(err for code, err in results if code == 2)
    assert loser.splitlines()[-1].startswith("error: ") and "already exists" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "gates", out.name, summary_path(out).name])
    assert len(read_table(out)) == 4 and json.loads(summary_path(out).read_text())["rows"] == 4


def test_cli_progress_bar_on_a_terminal(export_dir, folder, tmp_path, monkeypatch):
    """The CLI passes a rich ProgressHook (only on a terminal); the library draws nothing itself."""
    import io

    from rich.console import Console

    from cfvit_deploy.app import cli_app

    buf = io.StringIO()
    monkeypatch.setattr(cli_app, "console", Console(file=buf, force_terminal=True, width=100))
    assert cli.main(["infer", str(export_dir), str(folder), "-o", str(tmp_path / "r.csv")]) == 1
    assert "infer" in buf.getvalue() and "4/4" in buf.getvalue()


def test_parquet_without_pyarrow_names_the_extra(export_dir, folder, tmp_path, monkeypatch, capsys):
    """Issue 13 item 13: Parquet from the local engine needs pyarrow, asked for by its extra before any work."""
    from cfvit_deploy.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "r.parquet"
    with pytest.raises(MissingExtraError, match=r"pip install 'cfvit-deploy\[parquet\]'"):
        infer(export_dir, [folder], output=out)
    assert cli.main(["infer", str(export_dir), str(folder), "-o", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: pyarrow is not installed (needed for cfvit infer -o *.parquet): pip install 'cfvit-deploy[parquet]'"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_summary_records_the_settings_the_rows_depend_on(export_dir, folder, tmp_path):
    """Issue 23 item 5: the summary JSON did not say which η (nor provider, precision, decoding) made the rows."""
    out = tmp_path / "r.csv"
    infer(export_dir, [folder], output=out, batch_size=2, eta=0.35)
    settings = json.loads(summary_path(out).read_text())["settings"]
    precision = Manifest.load(export_dir).precision
    assert settings == {"eta": 0.35, "provider": "cpu", "precision": precision, "batch_size": 2, "decode": "exact"}
    infer(export_dir, [folder], output=out, force=True, decode="fast")  # no --eta: the manifest's default applies
    settings = json.loads(summary_path(out).read_text())["settings"]
    assert settings["eta"] == Manifest.load(export_dir).default_eta and settings["decode"] == "fast"
