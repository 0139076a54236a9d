"""Export verification on small folders (no model): every message of Manifest.load/verify/graph_path
and the checksum itself, so that a verification that passes wrongly, or says the wrong thing, fails."""

from __future__ import annotations

import hashlib
import json

import pytest

from cfvit_deploy.errors import ManifestError
from cfvit_deploy.manifest import FORMAT_VERSION, MIN_FORMAT_VERSION, Manifest, check_format_version, sha256_file
from tests.cfvit_deploy.test_manifest_fuzz import VALID, make_manifest, write_export


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: three 1 MiB reads
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_a_modified_graph_fails_with_both_checksums(tmp_path):
    manifest = write_export(tmp_path / "exp")
    Manifest.load(tmp_path / "exp")  # intact: loads
    (tmp_path / "exp" / "fine.onnx").write_bytes(b"another graph")
    want, have = manifest.graphs["fine"].sha256, hashlib.sha256(b"another graph").hexdigest()
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "exp")
    assert str(caught.value) == (
        f"checksum mismatch for fine.onnx: manifest says {want[:12]}…, file is {have[:12]}… "
        "(the graph was modified or comes from another export)"
    )
    assert Manifest.load(tmp_path / "exp", verify=False).graphs["fine"].sha256 == want  # verify=False skips it


def test_a_missing_graph_is_named(tmp_path):
    write_export(tmp_path / "exp")
    (tmp_path / "exp" / "coarse.onnx").unlink()
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "exp")
    assert str(caught.value) == f"export is incomplete: coarse graph {tmp_path / 'exp' / 'coarse.onnx'} is missing"


def test_an_unreadable_graph_is_named(tmp_path, monkeypatch):
    import cfvit_deploy.manifest as manifest_module

    write_export(tmp_path / "exp")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest_module, "sha256_file", unreadable)
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "exp")
    assert str(caught.value) == f"cannot read coarse graph {tmp_path / 'exp' / 'coarse.onnx'}: Permission denied"


def test_load_names_what_is_wrong_with_the_folder(tmp_path):
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "nowhere")
    assert str(caught.value) == f"export folder not found: {tmp_path / 'nowhere'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "empty")
    assert str(caught.value) == (
        f"{tmp_path / 'empty'} is not an export folder: manifest.json is missing (run `cfvit export`)"
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json is not valid JSON: JSONDecodeError: Expecting"):
        Manifest.load(tmp_path / "bad")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "manifest.json").mkdir()  # not a file
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        Manifest.load(tmp_path / "dir")


def test_load_sets_the_directory_and_checks_the_format(tmp_path):
    write_export(tmp_path / "exp")
    assert Manifest.load(tmp_path / "exp").directory == tmp_path / "exp"
    data = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "exp" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"format_version {FORMAT_VERSION + 1}; this cfvit-deploy reads up to"):
        Manifest.load(tmp_path / "exp")


def test_graph_path_errors():
    manifest = make_manifest()
    with pytest.raises(ManifestError) as caught:
        manifest.graph_path("fine")
    assert str(caught.value) == "manifest was not loaded from a folder; graph paths are unknown"
    with pytest.raises(ManifestError) as caught:
        manifest.graph_path("baseline")
    assert str(caught.value) == "export has no 'baseline' graph (graphs: coarse, fine)"


@pytest.mark.parametrize("version", [MIN_FORMAT_VERSION, FORMAT_VERSION])
def test_every_format_version_in_range_is_read(version):
    check_format_version({**VALID, "format_version": version})


def test_format_version_messages():
    reads = f"this cfvit-deploy reads format_version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}"
    with pytest.raises(ManifestError) as caught:
        check_format_version({})
    assert str(caught.value) == (
        f"manifest.json has no format_version key ({reads}); it was not written by `cfvit export`, or was edited: "
        "re-export it"
    )
    with pytest.raises(ManifestError) as caught:
        check_format_version({"format_version": 1.0})
    assert str(caught.value) == (
        f"manifest format_version must be a JSON integer such as {FORMAT_VERSION}, got 1.0 (float); {reads}"
    )
    with pytest.raises(ManifestError) as caught:
        check_format_version({"format_version": FORMAT_VERSION + 1})
    assert str(caught.value) == (
        f"this export has format_version {FORMAT_VERSION + 1}; this cfvit-deploy reads up to {FORMAT_VERSION}: "
        "upgrade cfvit-deploy (pip install -U cfvit-deploy)"
    )
    with pytest.raises(ManifestError) as caught:
        check_format_version({"format_version": MIN_FORMAT_VERSION - 1})
    assert str(caught.value) == (
        f"this export has format_version {MIN_FORMAT_VERSION - 1}, older than any this cfvit-deploy reads "
        f"({MIN_FORMAT_VERSION} to {FORMAT_VERSION}): re-export it with `cfvit export`"
    )


def test_an_unreadable_manifest_is_named(tmp_path, monkeypatch):
    from pathlib import Path

    write_export(tmp_path / "exp")
    real = Path.read_bytes

    def denied(self):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ManifestError) as caught:
        Manifest.load(tmp_path / "exp")
    assert str(caught.value) == f"cannot read {tmp_path / 'exp' / 'manifest.json'}: Permission denied"
