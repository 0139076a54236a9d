"""single.onnx: the whole gated CF-ViT in one ONNX graph, against the pair, PyTorch and the reference code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import cli
from cfvit_deploy.config import ModelConfig
from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import Manifest, sha256_file
from cfvit_deploy.model import CFViT
from exporters import export, validate
from exporters.criteria import closeness_ratio
from exporters.single_graph import NOT_REFINED, SINGLE_INPUTS, SINGLE_OUTPUTS
from runtimes.backends import create_backend
from runtimes.infer import infer
from runtimes.ort_backend import OrtBackend
from runtimes.pipeline import CFViTPipeline


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A small random CF-ViT (embed 48, g = 3, 10 classes) exported with baseline.onnx and single.onnx."""
    torch.manual_seed(0)
    model = CFViT(ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)).eval()
    out = tmp_path_factory.mktemp("single") / "export"
    export(model, out, baseline=True, single_graph=True)
    return out


def _mixed_eta(pipe: CFViTPipeline, x: np.ndarray) -> float:
    """An η between two confidences of `x`, far from both: some images exit, some do not."""
    c = np.sort(pipe.run(x, 0.0).confidence.astype(np.float64))
    gaps = np.diff(c)
    i = int(np.argmax(gaps))
    assert gaps[i] > 1e-5
    return float((c[i] + c[i + 1]) / 2)


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.exited, b.exited)
    np.testing.assert_array_equal(a.informative_idx, b.informative_idx)
    assert closeness_ratio(a.logits, b.logits, 1e-4, 1e-4) <= 1.0  # validate's fp32 bound
    # the two forms are compiled apart, so their fp32 sums may differ in order: 1.07e-6 measured on an AMX
    # Xeon (oneDNN kernels); 1e-5 is still far inside what the logits' bound allows
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5, rtol=0)


# -- the graph ----------------------------------------------------------------------------------------
def test_single_graph_is_listed_checked_and_keeps_the_pair(upstream, export_dir_factory):
    plain = Manifest.load(export_dir_factory(upstream.name))
    with_single = Manifest.load(export_dir_factory(upstream.name, single_graph=True))
    spec = with_single.graphs["single"]
    path = with_single.graph_path("single")
    assert spec.file == "single.onnx" and spec.sha256 == sha256_file(path)
    assert spec.input_names() == SINGLE_INPUTS and spec.output_names() == SINGLE_OUTPUTS
    for name in ("coarse", "fine"):  # the pair as it is without --single-graph
        assert with_single.graphs[name] == plain.graphs[name]
    assert "single" not in plain.graphs  # a manifest without it loads and runs the pair as before
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert 8 <= model.ir_version <= 10
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert {"Gather", "ScatterND"} <= {n.op_type for n in then.node}
    assert not any(n.name.startswith("fine/") for n in model.graph.node)  # the fine stage is inside the If only
    types = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.output]}
    ranks = {"images": 4, "eta": 1, "logits": 2, "confidence": 1, "exited": 1, "informative_idx": 2}
    for name, rank in ranks.items():  # static ranks everywhere (OpenVINO rejects If with a dynamic rank)
        assert len(types[name].shape.dim) == rank, name
    assert types["exited"].elem_type == onnx.TensorProto.BOOL
    assert types["informative_idx"].elem_type == onnx.TensorProto.INT64
    for branch in (if_node.attribute[0].g, if_node.attribute[1].g):
        assert [len(o.type.tensor_type.shape.dim) for o in branch.output] == [2, 2]


def test_single_equals_pair_and_the_reference(upstream, export_dir_factory):
    export_dir = export_dir_factory(upstream.name, single_graph=True)
    pair, single = CFViTPipeline(export_dir), CFViTPipeline(export_dir, graph="single")
    x = upstream.images
    mixed = _mixed_eta(pair, x)
    for eta in (0.0, mixed, 1.0):
        for batch in (x[:1], x):
            _same(single.run(batch, eta), pair.run(batch, eta))
    everything = single.run(x, 1.0)
    np.testing.assert_array_equal(everything.informative_idx, upstream.ref["informative_idx"])
    assert np.all(single.run(x, 0.0).informative_idx == NOT_REFINED)
    result = single.run(x, mixed)
    assert 0 < result.exited.sum() < len(x)
    assert np.all(result.informative_idx[result.exited] == NOT_REFINED)
    assert np.all(result.informative_idx[~result.exited] >= 0)


