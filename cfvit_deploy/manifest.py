"""The export manifest: the one contract between `exporters/` and `runtimes/` (torch-free).

An export folder holds ``coarse.onnx``, ``fine.onnx`` (optionally ``baseline.onnx``) and
``manifest.json``. Runtimes read only this file and the graphs it names; loading verifies the
format version, that every graph exists and that its sha256 matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ManifestError
from .preprocessing import PreprocessConfig

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
#: The oldest manifest format this release still reads.
MIN_FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
#: How the graphs compute attention: one contrib MultiHeadAttention node per block, or explicit ops.
ATTENTION_KINDS = ("fused", "plain")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and symbolic shape ("batch" is dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]
    doc: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the export."""

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Manifest:
    """Everything a runtime needs to know about an export."""

    model: ModelConfig
    preprocessing: PreprocessConfig
    graphs: dict[str, GraphSpec]
    gmacs: dict[str, float]
    precision: str = "fp32"
    optimized: bool = False
    attention: str = "plain"  #: "fused" | "plain" (manifests written before the field existed: plain)
    quantization: str | None = None  #: int8 only: "dynamic" | "static"
    calibration: dict[str, Any] | None = None  #: static int8: calibration folder, image count, method
    opset: int = 17
    default_eta: float = 0.7
    class_names: list[str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: Set by :meth:`load`: the folder the manifest was read from (not serialised).
    directory: Path | None = field(default=None, compare=False)

    # -- derived --------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.model.fine_image_size

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def labels(self) -> list[str]:
        """Class names, or "class_<i>" where none were recorded."""
        return list(self.class_names) if self.class_names else [f"class_{i}" for i in range(self.num_classes)]

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise ManifestError(f"export has no {name!r} graph (graphs: {', '.join(self.graphs)})")
        if self.directory is None:
            raise ManifestError("manifest was not loaded from a folder; graph paths are unknown")
        return self.directory / self.graphs[name].file

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        d["model"] = self.model.to_dict()
        d["preprocessing"] = self.preprocessing.to_dict()
        d["image_sizes"] = {"fine": self.model.fine_image_size, "coarse": self.model.coarse_image_size}
        d["derived"] = {"k": self.model.k, "fine_seq_len": self.model.fine_seq_len, "num_coarse": self.model.num_coarse}
        return {"format_version": d.pop("format_version"), **d}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest dict; any problem is a :class:`ManifestError`."""
        if not isinstance(data, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(data).__name__}")
        _check_format_version(data)
        try:
            _expect(isinstance(data["graphs"], dict), "graphs must be an object")
            _expect(isinstance(data["gmacs"], dict), "gmacs must be an object")
            optimized, opset = data.get("optimized", False), data.get("opset", 17)
            _expect(isinstance(optimized, bool), f"optimized must be true or false, got {optimized!r}")
            _expect(_is_int(opset), f"opset must be an integer, got {opset!r}")
            class_names = data.get("class_names")
            _expect(class_names is None or isinstance(class_names, list), "class_names must be a list")
            versions, source = data.get("versions", {}), data.get("source", {})
            _expect(isinstance(versions, dict) and isinstance(source, dict), "versions and source must be objects")
            manifest = cls(
                model=_model_config(data["model"]),
                preprocessing=PreprocessConfig.from_dict(data["preprocessing"]),
                graphs={name: _graph_spec(name, g) for name, g in data["graphs"].items()},
                gmacs={str(k): float(v) for k, v in data["gmacs"].items()},
                precision=str(data.get("precision", "fp32")),
                optimized=optimized,
                attention=str(data.get("attention", "plain")),
                quantization=None if data.get("quantization") is None else str(data["quantization"]),
                calibration=None if data.get("calibration") is None else dict(data["calibration"]),
                opset=opset,
                default_eta=float(data.get("default_eta", 0.7)),
                class_names=None if class_names is None else [str(c) for c in class_names],
                versions={str(k): str(v) for k, v in versions.items()},
                source=dict(source),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            raise ManifestError(f"invalid manifest: {type(exc).__name__}: {exc}") from None
        for name in ("coarse", "fine"):
            if name not in manifest.graphs:
                raise ManifestError(f"invalid manifest: no {name!r} graph listed")
        if manifest.precision not in PRECISIONS:
            raise ManifestError(f"invalid manifest: unknown precision {manifest.precision!r}")
        if manifest.quantization not in (None, "dynamic", "static"):
            raise ManifestError(f"invalid manifest: unknown quantization {manifest.quantization!r}")
        if manifest.attention not in ATTENTION_KINDS:
            raise ManifestError(f"invalid manifest: unknown attention {manifest.attention!r}")
        if not (0.0 <= manifest.default_eta <= 1.0) or math.isnan(manifest.default_eta):
            raise ManifestError(f"invalid manifest: default_eta {manifest.default_eta} outside [0, 1]")
        if manifest.class_names is not None and len(manifest.class_names) != manifest.num_classes:
            raise ManifestError("invalid manifest: class_names length differs from num_classes")
        if manifest.preprocessing.crop_size != manifest.image_size:
            raise ManifestError(
                f"invalid manifest: preprocessing crop_size {manifest.preprocessing.crop_size} differs from "
                f"the model's image size {manifest.image_size}"
            )
        return manifest

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> Manifest:
        """Read ``DIR/manifest.json``; with `verify`, check every graph file and its sha256."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ManifestError(f"export folder not found: {directory}")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{directory} is not an export folder: {MANIFEST_NAME} is missing (run `cfvit export`)")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
            raise ManifestError(f"{path} is not valid JSON: {type(exc).__name__}: {exc}") from None
        manifest = cls.from_dict(data)
        manifest.directory = directory
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        """Every graph exists and matches its recorded sha256 (tampering or mixed exports fail)."""
        for name, spec in self.graphs.items():
            path = self.graph_path(name)
            if not path.is_file():
                raise ManifestError(f"export is incomplete: {name} graph {path} is missing")
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise ManifestError(f"cannot read {name} graph {path}: {exc.strerror or exc}") from None
            if digest != spec.sha256:
                raise ManifestError(
                    f"checksum mismatch for {path.name}: manifest says {spec.sha256[:12]}…, file is {digest[:12]}… "
                    "(the graph was modified or comes from another export)"
                )


