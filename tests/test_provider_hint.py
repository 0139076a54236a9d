"""The --allow-fallback hint appears only where a fallback exists (issue 22, item 8): an unreadable
graph on the CPU provider has nothing to fall back to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cfvit_deploy.errors import ProviderError
from cfvit_deploy.manifest import Manifest
from runtimes.backends import create_backend


@pytest.fixture
def unreadable_export(export_dir_factory, tmp_path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(export_dir_factory("deit_g7"), export)
    (export / "coarse.onnx").write_bytes(b"\x08\x07 not a graph")  # ORT cannot parse it
    return export


def test_unreadable_graph_on_cpu_names_no_fallback(unreadable_export):
    manifest = Manifest.load(unreadable_export, verify=False)  # the checksum check would stop it earlier
    with pytest.raises(ProviderError) as info:
        create_backend(manifest, "cpu")
    message = str(info.value)
    assert message.startswith("cannot create a cpu session for coarse.onnx: ")
    assert "--allow-fallback" not in message