def test_gate_tie_rule_is_float32_greater_or_equal(small_export):
    """exited iff confidence >= eta in float32: η equal to a confidence exits, the next float32 above does not."""
    backend = create_backend(Manifest.load(small_export), graphs=("single",))
    x = np.random.default_rng(1).standard_normal((4, 3, 96, 96)).astype(np.float32)
    conf = backend.run("single", {"images": x, "eta": np.zeros(4, np.float32)})["confidence"]
    at = backend.run("single", {"images": x, "eta": conf})["exited"]
    above = backend.run("single", {"images": x, "eta": np.nextafter(conf, np.float32(2))})["exited"]
    assert at.all() and not above.any()


def test_fine_stage_does_not_run_when_every_image_exits(small_export, tmp_path):
    """ORT's profile of a call at η = 0 has no fine-stage node; at η = 1 it has them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(small_export / "single.onnx"), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((3, 3, 96, 96)).astype(np.float32)

    for _ in range(2):
        session.run(None, {"images": x, "eta": np.zeros(3, np.float32)})
    profile = json.loads(Path(session.end_profiling()).read_text())
    names = {e.get("name", "") for e in profile if e.get("cat") == "Node"}
    assert not any("fine/" in n for n in names)
    session = ort.InferenceSession(str(small_export / "single.onnx"), so, providers=["CPUExecutionProvider"])
    session.run(None, {"images": x, "eta": np.ones(3, np.float32)})
    profile = json.loads(Path(session.end_profiling()).read_text())
    assert any("fine/" in e.get("name", "") for e in profile if e.get("cat") == "Node")


# -- runtimes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_infer_rows_with_the_single_graph_equal_the_pairs(small_export, tmp_path, provider):
    if provider == "openvino":
        pytest.importorskip("openvino")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((120, 100)).save(folder / f"{i}.png")
    rows: dict[str, dict[float, list]] = {"pair": {}, "single": {}}
    confidences = []
    infer(small_export, folder, eta=0.0, provider=provider, on_row=lambda r: confidences.append(r.confidence))
    c = np.sort(confidences)
    etas = (0.0, float((c[2] + c[3]) / 2), 1.0)
    for graph in rows:
        for eta in etas:
            got: list = []
            infer(small_export, folder, eta=eta, provider=provider, graph=graph, batch_size=4, on_row=got.append)
            rows[graph][eta] = got
    for eta in etas:
        for a, b in zip(rows["single"][eta], rows["pair"][eta], strict=True):
            assert (a.path, a.stage, a.patches, a.labels) == (b.path, b.stage, b.patches, b.labels)
            assert a.confidence == pytest.approx(b.confidence, rel=1e-5)
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-4)
    stages = {r.stage for r in rows["single"][etas[1]]}
    assert stages == {"coarse", "fine"}


def test_backends_load_only_the_graphs_they_run(small_export):
    manifest = Manifest.load(small_export)
    assert set(OrtBackend(manifest).sessions) == {"coarse", "fine"}  # never baseline.onnx or single.onnx
    assert set(CFViTPipeline(manifest, graph="single").backend.sessions) == {"single"}
    assert set(CFViTPipeline(manifest).backend.sessions) == {"coarse", "fine"}


def test_serve_engine_loads_only_what_it_runs(small_export):
    from cfvit_deploy.app.serve.metrics import ServeMetrics
    from cfvit_deploy.app.serve.server import ServeOptions, build_engine

    for graph, want in (("pair", {"coarse", "fine"}), ("single", {"single"})):
        engine = build_engine(small_export, ServeOptions(graph=graph).check(), ServeMetrics())
        assert set(engine._load().backend.sessions) == want


def test_serve_engine_with_the_single_graph_answers_like_the_pair(small_export):
    import asyncio

    from runtimes.batching import BatchingEngine, EngineConfig, SingleGraphRunner, StageRunner

    manifest = Manifest.load(small_export)
    x = np.random.default_rng(4).standard_normal((6, 3, 96, 96)).astype(np.float32)
    eta = _mixed_eta(CFViTPipeline(manifest), x)
    etas = [0.0, 1.0, eta, eta, 1.0, 0.0]  # per-request η, batched together

    def answers(runner_cls, graphs) -> list:
        engine = BatchingEngine(lambda: runner_cls(create_backend(manifest, graphs=graphs)), EngineConfig(max_batch=8))

        async def main() -> list:
            await engine.start()
            with engine.expect():
                tasks = [asyncio.ensure_future(engine.submit(img, e, 3)) for img, e in zip(x, etas, strict=True)]
            got = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            await engine.close()
            return got

        return asyncio.run(main())

    single, pair = answers(SingleGraphRunner, ("single",)), answers(StageRunner, ("coarse", "fine"))
    assert [a.row.stage for a in single] == [a.row.stage for a in pair]
    assert {a.row.stage for a in single} == {"coarse", "fine"}
    for a, b in zip(single, pair, strict=True):
        assert a.refined == b.refined and a.row.labels == b.row.labels
        np.testing.assert_allclose(a.row.probs, b.row.probs, rtol=1e-4)


def test_graph_single_without_single_onnx_is_one_error_line(export_dir_factory, capsys, tmp_path):
    plain = export_dir_factory("deit_g7")
    with pytest.raises(UsageError, match="--single-graph"):
        CFViTPipeline(plain, graph="single")
    with pytest.raises(UsageError, match="--graph"):
        CFViTPipeline(plain, graph="both")
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert cli.main(["infer", str(plain), str(img), "--graph", "single"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--single-graph" in err[0]


# -- validation -------------------------------------------------------------------------------------------
def test_validate_checks_the_single_graph(small_export):
    report = validate(small_export, _small_model(), batch_sizes=(1, 3), etas=(0.1, 0.5))
    single = [c for c in report.checks if c.name.startswith("single graph")]
    assert report.passed, [c.line() for c in report.failed]
    names = {c.name for c in single}
    for case in ("eta=0", "eta=1", "eta=0.1", "eta alternating 0/1 per image"):
        assert any(case in n for n in names), case
    assert any("vs the pair" in n for n in names) and {c.batch for c in single} == {1, 3}


def test_validate_fails_a_single_graph_that_drops_the_fine_answer(small_export, tmp_path, capsys):
    """A single.onnx whose merge keeps the coarse logits for every row: validate says FAILED, exit 1."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_export, broken)
    _drop_fine_answer(broken)
    report = validate(broken, _small_model(), batch_sizes=(2,), etas=(0.5,))
    failed = {c.name for c in report.failed}
    assert any("single graph: logits vs PyTorch [eta=1]" in n for n in failed), failed
    assert not any(not n.startswith("single graph") for n in failed)  # the pair still passes


