"""`cfvit bench` for the field (issue 25): end-to-end cells on image files per decode mode, every int8 form
(dynamic and calibrated static QDQ) with its form named, and the threading and int8 units each result
records. Tiny upstream model, in-process cells, no timing thresholds (the machine may be loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.app.bench import BenchResult, run_bench
from cfvit_deploy.app.bench.machine import int8_units, machine_info
from cfvit_deploy.app.bench.plan import precision_label
from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import Manifest


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7", baseline=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five JPEGs larger than the model's resize (draft mode can apply) and one PNG."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-20, 20, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(folder / "scan.png")
    return folder


@pytest.fixture(scope="module")
def e2e(export_dir, photos) -> BenchResult:
    return run_bench(
        export_dir,
        batch_sizes=(2,),
        fine_fractions=(0.5, 1.0),
        images=photos,
        end_to_end=True,
        iterations=1,
        warmup=0,
        threads=1,
        isolation="inline",
    )


def test_end_to_end_cells_stand_beside_the_model_only_cells_for_each_decode_mode(e2e):
    pipe = e2e.find(model="cfvit")
    assert [(r.end_to_end, r.decode, r.target_fine_fraction) for r in pipe] == [
        (False, None, 0.5),
        (False, None, 1.0),
        (True, "exact", 0.5),
        (True, "exact", 1.0),
        (True, "fast", 0.5),
        (True, "fast", 1.0),
    ]
    assert e2e.settings["end_to_end_decodes"] == ["exact", "fast"]
    for r in pipe:
        assert r.status == "ok" and r.img_per_s > 0 and r.mean_ms > 0
    for r in (r for r in pipe if r.end_to_end):
        # a pass of infer over the 6 files; the gate sends the asked share of them to the fine stage
        assert r.fine_fraction == pytest.approx(round(6 * r.target_fine_fraction) / 6)
        assert r.coarse_ms is None and r.fine_batch is None  # infer's own batches: no per-session split
        assert r.decode_workers >= 1
    baseline = e2e.find(model="baseline")
    assert len(baseline) == 1 and not baseline[0].end_to_end  # the plain ViT has no end-to-end cells


def test_end_to_end_cells_time_infer_with_the_cell_decode_mode(export_dir, photos, monkeypatch):
    from runtimes import infer as infer_module

    calls = []
    original = infer_module.infer

    def spy(source, inputs, **kwargs):
        calls.append((type(source).__name__, len(inputs), kwargs["batch_size"], kwargs["decode"]))
        return original(source, inputs, **kwargs)

    monkeypatch.setattr(infer_module, "infer", spy)
    run_bench(
        export_dir,
        batch_sizes=(4,),
        fine_fractions=(1.0,),
        images=photos,
        end_to_end=True,
        decodes="fast",
        iterations=2,
        warmup=0,
        isolation="inline",
    )
    # the pipeline users build, handed to infer over every readable file, once per timed pass
    assert calls == [("CFViTPipeline", 6, 4, "fast")] * 2


def test_rows_record_the_threading_and_the_machine_its_cpu_units(e2e, tmp_path):
    assert len(e2e.find()) == len(e2e.rows)
    for r in e2e.rows:
        assert (r.threads, r.spin, r.stop_spinning, r.shared_threads, r.graph_optimization) == (
            1,
            True,
            True,
            False,
            "all",
        )
    assert e2e.machine["int8_units"] == int8_units(e2e.machine["cpu_flags"])
    e2e.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0]["threads"] == 1 and "int8_units" in saved["machine"]
    assert "decode" in (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    back = BenchResult.from_json(saved)
    assert [r.decode for r in back.rows] == [r.decode for r in e2e.rows]


@pytest.mark.parametrize(
    "flags, units",
    [
        (["avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"], "AMX + AVX-512 VNNI"),
        (["avx2", "avx_vnni"], "AVX-VNNI"),
        (["avx2", "fma"], "none (no VNNI)"),
    ],
)
def test_int8_units_from_cpu_flags(flags, units):
    assert int8_units(flags) == units


def test_machine_info_names_the_int8_units_of_this_cpu():
    info = machine_info()
    assert info["int8_units"] == int8_units(info["cpu_flags"])
    assert ("VNNI" in info["int8_units"]) == any("vnni" in f for f in info["cpu_flags"])


def test_every_int8_form_is_measured_and_named(export_dir, photos, tmp_path):
    r = run_bench(
        export_dir,
        precisions=("fp32", "int8", "int8-static"),
        calibration=photos,
        batch_sizes=(2,),
        fine_fractions=(0.5,),
        iterations=1,
        warmup=0,
        isolation="inline",
        cache_dir=tmp_path / "variants",
    )
    forms = {(row.precision, row.int8_form) for row in r.find()}
    assert forms == {("fp32", None), ("int8", "dynamic"), ("int8-static", "static")}
    # the static variant is the calibrated QDQ export a user gets from `cfvit export --calibration`
    (static_dir,) = [p.parent for p in (tmp_path / "variants").rglob("manifest.json") if "int8-static" in str(p)]
    manifest = Manifest.load(static_dir)
    assert manifest.quantization == "static" and manifest.calibration["folder"] == str(photos.resolve())
    assert precision_label(manifest) == "int8-static"
    assert r.settings["calibration"] == str(photos)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precisions=("int8-static",)), "needs --calibration"),
        (dict(precisions=("int8-static",), calibration="/nonexistent-folder"), "is not a folder"),
        (dict(end_to_end=True), "give --images"),
        (dict(end_to_end=True, images="PHOTOS", decodes="exact,draft"), "--decode must be one of"),
        (dict(end_to_end=True, images="PHOTOS", decodes=""), "at least one"),
    ],
)
def test_usage_errors_before_any_work(export_dir, photos, kwargs, message):
    kwargs = {k: photos if v == "PHOTOS" else v for k, v in kwargs.items()}
    with pytest.raises(UsageError, match=message):
        run_bench(export_dir, **kwargs)


def test_cli_end_to_end_and_calibration_options(export_dir, photos, tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            str(export_dir),
            "--precisions",
            "int8-static",
            "--calibration",
            str(photos),
            "--images",
            str(photos),
            "--end-to-end",
            "--decode",
            "exact",
            "--batch-sizes",
            "2",
            "--fine-fraction",
            "1",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--in-process",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {(row["model"], row["decode"], row["int8_form"]) for row in rows} == {
        ("baseline", None, "static"),
        ("cfvit", None, "static"),
        ("cfvit", "exact", "static"),
    }
    assert "e2e:exact" in capsys.readouterr().out
