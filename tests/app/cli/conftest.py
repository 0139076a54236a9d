"""Fixtures of the CLI error tests (test_errors_*.py): the fixture exports and a few inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    """The deit_g7 fixture export (shared: tests copy it before damaging it)."""
    return export_dir_factory("deit_g7")


@pytest.fixture(scope="module")
def g9_export(export_dir_factory) -> Path:
    return export_dir_factory("deit_g9")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """img: one 40x40 PNG; lab: a labelled folder (lab/c0/a.png) for `sweep`."""
    root = tmp_path_factory.mktemp("inputs")
    img = root / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    (root / "lab" / "c0").mkdir(parents=True)
    shutil.copyfile(img, root / "lab" / "c0" / "a.png")
    return {"img": img, "lab": root / "lab"}
