"""Two-graph export: fixture parity in ONNX Runtime, manifest, dynamic batch, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cfvit_deploy import ManifestError, ModelConfig, UsageError, load_checkpoint
from cfvit_deploy.manifest import FORMAT_VERSION, Manifest, sha256_file
from cfvit_deploy.model import CFViT
from exporters import export
from exporters.validation import smooth_random_images


def _sessions(export_dir):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return {g: ort.InferenceSession(str(export_dir / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
            for g in ("coarse", "fine")}


def _run(sessions, x):
    c = sessions["coarse"]
    co = dict(zip([o.name for o in c.get_outputs()], c.run(None, {"images": x})))
    f = sessions["fine"]
    feeds = {"images": x, **{k: co[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}}
    fo = dict(zip([o.name for o in f.get_outputs()], f.run(None, feeds)))
    return co, fo


def test_graphs_reproduce_upstream_outputs(upstream_export):
    fx, export_dir = upstream_export
    sessions = _sessions(export_dir)
    ref = fx.ref
    n = len(fx.images)
    for batch in sorted({1, n}):
        co, fo = _run(sessions, fx.images[:batch])
        np.testing.assert_allclose(co["coarse_logits"], ref["coarse_logits"][:batch], atol=1e-4, rtol=0)
        np.testing.assert_allclose(co["global_attention"], ref["score"][:batch], atol=1e-5, rtol=0)
        np.testing.assert_allclose(fo["fine_logits"], ref["fine_logits"][:batch], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(fo["informative_idx"], ref["informative_idx"][:batch])


def test_dynamic_batch_and_manifest(upstream_export):
    fx, export_dir = upstream_export
    manifest = Manifest.load(export_dir)
    cfg = manifest.model
    model = load_checkpoint(fx.pth, num_heads=fx.num_heads)
    assert cfg == model.config and manifest.format_version == FORMAT_VERSION
    pp = manifest.preprocessing
    assert pp.crop_size == 32 * cfg.coarse_grid and pp.resize_size == int(32 * cfg.coarse_grid / cfg.crop_pct)
    assert pp.interpolation == "bicubic" and manifest.precision == "fp32" and manifest.opset == 17
    assert manifest.graphs["fine"].outputs[1].shape == ["batch", cfg.k]
    assert set(manifest.versions) >= {"torch", "onnx", "onnxruntime", "cfvit_deploy"}
    raw = json.loads((export_dir / "manifest.json").read_text())
    assert raw["gmacs"]["coarse"] < raw["gmacs"]["fine"] and raw["derived"]["k"] == cfg.k
    sessions = _sessions(export_dir)
    rng = np.random.default_rng(1)
    for batch in (1, 3, 8):  # traced at batch 2
        x = smooth_random_images(rng, batch, cfg.fine_image_size)
        co, fo = _run(sessions, x)
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        assert fo["fine_logits"].shape == (batch, cfg.num_classes)
        np.testing.assert_allclose(fo["fine_logits"], out.fine_logits.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(fo["informative_idx"], out.informative_idx.numpy())
    for name, spec in manifest.graphs.items():
        graph = onnx.load(str(export_dir / spec.file))
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["cfvit.graph"] == name and meta["cfvit.k"] == str(cfg.k)
        assert json.loads(meta["cfvit.model_config"]) == cfg.to_dict()
        assert graph.ir_version <= 10
        assert [i.name for i in graph.graph.input] == spec.input_names()
        assert [o.name for o in graph.graph.output] == spec.output_names()


def test_baseline_graph_is_the_plain_vit(tmp_path, upstream):
    model = load_checkpoint(upstream.pth, num_heads=upstream.num_heads)
    manifest = export(model, tmp_path / "exp", baseline=True)
    assert set(manifest.graphs) == {"coarse", "fine", "baseline"}
    assert manifest.gmacs["baseline"] > manifest.gmacs["fine"] - manifest.gmacs["coarse"]
    sess = ort.InferenceSession(str(tmp_path / "exp" / "baseline.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"images": upstream.images})
    with torch.no_grad():
        ref = model.fine_stage_dense(torch.from_numpy(upstream.images), None)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)


def test_existing_folder_needs_force_and_is_replaced_atomically(tmp_path, upstream):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="already exists"):
        export(upstream.pth, out, num_heads=upstream.num_heads)
    assert (out / "keep.txt").read_text() == "user data"
    # a failing export (bad opset) leaves the folder as it was, even with --force
    with pytest.raises(UsageError, match="opset"):
        export(upstream.pth, out, num_heads=upstream.num_heads, opset=5, force=True)
    assert (out / "keep.txt").exists()
    export(upstream.pth, out, num_heads=upstream.num_heads, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary leftovers


def test_manifest_detects_tampering_and_mixing(tmp_path, upstream, export_dir_factory):
    src = export_dir_factory(upstream.name)
    import shutil

    a = tmp_path / "a"
    shutil.copytree(src, a)
    Manifest.load(a)
    other = next(iter(n for n in ("deit_g7", "lvvit_g7", "deit_g9") if n != upstream.name), None)
    if other is None:
        pytest.skip("needs a second fixture")
    shutil.copyfile(export_dir_factory(other) / "fine.onnx", a / "fine.onnx")
    with pytest.raises(ManifestError, match="checksum mismatch for fine.onnx"):
        Manifest.load(a)
    (a / "fine.onnx").unlink()
    with pytest.raises(ManifestError, match="fine graph .* is missing"):
        Manifest.load(a)


def _tamper_weight(path):
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))


def test_validate_passes_and_fails_on_tampered_graph(tmp_path, upstream, export_dir_factory):
    import shutil

    from cli import main

    src = export_dir_factory(upstream.name)
    ok = tmp_path / "ok"
    shutil.copytree(src, ok)
    assert main(["validate", str(ok), "--checkpoint", str(upstream.pth), "--batch-sizes", "1,3"]) == 0
    report = json.loads((ok / "validation.json").read_text())
    assert report["passed"] and len(report["checks"]) > 20
    names = " ".join(c["name"] for c in report["checks"])
    for part in ("coarse graph: global_attention", "fine graph: selected patches", "end to end: fine_logits",
                 "exit decision at eta=0.5", "batch 3"):
        assert part in names
    # one weight changed and the checksum updated: the numbers must give it away
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    _tamper_weight(bad / "fine.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["graphs"]["fine"]["sha256"] = sha256_file(bad / "fine.onnx")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["validate", str(bad), "--checkpoint", str(upstream.pth), "--report", str(tmp_path / "r.json")]) == 1
    failed = [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["checks"] if not c["passed"]]
    assert any("fine_logits" in n for n in failed) and not any(n.startswith("coarse graph") for n in failed)
    # the checksum left as it was: refused before any session is created
    bad2 = tmp_path / "bad2"
    shutil.copytree(src, bad2)
    _tamper_weight(bad2 / "coarse.onnx")
    assert main(["validate", str(bad2), "--checkpoint", str(upstream.pth)]) == 1


def test_validate_needs_a_checkpoint(tmp_path, upstream, capsys):
    from cli import main

    model = load_checkpoint(upstream.pth, num_heads=upstream.num_heads)
    del model.source_path
    export(model, tmp_path / "exp")
    assert main(["validate", str(tmp_path / "exp")]) == 2
    assert "no --checkpoint given" in capsys.readouterr().err


@pytest.mark.parametrize("precision,optimize", [("fp16", False), ("fp32", True), ("int8", False)])
def test_variants_validate_with_their_criteria(tmp_path, precision, optimize):
    from exporters import validate
    from tests.conftest import UpstreamFixture

    fx = UpstreamFixture("deit_g7")
    manifest = export(fx.pth, tmp_path / "v", num_heads=fx.num_heads, precision=precision, optimize=optimize)
    assert manifest.precision == precision and manifest.optimized == optimize
    graph = onnx.load(str(tmp_path / "v" / "fine.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    if precision == "int8":
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
        # the fixture's random weights (std 1.4/sqrt(d)) are adversarial for int8: judge the machinery
        kwargs: dict = {"batch_sizes": (8,), "min_top1": 0.6, "min_exit": 0.6}
    else:
        kwargs = {"batch_sizes": (1, 8)}
    report = validate(tmp_path / "v", **kwargs)
    if optimize:
        assert "SkipLayerNormalization" in ops
    if precision == "fp16":
        kinds = {init.data_type for init in graph.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in kinds
    assert report.passed, [c.line() for c in report.failed]
    # the same criteria must reject a broken graph of this precision: fine logits negated, checksum updated
    _negate_output(tmp_path / "v" / "fine.onnx", "fine_logits")
    manifest_json = json.loads((tmp_path / "v" / "manifest.json").read_text())
    manifest_json["graphs"]["fine"]["sha256"] = sha256_file(tmp_path / "v" / "fine.onnx")
    (tmp_path / "v" / "manifest.json").write_text(json.dumps(manifest_json))
    broken = validate(tmp_path / "v", **kwargs)
    assert not broken.passed
    assert any("fine" in c.name for c in broken.failed), [c.line() for c in broken.failed]
    assert not any(c.name.startswith("coarse graph") for c in broken.failed)


def _negate_output(path, name: str) -> None:
    """Rewire graph output `name` through a Neg node (any precision: the logits stay floating point)."""
    model = onnx.load(str(path))
    raw = f"{name}_before_neg"
    for node in model.graph.node:
        node.output[:] = [raw if o == name else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", [raw], [name]))
    onnx.save(model, str(path))


def test_fp16_with_optimize_is_refused(tmp_path, upstream):
    with pytest.raises(UsageError, match="fp16 cannot be combined"):
        export(upstream.pth, tmp_path / "x", num_heads=upstream.num_heads, precision="fp16", optimize=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch,grid", [("deit", 7), ("deit", 9), ("lvvit", 7), ("lvvit", 9)])
def test_full_size_export_validates(tmp_path, arch, grid):
    from exporters import validate

    torch.manual_seed(0)
    model = CFViT(ModelConfig.named(arch, "small", coarse_grid=grid)).eval()
    export(model, tmp_path / "exp")
    report = validate(tmp_path / "exp", model, batch_sizes=(1, 2))
    assert report.passed, [c.line() for c in report.failed]
