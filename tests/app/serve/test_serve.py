"""`cfvit serve`: the two-stage batching engine and the HTTP app (answers, bad input, overload,
disconnects, readiness, metrics). The real-process SIGTERM drain is in test_serve_shutdown.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

import cli  # noqa: E402
from cfvit_deploy.app.serve import ServeOptions, build_app  # noqa: E402
from cfvit_deploy.app.serve.app import create_app  # noqa: E402
from cfvit_deploy.app.serve.metrics import ServeMetrics  # noqa: E402
from cfvit_deploy.app.serve.requests import BadRequest, Limits  # noqa: E402
from cfvit_deploy.manifest import Manifest  # noqa: E402
from cfvit_deploy.preprocessing import load_and_preprocess  # noqa: E402
from runtimes.backends import create_backend  # noqa: E402
from runtimes.batching import BatchingEngine, EngineConfig, EngineObserver, StageRunner  # noqa: E402
from runtimes.infer import infer  # noqa: E402
from tests.app.serve.media import make_images, midpoint_eta  # noqa: E402

TIMEOUT = 60  # seconds any single wait in these tests may take


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("serve-images"), 12)


@pytest.fixture(scope="module")
def mixed_eta(export_dir, images) -> float:
    return midpoint_eta(export_dir, images)


@pytest.fixture(scope="module")
def infer_rows(export_dir, images, mixed_eta) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    infer(
        export_dir, images, eta=mixed_eta, topk=3, batch_size=32, on_row=lambda r: rows.__setitem__(r.path, r.to_json())
    )
    stages = {r["stage"] for r in rows.values()}
    assert stages == {"coarse", "fine"}, stages  # the comparison must cover both stages
    return rows


def _same_answer(got: dict, want: dict) -> None:
    """The server's answer against `cfvit infer`'s row for the same image and eta."""
    assert got["stage"] == want["stage"]
    assert got["patches"] == want["patches"]
    assert [t["label"] for t in got["topk"]] == [t["label"] for t in want["topk"]]
    np.testing.assert_allclose([t["prob"] for t in got["topk"]], [t["prob"] for t in want["topk"]], rtol=2e-5)
    assert got["confidence"] == pytest.approx(want["confidence"], rel=2e-5)


def _runner(export_dir: Path) -> StageRunner:
    return StageRunner(create_backend(Manifest.load(export_dir), "cpu"))


# -- engine --------------------------------------------------------------------------------------
def test_decode_matches_infer_decoding(export_dir, images):
    pp = Manifest.load(export_dir).preprocessing
    for path in images[:3]:  # serve decodes the bytes with infer's decoder
        np.testing.assert_array_equal(load_and_preprocess(path.read_bytes(), pp, None), load_and_preprocess(path, pp))


def test_engine_batches_both_stages_and_matches_infer(export_dir, images, mixed_eta, infer_rows):
    pp = Manifest.load(export_dir).preprocessing
    sizes: dict[str, list[int]] = {"coarse": [], "fine": []}
    observer = EngineObserver(on_batch=lambda stage, n, s: sizes[stage].append(n))
    engine = BatchingEngine(lambda: _runner(export_dir), EngineConfig(max_batch=8, max_wait_ms=50), observer)

    async def main() -> list:
        await engine.start()
        with engine.expect():  # every request announced: the coarse stage waits for them
            tasks = [
                asyncio.ensure_future(engine.submit(load_and_preprocess(p.read_bytes(), pp, None), mixed_eta, 3))
                for p in images
            ]
        answers = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        await engine.close()
        return answers

    answers = asyncio.run(main())
    for path, answer in zip(images, answers, strict=True):
        _same_answer(answer.row.to_json(), infer_rows[str(path)])
        assert len(answer.refined) == answer.row.patches
    assert sum(sizes["coarse"]) == len(images) and max(sizes["coarse"]) > 1
    n_fine = sum(r["stage"] == "fine" for r in infer_rows.values())
    assert sum(sizes["fine"]) == n_fine and max(sizes["fine"]) > 1  # fine batches span requests
    assert engine.pending == 0


class _Gated(StageRunner):
    """A runner whose coarse calls wait for `go` (to hold requests in the queue)."""

    #: set when a coarse call (not the warm-up) starts: a request is in the graph, not just admitted
    entered = threading.Event()

    def __init__(self, runner: StageRunner, go: threading.Event) -> None:
        super().__init__(runner.backend)
        self.go = go

    def run_coarse(self, images):
        _Gated.entered.set()
        assert self.go.wait(TIMEOUT)
        return super().run_coarse(images)

    def warm_up(self) -> None:
        s = self.image_size
        StageRunner.run_fine(self, [StageRunner.run_coarse(self, np.zeros((1, 3, s, s), np.float32))[0].fine_inputs])


def test_cancelled_request_costs_nothing_and_close_drains(export_dir, images):
    pp = Manifest.load(export_dir).preprocessing
    image = load_and_preprocess(images[0].read_bytes(), pp, None)
    go = threading.Event()
    sizes: list[int] = []
    engine = BatchingEngine(
        lambda: _Gated(_runner(export_dir), go),
        EngineConfig(max_batch=4, max_wait_ms=0),
        EngineObserver(on_batch=lambda stage, n, s: stage == "coarse" and sizes.append(n)),
    )

    async def main() -> tuple:
        await engine.start()
        first = asyncio.ensure_future(engine.submit(image, 0.0, 1))  # runs alone, held by `go`
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(engine.submit(image, 0.0, 1))
        kept = [asyncio.ensure_future(engine.submit(image, 0.0, 1)) for _ in range(2)]
        await asyncio.sleep(0.05)
        gone.cancel()  # its client went away while it queued
        closing = asyncio.ensure_future(engine.close())  # drain: answers `first` and `kept`
        await asyncio.sleep(0.05)
        go.set()
        await asyncio.wait_for(closing, TIMEOUT)
        return await first, [await k for k in kept], gone.cancelled()

    first, kept, cancelled = asyncio.run(main())
    assert cancelled and first.row.stage == "coarse" and all(k.row.stage == "coarse" for k in kept)
    assert sizes == [1, 2]  # the cancelled request never reached the graph
    assert engine.pending == 0


# -- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(export_dir):
    from starlette.testclient import TestClient

    # per-session pools: ONNX Runtime's shared pool is process-wide, and other tests share this process
    options = ServeOptions(max_batch=8, max_wait_ms=20, max_bytes=200_000, max_pixels=1_000_000)
    app = build_app(export_dir, options)
    with TestClient(app) as c:
        _wait_ready(c)
        yield c


def _wait_ready(c) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server not ready in time"
        time.sleep(0.05)


def _png(size=(64, 48), seed=0) -> bytes:
    """A noise PNG; above 64 px a side a flat one (it stays small as a file)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels if max(size) <= 64 else pixels * 0).save(buf, "PNG")
    return buf.getvalue()


