"""cfvit sweep: per-eta accuracy, exit rate, expected GMACs and measured throughput."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cfvit_deploy import UsageError
from cfvit_deploy.app.sweep import SweepResult, SweepRow, choose_eta, parse_etas, sweep, write_default_eta
from cfvit_deploy.errors import CFViTError
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.preprocessing import load_and_preprocess


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(4):
            arr = (rng.random((40 + 8 * i, 60, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).resize((120, 100)).save(root / f"c{c}" / f"{i}.png")
    (root / "c1" / "broken.png").write_bytes(b"not a png")
    return root


def test_parse_etas():
    assert parse_etas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_etas("0.7,0.3") == [0.3, 0.7]
    assert len(parse_etas("0:1:0.05")) == 21
    for bad in ("0:1:0", "a,b", "0:2:0.5", "nan"):
        with pytest.raises(UsageError):
            parse_etas(bad)


def test_sweep_matches_an_independent_computation(labelled, export_dir_factory):
    # the reference is the PyTorch model's predict on the fixture checkpoint, not the ONNX pipeline
    torch = pytest.importorskip("torch")
    from cfvit_deploy import load_checkpoint
    from cfvit_deploy.model import confidence
    from tests.conftest import UpstreamFixture

    fx = UpstreamFixture("deit_g7")
    model = load_checkpoint(fx.pth, num_heads=fx.num_heads).eval()
    export_dir = export_dir_factory("deit_g7")
    manifest = Manifest.load(export_dir)
    files = sorted(p for p in labelled.rglob("*.png") if p.name != "broken.png")
    x = np.stack([load_and_preprocess(p, manifest.preprocessing) for p in files])
    y = np.array([int(p.parent.name[1]) for p in files])
    with torch.no_grad():
        conf = np.sort(confidence(model.coarse_stage(torch.from_numpy(x)).logits).double().numpy())
    mid = float(np.round((conf[0] + conf[1]) / 2, 6))  # some exit, some do not: far from float ties
    assert conf[0] < mid < conf[1]

    result = sweep(export_dir, labelled, f"0,{mid},1", batch_size=5)
    assert result.n_images == 12 and len(result.skipped_files) == 1 and "broken.png" in result.skipped_files[0]
    by_eta = {r.eta: r for r in result.rows}
    for eta in (0.0, mid, 1.0):
        with torch.no_grad():
            pred = model.predict(torch.from_numpy(x), eta)
        row = by_eta[eta]
        assert row.accuracy == pytest.approx(float((pred.logits.argmax(1).numpy() == y).mean()))
        assert row.exit_rate == pytest.approx(float(pred.exited.float().mean()))
        g = manifest.gmacs
        assert row.expected_gmacs == pytest.approx(g["coarse"] + (1 - row.exit_rate) * (g["fine"] - g["coarse"]))
        assert row.img_per_s > 0 and row.ms_per_image == pytest.approx(1000 / row.img_per_s)
    assert by_eta[0.0].exit_rate == 1.0 and by_eta[1.0].exit_rate == 0.0 and 0 < by_eta[mid].exit_rate < 1


def test_cli_writes_files_and_refuses_overwrite(labelled, export_dir_factory, tmp_path):
    from cli import main

    export_dir = export_dir_factory("deit_g7")
    out = tmp_path / "sw"
    assert main(["sweep", str(export_dir), str(labelled), "--etas", "0:1:0.5", "--out", str(out)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [r["eta"] for r in data["rows"]] == [0.0, 0.5, 1.0]
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("eta,accuracy,exit_rate")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sweep", str(export_dir), str(labelled), "--out", str(out)]) == 2
    assert main(["sweep", str(export_dir), str(labelled), "--etas", "0:1.5:0.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", str(export_dir), str(labelled), "--batch-size", "0", "--out", str(tmp_path / "y")]) == 2


def test_class_folders_must_fit_the_model(tmp_path, export_dir_factory):
    for c in range(11):
        (tmp_path / f"k{c:02d}").mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / f"k{c:02d}" / "a.png")
    with pytest.raises(UsageError, match="11 class folders; the model has 10"):
        sweep(export_dir_factory("deit_g7"), tmp_path, "0.5")


def _result(rows: list[tuple[float, float, float, float]]) -> SweepResult:
    """(eta, accuracy, expected GMACs, ms per image) rows."""
    return SweepResult(
        "e",
        "f",
        "cpu",
        8,
        100,
        [],
        {"coarse": 1.0, "fine": 3.0},
        [SweepRow(e, a, 0.0, g, 1000 / ms, ms) for e, a, g, ms in rows],
    )


ROWS = [
    (0.0, 0.60, 1.0, 1.0),
    (0.5, 0.70, 1.6, 1.6),
    (0.7, 0.745, 2.0, 2.0),
    (0.9, 0.75, 2.6, 2.6),
    (1.0, 0.75, 3.0, 3.0),
]


@pytest.mark.parametrize(("max_drop", "eta"), [(0, 0.9), (0.5, 0.7), (5, 0.5), (4.9, 0.7), (100, 0.0)])
def test_max_drop_picks_the_cheapest_eta_within_the_drop(max_drop, eta):
    choice = choose_eta(_result(ROWS), max_drop=max_drop)
    assert choice["eta"] == eta
    assert choice["budget"] == {"max_drop": max_drop, "reference_eta": 1.0, "reference_accuracy": 0.75}


@pytest.mark.parametrize(("ms", "eta"), [(3.0, 0.9), (2.6, 0.9), (2.5, 0.7), (1.0, 0.0)])
def test_max_latency_picks_the_most_accurate_eta_within_it(ms, eta):
    assert choose_eta(_result(ROWS), max_latency_ms=ms)["eta"] == eta


def test_budget_errors():
    with pytest.raises(CFViTError, match="no eta meets --max-latency-ms 0.5: the fastest measured is 1.000 ms"):
        choose_eta(_result(ROWS), max_latency_ms=0.5)
    with pytest.raises(UsageError, match="not both"):
        choose_eta(_result(ROWS), max_drop=1, max_latency_ms=1)
    with pytest.raises(UsageError, match="--max-drop must be a number >= 0"):
        choose_eta(_result(ROWS), max_drop=-1)
    with pytest.raises(UsageError, match="eta = 1 row"):
        choose_eta(_result(ROWS[:-1]), max_drop=1)


def test_max_drop_adds_the_reference_eta(labelled, export_dir_factory):
    result = sweep(export_dir_factory("deit_g7"), labelled, "0,0.5", batch_size=6, max_drop=100)
    assert [r.eta for r in result.rows] == [0.0, 0.5, 1.0]
    assert result.choice["eta"] == 0.0 and result.choice["exit_rate"] == 1.0  # everything may exit


def test_cli_budget_writes_default_eta(labelled, export_dir_factory, tmp_path, capsys):
    from cli import main

    export_dir = tmp_path / "export"
    shutil.copytree(export_dir_factory("deit_g7"), export_dir)
    before = Manifest.load(export_dir)
    assert before.default_eta != 0.0
    args = ["sweep", str(export_dir), str(labelled), "--etas", "0,0.5,1", "--batch-size", "6"]
    assert main([*args, "--max-drop", "100", "--write-eta", "--out", str(tmp_path / "s1")]) == 0
    printed = capsys.readouterr().out
    assert "chosen eta 0: top-1" in printed and "exit rate 100%" in printed and "ms/image" in printed
    after = Manifest.load(export_dir)  # verifies every graph's sha256 again
    assert after.default_eta == 0.0
    assert after.source["default_eta_chosen_by"]["budget"]["max_drop"] == 100.0
    assert {n: g.sha256 for n, g in after.graphs.items()} == {n: g.sha256 for n, g in before.graphs.items()}
    data = json.loads((tmp_path / "s1" / "sweep.json").read_text())
    assert data["choice"]["eta"] == 0.0
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    for bad in (["--max-drop", "1", "--max-latency-ms", "5"], ["--write-eta"], ["--max-drop", "-1"]):
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2, bad
    assert Manifest.load(export_dir).default_eta == 0.0


@pytest.mark.slow
def test_written_default_eta_still_validates(export_dir_factory, tmp_path):
    from exporters import validate

    export_dir = tmp_path / "export"
    shutil.copytree(export_dir_factory("deit_g7"), export_dir)
    write_default_eta(export_dir, 0.35, chosen_by={"budget": {"max_drop": 1.0}})
    assert Manifest.load(export_dir).default_eta == 0.35
    assert validate(export_dir, batch_sizes=(2,)).passed


def test_repeats_keep_the_fastest_pass_and_record_the_background_cpu(labelled, export_dir_factory, monkeypatch):
    """Issue 23 item 2: one noisy pass chose η for --max-latency-ms; now the fastest of --repeats passes
    is kept, and each row says how busy the machine was while it was timed."""
    import cfvit_deploy.app.sweep as sweep_module

    passes = []
    real = sweep_module._one_pass

    def counted(*args):
        passes.append(args[-1])
        return real(*args)

    monkeypatch.setattr(sweep_module, "_one_pass", counted)
    result = sweep(export_dir_factory("deit_g7"), labelled, "0,1", batch_size=4, repeats=3, quiet_below=1e9)
    assert passes == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(r.background_cpu_pct is not None and r.background_cpu_pct >= 0 for r in result.rows)
    with pytest.raises(UsageError, match="--repeats"):
        sweep(export_dir_factory("deit_g7"), labelled, "0,1", repeats=0)


def test_eta_labels_do_not_overlap_and_the_chosen_one_is_labelled():
    """Issue 23 item 8: sweep.png labelled every η, and the low-η points (same accuracy and latency) piled up."""
    from cfvit_deploy.app.sweep import label_indices

    xs = [1.00, 1.01, 1.02, 1.03, 1.5, 2.0, 2.6, 3.0]
    ys = [60.0, 60.0, 60.3, 60.3, 75.0, 88.0, 95.0, 96.0]
    labelled = label_indices(xs, ys, first=[3])
    assert labelled[0] == 3 and {4, 5, 6, 7} <= set(labelled) and not {0, 1, 2} & set(labelled)
    span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
    for i in labelled:
        for j in labelled:
            if i < j:
                assert max(abs(xs[i] - xs[j]) / span_x, abs(ys[i] - ys[j]) / span_y) >= 0.07


def test_latency_panel_joins_points_along_the_axis(tmp_path, monkeypatch):
    """Issue 23 item 8: the latency panel joined the points in η order, a zig-zag when a timing was noisy."""
    import matplotlib.axes

    from cfvit_deploy.app.sweep import plot_sweep

    lines = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if len(args) >= 2 and len(args[0]) > 1:
            lines.append(list(args[0]))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    rows = [
        SweepRow(e, a, 1 - e, 0.02 + 0.07 * e, 1000 / ms, ms)
        for e, a, ms in ((0.0, 0.6, 1.0), (0.5, 0.8, 1.6), (0.7, 0.9, 1.4), (1.0, 0.95, 2.2))
    ]
    result = SweepResult("e", "f", "cpu", 32, 10, [], {"coarse": 0.02, "fine": 0.09}, rows)
    plot_sweep(result, tmp_path / "s.png")
    assert lines and all(xs == sorted(xs) for xs in lines)


def test_cli_output_off_a_terminal_is_unwrapped_without_progress_lines(labelled, export_dir_factory, tmp_path, capfd):
    """Issue 23 item 4: off a terminal, messages were wrapped at 80 columns with trailing spaces, and
    `sweep: eta 1/11` progress lines stood beside the INFO lines that say the same."""
    from cli import main

    out_dir = tmp_path / "a-folder-name-long-enough-that-an-80-column-console-would-wrap-the-message-about-it"
    assert main(["sweep", str(export_dir_factory("deit_g7")), str(labelled), "--etas", "0,1", "-o", str(out_dir)]) == 0
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    assert not any("eta 1/2" in line or "eta 2/2" in line for line in lines)  # no progress lines
    assert any(str(out_dir) in line and "sweep.json" in line for line in err.splitlines())  # one unwrapped line
