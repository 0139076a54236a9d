"""The ONNX pipeline's gate at ties: an image exits iff its float32 confidence >= η (the paper's rule).

Each test puts η exactly on an image's own float32 confidence, as the pipeline computes it from the
coarse logits of the same batch (ONNX Runtime and OpenVINO are deterministic for a fixed batch), and
on confidence exactly 1.0 with η = 1. Changing ``>=`` to ``>`` in ``runtimes/pipeline.py`` fails them;
so does a gate with slack (the next float32 above the confidence must NOT exit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from cfvit_deploy.manifest import Manifest
from runtimes import CFViTPipeline
from runtimes.backends import OrtBackend, SessionConfig
from runtimes.pipeline import max_softmax


def _ort(manifest: Manifest) -> CFViTPipeline:
    return CFViTPipeline(manifest)


def _iobinding(manifest: Manifest) -> CFViTPipeline:
    pipe = CFViTPipeline(manifest, config=SessionConfig(io_binding=True))
    assert pipe.io_device == "cpu"  # the device path, forced onto the CPU
    return pipe


def _openvino(manifest: Manifest) -> CFViTPipeline:
    pytest.importorskip("openvino")
    return CFViTPipeline(manifest, provider="openvino")


BACKENDS = {"ort-cpu": _ort, "ort-iobinding-cpu": _iobinding, "openvino": _openvino}


class SaturatingBackend:
    """Wraps a backend and multiplies the coarse logits by 1000: every max softmax is exactly 1.0 in float32.

    The fine graph still gets the real coarse outputs, so the fine stage runs for real.
    """

    def __init__(self, inner: Any) -> None:
        self.inner, self.manifest = inner, inner.manifest
        self.io_device = getattr(inner, "io_device", None)

    def __getattr__(self, name: str) -> Any:  # to_device / take of the IOBinding path
        return getattr(self.inner, name)

    @staticmethod
    def _saturate(graph: str, out: dict[str, Any]) -> dict[str, Any]:
        if graph == "coarse":
            out = dict(out, coarse_logits=np.asarray(out["coarse_logits"]) * np.float32(1000))
        return out

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return self._saturate(graph, self.inner.run(graph, inputs))

    def run_bound(self, graph: str, inputs: Mapping[str, Any], outputs: tuple[str, ...]) -> dict[str, Any]:
        return self._saturate(graph, self.inner.run_bound(graph, inputs, outputs))


@pytest.fixture(scope="module")
def deit(export_dir_factory):
    from tests.conftest import UpstreamFixture

    fx = UpstreamFixture("deit_g7")
    return Manifest.load(export_dir_factory("deit_g7")), fx.images


def _confidence_of_the_gate(pipe: CFViTPipeline, images: np.ndarray) -> np.ndarray:
    """The float32 confidences the gate compares, reproduced from the coarse logits the pipeline returns."""
    res = pipe.run(images, 0.5)
    conf = max_softmax(res.coarse_logits)
    assert conf.dtype == np.float32
    np.testing.assert_array_equal(res.confidence, conf)  # the returned field is the compared value, bit for bit
    # an independent float64 softmax agrees to rounding only: the tie must be taken from the pipeline's value
    z = res.coarse_logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(conf, (p / p.sum(1, keepdims=True)).max(1), rtol=1e-6)
    return conf


@pytest.mark.parametrize("backend", BACKENDS)
def test_eta_equal_to_an_images_confidence_exits(deit, backend):
    manifest, images = deit
    pipe = BACKENDS[backend](manifest)
    conf = _confidence_of_the_gate(pipe, images)
    for i in np.argsort(conf)[1:-1]:  # a mixed batch at each tie: some exit, some do not
        eta = float(conf[i])
        res = pipe.run(images, eta)
        np.testing.assert_array_equal(res.confidence, conf)  # same batch, same numbers
        assert res.exited[i], f"image {i}: confidence {conf[i]!r} == eta must exit (>=)"
        np.testing.assert_array_equal(res.exited, conf >= np.float32(eta))
        np.testing.assert_array_equal(res.logits[i], res.coarse_logits[i])  # answered by the coarse stage
        assert (res.informative_idx[i] == -1).all()
        above = float(np.nextafter(conf[i], np.float32(2)))  # one float32 step above: must not exit
        assert not pipe.run(images, above).exited[i]


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_exactly_one_exits_at_eta_one(deit, backend):
    manifest, images = deit
    pipe = BACKENDS[backend](manifest)
    saturated = CFViTPipeline(SaturatingBackend(pipe.backend))
    res = saturated.run(images, 1.0)
    assert (res.confidence == np.float32(1.0)).all()
    assert res.exited.all() and res.exit_rate == 1.0
    plain = pipe.run(images, 1.0)  # the same images without saturation: confidence < 1, nothing exits
    assert (plain.confidence < 1).all() and not plain.exited.any()


def test_infer_rows_at_a_tie_are_coarse(deit, tmp_path):
    """`cfvit infer` rows follow the same gate: η on an image's own confidence -> stage "coarse"."""
    from PIL import Image

    from cfvit_deploy.preprocessing import load_and_preprocess
    from runtimes.infer import infer

    manifest, _ = deit
    rng = np.random.default_rng(7)
    paths = []
    for j in range(4):
        path = tmp_path / f"img{j}.png"
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    images = np.stack([load_and_preprocess(p, manifest.preprocessing) for p in paths])
    pipe = CFViTPipeline(OrtBackend(manifest))
    conf = _confidence_of_the_gate(pipe, images)  # one batch of the same images, in the same order
    for i in range(len(paths)):
        rows = []
        infer(pipe, paths, eta=float(conf[i]), batch_size=len(paths), on_row=rows.append)
        stage = {r.path: r.stage for r in rows}
        assert stage[str(paths[i])] == "coarse"
        assert [stage[str(p)] for p in paths] == ["coarse" if c >= conf[i] else "fine" for c in conf]

    rows = []
    infer(CFViTPipeline(SaturatingBackend(OrtBackend(manifest))), paths, eta=1.0, on_row=rows.append)
    assert [r.stage for r in rows] == ["coarse"] * len(paths) and all(r.confidence == 1.0 for r in rows)
