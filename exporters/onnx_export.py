"""Export driver: CF-ViT -> coarse.onnx + fine.onnx (+ baseline.onnx) + manifest.json, atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cfvit_deploy import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import onnx
import torch
from torch import nn

import cfvit_deploy
from cfvit_deploy.checkpoints import WEIGHTS, load_checkpoint
from cfvit_deploy.checks import check_choice, check_eta, check_positive_int
from cfvit_deploy.config import ModelConfig
from cfvit_deploy.data.reader import list_images
from cfvit_deploy.errors import ExportError, UsageError
from cfvit_deploy.flops import baseline_gmacs, stage_gmacs
from cfvit_deploy.io import atomic_directory, disk_error_reason
from cfvit_deploy.manifest import GRAPH_IO_DOC, PRECISIONS, GraphSpec, Manifest, TensorSpec, sha256_file
from cfvit_deploy.model import CFViT
from cfvit_deploy.preprocessing import PreprocessConfig

from .attention import ATTENTION_MODES, CONTRIB_OPSET, DEFAULT_ATTENTION
from .graphs import (
    BASELINE_INPUTS,
    BASELINE_OUTPUTS,
    COARSE_INPUTS,
    COARSE_OUTPUTS,
    FINE_INPUTS,
    FINE_OUTPUTS,
    BaselineGraph,
    CoarseGraph,
    FineGraph,
)
from .variants import apply_variant, calibration_for, quantization_info

log = logging.getLogger(__name__)

TRACE_BATCH = 2
DEFAULT_OPSET = 17
#: onnxruntime rejects the newest IR versions; graphs are saved at most at this one.
MAX_IR_VERSION = 10


def _symbolic_shapes(model: CFViT) -> dict[str, tuple[list[int | str], str]]:
    cfg = model.config
    s, n, c = cfg.fine_image_size, cfg.num_coarse, cfg.embed_dim
    return {
        "images": (["batch", 3, s, s], "float32"),
        "coarse_logits": (["batch", cfg.num_classes], "float32"),
        "global_attention": (["batch", n], "float32"),
        "reuse_tokens": (["batch", n, c], "float32"),
        "coarse_embedding": (["batch", n, c], "float32"),
        "fine_logits": (["batch", cfg.num_classes], "float32"),
        "informative_idx": (["batch", cfg.k], "int64"),
        "logits": (["batch", cfg.num_classes], "float32"),
    }


def _specs(model: CFViT, graph: str, names: list[str]) -> list[TensorSpec]:
    shapes = _symbolic_shapes(model)
    return [TensorSpec(name, shapes[name][1], shapes[name][0], GRAPH_IO_DOC[graph][name]) for name in names]


def _trace_inputs(model: CFViT, graph: str) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(TRACE_BATCH, 3, cfg.fine_image_size, cfg.fine_image_size, generator=gen)
    if graph != "fine":
        return (images,)
    with torch.no_grad():
        c = model.coarse_stage(images)
    return images, c.score, c.features, c.embedding


def _export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str], opset: int
) -> None:
    fused = getattr(module, "attention", "plain") == "fused"
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    module.eval()  # the exporter restores the wrapper's mode recursively afterwards: keep it eval
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                do_constant_folding=True,
                custom_opsets=CONTRIB_OPSET if fused else None,
            )
    except Exception as exc:  # torch.onnx raises many types; keep the first line
        if disk_error_reason(exc) is not None:
            raise  # a full or read-only disk: the atomic export folder names it in one line
        raise ExportError(f"torch.onnx.export failed for {path.name}: {str(exc).splitlines()[0][:300]}") from exc


def _simplify(path: Path) -> str:
    """onnxsim in place; returns a note. A failure keeps the unsimplified graph and says so."""
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(path)))
        if not ok:
            return "onnxsim check failed; kept the unsimplified graph"
        onnx.save(simplified, str(path))
        return "simplified with onnxsim"
    except Exception as exc:  # onnxsim fails in many ways on exotic graphs
        if disk_error_reason(exc) is not None:
            raise  # the graph may be half written: never keep it
        return f"onnxsim failed ({type(exc).__name__}: {str(exc)[:120]}); kept the unsimplified graph"


def _finalize(path: Path, metadata: dict[str, str]) -> None:
    """Clamp the IR version, write metadata_props, and run the full checker."""
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "cfvit-deploy"
    model.producer_version = cfvit_deploy.__version__
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc


def versions() -> dict[str, str]:
    """Versions of the libraries that made (or run) an export."""
    import onnxruntime

    return {
        "cfvit_deploy": cfvit_deploy.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _resolve_model(
    model_or_checkpoint: CFViT | str | Path, num_heads: int | None, weights: str = "auto"
) -> tuple[CFViT, dict[str, Any]]:
    if isinstance(model_or_checkpoint, CFViT):
        model = model_or_checkpoint
        source: dict[str, Any] = dict(getattr(model, "metadata", {}) or {})
        path = getattr(model, "source_path", None)
    else:
        model = load_checkpoint(model_or_checkpoint, num_heads=num_heads, weights=weights)
        source = dict(model.metadata)  # type: ignore[attr-defined]
        path = model.source_path  # type: ignore[attr-defined]
    info: dict[str, Any] = {"class_names": source.get("class_names")}
    if path:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else None
        info["checkpoint"] = {"path": str(path), "sha256": digest}
        if "weights_key" in source:  # which state_dict of the file: model, state_dict, state_dict_ema, ...
            info["checkpoint"]["weights"] = source["weights_key"]
    return model.eval(), info


def check_export_args(
    precision: str,
    optimize: bool,
    opset: int,
    default_eta: float,
    num_heads: Any,
    weights: str = "auto",
    attention: str | None = None,
    calibration: str | Path | None = None,
) -> str:
    """Every flag check of :func:`export`, cheap and before any work (the CLI runs it first).

    Returns the attention mode to export (`attention`, or the default when None).
    """
    check_choice(precision, PRECISIONS, "--precision")
    if precision == "fp16" and optimize:
        raise UsageError(
            "fp16 cannot be combined with --optimize: ORT's float16 converter breaks the fused graph (SSA error); "
            "export fp16 and optimized separately"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 21:
        raise UsageError(f"opset {opset} is not supported; use 13..21 (default {DEFAULT_OPSET})")
    check_eta(default_eta, "--eta")
    if num_heads is not None:
        check_positive_int(num_heads, "--num-heads")  # 0 must not mean "default"
    check_choice(weights, WEIGHTS, "--weights")
    if calibration is not None:
        if precision != "int8":
            raise UsageError(f"--calibration is for --precision int8 (static quantization), not {precision}")
        list_images(calibration, "--calibration")
    return check_choice(attention or DEFAULT_ATTENTION, ATTENTION_MODES, "--attention")


def export(
    model_or_checkpoint: CFViT | str | Path,
    out_dir: str | Path,
    *,
    num_heads: int | None = None,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    optimize: bool = False,
    baseline: bool = False,
    simplify: bool = True,
    default_eta: float = 0.7,
    attention: str | None = None,
    calibration: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    weights: str = "auto",
) -> Manifest:
    """Export a CF-ViT (model or checkpoint path) to an export folder; returns its manifest.

    `attention="fused"` exports each block's attention as one ONNX Runtime ``MultiHeadAttention`` contrib
    node (see :mod:`exporters.attention`; OpenVINO reads it too); "plain" keeps the explicit
    MatMul/Softmax chain; None means :data:`~exporters.attention.DEFAULT_ATTENTION`. `calibration` (an
    image folder, int8 only) makes int8 static (calibrated QDQ with per-channel weights) instead of dynamic.

    The folder is built in a temporary directory and renamed into place; an existing folder is
    replaced only with `force`. `weights` picks the trained or EMA weights of a checkpoint that holds
    both (see :func:`cfvit_deploy.checkpoints.load_checkpoint`); the manifest's source records which.
    """
    attention = check_export_args(precision, optimize, opset, default_eta, num_heads, weights, attention, calibration)
    say = progress or (lambda msg: log.info(msg))
    model, info = _resolve_model(model_or_checkpoint, num_heads, weights)
    cfg = model.config
    calib = calibration_for(precision, calibration, PreprocessConfig.for_model(cfg))
    class_names = info.pop("class_names")
    if class_names is not None and len(class_names) != cfg.num_classes:
        class_names = None
    wrappers, gmacs = _graph_wrappers(model, attention, baseline)
    notes: dict[str, str] = {}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force) as tmp:
        graphs: dict[str, GraphSpec] = {}
        for name, wrapper in wrappers.items():
            graphs[name], notes[name] = _write_graph(
                tmp,
                name,
                wrapper,
                model,
                opset=opset,
                attention=attention,
                precision=precision,
                optimize=optimize,
                simplify=simplify,
                calibration=calib,
                say=say,
            )
        quantization, calib_info = quantization_info(precision, calib)
        manifest = Manifest(
            model=cfg,
            preprocessing=PreprocessConfig.for_model(cfg),
            graphs=graphs,
            gmacs=gmacs,
            precision=precision,
            optimized=optimize,
            attention=attention,
            quantization=quantization,
            calibration=calib_info,
            opset=opset,
            default_eta=default_eta,
            class_names=class_names,
            versions=versions(),
            source={**info, "notes": notes},
        )
        manifest.save(tmp)
    manifest.directory = out_dir
    return manifest


_Wrapper = tuple[nn.Module, list[str], list[str]]  # the graph's module, input names, output names


def _graph_wrappers(model: CFViT, attention: str, baseline: bool) -> tuple[dict[str, _Wrapper], dict[str, float]]:
    """The graphs to export (coarse, fine, and the plain-ViT baseline if asked) and their GMACs per image."""
    cfg = model.config
    gm = stage_gmacs(cfg)
    gmacs = {"coarse": gm.coarse, "fine": gm.fine}
    wrappers: dict[str, _Wrapper] = {
        "coarse": (CoarseGraph(model, attention), COARSE_INPUTS, COARSE_OUTPUTS),
        "fine": (FineGraph(model, attention), FINE_INPUTS, FINE_OUTPUTS),
    }
    if baseline:
        wrappers["baseline"] = (BaselineGraph(model, attention), BASELINE_INPUTS, BASELINE_OUTPUTS)
        gmacs["baseline"] = baseline_gmacs(cfg)
    return wrappers, gmacs


def _graph_metadata(cfg: ModelConfig, name: str, precision: str, optimize: bool, attention: str) -> dict[str, str]:
    """The ``cfvit.*`` metadata_props every exported graph carries."""
    return {
        "cfvit.graph": name,
        "cfvit.arch": cfg.arch,
        "cfvit.coarse_grid": str(cfg.coarse_grid),
        "cfvit.k": str(cfg.k),
        "cfvit.image_size": str(cfg.fine_image_size),
        "cfvit.num_classes": str(cfg.num_classes),
        "cfvit.precision": precision,
        "cfvit.optimized": str(optimize),
        "cfvit.attention": attention,
        "cfvit.model_config": json.dumps(cfg.to_dict()),
        "cfvit.version": cfvit_deploy.__version__,
    }


def _write_graph(
    tmp: Path,
    name: str,
    wrapper: _Wrapper,
    model: CFViT,
    *,
    opset: int,
    attention: str,
    precision: str,
    optimize: bool,
    simplify: bool,
    calibration: Any,
    say: Callable[[str], None],
) -> tuple[GraphSpec, str]:
    """Trace, simplify, build the precision variant of and finalize ``tmp/<name>.onnx``; its spec and notes."""
    module, inputs, outputs = wrapper
    cfg = model.config
    path = tmp / f"{name}.onnx"
    say(f"exporting {name}.onnx (opset {opset}, {attention} attention, traced at batch {TRACE_BATCH})")
    _export_graph(module, _trace_inputs(model, name), path, inputs, outputs, opset)
    note = _simplify(path) if simplify else "not simplified (--no-simplify)"
    if precision != "fp32" or optimize:
        say(f"building the {precision}{' optimized' if optimize else ''} variant of {name}.onnx")
        note += "; " + apply_variant(path, cfg, precision=precision, optimize=optimize, calibration=calibration)
    _finalize(path, _graph_metadata(cfg, name, precision, optimize, attention))
    spec = GraphSpec(
        file=path.name,
        sha256=sha256_file(path),
        inputs=_specs(model, name, inputs),
        outputs=_specs(model, name, outputs),
    )
    return spec, note
