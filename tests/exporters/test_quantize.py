"""Static (calibrated QDQ) and dynamic int8 variants: manifest record, graph form, validation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cfvit_deploy import ModelConfig, UsageError
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.model import CFViT
from exporters import export, make_variant, validate
from exporters.validation import smooth_random_images


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small DeiT export (fp32), its model, and a folder of 12 calibration images."""
    tmp = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    cfg = ModelConfig.named("deit", "small", coarse_grid=3, embed_dim=48, num_heads=3, num_classes=10)
    model = CFViT(cfg).eval()
    export(model, tmp / "fp32", baseline=True)
    folder = tmp / "calib"
    folder.mkdir()
    images = smooth_random_images(np.random.default_rng(3), 12, 128)
    for i, x in enumerate(images):
        pixels = np.clip((x.transpose(1, 2, 0) * 0.25 + 0.5) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")  # skipped and counted, not fatal
    return model, tmp, folder


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_static_int8_variant_is_calibrated_qdq_and_validates(small):
    model, tmp, folder = small
    manifest = make_variant(tmp / "fp32", tmp / "static", "int8", calibration=folder)
    assert manifest.quantization == "static" and Manifest.load(tmp / "static").quantization == "static"
    assert manifest.calibration["images"] == 12 and manifest.calibration["skipped"] == 1
    for graph in ("coarse", "fine", "baseline"):
        ops = _ops(tmp / "static" / f"{graph}.onnx")
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"], graph
        assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    # per-channel weights: a weight's DequantizeLinear carries one scale per output channel
    fine = onnx.load(str(tmp / "static" / "fine.onnx"))
    inits = {i.name: i for i in fine.graph.initializer}
    weight_scales = [
        inits[n.input[1]]
        for n in fine.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits
    ]
    assert weight_scales and max(int(np.prod(s.dims)) for s in weight_scales) > 1
    report = validate(tmp / "static", model, batch_sizes=(8,), min_top1=0.6, min_exit=0.6)
    assert report.passed, [c.line() for c in report.failed]
    selection = [c for c in report.checks if "selected patches" in c.name]
    assert selection and min(c.value for c in selection) >= 0.75  # the fp32 score path keeps the choice


def test_score_path_stays_fp32(small):
    """global_attention of the static coarse graph equals the fp32 graph's up to the int8 token error
    upstream of it, but no Quantize/Dequantize node sits on the path after the blocks' q and k."""
    _, tmp, folder = small
    make_variant(tmp / "fp32", tmp / "s2", "int8", calibration=folder, force=True)
    coarse = onnx.load(str(tmp / "s2" / "coarse.onnx"))
    producer = {o: n for n in coarse.graph.node for o in n.output}
    node, chain = producer["global_attention"], []
    while node is not None and node.op_type not in ("Softmax",):
        chain.append(node.op_type)
        node = producer.get(node.input[0])
    assert node is not None and "QuantizeLinear" not in chain and "DequantizeLinear" not in chain
    # the classifier head stays fp32 (quantized, it moved the demo's exit rate by 13 points): its GEMM
    # reads an fp32 weight initializer, not a DequantizeLinear output
    inits = {i.name: i for i in coarse.graph.initializer}
    node = producer["coarse_logits"]
    while node.op_type not in ("MatMul", "Gemm"):
        node = producer[node.input[0]]
    assert node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT


def test_export_flag_and_dynamic_record(small, tmp_path):
    model, _, folder = small
    manifest = export(model, tmp_path / "s", precision="int8", calibration=folder)
    assert manifest.quantization == "static" and manifest.calibration["method"] == "MinMax"
    dyn = export(model, tmp_path / "d", precision="int8")
    assert dyn.quantization == "dynamic" and dyn.calibration is None
    assert (
        "DynamicQuantizeLinear" in _ops(tmp_path / "d" / "fine.onnx")
        or "MatMulInteger" in _ops(tmp_path / "d" / "fine.onnx")
        or "DynamicQuantizeMatMul" in _ops(tmp_path / "d" / "fine.onnx")
    )
    assert export(model, tmp_path / "f").quantization is None
    with pytest.raises(UsageError, match="--calibration is for --precision int8"):
        export(model, tmp_path / "x", precision="fp16", calibration=folder)
    with pytest.raises(UsageError, match="calibration"):
        export(model, tmp_path / "y", precision="int8", calibration=tmp_path / "missing")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantizer_advice_is_logged_at_debug_not_printed(small, tmp_path, capfd, caplog):
    """Issue 23 item 4: ONNX Runtime's "Please consider to run pre-processing before quantization" went to
    stderr once per graph (its URL broken across lines); now it is a DEBUG record of exporters.quantize."""
    import logging

    _, tmp, _ = small
    root = logging.getLogger()
    handlers = list(root.handlers)
    with caplog.at_level(logging.DEBUG, logger="exporters.quantize"):
        make_variant(tmp / "fp32", tmp_path / "int8", "int8")
    out, err = capfd.readouterr()
    assert "pre-processing" not in out + err
    advice = [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert advice and all(r.levelno == logging.DEBUG and r.name == "exporters.quantize" for r in advice)
    assert root.handlers == handlers  # no stderr handler left behind by logging.basicConfig()
