"""The gated two-stage pipeline against the upstream reference outputs and PyTorch's `predict`."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cfvit_deploy.errors import ProviderError, UsageError
from cfvit_deploy.manifest import Manifest
from runtimes import CFViTPipeline, PipelineResult
from runtimes.backends import SessionConfig
from runtimes.ort_backend import OrtBackend
from runtimes.pipeline import NOT_REFINED, check_eta, max_softmax, softmax

ATOL = 1e-4


def _has_gpu() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_GPU = _has_gpu()


def _mid_eta(confidence: np.ndarray) -> float:
    """An eta strictly between the two lowest confidences: a mixed batch, far from float ties."""
    c = np.sort(confidence.astype(np.float64))
    return float((c[0] + c[1]) / 2)


def _concat(results: list[PipelineResult]) -> dict[str, np.ndarray]:
    fields = ("logits", "exited", "coarse_logits", "confidence", "informative_idx")
    return {f: np.concatenate([getattr(r, f) for r in results]) for f in fields}


def _run(pipe: CFViTPipeline, images: np.ndarray, eta: float, batch: str) -> dict[str, np.ndarray]:
    if batch == "full":
        return _concat([pipe.run(images, eta)])
    return _concat([pipe.run(images[i : i + 1], eta) for i in range(len(images))])


class CountingBackend:
    """Wraps a backend and records each graph call with the inputs it got."""

    def __init__(self, inner: OrtBackend) -> None:
        self.inner, self.manifest, self.calls = inner, inner.manifest, []

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((graph, {k: np.array(v) for k, v in inputs.items()}))
        return self.inner.run(graph, inputs)


@pytest.fixture(scope="module")
def deit_pipe(export_dir_factory) -> CFViTPipeline:
    return CFViTPipeline(export_dir_factory("deit_g7"))


@pytest.mark.parametrize("batch", ["one", "full"])
def test_matches_upstream_reference(upstream_export, batch):
    fx, export_dir = upstream_export
    ref, images = fx.ref, fx.images
    pipe = CFViTPipeline(export_dir)

    coarse = _run(pipe, images, 0.0, batch)  # eta 0: every image exits at the coarse stage
    assert coarse["exited"].all()
    np.testing.assert_allclose(coarse["logits"], ref["coarse_logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(coarse["coarse_logits"], ref["coarse_logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(coarse["confidence"], ref["coarse_confidence"], atol=1e-5, rtol=0)
    assert (coarse["informative_idx"] == NOT_REFINED).all()

    fine = _run(pipe, images, 1.0, batch)  # eta 1: every image goes to the fine stage
    assert not fine["exited"].any()
    np.testing.assert_allclose(fine["logits"], ref["fine_logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(fine["informative_idx"], ref["informative_idx"])

    eta = _mid_eta(ref["coarse_confidence"])
    mixed = _run(pipe, images, eta, batch)
    expected_exit = ref["coarse_confidence"] >= eta
    assert expected_exit.any() and not expected_exit.all()
    np.testing.assert_array_equal(mixed["exited"], expected_exit)
    want = np.where(expected_exit[:, None], ref["coarse_logits"], ref["fine_logits"])
    np.testing.assert_allclose(mixed["logits"], want, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(mixed["informative_idx"][~expected_exit], ref["informative_idx"][~expected_exit])
    assert (mixed["informative_idx"][expected_exit] == NOT_REFINED).all()


@pytest.mark.parametrize("batch", ["one", "full"])
def test_matches_pytorch_predict(upstream_export, batch):
    torch = pytest.importorskip("torch")
    import cfvit_deploy

    fx, export_dir = upstream_export
    model = cfvit_deploy.load_checkpoint(fx.pth, num_heads=fx.num_heads).eval()
    pipe = CFViTPipeline(export_dir)
    for eta in (0.0, _mid_eta(fx.ref["coarse_confidence"]), 1.0):
        with torch.no_grad():
            pred = model.predict(torch.from_numpy(fx.images), eta)
        got = _run(pipe, fx.images, eta, batch)
        np.testing.assert_array_equal(got["exited"], pred.exited.numpy())
        np.testing.assert_allclose(got["logits"], pred.logits.numpy(), atol=ATOL, rtol=0)


def test_fine_graph_runs_only_on_the_sub_batch(upstream_export):
    fx, export_dir = upstream_export
    backend = CountingBackend(OrtBackend(Manifest.load(export_dir)))
    pipe = CFViTPipeline(backend)

    pipe.run(fx.images, 0.0)
    assert [g for g, _ in backend.calls] == ["coarse"]  # everything exited: no fine session call

    backend.calls.clear()
    eta = _mid_eta(fx.ref["coarse_confidence"])
    res = pipe.run(fx.images, eta)
    assert [g for g, _ in backend.calls] == ["coarse", "fine"]
    todo = np.flatnonzero(~res.exited)
    feeds = backend.calls[1][1]
    np.testing.assert_array_equal(feeds["images"], fx.images[todo])  # the sub-batch, in input order
    coarse = backend.inner.run("coarse", {"images": fx.images})
    for name in ("global_attention", "reuse_tokens", "coarse_embedding"):
        np.testing.assert_array_equal(feeds[name], coarse[name][todo])

    backend.calls.clear()
    pipe.run(fx.images, 1.0)
    assert backend.calls[1][1]["images"].shape[0] == len(fx.images)


class SleepingBackend:
    """Wraps a backend; each coarse call sleeps COARSE_SLEEP s and each fine call FINE_SLEEP s."""

    COARSE_SLEEP, FINE_SLEEP = 0.05, 0.1

    def __init__(self, inner: OrtBackend) -> None:
        self.inner, self.manifest = inner, inner.manifest

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.COARSE_SLEEP if graph == "coarse" else self.FINE_SLEEP)
        return self.inner.run(graph, inputs)


def test_result_fields(deit_pipe):
    images = _deit_images()
    eta = _mid_eta(deit_pipe.run(images, 0.0).confidence)
    res = deit_pipe.run(images, eta)
    b, k = len(res.logits), deit_pipe.manifest.model.k
    assert res.logits.dtype == np.float32 and res.logits.shape == (b, deit_pipe.manifest.num_classes)
    assert res.exited.dtype == bool and res.confidence.dtype == np.float32
    assert res.informative_idx.dtype == np.int64 and res.informative_idx.shape == (b, k)
    n_exit = int(res.exited.sum())
    assert 0 < n_exit < b and res.eta == eta
    assert res.exit_rate == n_exit / b  # the share that exited (not the share refined)


def test_timings_are_the_stages_wall_clock(export_dir_factory):
    """Each stage's time is the wall clock of its own graph call: a backend that sleeps a known time per
    graph shows up in the right field, and the three fields cover the whole call."""
    images = _deit_images()
    pipe = CFViTPipeline(SleepingBackend(OrtBackend(Manifest.load(export_dir_factory("deit_g7")))))
    t0 = time.perf_counter()
    t = pipe.run(images, 1.0).timings
    wall = time.perf_counter() - t0
    assert t.coarse_s >= SleepingBackend.COARSE_SLEEP and t.fine_s >= SleepingBackend.FINE_SLEEP
    assert 0 <= t.gate_s < SleepingBackend.COARSE_SLEEP  # host work only: neither graph's time
    assert t.coarse_s + t.gate_s + t.fine_s <= wall and t.total_s == pytest.approx(wall, abs=0.05)
    t = pipe.run(images, 0.0).timings  # everything exits: no fine call, no fine time
    assert t.fine_s == 0.0 and t.coarse_s >= SleepingBackend.COARSE_SLEEP and t.gate_s < SleepingBackend.COARSE_SLEEP


def _deit_images() -> np.ndarray:
    from tests.conftest import UpstreamFixture

    return UpstreamFixture("deit_g7").images


def test_default_eta_is_the_manifest_one(export_dir_factory):
    manifest = Manifest.load(export_dir_factory("deit_g7"))
    manifest.default_eta = 0.0
    assert CFViTPipeline(manifest).run(_deit_images()).exited.all()
    manifest.default_eta = 1.0
    assert not CFViTPipeline(manifest).run(_deit_images()).exited.any()


def test_eta_none_means_the_manifests_default(export_dir_factory):
    manifest = Manifest.load(export_dir_factory("deit_g7"))
    images = _deit_images()
    conf = CFViTPipeline(manifest).run(images, 0.0).confidence
    manifest.default_eta = _mid_eta(conf)  # neither 0, 0.5 nor 1: a mixed batch only at this value
    res = CFViTPipeline(manifest).run(images, None)
    assert res.eta == manifest.default_eta
    np.testing.assert_array_equal(res.exited, conf >= manifest.default_eta)
    assert res.exited.any() and not res.exited.all()


@pytest.mark.parametrize("eta", [1.5, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_bad_eta_is_a_usage_error(deit_pipe, eta):
    with pytest.raises(UsageError, match="eta"):
        deit_pipe.run(_deit_images(), eta)


def test_check_eta_accepts_numpy_scalars():
    assert check_eta(np.float32(0.25)) == 0.25 and check_eta(1) == 1.0 and check_eta(np.int64(0)) == 0.0


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 3, 224, 224), np.float64), "dtype float64"),
        (np.zeros((3, 224, 224), np.float32), r"shape \(3, 224, 224\)"),
        (np.zeros((2, 3, 112, 112), np.float32), "shape"),
        (np.zeros((2, 1, 224, 224), np.float32), "shape"),
        (np.zeros((0, 3, 224, 224), np.float32), "batch >= 1"),
        ([[0.0]], "got list"),
    ],
)
def test_bad_images_are_usage_errors(deit_pipe, images, match):
    with pytest.raises(UsageError, match=match):
        deit_pipe.run(images, 0.5)


def test_non_contiguous_images_are_accepted(deit_pipe):
    images = _deit_images()
    flipped = images[::-1]
    assert not flipped.flags.c_contiguous
    np.testing.assert_allclose(deit_pipe.run(flipped, 1.0).logits, deit_pipe.run(images, 1.0).logits[::-1], atol=1e-5)


def test_pipeline_sources(export_dir_factory):
    export_dir = export_dir_factory("deit_g7")
    manifest = Manifest.load(export_dir)
    backend = OrtBackend(manifest)
    for source in (export_dir, str(export_dir), manifest, backend):
        assert CFViTPipeline(source).manifest.num_classes == manifest.num_classes
    assert CFViTPipeline(backend).backend is backend
    with pytest.raises(UsageError, match="export folder, a Manifest or a backend"):
        CFViTPipeline(42)  # type: ignore[arg-type]


def _spinning(session) -> str:
    return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_default_threading_spins_only_while_a_graph_runs(export_dir_factory):
    """A plain CFViTPipeline(dir) gets the measured-fastest threading (benchmarks/threading_ab.py): a pool
    per session, spinning during its own Run and stopped when it returns (no process-wide pool)."""
    pipe = CFViTPipeline(export_dir_factory("deit_g7"))
    for session in pipe.backend.sessions.values():
        options = session.get_session_options()
        assert options.use_per_session_threads
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        with pytest.raises(Exception, match="allow_spinning"):  # ORT: never set, so spinning stays on
            options.get_session_config_entry("session.intra_op.allow_spinning")
    sleeping = OrtBackend(pipe.manifest, config=SessionConfig(spin=False, stop_spinning=False), graphs=("coarse",))
    options = sleeping.sessions["coarse"].get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_thread_safe_run(deit_pipe):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 2, 3, 4, 5, 2, 3, 1)]
    etas = [0.0, 0.3, 0.45, 0.6, 1.0, 0.4, 0.5, 0.2]
    expected = [deit_pipe.run(b, e) for b, e in zip(batches, etas, strict=True)]
    got: dict[int, PipelineResult] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(worker, len(batches), 4):
                for _ in range(2):
                    got[i] = deit_pipe.run(batches[i], etas[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(got[i].exited, want.exited)
        np.testing.assert_allclose(got[i].logits, want.logits, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got[i].informative_idx, want.informative_idx)


def test_iobinding_path_matches_plain_runs(upstream_export):
    """The device path (coarse outputs kept as OrtValues, on-device gather, fine run on bound inputs),
    selected on ONNX Runtime's CPU device, gives the plain path's rows: the logic CUDA/TensorRT use."""
    fx, export_dir = upstream_export
    manifest = Manifest.load(export_dir)
    plain = CFViTPipeline(manifest)
    bound = CFViTPipeline(manifest, config=SessionConfig(io_binding=True))
    assert plain.io_device is None and bound.io_device == "cpu"
    gathered: list[np.ndarray] = []
    take = bound.backend.take
    bound.backend.take = lambda values, rows: (gathered.append(rows), take(values, rows))[1]
    c = np.sort(fx.ref["coarse_confidence"].astype(np.float64))
    mixed = {float((c[0] + c[1]) / 2), float((c[-2] + c[-1]) / 2)}  # one / all but one go on
    for eta in (0.0, *sorted(mixed), 1.0):
        a, b = plain.run(fx.images, eta), bound.run(fx.images, eta)
        if eta in mixed:  # some exit, some go on: the sub-batch is gathered on the device
            assert 0 < b.exited.sum() < len(b.exited)
            np.testing.assert_array_equal(gathered[-1], np.flatnonzero(~b.exited))
        np.testing.assert_array_equal(a.exited, b.exited)
        np.testing.assert_allclose(a.coarse_logits, b.coarse_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.informative_idx, b.informative_idx)
    assert len(gathered) == len(mixed)  # eta 0: nothing to refine; eta 1: the whole batch, no gather


def test_take_gathers_rows(export_dir_factory):
    backend = OrtBackend(Manifest.load(export_dir_factory("deit_g7")), config=SessionConfig(io_binding=True))
    images = _deit_images()
    coarse = backend.run_bound("coarse", {"images": backend.to_device(images)}, ("coarse_logits",))
    assert isinstance(coarse["coarse_logits"], np.ndarray)
    coarse["images"] = backend.to_device(images)
    taken = backend.take(coarse, np.array([2, 0]))
    np.testing.assert_array_equal(taken["images"].numpy(), images[[2, 0]])
    np.testing.assert_array_equal(taken["reuse_tokens"].numpy(), coarse["reuse_tokens"].numpy()[[2, 0]])


# -- providers ---------------------------------------------------------------------------------------
def test_unknown_provider_lists_the_available_ones(export_dir_factory):
    with pytest.raises(UsageError, match="available: cpu, cuda, tensorrt, openvino"):
        CFViTPipeline(export_dir_factory("deit_g7"), provider="tpu")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a working CUDA GPU")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_gpu_is_a_provider_error(export_dir_factory, provider):
    export_dir = export_dir_factory("deit_g7")
    with pytest.raises(ProviderError, match="--allow-fallback"):
        CFViTPipeline(export_dir, provider=provider)
    pipe = CFViTPipeline(export_dir, provider=provider, config=SessionConfig(allow_fallback=True))
    assert pipe.io_device is None  # fell back to the CPU: plain runs, no binding
    want = CFViTPipeline(export_dir).run(_deit_images(), 0.5)
    np.testing.assert_allclose(pipe.run(_deit_images(), 0.5).logits, want.logits, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs CUDAExecutionProvider and an NVIDIA GPU (nvidia-smi)")
def test_cuda_iobinding_matches_cpu(upstream_export):
    fx, export_dir = upstream_export
    gpu = CFViTPipeline(export_dir, provider="cuda", config=SessionConfig(provider_options={"use_tf32": 0}))
    assert gpu.io_device == "cuda"
    assert all(p[0] == "CUDAExecutionProvider" for p in gpu.backend.active_providers.values())
    cpu = CFViTPipeline(export_dir)
    for eta in (0.0, _mid_eta(fx.ref["coarse_confidence"]), 1.0):
        a, b = cpu.run(fx.images, eta), gpu.run(fx.images, eta)
        np.testing.assert_array_equal(a.exited, b.exited)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(a.informative_idx, b.informative_idx)


# -- softmax -------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 12)), elements=st.floats(-1e4, 1e4, width=32)))
def test_softmax_is_stable(logits):
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    conf = max_softmax(logits)
    assert conf.dtype == np.float32 and np.isfinite(conf).all()
    np.testing.assert_allclose(conf, p.max(axis=1), atol=1e-6)
    assert ((conf >= 1.0 / logits.shape[1] - 1e-6) & (conf <= 1.0)).all()


def test_softmax_is_over_the_last_axis_of_any_rank():
    """Kills the axis=+1 mutants, identical to axis=-1 on (B, classes) only."""
    logits = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    z = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    want = z / z.sum(-1, keepdims=True)
    np.testing.assert_allclose(softmax(logits.copy()), want, rtol=1e-5)
    np.testing.assert_allclose(max_softmax(logits), want.max(-1), rtol=1e-5)


def test_no_gather_copy_when_every_image_goes_to_fine(export_dir_factory):
    """With no exit, the fine graph gets the coarse outputs themselves (no gather copy of the batch)."""
    seen: list[dict] = []

    class Recording(CountingBackend):
        def run(self, graph, inputs):
            seen.append((graph, dict(inputs)))
            return self.inner.run(graph, inputs)

    pipe = CFViTPipeline(Recording(OrtBackend(Manifest.load(export_dir_factory("deit_g7")))))
    images = np.ascontiguousarray(_deit_images())
    pipe.run(images, 1.0)
    assert [g for g, _ in seen] == ["coarse", "fine"] and seen[1][1]["images"] is images
