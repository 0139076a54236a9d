"""Manifest loading on bad input: from_dict raises only ManifestError; load names each problem."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfvit_deploy.config import ModelConfig
from cfvit_deploy.errors import CFViTError, ManifestError
from cfvit_deploy.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    GraphSpec,
    Manifest,
    TensorSpec,
    sha256_file,
)
from cfvit_deploy.preprocessing import PreprocessConfig

CFG = ModelConfig.named("deit", "micro", num_classes=4)


def fake_graph(name: str, sha256: str = "0" * 64) -> GraphSpec:
    images = TensorSpec("images", "float32", ["batch", 3, 224, 224], "images")
    logits = TensorSpec(f"{name}_logits", "float32", ["batch", CFG.num_classes])
    return GraphSpec(file=f"{name}.onnx", sha256=sha256, inputs=[images], outputs=[logits])


def make_manifest(graphs: dict[str, GraphSpec] | None = None) -> Manifest:
    return Manifest(
        model=CFG,
        preprocessing=PreprocessConfig.for_model(CFG),
        graphs=graphs or {n: fake_graph(n) for n in ("coarse", "fine")},
        gmacs={"coarse": 0.05, "fine": 0.2},
        class_names=["cat", "dog", "émeu", "a b"],
        versions={"torch": "2.x"},
        source={"checkpoint": {"path": "x.pth"}},
    )


def write_export(directory: Path, tag: str = "a", names: tuple[str, ...] = ("coarse", "fine")) -> Manifest:
    """A complete export folder with dummy graph files and their real checksums."""
    directory.mkdir(parents=True)
    graphs = {}
    for name in names:
        path = directory / f"{name}.onnx"
        path.write_bytes(f"dummy {name} graph of export {tag}".encode())
        graphs[name] = fake_graph(name, sha256_file(path))
    manifest = make_manifest(graphs)
    manifest.save(directory)
    return manifest


VALID = json.loads(json.dumps(make_manifest().to_dict()))


def parse(data: Any) -> Manifest | None:
    """from_dict must either return a consistent manifest or raise ManifestError, nothing else."""
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as exc:
        assert str(exc) and isinstance(exc, CFViTError) and exc.exit_code == 1
        return None
    assert {"coarse", "fine"} <= set(manifest.graphs)
    assert manifest.precision in PRECISIONS and 0 <= manifest.default_eta <= 1
    assert manifest.preprocessing.crop_size == manifest.image_size
    for spec in manifest.graphs.values():
        assert isinstance(spec.file, str) and "/" not in spec.file and len(spec.sha256) == 64
    return manifest


# -- the valid manifest -------------------------------------------------------------------------------
def test_valid_round_trip(tmp_path):
    manifest = make_manifest()
    assert VALID["format_version"] == FORMAT_VERSION
    assert Manifest.from_dict(VALID) == manifest
    saved = write_export(tmp_path / "exp")
    loaded = Manifest.load(tmp_path / "exp")
    assert loaded == saved and loaded.directory == tmp_path / "exp"
    assert loaded.graph_path("fine") == tmp_path / "exp" / "fine.onnx"
    assert loaded.labels() == ["cat", "dog", "émeu", "a b"]


# -- fuzz: random JSON and mutated valid manifests ---------------------------------------------------
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "fp16", "bicubic", "deit", "../x.onnx", "/etc/passwd", "%s", "%c", "0" * 64])
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a JSON value (including the root)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, prefix + (i,))
    return out


@st.composite
def mutated_manifests(draw) -> Any:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        targets = paths(data)
        path = draw(st.sampled_from(targets))
        if not path:
            return draw(JSON)  # replace the whole document
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent[path[-1]] = draw(JSON)
    return data


@settings(max_examples=250, deadline=None)
@given(data=JSON)
def test_random_json_raises_only_manifest_error(data):
    parse(data)


@settings(max_examples=250, deadline=None)
@given(data=st.fixed_dictionaries({}, optional={k: JSON for k in VALID}))
def test_random_values_under_the_real_keys_raise_only_manifest_error(data):
    parse({"format_version": FORMAT_VERSION, **data})


@settings(max_examples=400, deadline=None)
@given(data=mutated_manifests())
def test_mutated_manifest_raises_only_manifest_error(data):
    parse(data)


# -- specific bad values (each was accepted or escaped as another exception) ---------------------------
def mutate(path: tuple, value: Any = None, delete: bool = False) -> dict:
    data = copy.deepcopy(VALID)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path, value, reason",
    [
        (("format_version",), 2, "this export has format_version 2; this cfvit-deploy reads up to 1: upgrade"),
        (("format_version",), "1", 'format_version must be a JSON integer such as 1, got "1" (str)'),
        (("format_version",), True, "format_version must be a JSON integer such as 1, got true (bool)"),
        (("format_version",), None, "format_version must be a JSON integer such as 1, got null (NoneType)"),
        (("model", "num_heads"), 0, "num_heads must be a positive integer"),
        (("model", "embed_dim"), "%c", "model.embed_dim must be int"),
        (("model", "coarse_grid"), 7.5, "model.coarse_grid must be int"),
        (("model", "mlp_ratio"), math.nan, "model.mlp_ratio must be float"),
        (("model", "qkv_bias"), "yes", "model.qkv_bias must be bool"),
        (("model", "arch"), "resnet", "unknown arch"),
        (("model", "colour"), "red", "unknown model config keys: colour"),
        (("model",), [], "model must be an object"),
        (("preprocessing", "crop_size"), 100, "crop_size 100 differs from the model's image size 224"),
        (("preprocessing", "crop_size"), -224, "crop_size must be a positive integer"),
        (("preprocessing", "resize_size"), 200, "smaller than crop_size"),
        (("preprocessing", "std"), [0, 0.2, 0.2], "std must be positive"),
        (("preprocessing", "mean"), [0.5], "mean must be three finite numbers"),
        (("preprocessing", "interpolation"), "nearest", "unknown interpolation 'nearest'"),
        (("graphs",), [], "graphs must be an object"),
        (("graphs", "fine", "file"), "/etc/passwd", "fine graph file '/etc/passwd' must be a plain file name"),
        (("graphs", "fine", "file"), "../other/fine.onnx", "must be a plain file name inside the export folder"),
        (("graphs", "fine", "file"), "..", "must be a plain file name"),
        (("graphs", "coarse", "file"), 3, "coarse graph file 3 must be a plain file name"),
        (("graphs", "fine", "sha256"), "abc", "fine graph sha256 'abc' is not a hex sha256 digest"),
        (("graphs", "fine", "sha256"), ["0" * 64], "is not a hex sha256 digest"),
        (("graphs", "fine", "inputs"), [{"name": 1, "dtype": "float32", "shape": []}], "malformed tensor spec"),
        (("graphs", "fine", "inputs"), [{"name": "x", "dtype": "float32", "shape": [1.5]}], "malformed tensor spec"),
        (("graphs", "fine", "outputs"), [{"name": "x", "rank": 2}], "TypeError"),
        (("gmacs",), {"fine": 10**400}, "OverflowError"),
        (("gmacs",), [], "gmacs must be an object"),
        (("opset",), math.inf, "opset must be an integer, got inf"),
        (("opset",), "17", "opset must be an integer, got '17'"),
        (("optimized",), "false", "optimized must be true or false, got 'false'"),
        (("precision",), "fp64", "unknown precision 'fp64'"),
        (("default_eta",), 1.5, "default_eta 1.5 outside [0, 1]"),
        (("default_eta",), math.nan, "default_eta nan outside [0, 1]"),
        (("class_names",), "abcd", "class_names must be a list"),
        (("class_names",), ["a", "b"], "class_names length differs from num_classes"),
        (("versions",), ["ab"], "versions and source must be objects"),
        (("source",), "x", "versions and source must be objects"),
    ],
)
def test_bad_value_is_a_manifest_error(path, value, reason):
    with pytest.raises(ManifestError, match=re.escape(reason)):
        Manifest.from_dict(mutate(path, value))


@pytest.mark.parametrize(
    "path, reason",
    [
        (("graphs", "fine"), "no 'fine' graph listed"),
        (("graphs", "coarse"), "no 'coarse' graph listed"),
        (("graphs", "fine", "sha256"), "KeyError: 'sha256'"),
        (("model",), "KeyError: 'model'"),
        (("preprocessing", "mean"), "KeyError: 'mean'"),
        (("gmacs",), "KeyError: 'gmacs'"),
    ],
)
def test_missing_key_is_a_manifest_error(path, reason):
    with pytest.raises(ManifestError, match=re.escape(reason)):
        Manifest.from_dict(mutate(path, delete=True))


@pytest.mark.parametrize("data", [None, [], "manifest", 1, [VALID]])
def test_non_object_document(data):
    with pytest.raises(ManifestError, match="manifest must be a JSON object"):
        Manifest.from_dict(data)


def test_optional_keys_have_defaults():
    data = copy.deepcopy(VALID)
    for key in ("precision", "optimized", "opset", "default_eta", "class_names", "versions", "source"):
        del data[key]
    manifest = Manifest.from_dict(data)
    assert (manifest.precision, manifest.optimized, manifest.opset, manifest.default_eta) == ("fp32", False, 17, 0.7)
    assert manifest.class_names is None and manifest.labels() == [f"class_{i}" for i in range(4)]


# -- Manifest.load on bad folders ---------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(ManifestError, match=r"export folder not found: .*nowhere"):
        Manifest.load(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ManifestError, match="export folder not found"):
        Manifest.load(tmp_path / "file")


def test_folder_without_manifest(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "fine.onnx").write_bytes(b"x")
    with pytest.raises(
        ManifestError, match=r"is not an export folder: manifest\.json is missing \(run `cfvit export`\)"
    ):
        Manifest.load(tmp_path / "exp")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "JSONDecodeError"),
        ("{", "JSONDecodeError"),
        ("{'format_version': 1}", "JSONDecodeError"),
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
        ("1" * 5000, "ValueError"),  # above Python's int-string conversion limit
    ],
)
def test_invalid_json(tmp_path, text, reason):
    write_export(tmp_path / "exp")
    (tmp_path / "exp" / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError, match=rf"manifest\.json is not valid JSON: {reason}"):
        Manifest.load(tmp_path / "exp")


def test_manifest_not_utf8(tmp_path):
    write_export(tmp_path / "exp")
    (tmp_path / "exp" / MANIFEST_NAME).write_bytes(b'{"format_version": 1, "x": "\xff\xfe"}')
    with pytest.raises(ManifestError, match=r"not valid JSON: UnicodeDecodeError"):
        Manifest.load(tmp_path / "exp")


def _load_with_version(tmp_path, version=None, delete=False):
    write_export(tmp_path / "exp")
    path = tmp_path / "exp" / MANIFEST_NAME
    data = json.loads(path.read_text())
    if delete:
        del data["format_version"]
    else:
        data["format_version"] = version
    path.write_text(json.dumps(data))
    return Manifest.load(tmp_path / "exp")


@pytest.mark.parametrize("version", [2, 99])
def test_newer_format_version_says_upgrade(tmp_path, version):
    """The fix for a newer export is a newer cfvit-deploy, not a re-export (issue 13 item 19)."""
    with pytest.raises(
        ManifestError,
        match=rf"^this export has format_version {version}; this cfvit-deploy reads up "
        r"to 1: upgrade cfvit-deploy \(pip install -U cfvit-deploy\)$",
    ):
        _load_with_version(tmp_path, version)


@pytest.mark.parametrize("version", [0, -1])
def test_older_format_version_says_re_export(tmp_path, version):
    with pytest.raises(ManifestError, match=rf"this export has format_version {version}, older than .* re-export it"):
        _load_with_version(tmp_path, version)


def test_missing_format_version_says_it_is_missing(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json has no format_version key") as err:
        _load_with_version(tmp_path, delete=True)
    assert "None" not in str(err.value)


@pytest.mark.parametrize("version, shown", [("1", '"1" (str)'), (1.0, "1.0 (float)"), ("one", '"one" (str)')])
def test_integer_valued_non_integers_are_refused_alike(tmp_path, version, shown):
    """ "1" and 1.0 get the same answer (before: 1.0 was accepted and "1" refused)."""
    with pytest.raises(ManifestError, match=re.escape(f"format_version must be a JSON integer such as 1, got {shown}")):
        _load_with_version(tmp_path, version)


@pytest.mark.parametrize("name", ["coarse", "fine"])
def test_missing_graph_file(tmp_path, name):
    write_export(tmp_path / "exp")
    (tmp_path / "exp" / f"{name}.onnx").unlink()
    with pytest.raises(ManifestError, match=rf"export is incomplete: {name} graph .*{name}\.onnx is missing"):
        Manifest.load(tmp_path / "exp")
    assert Manifest.load(tmp_path / "exp", verify=False).graphs[name].file == f"{name}.onnx"


def test_graph_file_replaced_by_a_directory(tmp_path):
    write_export(tmp_path / "exp")
    (tmp_path / "exp" / "fine.onnx").unlink()
    (tmp_path / "exp" / "fine.onnx").mkdir()
    with pytest.raises(ManifestError, match=r"fine graph .* is missing"):
        Manifest.load(tmp_path / "exp")


def test_checksum_mismatch(tmp_path):
    saved = write_export(tmp_path / "exp")
    with open(tmp_path / "exp" / "fine.onnx", "ab") as f:
        f.write(b"tampered")
    expected = saved.graphs["fine"].sha256[:12]
    with pytest.raises(ManifestError, match=rf"checksum mismatch for fine\.onnx: manifest says {expected}…"):
        Manifest.load(tmp_path / "exp")
    assert Manifest.load(tmp_path / "exp", verify=False).graphs["fine"].sha256 == saved.graphs["fine"].sha256


def test_graphs_mixed_from_two_exports(tmp_path):
    write_export(tmp_path / "a", tag="a")
    write_export(tmp_path / "b", tag="b")
    Manifest.load(tmp_path / "a")
    shutil.copyfile(tmp_path / "b" / "fine.onnx", tmp_path / "a" / "fine.onnx")
    with pytest.raises(ManifestError, match=r"checksum mismatch for fine\.onnx: .*comes from another export"):
        Manifest.load(tmp_path / "a")
    # and the other way round: b's manifest with a's graphs
    shutil.copyfile(tmp_path / "a" / MANIFEST_NAME, tmp_path / "b" / MANIFEST_NAME)
    with pytest.raises(ManifestError, match=r"checksum mismatch for coarse\.onnx"):
        Manifest.load(tmp_path / "b")


def test_optional_baseline_graph_is_verified_too(tmp_path):
    write_export(tmp_path / "exp", names=("coarse", "fine", "baseline"))
    assert set(Manifest.load(tmp_path / "exp").graphs) == {"coarse", "fine", "baseline"}
    (tmp_path / "exp" / "baseline.onnx").write_bytes(b"other")
    with pytest.raises(ManifestError, match=r"checksum mismatch for baseline\.onnx"):
        Manifest.load(tmp_path / "exp")


def test_graph_path_errors(tmp_path):
    manifest = Manifest.from_dict(VALID)
    with pytest.raises(ManifestError, match="not loaded from a folder"):
        manifest.graph_path("fine")
    write_export(tmp_path / "exp")
    loaded = Manifest.load(tmp_path / "exp")
    with pytest.raises(ManifestError, match=r"export has no 'baseline' graph \(graphs: coarse, fine\)"):
        loaded.graph_path("baseline")