def test_http_answers_equal_infer_rows(client, export_dir, images, mixed_eta, infer_rows):
    def post(i_path):
        i, path = i_path
        if i % 2:  # half as raw bodies, half as multipart files
            return client.post(
                f"/v1/classify?eta={mixed_eta!r}&topk=3",
                content=path.read_bytes(),
                headers={"content-type": "image/png" if path.suffix == ".png" else "image/jpeg"},
            )
        return client.post(f"/v1/classify?eta={mixed_eta!r}&topk=3", files={"file": (path.name, path.read_bytes())})

    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(post, enumerate(images)))
    digest = hashlib.sha256((export_dir / "manifest.json").read_bytes()).hexdigest()
    for path, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        _same_answer(body, infer_rows[str(path)])
        assert body["label"] == body["topk"][0]["label"] and body["eta"] == mixed_eta
        assert body["export"]["manifest_sha256"] == digest
        assert len(body["refined_patches"]) == body["patches"]
        timing = re.fullmatch(r"app;dur=(\d+\.\d{3})", r.headers["server-timing"])
        assert timing and 0 < float(timing.group(1)) < 60_000  # the server's own ms for the request


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": _png()}, 415, "unsupported_media_type"),  # no content type at all
        ({"content": b"not an image at all", "headers": {"content-type": "image/png"}}, 400, "not_an_image"),
        ({"content": _png()[:300], "headers": {"content-type": "image/png"}}, 400, "truncated_image"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
        ({"content": b"x" * 200_001, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
        ({"content": _png((1200, 1000)), "headers": {"content-type": "image/png"}}, 413, "too_many_pixels"),
        ({"files": {"other": ("a.txt", b"x", "text/plain")}, "data": {}}, 400, "not_an_image"),
        (
            {
                "content": b'--B\r\nContent-Disposition: form-data; name="eta"\r\n\r\n0.5\r\n--B--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=B"},
            },
            400,
            "missing_file",
        ),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(client, kwargs, status, code):
    r = client.post("/v1/classify", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    ok = client.post("/v1/classify", content=_png(), headers={"content-type": "image/png"})
    assert ok.status_code == 200  # the server keeps serving


def test_streamed_body_over_the_limit_is_refused(client):
    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("eta=1.5", "bad_eta"),
        ("eta=abc", "bad_eta"),
        ("eta=nan", "bad_eta"),
        ("eta=-0.1", "bad_eta"),
        ("topk=0", "bad_topk"),
        ("topk=two", "bad_topk"),
        ("topk=1.5", "bad_topk"),
        ("ETA=0.5", "unknown_parameter"),
    ],
)
def test_bad_query_parameters(client, query, code):
    r = client.post(f"/v1/classify?{query}", content=_png(), headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert query.split("=")[0] in r.json()["error"]["message"]


def test_topk_is_capped_and_metrics_are_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    r = client.post("/v1/classify?topk=50&eta=0", content=_png(), headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["topk"]) == 10 and r.json()["stage"] == "coarse"
    client.post("/v1/classify?eta=2", content=_png(), headers={"content-type": "image/png"})
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    by_status = {s.labels["status"]: s.value for s in families["cfvit_requests"].samples if s.name.endswith("_total")}
    assert by_status["200"] >= 1 and by_status["400"] >= 1
    answers = {s.labels["stage"]: s.value for s in families["cfvit_answers"].samples if s.name.endswith("_total")}
    exit_rate = families["cfvit_exit_rate"].samples[0].value
    assert exit_rate == pytest.approx(answers.get("coarse", 0) / sum(answers.values()))
    for name in ("cfvit_coarse_batch_size", "cfvit_fine_batch_size", "cfvit_request_latency_seconds"):
        assert families[name].type == "histogram"
    count = next(s.value for s in families["cfvit_coarse_batch_size"].samples if s.name.endswith("_count"))
    assert count >= 1
    depth = {s.labels["stage"] for s in families["cfvit_queue_depth"].samples}
    assert depth == {"coarse", "fine"}


def _gated_app(export_dir: Path, go: threading.Event, **config):
    engine = BatchingEngine(lambda: _Gated(_runner(export_dir), go), EngineConfig(**config))
    return create_app(engine, export_dir, Limits(), ServeMetrics())


def test_full_queue_answers_503_with_retry_after(export_dir):
    from starlette.testclient import TestClient

    go = threading.Event()
    with TestClient(_gated_app(export_dir, go, max_batch=1, max_wait_ms=0, max_queue=2)) as c:
        _wait_ready(c)
        go.clear()
        post = lambda _: c.post("/v1/classify", content=_png(), headers={"content-type": "image/png"})  # noqa: E731
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, i) for i in range(2)]
            import time

            deadline = time.monotonic() + TIMEOUT
            while c.app.state.serve.engine.pending < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = post(0)
            go.set()
            assert [f.result(TIMEOUT).status_code for f in held] == [200, 200]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "full"


def test_readyz_and_classify_wait_for_the_sessions(export_dir):
    from starlette.testclient import TestClient

    go = threading.Event()  # the warm-up (coarse call) is held until `go`

    class SlowLoad(_Gated):
        def warm_up(self) -> None:
            assert self.go.wait(TIMEOUT)
            super().warm_up()

    engine = BatchingEngine(lambda: SlowLoad(_runner(export_dir), go), EngineConfig())
    with TestClient(create_app(engine, export_dir)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/classify", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        go.set()
        _wait_ready(c)
        assert c.post("/v1/classify", content=_png(), headers={"content-type": "image/png"}).status_code == 200


def test_client_that_disconnects_costs_nothing(export_dir):
    """An ASGI client that sends its body and goes away: no answer, no error, no graph work for it."""
    from starlette.testclient import TestClient

    go = threading.Event()
    app = _gated_app(export_dir, go, max_batch=4, max_wait_ms=0)
    with TestClient(app) as c:
        _wait_ready(c)
        go.clear()
        state = app.state.serve
        sizes: list[int] = []
        state.engine.observer.on_batch = lambda stage, n, s: stage == "coarse" and sizes.append(n)
        _Gated.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(lambda: c.post("/v1/classify", content=_png(), headers={"content-type": "image/png"}))
            # in the coarse graph (engine.pending counts it from before its body is read: too early)
            assert _Gated.entered.wait(TIMEOUT)
            sent = c.portal.call(_disconnecting_request, app, _png())
            go.set()
            assert held.result(TIMEOUT).status_code == 200
        assert sent == [] and sizes == [1]  # nothing sent to the gone client; it never reached the graph
        assert state.engine.pending == 0
        assert 'cfvit_requests_total{protocol="v1",status="499"} 1.0' in c.get("/metrics").text


async def _disconnecting_request(app, body: bytes) -> list:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list = []
    gone = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0.1)  # the request is queued by now; then the client goes away
        gone.set()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            return  # a real server drops what is sent to a closed connection
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT)
    return sent


