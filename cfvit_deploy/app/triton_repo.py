"""A Triton Inference Server model repository for an export's ``single.onnx`` (the twin of ``cfvit triton-repo``).

Layout (Triton's onnxruntime backend)::

    REPO/cfvit/config.pbtxt     inputs, outputs, dynamic batching, instance group, parameters
    REPO/cfvit/labels.txt       the manifest's class names, one per line (label_filename of "logits")
    REPO/cfvit/1/model.onnx     single.onnx (byte for byte; its sha256 is in the config's parameters)

Triton's dynamic batching stacks requests along the first axis, so every input carries it: ``images``
([3, S, S] per request) and ``eta`` (one float per image; a per-image scalar is ``dims: [1]`` with
``reshape: { shape: [] }``, Triton's documented form for an input that is [N] in the model). The
graph has no default for ``eta``: clients send it (the export's default η is recorded in the
config's ``parameters`` as ``default_eta``). See docs/triton.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cfvit_deploy.checks import check_positive_int
from cfvit_deploy.errors import UsageError
from cfvit_deploy.io import atomic_directory
from cfvit_deploy.manifest import Manifest, TensorSpec

#: manifest dtype -> Triton model-config DataType
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class TritonOptions:
    """What ``cfvit triton-repo`` takes besides the export folder and the repository."""

    model_name: str = "cfvit"
    max_batch_size: int = 32
    instances: int = 1
    max_queue_delay_us: int = 5000  #: longest a request waits for others to batch with

    def check(self) -> TritonOptions:
        check_positive_int(self.max_batch_size, "--max-batch-size")
        check_positive_int(self.instances, "--instances")
        if isinstance(self.max_queue_delay_us, bool) or not isinstance(self.max_queue_delay_us, int):
            raise UsageError(f"--max-queue-delay-us must be an integer, got {self.max_queue_delay_us!r}")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        name = self.model_name
        if not name or name in (".", "..") or Path(name).name != name or not name.isprintable():
            raise UsageError(f"--model-name {name!r} must be a plain folder name")
        return self


def _tensor(spec: TensorSpec, kind: str, labels: bool = False) -> str:
    """One input/output entry: the per-request dims (the batch axis is Triton's), scalars reshaped."""
    if spec.dtype not in TRITON_TYPES or not spec.shape or spec.shape[0] != "batch":
        raise UsageError(f"{kind} {spec.name}: cannot express {spec.dtype} {spec.shape} for Triton")
    dims = [d for d in spec.shape[1:]]
    if any(not isinstance(d, int) for d in dims):
        raise UsageError(f"{kind} {spec.name}: only the batch axis may be dynamic, got {spec.shape}")
    lines = [f'    name: "{spec.name}"', f"    data_type: {TRITON_TYPES[spec.dtype]}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # [batch] in the model: one value per request
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if labels:
        lines.append(f'    label_filename: "{LABELS_FILE}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def _quoted(value: str) -> str:
    """A protobuf text-format string literal (C escapes; control characters as octal)."""
    body = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\{ord(c) & 0xFF:03o}" for c in body) + '"'


def _parameter(key: str, value: str) -> str:
    return f"parameters {{\n  key: {_quoted(key)}\n  value: {{ string_value: {_quoted(value)} }}\n}}"


def config_text(manifest: Manifest, options: TritonOptions) -> str:
    """The config.pbtxt of the single graph of `manifest` (protobuf text format)."""
    spec = manifest.graphs["single"]
    inputs = ",\n".join(_tensor(t, "input") for t in spec.inputs)
    outputs = ",\n".join(_tensor(t, "output", labels=t.name == "logits") for t in spec.outputs)
    params = {
        "default_eta": f"{manifest.default_eta:g}",
        "cfvit.precision": manifest.precision,
        "cfvit.image_size": str(manifest.image_size),
        "cfvit.preprocessing": json.dumps(manifest.preprocessing.to_dict(), sort_keys=True),
        "cfvit.single_onnx_sha256": spec.sha256,
    }
    return "\n".join(
        [
            f'name: "{options.model_name}"',
            'backend: "onnxruntime"',
            f"max_batch_size: {options.max_batch_size}",
            f"input [\n{inputs}\n]",
            f"output [\n{outputs}\n]",
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}",
            f"instance_group [\n  {{\n    count: {options.instances}\n    kind: KIND_AUTO\n  }}\n]",
            *(_parameter(k, v) for k, v in params.items()),
            "",
        ]
    )


def write_triton_repo(
    export_dir: str | Path, out: str | Path, options: TritonOptions | None = None, force: bool = False
) -> Path:
    """Write the model repository `out` for `export_dir`'s single.onnx; returns the model folder.

    The repository is built beside `out` and renamed into place (an existing `out` only with `force`).
    """
    options = (options or TritonOptions()).check()
    manifest = Manifest.load(export_dir)
    if "single" not in manifest.graphs:
        raise UsageError(f"{export_dir} has no single.onnx: re-export with `cfvit export --single-graph`")
    text = config_text(manifest, options)
    with atomic_directory(Path(out), force=force) as tmp:
        model_dir = tmp / options.model_name
        (model_dir / "1").mkdir(parents=True)
        shutil.copyfile(manifest.graph_path("single"), model_dir / "1" / MODEL_FILE)
        (model_dir / "config.pbtxt").write_text(text)
        labels = (" ".join(label.splitlines()) for label in manifest.labels())  # one line per class
        (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    return Path(out) / options.model_name
