"""Graph variants built with ONNX Runtime / onnxconverter-common tooling (no hand-written rewriting).

* optimize: ``onnxruntime.transformers.optimizer`` (attention, LayerNorm, GELU fusions; model_type vit)
* fp16: ``onnxruntime.transformers`` float16 conversion with fp32 inputs/outputs; LayerNorm, Softmax, TopK and the
  selection-score path stay in fp32
* int8: ``onnxruntime.quantization.quantize_dynamic`` of the MatMul weights (signed int8), or with a
  calibration folder ``quantize_static`` (QDQ, per-channel weights; see :mod:`exporters.quantize`)

These need no torch, so they also turn an existing fp32 export into a variant (:func:`make_variant`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from cfvit_deploy.config import ModelConfig
from cfvit_deploy.errors import ExportError, UsageError
from cfvit_deploy.io import atomic_directory
from cfvit_deploy.manifest import PRECISIONS, GraphSpec, Manifest, sha256_file
from cfvit_deploy.preprocessing import PreprocessConfig

from .quantize import Calibration, quantize_dynamic_graph, quantize_static_graph
from .single_graph import write_single_graph

log = logging.getLogger(__name__)

#: Ops kept in fp32 in the fp16 variant (numerically sensitive, or selection-critical).
#: MultiHeadAttention: ONNX Runtime's CPU kernel of the contrib op is float32 only.
FP16_KEEP_OPS = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "TopK",
    "ReduceMean",
    "Resize",
    "MultiHeadAttention",
]


def _ancestors(graph: onnx.GraphProto, outputs: set[str]) -> set[str]:
    """Names of the nodes that any of `outputs` depends on."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return seen


def score_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that only feed `global_attention` (the EMA of attention rows): kept in fp32."""
    graph = model.graph
    outs = {o.name for o in graph.output}
    if "global_attention" not in outs:
        return []
    return sorted(_ancestors(graph, {"global_attention"}) - _ancestors(graph, outs - {"global_attention"}))


def _name_nodes(model: onnx.ModelProto) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _isolate_outputs(model: onnx.ModelProto) -> None:
    """Give every graph output that is also consumed inside the graph its own Identity node.

    onnxconverter-common's keep_io_types casts graph outputs in place and would otherwise feed
    the fp32 cast to internal consumers that expect fp16.
    """
    graph = model.graph
    consumed = {i for node in graph.node for i in node.input}
    for out in graph.output:
        if out.name not in consumed:
            continue
        internal = f"{out.name}__internal"
        for node in graph.node:
            node.output[:] = [internal if o == out.name else o for o in node.output]
            node.input[:] = [internal if i == out.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [internal], [out.name], name=f"{out.name}__output"))


def _split_shared_fp32_inputs(model: onnx.ModelProto, keep_ops: list[str], keep_nodes: list[str]) -> None:
    """Give each kept-fp32 consumer of a shared tensor after the first its own copy of it.

    The float16 converter names the fp16->fp32 Cast it puts before a kept node after the input tensor
    alone, so two kept consumers of one tensor would get two Casts of the same name (invalid graph): the
    fused attention and the class-row path both read q; onnxsim merges equal weights (the zero biases
    and unit LayerNorm scales of a freshly initialised model) into one initializer. Activations get an
    Identity copy, weights a copied initializer (so a weight read only by kept nodes stays fp32).
    """
    kept = set(keep_nodes)
    weights = {init.name: init for init in model.graph.initializer}
    seen: set[str] = set()
    extra_nodes, extra_weights = [], []
    for node in model.graph.node:
        if node.op_type not in keep_ops and node.name not in kept:
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in seen:
                copy = f"{name}__for_{node.name}_{i}"
                if name in weights:
                    clone = onnx.TensorProto()
                    clone.CopyFrom(weights[name])
                    clone.name = copy
                    extra_weights.append(clone)
                else:
                    extra_nodes.append(onnx.helper.make_node("Identity", [name], [copy], name=f"{copy}__identity"))
                node.input[i] = copy
            seen.add(name)
    model.graph.node.extend(extra_nodes)
    model.graph.initializer.extend(extra_weights)


def _restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """keep_io_types casts a graph output that a kept-fp32 node produces back to fp16: undo that cast."""
    producer = {o: node for node in model.graph.node for o in node.output}
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producer.get(out.name)
        if node is None or node.op_type != "Cast":
            raise ExportError(f"fp16 conversion left output {out.name} in fp16")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _optimize(path: Path, cfg: ModelConfig) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type="vit", num_heads=cfg.num_heads, hidden_size=cfg.embed_dim, opt_level=0)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(path))
    return "ORT transformer optimizer: " + (", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "no fusions")


def _fp16(path: Path) -> str:
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(path))
    _isolate_outputs(model)
    _name_nodes(model)
    keep = score_path_nodes(model)
    _split_shared_fp32_inputs(model, float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_OPS, keep)
    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_OPS,
        node_block_list=keep,
    )
    _restore_fp32_outputs(wrapped.model)
    wrapped.topological_sort()
    onnx.save(wrapped.model, str(path))
    return f"fp16 (kept in fp32: {', '.join(FP16_KEEP_OPS)}, {len(keep)} score-path nodes)"


def apply_variant(
    path: Path,
    cfg: ModelConfig,
    precision: str = "fp32",
    optimize: bool = False,
    calibration: Calibration | None = None,
) -> str:
    """Turn the fp32 graph at `path` into the requested variant, in place; returns a note.

    int8 with `calibration` is static (the coarse graph must come before the fine graph), else dynamic.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and optimize:
        raise UsageError(
            "fp16 cannot be combined with --optimize: ORT's float16 converter breaks the fused graph (SSA error); "
            "export fp16 and optimized separately"
        )
    notes = []
    try:
        if optimize:
            notes.append(_optimize(path, cfg))
        if precision == "fp16":
            notes.append(_fp16(path))
        elif precision == "int8" and calibration is not None:
            notes.append(quantize_static_graph(path, calibration, score_path_nodes(onnx.load(str(path)))))
        elif precision == "int8":
            notes.append(quantize_dynamic_graph(path))
    except (UsageError, ExportError):
        raise
    except Exception as exc:  # the converters raise assorted types
        raise ExportError(f"building the {precision} variant of {path.name} failed: {exc}") from exc
    return "; ".join(notes) or "fp32"


