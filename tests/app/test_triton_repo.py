"""`cfvit triton-repo`: the model repository, parsed with Triton's own model-config schema."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import cli
from cfvit_deploy.app.triton_repo import TritonOptions, write_triton_repo
from cfvit_deploy.errors import OutputExistsError, UsageError
from cfvit_deploy.manifest import Manifest, sha256_file

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

#: ONNX element type -> Triton DataType name
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7", single_graph=True)


def _config(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _check_against_onnx(entries, values) -> None:
    """Each config entry has the ONNX tensor's name and type, and its shape without the batch axis."""
    assert [e.name for e in entries] == [v.name for v in values]
    for entry, value in zip(entries, values, strict=True):
        tensor = value.type.tensor_type
        assert model_config_pb2.DataType.Name(entry.data_type) == ONNX_TO_TRITON[tensor.elem_type], entry.name
        dims = [d.dim_value for d in tensor.shape.dim]
        assert tensor.shape.dim[0].dim_param == "batch"  # Triton's batch axis
        per_request = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        assert per_request == dims[1:], entry.name
        if not dims[1:]:
            assert list(entry.dims) == [1]  # a per-image scalar is sent as [1] and reshaped to []


def test_repository_matches_the_onnx_model_and_triton_schema(export_dir, tmp_path):
    options = TritonOptions(max_batch_size=16, instances=2)
    model_dir = write_triton_repo(export_dir, tmp_path / "repo", options)
    manifest = Manifest.load(export_dir)
    assert model_dir == tmp_path / "repo" / "cfvit"
    onnx_path = model_dir / "1" / "model.onnx"
    assert sha256_file(onnx_path) == manifest.graphs["single"].sha256
    config = _config(model_dir)
    assert config.name == "cfvit" and config.backend == "onnxruntime"
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (2, "KIND_AUTO")
    ]
    graph = onnx.load(str(onnx_path)).graph
    _check_against_onnx(config.input, graph.input)
    _check_against_onnx(config.output, graph.output)
    assert float(config.parameters["default_eta"].string_value) == pytest.approx(manifest.default_eta)
    labels = [o.label_filename for o in config.output if o.label_filename]
    assert labels == ["labels.txt"]
    assert (model_dir / "labels.txt").read_text().splitlines() == manifest.labels()


def test_no_clobber_force_and_errors(export_dir, export_dir_factory, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli.main(["triton-repo", str(export_dir), "--out", str(repo), "--instances", "3"]) == 0
    assert _config(repo / "cfvit").instance_group[0].count == 3
    with pytest.raises(OutputExistsError):
        write_triton_repo(export_dir, repo)
    assert cli.main(["triton-repo", str(export_dir), "--out", str(repo), "--max-batch-size", "8", "--force"]) == 0
    assert _config(repo / "cfvit").max_batch_size == 8
    with pytest.raises(UsageError, match="--single-graph"):
        write_triton_repo(export_dir_factory("deit_g7"), tmp_path / "other")
    assert not (tmp_path / "other").exists()
    capsys.readouterr()
    assert cli.main(["triton-repo", str(export_dir), "--out", str(tmp_path / "x"), "--instances", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--instances" in err[0]
    with pytest.raises(UsageError, match="--model-name"):
        write_triton_repo(export_dir, tmp_path / "y", TritonOptions(model_name="../up"))
