"""`cfvit infer` and its library twin: inputs, rows, formats, overlays, exit codes, interrupts."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import cli
from cfvit_deploy.errors import OutputExistsError, UsageError
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import load_and_preprocess
from runtimes import CFViTPipeline
from runtimes import infer as infer_mod
from runtimes.infer import InferInterrupted, collect_inputs, infer, overlay_names

ROOT = Path(__file__).resolve().parents[1]


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
        "a.png", "b.JPG", "c.jpeg", "d.jpg", "sub/deeper/t.bmp", "sub/s.png"]
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
    real = infer_mod.load_and_preprocess

    def flaky(path, pp, max_pixels):
        if Path(path).name == "b.JPG":
            raise RuntimeError("boom")
        return real(path, pp, max_pixels)

    monkeypatch.setattr(infer_mod, "load_and_preprocess", flaky)
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
    assert table[0] == ["path", "stage", "confidence", "patches", "label_1", "prob_1", "label_2", "prob_2",
                        "label_3", "prob_3", "error"]
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
        assert cells[10] == ""
    assert {c[1] for c in table[1:]} == {"coarse", "fine"}


def test_jsonl_format(export_dir, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    infer(export_dir, [folder], output=out, topk=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for r in rows[:3]:
        assert set(r) == {"path", "stage", "confidence", "patches", "topk", "error"}
        assert r["stage"] in ("coarse", "fine") and r["error"] == "" and 0 < r["confidence"] <= 1
        assert [set(t) for t in r["topk"]] == [{"label", "prob"}] * 2
        assert r["topk"][0]["prob"] >= r["topk"][1]["prob"]
    assert rows[3] == {"path": str(folder / "d.jpg"), "stage": None, "confidence": None, "patches": None,
                       "topk": [], "error": "not a recognised image format"}


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


def test_progress_bar(export_dir, folder):
    buf = io.StringIO()
    infer(export_dir, [folder], progress=Console(file=buf, force_terminal=True, width=120))
    text = buf.getvalue()
    assert "4/4" in text and "img/s" in text and "exit" in text


def test_decoding_look_ahead_is_bounded(export_dir, tmp_path, monkeypatch):
    src = _image(tmp_path / "src.png", 7, (64, 64))
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"{i:02d}.png")
        paths[-1].write_bytes(src.read_bytes())
    decoded, emitted, batch = [0], [0], 3
    real = infer_mod.load_and_preprocess

    def counting(*args):
        decoded[0] += 1
        return real(*args)

    class Watching(CFViTPipeline):
        def run(self, images, eta=None):
            assert decoded[0] <= emitted[0] + 3 * batch  # at most ~two batches decoded ahead
            return super().run(images, eta)

    monkeypatch.setattr(infer_mod, "load_and_preprocess", counting)
    s = infer(Watching(export_dir), [tmp_path], batch_size=batch,
              on_row=lambda row: emitted.__setitem__(0, emitted[0] + 1))
    assert s.images == 31 and emitted[0] == 31


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_interrupt_leaves_a_complete_file_with_a_note(export_dir, folder, tmp_path, monkeypatch, suffix):
    calls = [0]
    real = CFViTPipeline.run

    def interrupted(self, images, eta=None):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, images, eta)

    monkeypatch.setattr(CFViTPipeline, "run", interrupted)
    out = tmp_path / f"r{suffix}"
    with pytest.raises(InferInterrupted) as info:
        infer(export_dir, [folder], recursive=True, batch_size=2, output=out)
    assert info.value.summary.rows == 2 and info.value.summary.interrupted
    lines = out.read_text().splitlines()
    if suffix == ".csv":
        assert lines[0].startswith("path,") and len(lines) == 4
        assert lines[-1] == "# interrupted: 2 of 6 inputs written"
    else:
        assert len(lines) == 3 and json.loads(lines[-1]) == {"interrupted": True, "rows": 2, "inputs": 6}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", out.name])  # no temp file left

    calls[0] = 0
    assert cli.main(["infer", str(export_dir), str(folder), "-r", "--batch-size", "2", "-o", str(out), "--force"]) == 130
    assert out.read_text().splitlines()[-1] == lines[-1]


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
        (["--batch-size", "0"], "batch size must be a positive integer"),
        (["--topk", "0"], "topk must be a positive integer"),
        (["--threads", "0"], "threads must be a positive integer"),
        (["--max-pixels", "0"], "max pixels"),
        (["--provider", "tpu"], "available: cpu, cuda, tensorrt, openvino"),
        (["-o", "r.txt"], "must end in .csv or .jsonl"),
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
    assert cli.main(["infer", str(export_dir), str(folder / "a.png"), "-o", str(b), "--eta", "0.5",
                     "--provider", "openvino", "--threads", "1"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["stage"] == rb["stage"] and ra["confidence"] == pytest.approx(rb["confidence"], abs=1e-4)


def test_library_usage_errors_come_before_any_work(export_dir, folder, tmp_path):
    with pytest.raises(UsageError, match="eta"):
        infer(tmp_path / "not-an-export", [folder], eta=2.0)
    with pytest.raises(UsageError, match="batch size"):
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