def calibration_for(precision: str, calibration: str | Path | None, pp: PreprocessConfig) -> Calibration | None:
    """The calibration set for static int8 (None: dynamic int8, or not int8)."""
    if calibration is None:
        return None
    if precision != "int8":
        raise UsageError(f"--calibration is for --precision int8 (static quantization), not {precision}")
    return Calibration.from_folder(calibration, pp)


def quantization_info(precision: str, calibration: Calibration | None) -> tuple[str | None, dict | None]:
    """The manifest's ``quantization`` ("dynamic" | "static" | None) and ``calibration`` entries."""
    if precision != "int8":
        return None, None
    return ("static", calibration.info()) if calibration is not None else ("dynamic", None)


def make_variant(
    src_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    optimize: bool = False,
    force: bool = False,
    calibration: str | Path | None = None,
) -> Manifest:
    """Build a variant folder from an existing fp32 export (torch-free).

    `calibration` (an image folder) makes int8 static: calibrated QDQ instead of dynamic quantization.
    """
    src = Manifest.load(src_dir)
    if src.precision != "fp32" or src.optimized:
        raise UsageError(f"variants are built from a plain fp32 export; {src_dir} is {src.precision}")
    calib = calibration_for(precision, calibration, src.preprocessing)
    graphs: dict[str, GraphSpec] = {}
    notes: dict[str, str] = {}
    # the fine graph is calibrated on coarse outputs; single.onnx is composed from the variant's stage graphs
    order = sorted((g for g in src.graphs if g != "single"), key=lambda g: g != "coarse")
    with atomic_directory(Path(out_dir), force=force) as tmp:
        for name in order:
            spec = src.graphs[name]
            path = tmp / spec.file
            shutil.copyfile(src.graph_path(name), path)
            notes[name] = apply_variant(path, src.model, precision, optimize, calib)
            model = onnx.load(str(path))
            for prop in model.metadata_props:
                if prop.key == "cfvit.precision":
                    prop.value = precision
                elif prop.key == "cfvit.optimized":
                    prop.value = str(optimize)
            onnx.save(model, str(path))
            graphs[name] = GraphSpec(spec.file, sha256_file(path), spec.inputs, spec.outputs)
        if "single" in src.graphs:
            graphs["single"] = write_single_graph(tmp, src.model, src.graphs["coarse"].file, src.graphs["fine"].file)
            notes["single"] = f"composed from the {precision} coarse and fine graphs"
        quantization, calib_info = quantization_info(precision, calib)
        manifest = Manifest(
            model=src.model,
            preprocessing=src.preprocessing,
            graphs={name: graphs[name] for name in src.graphs},
            gmacs=src.gmacs,
            precision=precision,
            optimized=optimize,
            attention=src.attention,
            quantization=quantization,
            calibration=calib_info,
            opset=src.opset,
            default_eta=src.default_eta,
            class_names=src.class_names,
            versions=src.versions,
            source={**src.source, "variant_of": str(Path(src_dir).resolve()), "notes": notes},
        )
        manifest.save(tmp)
    manifest.directory = Path(out_dir)
    return manifest
