"""`cfvit serve` against hostile traffic (issue 22): admission before the body, header/body deadlines,
the connection cap, a drain that ends, one-line startup failures, 5xx without internals, strict
query parameters. The attacks run against real `cfvit serve` processes on 127.0.0.1 with raw sockets,
every loop bounded in count and time."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from cfvit_deploy.app.serve import ServeOptions, build_app  # noqa: E402
from cfvit_deploy.app.serve.protocol import TruncatedAccessLog  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds any single wait may take
PNG_HEADERS = b"content-type: image/png\r\n"


@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `cfvit serve` child process on 127.0.0.1, its log in a file."""

    def __init__(self, export_dir: Path, log_path: Path, *flags: str) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "serve", str(export_dir)]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*args, "--port", str(self.port), "--threads", "1", *flags],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "server not ready in time"
            try:
                status, _, _ = http(self.port, b"GET /readyz HTTP/1.1\r\nhost: t\r\n\r\n")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


@pytest.fixture
def server_factory(export_dir, tmp_path) -> Iterator:
    started: list[Server] = []

    def start(*flags: str, ready: bool = True) -> Server:
        server = Server(export_dir, tmp_path / f"server{len(started)}.log", *flags)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def connect(port: int, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 answer (Content-Length bodies), bounded by the socket timeout."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(port, 10) as sock:
        sock.sendall(request)
        return read_answer(sock)


def post_head(length: int, target: str = "/v1/classify") -> bytes:
    return f"POST {target} HTTP/1.1\r\nhost: t\r\ncontent-length: {length}\r\n".encode() + PNG_HEADERS + b"\r\n"


# -- admission: memory bounded by --max-queue x --max-bytes ----------------------------------------
@pytest.mark.slow
def test_bodies_past_max_queue_are_refused_before_they_are_buffered(server_factory):
    """12 clients each send 8 MB of an 8 MB body and hold the last byte. With --max-queue 2 two bodies
    are read and the other ten are refused with 503 at once: the server's RSS grows by about 2 x 8 MB,
    not 12 x 8 MB (today's code read all twelve: ~96 MB)."""
    size, clients, queue = 8 * 2**20, 12, 2
    server = server_factory("--max-queue", str(queue), "--max-bytes", str(size), "--body-timeout", "60")
    before = server.rss()
    body = b"\x89PNG" + b"\0" * (size - 5)  # one byte short of the declared length
    socks = [connect(server.port, 20) for _ in range(clients)]

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # refused: the server answered 503, stopped reading and closed
            sock.sendall(post_head(size) + body)

    senders = [threading.Thread(target=send, args=(s,)) for s in socks]
    for t in senders:
        t.start()
    for t in senders:
        t.join(TIMEOUT)
    time.sleep(1.0)  # let the admitted bodies be read to their last byte
    held = server.rss() - before
    refused = []
    for sock in socks:
        sock.settimeout(0.5)
        try:
            status, headers, answer = read_answer(sock)
            refused.append((status, headers.get("retry-after"), b'"full"' in answer))
        except (TimeoutError, ConnectionError, OSError):
            pass  # admitted: still waiting for its last byte
    for sock in socks:
        sock.close()
    assert refused == [(503, "1", True)] * (clients - queue), server.log()
    assert held < queue * size + 40 * 2**20, f"RSS grew by {held / 2**20:.0f} MB"


# -- deadlines -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deadline_server(export_dir, tmp_path_factory) -> Iterator[Server]:
    server = Server(
        export_dir,
        tmp_path_factory.mktemp("deadlines") / "server.log",
        "--header-timeout",
        "2",
        "--body-timeout",
        "2",
        "--max-connections",
        "6",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _drip(sock: socket.socket, data: bytes, every: float, limit: float) -> float:
    """Send `data` one byte every `every` seconds until the server answers or closes; the seconds it took."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        time.sleep(every)
    return time.monotonic() - start


def test_headers_dripped_byte_by_byte_end_with_408(deadline_server):
    """uvicorn's keep-alive timer restarts on every byte: a dripping client held its connection for ever."""
    with connect(deadline_server.port, 15) as sock:
        start = time.monotonic()
        _drip(sock, b"POST /v1/classify HTTP/1.1\r\n" + b"x-pad: y\r\n" * 100, 0.2, 10)
        status, _, body = read_answer(sock)
        assert status == 408 and b"header_timeout" in body
        assert 1.5 < time.monotonic() - start < 8
        assert sock.recv(1) == b""  # and the connection is closed


def test_a_flood_of_headers_is_cut_at_64_kib(deadline_server):
    """httptools keeps every header it parses: 4 s of headers grew the server by 740 MB."""
    before = deadline_server.rss()
    with connect(deadline_server.port, 15) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: t\r\n")
        line = b"x-pad: " + b"a" * 1000 + b"\r\n"
        with contextlib.suppress(OSError):  # the server closes the connection after its answer
            for _ in range(2000):  # at most 2 MB
                sock.sendall(line * 16)
        status, _, body = read_answer(sock)
    assert status == 431 and b"headers_too_large" in body
    assert deadline_server.rss() - before < 20 * 2**20


def test_idle_connection_is_closed_after_the_header_deadline(deadline_server):
    with connect(deadline_server.port, 15) as sock:
        start = time.monotonic()
        status, _, _ = read_answer(sock)
        assert status == 408 and 1.5 < time.monotonic() - start < 8


def test_body_dripped_byte_by_byte_ends_with_408(deadline_server):
    with connect(deadline_server.port, 15) as sock:
        sock.sendall(post_head(1000))
        start = time.monotonic()
        _drip(sock, b"\x89PNG" + b"\0" * 996, 0.2, 10)
        status, headers, body = read_answer(sock)
        assert status == 408 and b"body_timeout" in body and headers["connection"] == "close"
        assert 1.5 < time.monotonic() - start < 8


def test_idle_sockets_beyond_max_connections_are_refused_and_the_server_goes_on(deadline_server):
    socks = [connect(deadline_server.port, 10) for _ in range(6)]
    try:
        time.sleep(0.3)
        with connect(deadline_server.port, 10) as extra:
            status, headers, body = read_answer(extra)
            assert status == 503 and b"too_many_connections" in body and headers["retry-after"] == "1"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    assert http(deadline_server.port, b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")[0] == 200


def test_access_log_lines_are_cut_at_200_characters(deadline_server):
    query = "eta=" + "9" * 20_000
    status, _, _ = http(deadline_server.port, f"POST /v1/classify?{query} HTTP/1.1\r\nhost: t\r\n".encode() + b"\r\n")
    assert status == 400
    lines = [line for line in deadline_server.log().splitlines() if "POST /v1/classify?eta=" in line]
    assert lines and max(len(line) for line in lines) < 400


# -- shutdown --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_with_a_slow_client_exits_within_the_drain_timeout(server_factory):
    """One client sending its body at 5 bytes/s kept the server alive after SIGTERM until it left."""
    server = server_factory("--drain-timeout", "3", "--body-timeout", "120")
    with connect(server.port) as sock:
        sock.sendall(post_head(100_000) + b"\x89PNG")
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        stop = threading.Event()
        dripper = threading.Thread(target=lambda: [sock.send(b"\0") or stop.wait(0.2) for _ in range(200)])
        dripper.daemon = True
        dripper.start()
        try:
            code = server.proc.wait(TIMEOUT)
        finally:
            stop.set()
        took = time.monotonic() - start
    assert code == 0, server.log()
    assert 2.5 < took < 3 + 10, took  # drained for --drain-timeout, then closed what was left


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(server_factory):
    server = server_factory("--drain-timeout", "60", "--body-timeout", "120")
    with connect(server.port) as sock:
        sock.sendall(post_head(100_000) + b"\x89PNG")
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(TIMEOUT)
        assert code == 128 + signal.SIGTERM and time.monotonic() - start < 5
    assert "exiting now, without draining" in server.log()


# -- startup ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_busy_port_and_bad_host_are_one_line_before_ready(server_factory, export_dir):
    server = server_factory()
    for flags, reason in (
        (["--port", str(server.port)], rf"cannot listen on 127\.0\.0\.1:{server.port}: Address already in use"),
        (
            ["--host", "no-such-host.invalid", "--port", "0"],
            r"cannot listen on no-such-host\.invalid:0: unknown host .*",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "serve", str(export_dir), *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(rf"error: {reason}", done.stderr.strip()), done.stderr
        assert "ready: " not in done.stdout + done.stderr and "Errno" not in done.stderr


def test_unreadable_export_is_one_line_exit_1(tmp_path, capsys):
    import cli

    (tmp_path / "manifest.json").write_text("{broken")
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--body-timeout", "--header-timeout", "--drain-timeout", "--max-connections"])
def test_limit_flags_must_be_positive(export_dir, capsys, flag):
    import cli

    assert cli.main(["serve", str(export_dir), flag, "0"]) == 2
    assert f"{flag} must be a positive" in capsys.readouterr().err


# -- answers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(export_dir):
    from starlette.testclient import TestClient

    with TestClient(build_app(export_dir, ServeOptions(max_batch=4))) as c:
        deadline = time.monotonic() + TIMEOUT
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield c


def _png_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("eta=0.5&eta=0.9", "bad_parameter"),
        ("topk=2&topk=3", "bad_parameter"),
        ("topk=\uff13", "bad_topk"),  # a full-width 3: int() would take it
        ("topk=1_0", "bad_topk"),  # int() would read 10
        ("eta=\uff10.5", "bad_eta"),  # float() would take it
        ("eta=0.5\u00a0", "bad_eta"),
    ],
)
def test_query_parameters_are_single_and_ascii(client, query, code):
    r = client.post(f"/v1/classify?{query}", content=_png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_unterminated_multipart_body_is_bad_form(client):
    body = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + _png_bytes()
    r = client.post("/v1/classify", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_form", r.text


def test_internal_error_names_no_internals_and_logs_the_traceback_once(client, caplog):
    engine = client.app.state.serve.engine
    secret = "/secret/tmp/upload-1234 gs -dSAFER -sDEVICE=pnmraw"

    async def broken(*args, admitted=False, **kwargs):  # a graph that fails: the engine gives the unit back
        engine.admission.release()
        raise RuntimeError(secret)

    original, engine.submit = engine.submit, broken
    try:
        with caplog.at_level(logging.ERROR):
            r = client.post("/v1/classify", content=_png_bytes(), headers={"content-type": "image/png"})
    finally:
        engine.submit = original
    error = r.json()["error"]
    assert r.status_code == 500 and error["code"] == "internal_error"
    assert secret not in r.text and "RuntimeError" not in r.text
    assert re.fullmatch(r"[0-9a-f]{16}", error["request_id"]) and r.headers["x-request-id"] == error["request_id"]
    logged = [rec for rec in caplog.records if error["request_id"] in rec.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info and secret in str(logged[0].exc_info[1])


def test_truncated_access_log_filter():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', None, None)
    record.args = ("127.0.0.1:1", "GET", "/x?" + "a" * 10_000, "1.1", 200)
    assert TruncatedAccessLog(200).filter(record)
    assert len(record.args[2]) < 250 and record.args[2].startswith("/x?aaa") and record.args[4] == 200
    assert len(record.getMessage()) < 300


def test_every_outcome_gives_its_admission_unit_back(client):
    """One counter holds a request from before its body is read to its answer: refused, failed and
    answered requests all give their unit back (a leak would shrink --max-queue for good)."""
    engine = client.app.state.serve.engine
    png = {"content": _png_bytes(), "headers": {"content-type": "image/png"}}
    outcomes = [
        client.post("/v1/classify", **png).status_code,
        client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"}).status_code,
        client.post("/v1/classify?eta=2", **png).status_code,
        client.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}).status_code,
    ]
    assert outcomes == [200, 400, 400, 415]
    assert engine.admission.in_use == 0 and engine.pending == 0


def test_v2_infer_takes_its_unit_before_the_body_and_gives_it_back(client):
    """The KServe v2 route counts against the same --max-queue from before its body is read."""
    admission = client.app.state.serve.engine.admission
    url, headers = "/v2/models/cfvit/infer", {"content-type": "application/json"}
    assert admission.try_acquire(admission.capacity)  # every unit is held
    try:
        r = client.post(url, content=b'{"inputs": []}', headers=headers)
    finally:
        admission.release(admission.capacity)
    assert r.status_code == 503 and r.headers["connection"] == "close" and r.headers["retry-after"] == "1"
    for body in (b"{not json", b'{"inputs": []}'):  # refused after the body was read: the unit comes back
        assert client.post(url, content=body, headers=headers).status_code == 400
    assert admission.in_use == 0


def test_v2_internal_error_names_no_internals(client, caplog):
    import json

    engine = client.app.state.serve.engine
    secret = "/secret/tmp/upload-1234 gs -dSAFER"

    async def broken(*args, admitted=False, **kwargs):  # a graph that fails: the engine gives the unit back
        engine.admission.release()
        raise RuntimeError(secret)

    png = _png_bytes()
    blob = len(png).to_bytes(4, "little") + png
    header = json.dumps(
        {
            "inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    original, engine.submit = engine.submit, broken
    try:
        with caplog.at_level(logging.ERROR):
            r = client.post(
                "/v2/models/cfvit/infer",
                content=header + blob,
                headers={
                    "content-type": "application/octet-stream",
                    "inference-header-content-length": str(len(header)),
                },
            )
    finally:
        engine.submit = original
    assert r.status_code == 500 and secret not in r.text and "RuntimeError" not in r.text, r.text
    request_id = r.headers["x-request-id"]
    assert request_id in r.json()["error"]
    assert [rec for rec in caplog.records if request_id in rec.getMessage()][0].exc_info
    assert engine.admission.in_use == 0
