"""One export identity (cfvit_deploy.manifest.export_identity) for `cfvit infer`'s summary and the server."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from cfvit_deploy.manifest import Manifest, export_identity
from runtimes.infer import infer


@pytest.fixture(scope="module")
def export_dir(export_dir_factory):
    return export_dir_factory("deit_g7")


def test_identity_fields(export_dir):
    manifest = Manifest.load(export_dir)
    identity = export_identity(manifest)
    assert identity["manifest_sha256"] == hashlib.sha256((export_dir / "manifest.json").read_bytes()).hexdigest()
    assert identity["graphs"] == {g: manifest.graphs[g].sha256 for g in ("coarse", "fine")}
    assert identity["directory"] == str(export_dir.absolute())
    assert (identity["arch"], identity["precision"]) == (manifest.model.arch, manifest.precision)
    assert export_identity(manifest, with_directory=False) == {k: v for k, v in identity.items() if k != "directory"}
    unsaved = Manifest.from_dict(manifest.to_dict())  # never written: no file to hash, no folder
    assert export_identity(unsaved)["manifest_sha256"] is None and export_identity(unsaved)["directory"] is None


def test_infer_summary_and_server_name_the_export_alike(export_dir, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("prometheus_client")
    from starlette.testclient import TestClient

    from cfvit_deploy.app.serve import ServeOptions, build_app

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    infer(export_dir, [image], output=tmp_path / "rows.csv")
    summary = json.loads((tmp_path / "rows.csv.summary.json").read_text())["export"]
    with TestClient(build_app(export_dir, ServeOptions())) as client:
        for _ in range(600):
            ready = client.get("/readyz")
            if ready.status_code == 200:
                break
            time.sleep(0.05)
        served = ready.json()["export"]
    assert summary.pop("directory") == str(export_dir.absolute())
    assert served == summary  # the same identity; the server does not tell its clients its folder