# -- CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be a positive integer"),
        (["--engine", "spark"], "--engine must be one of local, ray"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must be a number"),
        (["--eta", "1.5"], "--eta must lie in [0, 1]"),
        (["--provider", "tpu"], "unknown provider 'tpu'"),
    ],
)
def test_cli_refuses_bad_flags_before_listening(export_dir, capsys, args, message):
    assert cli.main(["serve", str(export_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_exits_1_when_the_sessions_cannot_be_created(export_dir, capsys):
    """--provider cuda on a machine without a usable GPU: one error line, exit 1, no server left."""
    pytest.importorskip("uvicorn")
    code = cli.main(["serve", str(export_dir), "--provider", "cuda", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "error: " in err and "cuda" in err.lower() and "Traceback" not in err


def test_client_gone_while_sending_its_body(export_dir):
    from starlette.testclient import TestClient

    app = create_app(BatchingEngine(lambda: _runner(export_dir), EngineConfig()), export_dir)
    with TestClient(app) as c:
        _wait_ready(c)
        answered = c.portal.call(_request_then_gone, app)
        assert (
            answered == []
        )  # no error answer (a 499 goes nowhere: the connection is closed) and 'cfvit_requests_total{protocol="v1",status="499"} 1.0' in c.get("/metrics").text
        assert c.post("/v1/classify", content=_png(), headers={"content-type": "image/png"}).status_code == 200


async def _request_then_gone(app) -> list:
    messages = [{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}]
    sent: list = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT)
    return [m["status"] for m in sent if m["type"] == "http.response.start" and m["status"] != 499]


def test_serving_never_imports_torch(export_dir):
    code = f"""
import sys
from starlette.testclient import TestClient
from cfvit_deploy.app.serve import ServeOptions, build_app
with TestClient(build_app({str(export_dir)!r}, ServeOptions())) as c:
    import time
    while c.get('/readyz').status_code != 200:
        time.sleep(0.05)
    import io, numpy as np
    from PIL import Image
    buf = io.BytesIO(); Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, 'PNG')
    assert c.post('/v1/classify', content=buf.getvalue(), headers={{'content-type': 'image/png'}}).status_code == 200
heavy = sorted(m for m in ('torch', 'onnxsim', 'exporters', 'matplotlib') if m in sys.modules)
assert not heavy, heavy
"""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    r = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stderr


def test_bad_request_json_shape():
    assert BadRequest(400, "bad_eta", "eta …").to_json() == {"error": {"code": "bad_eta", "message": "eta …"}}


# -- Ray Serve -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_serve_engine_gives_the_local_answers(export_dir, images, mixed_eta, infer_rows):
    """`--engine ray` on a local 2-CPU Ray cluster: coarse and fine deployments batched by Ray Serve."""
    pytest.importorskip("ray.serve")
    from starlette.testclient import TestClient

    from runtimes.ray_serve import RayServeEngine

    metrics = ServeMetrics()
    engine = RayServeEngine(
        export_dir,
        EngineConfig(max_batch=4, max_wait_ms=50),
        threads=1,
        replicas={"coarse": 1, "fine": 1},
        observer=EngineObserver(on_batch=metrics.on_batch, on_answer=metrics.on_answer),
        ray_init={"num_cpus": 2},
    )
    with TestClient(create_app(engine, export_dir, Limits(), metrics)) as c:
        _wait_ready(c)
        with ThreadPoolExecutor(len(images)) as pool:
            responses = list(
                pool.map(
                    lambda p: c.post(
                        f"/v1/classify?eta={mixed_eta!r}&topk=3",
                        content=p.read_bytes(),
                        headers={"content-type": "image/png"},
                    ),
                    images,
                )
            )
        text = c.get("/metrics").text
    for path, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        _same_answer(r.json(), infer_rows[str(path)])
    assert "cfvit_coarse_batch_size_count" in text and engine.pending == 0
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    sums = {s.name: s.value for s in families["cfvit_coarse_batch_size"].samples}
    assert sums["cfvit_coarse_batch_size_sum"] == len(images)
    assert sums["cfvit_coarse_batch_size_count"] < len(images)  # Ray Serve batched some requests together