def _drop_fine_answer(export_dir: Path) -> None:
    """Make single.onnx's merge keep the coarse logits for every row (and record the new sha256)."""
    model = onnx.load(str(export_dir / "single.onnx"))
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    merge = next(n for n in then.node if n.output[0] == "then/logits")
    merge.op_type, merge.input[:] = "Identity", ["coarse/coarse_logits"]
    onnx.save(model, str(export_dir / "single.onnx"))
    data = json.loads((export_dir / "manifest.json").read_text())
    data["graphs"]["single"]["sha256"] = sha256_file(export_dir / "single.onnx")
    (export_dir / "manifest.json").write_text(json.dumps(data))


def _small_model() -> CFViT:
    torch.manual_seed(0)
    return CFViT(ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)).eval()


# -- variants -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variant_single_graph_is_composed_from_the_variant_stages(small_export, tmp_path, precision):
    from exporters import make_variant

    variant = make_variant(small_export, tmp_path / precision, precision)
    model = onnx.load(str(variant.graph_path("single")))
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then_ops = {n.op_type for n in next(a.g for a in if_node.attribute if a.name == "then_branch").node}
    main_ops = {n.op_type for n in model.graph.node}
    marker = "Cast" if precision == "fp16" else "DynamicQuantizeLinear"
    assert marker in then_ops and marker in main_ops  # both stages are the variant's
    pair, single = CFViTPipeline(variant.directory), CFViTPipeline(variant.directory, graph="single")
    x = np.random.default_rng(5).standard_normal((4, 3, 96, 96)).astype(np.float32)
    for eta in (0.0, _mixed_eta(pair, x), 1.0):
        a, b = single.run(x, eta), pair.run(x, eta)
        np.testing.assert_array_equal(a.exited, b.exited)
        np.testing.assert_array_equal(a.informative_idx, b.informative_idx)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)


