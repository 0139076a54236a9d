"""Fused attention in the exported graphs: same numbers as the model, one contrib node per block."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from cfvit_deploy import ModelConfig, UsageError
from cfvit_deploy.layers import Attention
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.model import CFViT
from exporters import export, validate
from exporters.attention import attention_mode, fused_forward


@pytest.mark.parametrize("scale_query", [False, True])
def test_fused_forward_matches_attention_and_its_class_row(scale_query):
    """The export-time forward (traced into the graphs) against the model's own explicit attention."""
    torch.manual_seed(0)
    attn = Attention(48, 3, qkv_bias=True, scale_query=scale_query).eval()
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        out, full = attn(x)
        fused_out, row = fused_forward(attn, x)
    assert row.shape == (2, 3, 1, 17)
    torch.testing.assert_close(fused_out, out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(row, full[:, :, :1], atol=1e-7, rtol=1e-5)


def test_attention_mode_restores_the_model():
    model = CFViT(ModelConfig.named("deit", "small", coarse_grid=2, embed_dim=48, depth=4, num_heads=3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with attention_mode(model, "fused"):
            assert all("forward" in b.attn.__dict__ for b in model.blocks)
            inside = model(x)
        after = model(x)
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)
    torch.testing.assert_close(inside.coarse_logits, ref.coarse_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(after.fine_logits, ref.fine_logits)  # bit-exact again outside the block


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fused_and_plain_exports_validate(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)
    model = CFViT(cfg).eval()
    for mode in ("fused", "plain"):
        manifest = export(model, tmp_path / mode, attention=mode, baseline=True)
        assert manifest.attention == mode and Manifest.load(tmp_path / mode).attention == mode
        report = validate(tmp_path / mode, model, batch_sizes=(1, 3))
        assert report.passed, [c.line() for c in report.failed]
        coarse, fine, base = (_ops(tmp_path / mode / f"{g}.onnx") for g in ("coarse", "fine", "baseline"))
        if mode == "fused":
            assert coarse["MultiHeadAttention"] == fine["MultiHeadAttention"] == base["MultiHeadAttention"] == cfg.depth
            # no (N, N) map anywhere: only the coarse EMA blocks keep a softmax, over one class row
            assert fine["Softmax"] == base["Softmax"] == 0
            assert coarse["Softmax"] == cfg.depth - cfg.ema_start
        else:
            assert "MultiHeadAttention" not in coarse and fine["Softmax"] == cfg.depth
    with pytest.raises(UsageError, match="attention must be one of"):
        export(model, tmp_path / "bad", attention="flash")


def test_fused_graph_runs_in_openvino(tmp_path):
    pytest.importorskip("openvino")
    from runtimes.backends import create_backend
    from runtimes.openvino_backend import OpenVinoBackend

    torch.manual_seed(0)
    model = CFViT(ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)).eval()
    manifest = export(model, tmp_path / "e", attention="fused")
    backend = create_backend(Manifest.load(tmp_path / "e"), "openvino")
    assert isinstance(backend, OpenVinoBackend)
    x = np.random.default_rng(0).standard_normal((2, 3, manifest.image_size, manifest.image_size)).astype(np.float32)
    got = backend.run("coarse", {"images": x})
    with torch.no_grad():
        ref = model.coarse_stage(torch.from_numpy(x))
    np.testing.assert_allclose(got["coarse_logits"], ref.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["global_attention"], ref.score.numpy(), atol=1e-6)


def test_fused_export_reproduces_upstream_outputs(upstream, export_dir_factory):
    """The fused graphs against the original code's outputs (same tolerances as the plain export's test)."""
    import onnxruntime as ort

    export_dir = export_dir_factory(upstream.name, attention="fused")
    assert Manifest.load(export_dir).attention == "fused"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    coarse, fine = (
        ort.InferenceSession(str(export_dir / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
        for g in ("coarse", "fine")
    )
    ref, x = upstream.ref, upstream.images
    co = dict(zip([o.name for o in coarse.get_outputs()], coarse.run(None, {"images": x}), strict=True))
    feeds = {"images": x, **{k: co[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}}
    fo = dict(zip([o.name for o in fine.get_outputs()], fine.run(None, feeds), strict=True))
    np.testing.assert_allclose(co["coarse_logits"], ref["coarse_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(co["global_attention"], ref["score"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fo["fine_logits"], ref["fine_logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(fo["informative_idx"], ref["informative_idx"])


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variants_of_a_fused_export_validate(tmp_path, precision):
    """fp16 (the converter once wrote two Casts of one name for q, read by the fused node and the class
    row) and dynamic int8, built from a fused fp32 export."""
    from exporters import make_variant

    torch.manual_seed(0)
    model = CFViT(ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)).eval()
    export(model, tmp_path / "fp32", attention="fused")
    manifest = make_variant(tmp_path / "fp32", tmp_path / precision, precision)
    assert manifest.attention == "fused" and _ops(tmp_path / precision / "fine.onnx")["MultiHeadAttention"] == 12
    report = validate(tmp_path / precision, model, batch_sizes=(8,), min_top1=0.75, min_exit=0.75)
    assert report.passed, [c.line() for c in report.failed]