def _check_format_version(data: dict[str, Any]) -> None:
    """The manifest's format_version must be an integer this release reads; say what to do otherwise.

    Like every integer of the manifest it must be a JSON integer: "1" (a string) and 1.0 are refused alike.
    """
    reads = f"this cfvit-deploy reads format_version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}"
    if "format_version" not in data:
        raise ManifestError(
            f"manifest.json has no format_version key ({reads}); it was not written by "
            "`cfvit export`, or was edited: re-export it"
        )
    version = data["format_version"]
    if not _is_int(version):
        raise ManifestError(
            f"manifest format_version must be a JSON integer such as {FORMAT_VERSION}, got "
            f"{json.dumps(version)} ({type(version).__name__}); {reads}"
        )
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"this export has format_version {version}; this cfvit-deploy reads up to "
            f"{FORMAT_VERSION}: upgrade cfvit-deploy (pip install -U cfvit-deploy)"
        )
    if version < MIN_FORMAT_VERSION:
        raise ManifestError(
            f"this export has format_version {version}, older than any this cfvit-deploy reads "
            f"({MIN_FORMAT_VERSION} to {FORMAT_VERSION}): re-export it with `cfvit export`"
        )


def _expect(ok: bool, problem: str) -> None:
    if not ok:
        raise ManifestError(f"invalid manifest: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: JSON type checks for ModelConfig fields, by annotation (ModelConfig itself does arithmetic on them).
_FIELD_CHECKS = {
    "int": _is_int,
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def _model_config(data: Any) -> ModelConfig:
    _expect(isinstance(data, dict), "model must be an object")
    for f in fields(ModelConfig):
        check = _FIELD_CHECKS.get(str(f.type))
        if f.name in data and check is not None and not check(data[f.name]):
            raise ManifestError(f"invalid manifest: model.{f.name} must be {f.type}, got {data[f.name]!r}")
    return ModelConfig.from_dict(data)


def _tensor_spec(graph: str, data: Any) -> TensorSpec:
    spec = TensorSpec(**data)
    _expect(
        isinstance(spec.name, str)
        and isinstance(spec.dtype, str)
        and isinstance(spec.doc, str)
        and isinstance(spec.shape, list)
        and all(isinstance(d, str) or _is_int(d) for d in spec.shape),
        f"{graph} graph: malformed tensor spec {data!r}",
    )
    return spec


def _graph_spec(name: str, data: Any) -> GraphSpec:
    file, sha256 = data["file"], data["sha256"]
    _expect(
        isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file,
        f"{name} graph file {file!r} must be a plain file name inside the export folder",
    )
    _expect(
        isinstance(sha256, str) and re.fullmatch("[0-9a-f]{64}", sha256) is not None,
        f"{name} graph sha256 {sha256!r} is not a hex sha256 digest",
    )
    return GraphSpec(
        file=file,
        sha256=sha256,
        inputs=[_tensor_spec(name, t) for t in data["inputs"]],
        outputs=[_tensor_spec(name, t) for t in data["outputs"]],
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_identity(manifest: Manifest, *, with_directory: bool = True) -> dict[str, Any]:
    """What identifies an export, the same for every consumer (``cfvit infer``'s summary JSON, the
    server's answers): the sha256 of its manifest.json (which records every graph's sha256; None for
    a manifest never saved), the architecture, precision, whether optimized, the coarse and fine
    graphs' sha256, and its folder. `with_directory=False` leaves the folder out: a server tells its
    clients which model answered, not where it keeps its files."""
    folder = manifest.directory
    manifest_file = None if folder is None else folder / MANIFEST_NAME
    identity: dict[str, Any] = {
        "manifest_sha256": sha256_file(manifest_file) if manifest_file and manifest_file.is_file() else None,
        "arch": manifest.model.arch,
        "precision": manifest.precision,
        "optimized": manifest.optimized,
        "graphs": {name: spec.sha256 for name, spec in manifest.graphs.items() if name in ("coarse", "fine")},
    }
    if with_directory:
        identity["directory"] = None if folder is None else str(folder.absolute())
    return identity


#: Graph interface (names are also recorded per graph in the manifest; runtimes read them from there).
#: The fine graph's inputs other than ``images`` are coarse outputs of the same name.
GRAPH_IO_DOC: dict[str, dict[str, str]] = {
    "coarse": {
        "images": "(batch, 3, 32g, 32g) float32 ImageNet-normalized images; resized to 16g inside the graph",
        "coarse_logits": "(batch, classes) float32 coarse-stage logits; the gate uses max softmax of these",
        "global_attention": "(batch, g*g) float32 EMA class attention (blocks 3..last), selects the patches",
        "reuse_tokens": "(batch, g*g, C) float32 final-normed coarse patch tokens; the fine graph feeds them "
        "through the reuse block (so exiting images do not pay for it)",
        "coarse_embedding": "(batch, g*g, C) float32 coarse input tokens (patch embedding + coarse position "
        "embedding); the uninformative patches enter the fine stage as these",
    },
    "fine": {
        "images": "(batch, 3, 32g, 32g) float32, the same images (only those that did not exit)",
        "global_attention": "from coarse.onnx",
        "reuse_tokens": "from coarse.onnx",
        "coarse_embedding": "from coarse.onnx",
        "fine_logits": "(batch, classes) float32 fine-stage logits",
        "informative_idx": "(batch, k) int64 coarse patches refined at fine resolution, descending score",
    },
    "baseline": {
        "images": "(batch, 3, 32g, 32g) float32",
        "logits": "(batch, classes) float32 plain ViT on all (2g)^2 fine patches (same weights, no reuse)",
    },
}
