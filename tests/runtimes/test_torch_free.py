"""`runtimes` works where torch and onnx cannot be imported (the base install has neither)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from runtimes import CFViTPipeline

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: a meta-path finder refuses torch, onnx, onnxsim and exporters before
# anything is imported, then the serving modules load and the pipeline runs (plain and IOBinding).
CHILD = textwrap.dedent("""
    import importlib, json, sys

    BLOCKED = {"torch", "onnx", "onnxsim", "exporters"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    for name in ("runtimes", "runtimes.pipeline", "runtimes.infer", "runtimes.backends", "runtimes.ort_backend"):
        importlib.import_module(name)
    from runtimes import CFViTPipeline, SessionConfig, create_backend  # noqa: F401

    export_dir, images_path, eta = sys.argv[1], sys.argv[2], float(sys.argv[3])
    images = np.load(images_path)
    out = {}
    for label, config in (("plain", None), ("bound", SessionConfig(io_binding=True))):
        result = CFViTPipeline(export_dir, config=config).run(images, eta)
        out[label] = {"logits": result.logits.tolist(), "exited": result.exited.tolist()}
    out["loaded"] = sorted(m for m in BLOCKED if m in sys.modules)
    print(json.dumps(out))
""")


def test_runtimes_import_and_run_without_torch_and_onnx(export_dir_factory, tmp_path):
    export_dir = export_dir_factory("deit_g7")
    images = np.random.default_rng(3).standard_normal((4, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    reference = CFViTPipeline(export_dir).run(images, 1.0)  # this process may use torch: a reference
    confidence = np.sort(reference.confidence.astype(np.float64))
    eta = float((confidence[1] + confidence[2]) / 2)  # two images exit, two go on to the fine stage
    want = CFViTPipeline(export_dir).run(images, eta)
    assert 0 < want.exited.sum() < len(images)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(export_dir), str(tmp_path / "images.npy"), str(eta)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    for label in ("plain", "bound"):
        np.testing.assert_array_equal(np.array(got[label]["exited"]), want.exited)
        np.testing.assert_allclose(np.array(got[label]["logits"], dtype=np.float32), want.logits, atol=1e-5, rtol=0)
