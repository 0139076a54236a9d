"""int8 quantization of the exported graphs with ONNX Runtime's tooling (torch-free).

* dynamic: ``quantize_dynamic`` — int8 MatMul weights, activations quantized at run time per call;
* static: ``quantize_static`` — QDQ format, per-channel int8 weights, uint8 activations whose ranges
  are calibrated (MinMax) on an image folder preprocessed with the export's own preprocessing. The
  weights use the 7-bit range (``reduce_range``): x86 CPUs without VNNI (AVX2, AVX-512F) compute the
  uint8 x int8 products in saturating 16-bit pairs, and full-range weights lost the patch selection
  there (tests/test_quantize.py failed on an AVX2 machine: 50% selection agreement, 100% with 7 bits).

Static calibration feeds each graph what it sees in the pipeline: ``coarse`` and ``baseline`` get the
images, ``fine`` gets the images plus the **fp32** coarse graph's outputs for them (recorded when the
coarse graph passes through, before it is quantized itself).

What stays float32 in static int8: the nodes that only feed ``global_attention`` (the EMA class
attention that selects the patches: TopK on it must keep its order), the classifier heads (the gate
thresholds the softmax of their logits), Softmax, LayerNormalization and
the fused MultiHeadAttention (only Conv, MatMul and Gemm are quantized), and every MatMul whose inputs
are both activations (q·kᵀ and attention·v of plain graphs): only weight GEMMs are quantized. Their
outputs stay float (``OpTypesToExcludeOutputQuantization``): ONNX Runtime then runs QGemm /
MatMulIntegerToFloat with float outputs instead of re-quantizing every GEMM result for the float ops
after it (single-thread CPU time of the DeiT-S-size fine graph at batch 8, fp32 / static int8: 2.0x with
quantized outputs, 2.7x without; dynamic int8 2.6x).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cfvit_deploy.data.reader import list_images, read_images
from cfvit_deploy.errors import ExportError, UsageError
from cfvit_deploy.preprocessing import PreprocessConfig
from cfvit_deploy.thirdparty import third_party_at_debug

log = logging.getLogger(__name__)

#: Calibration images used at most (MinMax ranges settle well before this; each costs one forward).
MAX_CALIBRATION_IMAGES = 128
#: Fewer calibration images than this get a warning: MinMax ranges from a handful of images miss the
#: extremes of real inputs, which then saturate (clip) in uint8.
MIN_CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 8
STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]


@dataclass
class Calibration:
    """Preprocessed calibration images and, once the coarse graph passed, its fp32 outputs for them."""

    folder: Path
    images: np.ndarray
    skipped: int = 0
    coarse_outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path, pp: PreprocessConfig, limit: int = MAX_CALIBRATION_IMAGES) -> Calibration:
        read = read_images(list_images(folder, "--calibration"), pp, limit=limit, name="--calibration")
        if not len(read.images):
            raise UsageError(f"--calibration {folder} holds no readable image")
        if len(read.images) < MIN_CALIBRATION_IMAGES:
            log.warning(
                "static int8 calibrated on only %d image(s) of %s: activation ranges from so few images can "
                "clip real inputs; give --calibration at least %d images (up to %d are used)",
                len(read.images),
                folder,
                MIN_CALIBRATION_IMAGES,
                MAX_CALIBRATION_IMAGES,
            )
        return cls(Path(folder), read.images.astype(np.float32), skipped=len(read.skipped))

    def info(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder.resolve()),
            "images": int(len(self.images)),
            "skipped": self.skipped,
            "method": "MinMax",
            "format": "QDQ",
            "weights": "int8 per-channel",
            "activations": "uint8",
        }

    def feeds(self, graph: str, fp32_path: Path) -> list[dict[str, np.ndarray]]:
        """Calibration batches for `graph`; for the coarse graph it also records the fp32 outputs."""
        batches = [self.images[i : i + CALIBRATION_BATCH] for i in range(0, len(self.images), CALIBRATION_BATCH)]
        if graph == "coarse":
            import onnxruntime as ort

            session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outs = [dict(zip(names, session.run(None, {"images": b}), strict=True)) for b in batches]
            self.coarse_outputs = {n: np.concatenate([o[n] for o in outs]) for n in names}
        if graph != "fine":
            return [{"images": b} for b in batches]
        if not self.coarse_outputs:
            raise ExportError(
                "static int8: the fine graph is calibrated on the coarse graph's outputs; quantize coarse first"
            )
        return [
            {
                "images": b,
                **{
                    n: v[i : i + CALIBRATION_BATCH]
                    for n, v in self.coarse_outputs.items()
                    if n in ("global_attention", "reuse_tokens", "coarse_embedding")
                },
            }
            for b, i in zip(batches, range(0, len(self.images), CALIBRATION_BATCH), strict=True)
        ]


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes without a weight input (attention products): left in float32."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


LOGIT_OUTPUTS = ("coarse_logits", "fine_logits", "logits")


def _head_gemms(model: onnx.ModelProto) -> list[str]:
    """The classifier GEMMs: the first MatMul/Gemm met walking back from each logits output.

    The gate thresholds max softmax(coarse_logits), which is sensitive to the logits' scale; the heads
    cost one (classes x C) product per image, so they stay fp32.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    found: set[str] = set()
    stack = [producer[o.name] for o in model.graph.output if o.name in LOGIT_OUTPUTS and o.name in producer]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.add(node.name)
            continue
        stack.extend(producer[i] for i in node.input if i in producer)
    return sorted(found)


def quantize_dynamic_graph(path: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        with third_party_at_debug(log):  # the quantizer's advice to its own users, at DEBUG
            quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        shutil.copyfile(out, path)
    return "int8 dynamic quantization of MatMul weights (signed int8 weights, uint8 activations)"


def quantize_static_graph(path: Path, calibration: Calibration, keep_fp32: list[str]) -> str:
    """QDQ static int8 of the graph at `path`, in place; `keep_fp32` names nodes not to quantize."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = path.stem
    batches = calibration.feeds(graph, path)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):  # the quantizer addresses nodes by name
        node.name = node.name or f"{node.op_type}_{i}"
    exclude = sorted(set(keep_fp32) | set(_activation_matmuls(model)) | set(_head_gemms(model)))
    with tempfile.TemporaryDirectory() as tmp:
        named, out = Path(tmp) / "named.onnx", Path(tmp) / path.name
        onnx.save(model, str(named))
        with third_party_at_debug(log):  # the quantizer's advice to its own users, at DEBUG
            quantize_static(
                str(named),
                str(out),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: no u8s8 saturation on x86 CPUs without VNNI (AVX2, AVX-512)
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=STATIC_OP_TYPES,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "CalibTensorRangeSymmetric": False,
                    "WeightSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": STATIC_OP_TYPES,
                },
            )
        shutil.copyfile(out, path)
    return (
        f"int8 static QDQ (per-channel 7-bit-range int8 weights, uint8 activations, MinMax on {len(calibration.images)} "
        f"images; {len(exclude)} score-path, classifier-head and activation-product nodes kept in fp32)"
    )
