"""The whole gated CF-ViT as one ONNX graph (``single.onnx``), composed from the exported stage graphs.

The two stage graphs are not re-traced: their nodes are copied (names prefixed with
``onnx.compose.add_prefix``) into one graph, the coarse stage in the main graph and the fine stage in
the ``then`` branch of an ``If``, with the gate and the merge written as a few standard ops::

    images ─▶ coarse stage ─▶ coarse_logits ─▶ confidence = 1 / Σ exp(l - max l)   (as runtimes.pipeline)
    eta ────────────────────────────────────▶ exited = confidence >= eta           (float32, per image)
    rows = NonZero(not exited) ─▶ If (any rows) ─then─▶ Gather rows ─▶ fine stage ─▶ ScatterND into
                                               │                      coarse_logits / a -1 filled index
                                               └else─▶ coarse_logits, the -1 filled index

so the fine stage does not run at all when every image exits and runs on the not-exited rows only.
Both branches produce tensors of the same static rank and shape ([N, classes], [N, k]): OpenVINO's CPU
plugin rejects an ``If`` whose outputs have a dynamic rank, and TensorRT wants the branches' shapes equal.
Initializers the two stages share (every weight but the position embeddings) are stored once.

This module needs onnx, not torch, so a variant's single graph is built from the variant's own stage
graphs (:func:`exporters.variants.make_variant`): ORT's quantizer does not enter ``If`` subgraphs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from cfvit_deploy.config import ModelConfig
from cfvit_deploy.errors import ExportError
from cfvit_deploy.manifest import GRAPH_IO_DOC, GraphSpec, TensorSpec, sha256_file

#: The graph's inputs and outputs (``coarse_logits`` is the coarse answer of every row, for clients that want it).
SINGLE_INPUTS = ["images", "eta"]
SINGLE_OUTPUTS = ["logits", "confidence", "exited", "informative_idx", "coarse_logits"]
SINGLE_FILE = "single.onnx"
#: informative_idx of the rows that exited (the same fill as runtimes.pipeline.NOT_REFINED).
NOT_REFINED = -1
#: onnxruntime rejects the newest IR versions (as exporters.onnx_export.MAX_IR_VERSION).
MAX_IR_VERSION = 10
_STAGE_OUTPUTS = ("global_attention", "reuse_tokens", "coarse_embedding")


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _dedupe_initializers(graphs: list[onnx.GraphProto]) -> None:
    """Keep one copy of equal initializers (same type, shape and bytes) and point every reader at it."""
    seen: dict[bytes, str] = {}
    rename: dict[str, str] = {}
    for graph in graphs:
        kept = []
        for init in graph.initializer:
            body = onnx.TensorProto()
            body.CopyFrom(init)
            body.name = ""
            key = hashlib.sha256(body.SerializeToString(deterministic=True)).digest()
            if key in seen:
                rename[init.name] = seen[key]
            else:
                seen[key] = init.name
                kept.append(init)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    for graph in graphs:
        for node in graph.node:
            node.input[:] = [rename.get(name, name) for name in node.input]


def _value(name: str, elem: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _reduce_max(opset: int, data: str, out: str) -> list[onnx.NodeProto]:
    """ReduceMax over axis 1 keeping it (axes became an input in opset 18)."""
    if opset >= 18:
        return [helper.make_node("ReduceMax", [data, "gate/axis1"], [out], keepdims=1, name="gate/max")]
    return [helper.make_node("ReduceMax", [data], [out], axes=[1], keepdims=1, name="gate/max")]


def _gate_nodes(opset: int, coarse_logits: str) -> list[onnx.NodeProto]:
    """confidence = 1 / sum(exp(l - max l)) (runtimes.pipeline.max_softmax), exited = confidence >= eta."""
    node = helper.make_node
    return [
        *_reduce_max(opset, coarse_logits, "gate/max_logit"),
        node("Sub", [coarse_logits, "gate/max_logit"], ["gate/shifted"], name="gate/sub"),
        node("Exp", ["gate/shifted"], ["gate/exp"], name="gate/exp"),
        node("ReduceSum", ["gate/exp", "gate/axis1"], ["gate/sum"], keepdims=0, name="gate/sum"),
        node("Reciprocal", ["gate/sum"], ["confidence"], name="gate/confidence"),
        node("GreaterOrEqual", ["confidence", "eta"], ["exited"], name="gate/exited"),
        node("Not", ["exited"], ["gate/todo_mask"], name="gate/todo_mask"),
        node("NonZero", ["gate/todo_mask"], ["gate/todo_2d"], name="gate/nonzero"),
        node("Reshape", ["gate/todo_2d", "gate/minus_one"], ["gate/todo"], name="gate/todo"),
        node("Unsqueeze", ["gate/todo", "gate/axis1"], ["gate/todo_idx"], name="gate/todo_idx"),
        node("Size", ["gate/todo"], ["gate/n_todo"], name="gate/n_todo"),
        node("Greater", ["gate/n_todo", "gate/zero"], ["gate/any_todo"], name="gate/any_todo"),
        # the [N, k] informative_idx of a batch where nothing was refined
        node("Shape", ["images"], ["gate/image_shape"], name="gate/image_shape"),
        node("Gather", ["gate/image_shape", "gate/axis0"], ["gate/n"], axis=0, name="gate/n"),
        node("Concat", ["gate/n", "gate/k"], ["gate/fill_shape"], axis=0, name="gate/fill_shape"),
        node(
            "ConstantOfShape",
            ["gate/fill_shape"],
            ["gate/not_refined"],
            value=helper.make_tensor("fill", TensorProto.INT64, [1], [NOT_REFINED]),
            name="gate/not_refined",
        ),
    ]


def _gate_constants(k: int) -> list[onnx.TensorProto]:
    def const(name: str, values: list[int], dims: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, dims, values)

    return [
        const("gate/axis0", [0], [1]),
        const("gate/axis1", [1], [1]),
        const("gate/minus_one", [-1], [1]),
        const("gate/zero", [0], []),
        const("gate/k", [k], [1]),
    ]


def _branches(fine: onnx.GraphProto, classes: int, k: int) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """then: the fine stage on the gathered rows, scattered back; else: the coarse answer as it is."""
    node = helper.make_node
    gathers = [node("Gather", ["images", "gate/todo"], ["fine/images"], axis=0, name="fine/gather_images")]
    gathers += [
        node("Gather", [f"coarse/{n}", "gate/todo"], [f"fine/{n}"], axis=0, name=f"fine/gather_{n}")
        for n in _STAGE_OUTPUTS
    ]
    merge = [
        node("ScatterND", ["coarse/coarse_logits", "gate/todo_idx", "fine/fine_logits"], ["then/logits"]),
        node("ScatterND", ["gate/not_refined", "gate/todo_idx", "fine/informative_idx"], ["then/informative_idx"]),
    ]
    for n in merge:
        n.name = f"merge/{n.output[0].split('/')[1]}"
    outputs = [
        _value("{}/logits", TensorProto.FLOAT, ["batch", classes]),
        _value("{}/informative_idx", TensorProto.INT64, ["batch", k]),
    ]

    def outs(branch: str) -> list[onnx.ValueInfoProto]:
        made = []
        for o in outputs:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(o)
            copy.name = o.name.format(branch)
            made.append(copy)
        return made

    then = helper.make_graph(
        [*gathers, *fine.node, *merge], "fine_stage", [], outs("then"), initializer=list(fine.initializer)
    )
    orelse = helper.make_graph(
        [
            node("Identity", ["coarse/coarse_logits"], ["else/logits"], name="else/logits"),
            node("Identity", ["gate/not_refined"], ["else/informative_idx"], name="else/informative_idx"),
        ],
        "all_exited",
        [],
        outs("else"),
    )
    return then, orelse


def build_single_graph(coarse: onnx.ModelProto, fine: onnx.ModelProto, classes: int, k: int) -> onnx.ModelProto:
    """The single graph of one export from its coarse and fine graphs (any precision; same opset)."""
    opset = _opset(coarse)
    if _opset(fine) != opset:
        raise ExportError(f"coarse and fine graphs have different opsets ({opset}, {_opset(fine)})")
    c = onnx.compose.add_prefix(coarse, "coarse/")
    f = onnx.compose.add_prefix(fine, "fine/")
    for g in (c.graph, f.graph):
        del g.value_info[:]  # the fine stage's "batch" is the number of rows left, not N: let runtimes infer
    _dedupe_initializers([c.graph, f.graph])
    image_size = coarse.graph.input[0].type.tensor_type.shape.dim[3].dim_value
    then, orelse = _branches(f.graph, classes, k)
    node = helper.make_node
    nodes = [
        node("Identity", ["images"], ["coarse/images"], name="coarse/input"),
        *c.graph.node,
        *_gate_nodes(opset, "coarse/coarse_logits"),
        node("If", ["gate/any_todo"], ["logits", "informative_idx"], then_branch=then, else_branch=orelse, name="fine"),
        node("Identity", ["coarse/coarse_logits"], ["coarse_logits"], name="coarse/output"),
    ]
    graph = helper.make_graph(
        nodes,
        "cfvit_single",
        [
            _value("images", TensorProto.FLOAT, ["batch", 3, image_size, image_size]),
            _value("eta", TensorProto.FLOAT, ["batch"]),
        ],
        [
            _value("logits", TensorProto.FLOAT, ["batch", classes]),
            _value("confidence", TensorProto.FLOAT, ["batch"]),
            _value("exited", TensorProto.BOOL, ["batch"]),
            _value("informative_idx", TensorProto.INT64, ["batch", k]),
            _value("coarse_logits", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=[*c.graph.initializer, *_gate_constants(k)],
    )
    domains = {(o.domain, o.version) for m in (coarse, fine) for o in m.opset_import}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(domains)])
    model.ir_version = min(coarse.ir_version, MAX_IR_VERSION)
    model.functions.extend([*c.functions, *f.functions])
    model.producer_name, model.producer_version = coarse.producer_name, coarse.producer_version
    for prop in coarse.metadata_props:
        model.metadata_props.add(key=prop.key, value="single" if prop.key == "cfvit.graph" else prop.value)
    model.doc_string = (
        "CF-ViT, coarse and fine stage with the confidence gate in one graph: inputs images [N,3,S,S] float32 "
        "and eta [N] float32; an image exits at the coarse stage iff max softmax(coarse_logits) >= eta"
    )
    return model


def single_specs(cfg: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's input and output specs of the single graph."""
    s, batch = cfg.fine_image_size, "batch"
    shapes: dict[str, tuple[str, list[int | str]]] = {
        "images": ("float32", [batch, 3, s, s]),
        "eta": ("float32", [batch]),
        "logits": ("float32", [batch, cfg.num_classes]),
        "confidence": ("float32", [batch]),
        "exited": ("bool", [batch]),
        "informative_idx": ("int64", [batch, cfg.k]),
        "coarse_logits": ("float32", [batch, cfg.num_classes]),
    }
    doc = GRAPH_IO_DOC["single"]

    def specs(names: list[str]) -> list[TensorSpec]:
        return [TensorSpec(n, shapes[n][0], shapes[n][1], doc[n]) for n in names]

    return specs(SINGLE_INPUTS), specs(SINGLE_OUTPUTS)


def write_single_graph(
    folder: Path, cfg: ModelConfig, coarse_file: str = "coarse.onnx", fine_file: str = "fine.onnx"
) -> GraphSpec:
    """Build ``folder/single.onnx`` from the stage graphs in `folder`, run the full checker; its spec."""
    model = build_single_graph(
        onnx.load(str(folder / coarse_file)), onnx.load(str(folder / fine_file)), cfg.num_classes, cfg.k
    )
    path = folder / SINGLE_FILE
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{SINGLE_FILE} fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    inputs, outputs = single_specs(cfg)
    return GraphSpec(file=SINGLE_FILE, sha256=sha256_file(path), inputs=inputs, outputs=outputs)