# -- bench ----------------------------------------------------------------------------------------------------
def test_bench_measures_the_single_graph_beside_the_pair(small_export, export_dir_factory):
    from cfvit_deploy.app.bench import run_bench

    r = run_bench(
        small_export,
        graphs="pair,single",
        batch_sizes=(1, 4),
        fine_fractions=(0.24, 0.52),
        iterations=1,
        warmup=1,
        isolation="inline",
    )
    for model in ("cfvit", "cfvit-single"):
        rows = r.find(model=model)
        assert [(x.batch_size, x.target_fine_fraction) for x in rows] == [(1, 0.24), (1, 0.52), (4, 0.24), (4, 0.52)]
        assert all(x.status == "ok" and x.speedup_vs_baseline is not None for x in rows), [x.reason for x in rows]
    pair, single = r.find(model="cfvit"), r.find(model="cfvit-single")
    # the same synthetic gate sends the same images to the fine stage; single.onnx has no stage split
    assert [x.fine_fraction for x in single] == [x.fine_fraction for x in pair]
    assert all(x.coarse_ms is None and x.fine_ms is None for x in single)
    with pytest.raises(UsageError, match="--single-graph"):
        run_bench(export_dir_factory("deit_g7"), graphs="single", iterations=1, isolation="inline")
    with pytest.raises(UsageError, match="--graph"):
        run_bench(small_export, graphs="triple", iterations=1, isolation="inline")


def test_bench_end_to_end_cells_run_each_graph_and_record_its_threading(small_export, tmp_path, monkeypatch):
    """--graph pair,single with --end-to-end: per graph, model-only and end-to-end cells; infer gets the
    pipeline of the cell's graph; every row records the threading it ran with."""
    from cfvit_deploy.app.bench import run_bench
    from runtimes import infer as infer_module

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    graphs_seen, original = [], infer_module.infer

    def spy(source, inputs, **kwargs):
        graphs_seen.append((source.graph, kwargs["decode"]))
        return original(source, inputs, **kwargs)

    monkeypatch.setattr(infer_module, "infer", spy)
    r = run_bench(
        small_export,
        graphs="pair,single",
        batch_sizes=(2,),
        fine_fractions=(0.5,),
        images=tmp_path,
        end_to_end=True,
        iterations=1,
        warmup=0,
        threads=1,
        isolation="inline",
    )
    for model in ("cfvit", "cfvit-single"):
        rows = r.find(model=model)
        assert [(x.end_to_end, x.decode) for x in rows] == [(False, None), (True, "exact"), (True, "fast")]
        assert all(x.status == "ok" for x in rows), [x.reason for x in rows]
    assert graphs_seen == [("pair", "exact"), ("pair", "fast"), ("single", "exact"), ("single", "fast")]
    assert all(x.threads == 1 and x.graph_optimization == "all" for x in r.rows)


# -- the commands -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_export_single_graph_validate_and_a_broken_merge_exits_1(tmp_path):
    """`cfvit export --single-graph` then `cfvit validate`: 0; the same with the fine answer dropped: 1."""
    import shutil

    from cfvit_deploy.checkpoints import save_checkpoint

    ckpt = save_checkpoint(_small_model(), tmp_path / "small.pth")
    out = tmp_path / "export"
    assert cli.main(["export", str(ckpt), "--out", str(out), "--num-heads", "3", "--single-graph"]) == 0
    assert "single" in Manifest.load(out).graphs
    args = ["--batch-sizes", "1,3", "--etas", "0.5"]
    assert cli.main(["validate", str(out), *args]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    _drop_fine_answer(broken)
    assert cli.main(["validate", str(broken), "--report", str(tmp_path / "r.json"), *args]) == 1
    failed = {c["name"] for c in json.loads((tmp_path / "r.json").read_text())["checks"] if not c["passed"]}
    assert "single graph: logits vs PyTorch [eta=1]" in failed


def test_sweep_with_the_single_graph_equals_the_pairs(small_export, tmp_path):
    from cfvit_deploy.app.sweep import sweep

    rng = np.random.default_rng(6)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((100, 100)).save(
                tmp_path / "data" / c / f"{i}.png"
            )
    results = {
        g: sweep(small_export, tmp_path / "data", "0,0.115,1", graph=g, batch_size=4) for g in ("pair", "single")
    }
    strip = [[(r.eta, r.accuracy, r.exit_rate) for r in res.rows] for res in results.values()]
    assert strip[0] == strip[1]
    with pytest.raises(UsageError, match="--graph"):
        sweep(small_export, tmp_path / "data", "0.5", graph="triple")
