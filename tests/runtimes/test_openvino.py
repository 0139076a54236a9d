"""OpenVINO backend: same graphs, same numbers as ONNX Runtime (CPU), dynamic batch, threads."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from cfvit_deploy.errors import ProviderError
from cfvit_deploy.manifest import Manifest
from runtimes import CFViTPipeline
from runtimes.backends import SessionConfig, create_backend
from runtimes.ort_backend import OrtBackend

pytest.importorskip("openvino")
from runtimes.openvino_backend import OpenVinoBackend  # noqa: E402

ATOL = 1e-4


@pytest.mark.parametrize("batch", [1, None])
def test_openvino_matches_onnxruntime(upstream_export, batch):
    fx, export_dir = upstream_export
    manifest = Manifest.load(export_dir)
    ov, ort = OpenVinoBackend(manifest, SessionConfig(threads=2)), OrtBackend(manifest)
    images = fx.images[:batch]
    coarse_ov, coarse_ort = ov.run("coarse", {"images": images}), ort.run("coarse", {"images": images})
    assert set(coarse_ov) == set(coarse_ort) == set(manifest.graphs["coarse"].output_names())
    for name, value in coarse_ort.items():
        assert coarse_ov[name].shape == value.shape
        np.testing.assert_allclose(coarse_ov[name], value, atol=ATOL, rtol=0, err_msg=name)
    feeds = {"images": images, **{k: coarse_ort[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}}
    fine_ov, fine_ort = ov.run("fine", feeds), ort.run("fine", feeds)
    np.testing.assert_allclose(fine_ov["fine_logits"], fine_ort["fine_logits"], atol=ATOL, rtol=0)
    assert fine_ov["informative_idx"].dtype == np.int64
    np.testing.assert_array_equal(fine_ov["informative_idx"], fine_ort["informative_idx"])
    np.testing.assert_array_equal(fine_ov["informative_idx"], fx.ref["informative_idx"][:batch])


def test_openvino_pipeline_matches_reference(upstream_export):
    fx, export_dir = upstream_export
    pipe = CFViTPipeline(export_dir, provider="openvino")
    assert pipe.backend.name == "openvino-cpu"
    res = pipe.run(fx.images, 1.0)
    np.testing.assert_allclose(res.logits, fx.ref["fine_logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(res.informative_idx, fx.ref["informative_idx"])
    c = np.sort(fx.ref["coarse_confidence"].astype(np.float64))
    eta = float((c[0] + c[1]) / 2)
    np.testing.assert_array_equal(pipe.run(fx.images, eta).exited, fx.ref["coarse_confidence"] >= eta)


def test_dynamic_batch_and_threads(export_dir_factory):
    manifest = Manifest.load(export_dir_factory("deit_g7"))
    backend = create_backend(manifest, "openvino", SessionConfig(threads=1), graphs=("coarse",))
    assert isinstance(backend, OpenVinoBackend) and set(backend.compiled) == {"coarse"}
    assert backend.compiled["coarse"].get_property("INFERENCE_NUM_THREADS") == 1
    rng = np.random.default_rng(0)
    for b in (1, 5, 2):
        out = backend.run("coarse", {"images": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)})
        assert out["coarse_logits"].shape == (b, manifest.num_classes)


def test_openvino_run_is_thread_safe(export_dir_factory):
    pipe = CFViTPipeline(export_dir_factory("deit_g7"), provider="openvino")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 3, 2, 4)]
    expected = [pipe.run(b, 0.4).logits for b in batches]
    got: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, pipe.run(batches[i], 0.4).logits)) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=0)


def test_missing_openvino_is_a_provider_error(export_dir_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ProviderError, match=r"pip install 'cfvit-deploy\[openvino\]'"):
        CFViTPipeline(export_dir_factory("deit_g7"), provider="openvino")


def test_fp16_export_ports_are_named_by_the_manifest(export_dir_factory):
    """The fp16 converter gives the input ports alias names; the backend must still feed them."""
    from cfvit_deploy.manifest import Manifest
    from runtimes.openvino_backend import OpenVinoBackend
    from runtimes.ort_backend import OrtBackend

    manifest = Manifest.load(export_dir_factory("deit_g7", precision="fp16"))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    ov = OpenVinoBackend(manifest).run("coarse", {"images": x})
    ref = OrtBackend(manifest).run("coarse", {"images": x})
    assert set(ov) == set(ref)
    np.testing.assert_allclose(ov["coarse_logits"], ref["coarse_logits"], atol=0.1)
