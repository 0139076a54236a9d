"""`cfvit infer --engine ray`: same rows as the local engine on a 2-CPU Ray cluster, resource plan, no-Ray error,
interrupts kept by the shared shell, no Ray log lines on stderr."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from cfvit_deploy.errors import ManifestError, MissingExtraError, UsageError
from runtimes.infer import InferInterrupted, InferRow, InferStopped, RayOptions, infer
from runtimes.ray_cluster import layout_pool, plan_actors
from runtimes.ray_engine import load_pipeline_manifest
from runtimes.sinks import summary_path
from tests.conftest import FIXTURES

EXPORT = "deit_g7"
TOL = 1e-5


@pytest.fixture(scope="module")
def ray_2cpu():
    """One local Ray cluster limited to 2 CPUs for the module (Ray takes seconds to start)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    import logging

    # address="local": a private cluster even while a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A folder of good PNG/JPEG images and bad files, plus an explicitly named non-image."""
    root = tmp_path_factory.mktemp("ray-images")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(21):
        h, w = 160 + 7 * i, 300 - 5 * i
        if i % 3 == 0:  # smooth gradients and noise: a mix of coarse exits and fine-stage images
            img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        else:
            y, x = np.mgrid[0:h, 0:w]
            rgb = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, ((x + y) * i) % 256], -1)
            img = Image.fromarray(rgb.astype(np.uint8))
        if i == 4:
            img = img.convert("L")
        elif i == 5:
            img = img.convert("RGBA")
        img.save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    good = (folder / "img00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    notes = root / "notes.txt"
    notes.write_text("not an image")
    return [folder, notes]


@pytest.fixture(scope="module")
def export(export_dir_factory) -> Path:
    if not (FIXTURES / f"{EXPORT}.pth").exists():
        pytest.skip("no upstream fixtures")
    return export_dir_factory(EXPORT)


def _cli(*args: object) -> int:
    return cli.main(["infer", *(str(a) for a in args)])


def _read(path: Path) -> list[dict]:
    """Rows of an output file in the JSONL record layout."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ranks = range(1, 1 + sum(k.startswith("label_") for k in r))
            topk = [{"label": r[f"label_{i}"], "prob": float(r[f"prob_{i}"])} for i in ranks if r[f"label_{i}"]]
            records.append(
                {
                    "path": r["path"],
                    "stage": r["stage"] or None,
                    "confidence": float(r["confidence"]) if r["confidence"] else None,
                    "patches": int(r["patches"]) if r["patches"] else None,
                    "topk": topk,
                    "overlay": r["overlay"],
                    "error": r["error"],
                }
            )
    return records


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]  # one row per file, input order
    for g, w in zip(got, want, strict=True):
        assert (g["stage"], g["patches"], g["overlay"], g["error"]) == (
            w["stage"],
            w["patches"],
            w["overlay"],
            w["error"],
        ), g["path"]
        assert [t["label"] for t in g["topk"]] == [t["label"] for t in w["topk"]], g["path"]
        np.testing.assert_allclose([t["prob"] for t in g["topk"]], [t["prob"] for t in w["topk"]], atol=TOL)
        if w["confidence"] is None:
            assert g["confidence"] is None
        else:
            assert g["confidence"] == pytest.approx(w["confidence"], abs=TOL)


@pytest.fixture(scope="module")
def local_rows(export: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The local engine's rows (CLI), as JSONL, CSV and Parquet."""
    out = tmp_path_factory.mktemp("ray-local")
    rows = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        assert _cli(export, *images, "--batch-size", 8, "--output", out / f"local{suffix}") == 1  # error rows
        rows[suffix] = _read(out / f"local{suffix}")
    stages = [r["stage"] for r in rows[".jsonl"]]
    assert {"coarse", "fine"} <= set(stages) and stages.count(None) == 4  # both stages and the bad files
    return rows


@pytest.mark.parametrize("num_actors, suffix", [(2, ".parquet"), (1, ".csv")])
def test_cli_ray_rows_equal_local(ray_2cpu, export, images, local_rows, tmp_path, num_actors, suffix) -> None:
    """2 CPUs, 1 or 2 actors: the run finishes and its rows equal the local engine's; --force replaces."""
    out = tmp_path / f"ray{suffix}"
    out.write_text("old")
    args = (export, *images, "--engine", "ray", "--batch-size", 8, "--num-actors", num_actors, "--output", out)
    assert _cli(*args) == 2 and out.read_text() == "old"  # exists, no --force
    assert _cli(*args, "--force") == 1  # error rows -> exit 1, like the local engine
    _assert_same_rows(_read(out), local_rows[suffix])
    if suffix == ".parquet":  # the two engines write the same Parquet schema
        import pyarrow.parquet as pq

        from runtimes.sinks import row_schema

        assert pq.read_schema(out).remove_metadata().equals(row_schema())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_python_twin_shared_export(ray_2cpu, export, images) -> None:
    """infer(engine="ray") with the export read by path: the same InferRow objects as the local engine, in input order."""
    want: list[InferRow] = []
    infer(export, images, batch_size=5, on_row=want.append)
    got: list[InferRow] = []
    options = RayOptions(shared_export=True, actor_threads=1)
    summary = infer(export, images, engine="ray", batch_size=5, ray=options, on_row=got.append)
    assert infer(export, images[1], engine="ray", batch_size=5).rows == 1  # a single path
    _assert_same_rows([r.to_json() for r in got], [r.to_json() for r in want])
    assert (summary.inputs, summary.rows, summary.errors) == (len(want), len(want), 4)
    assert summary.exited + summary.fine == len(want) - 4


def test_crashed_actor_on_the_only_node_ends_the_run_with_rows_kept(ray_2cpu, export, images, tmp_path) -> None:
    """An actor killed while its node stays up is a crash: that node is not used again; with no node left the
    run ends with InferStopped naming the demand, and the rows done so far are kept (summary: interrupted)."""
    import pandas as pd

    out, seen = tmp_path / "r.csv", []

    def kill_an_actor(row: InferRow) -> None:
        seen.append(row)
        if len(seen) == 4:  # the first batch is back: SIGKILL the pipeline actor (a crash; its node stays up)
            import psutil

            for proc in psutil.Process().children(recursive=True):  # this test's private cluster only
                if "_PipelineActor" in " ".join(proc.cmdline()):
                    proc.kill()

    with pytest.raises(InferStopped, match=r"no Ray node with CPUs is left.*interrupted, \d+ of 25 inputs") as info:
        infer(
            export, images, engine="ray", batch_size=4, output=out, ray=RayOptions(num_actors=1), on_row=kill_an_actor
        )
    summary = info.value.summary
    assert summary is not None and summary.interrupted and 4 <= summary.rows < 25
    assert len(pd.read_csv(out)) == summary.rows
    saved = json.loads(summary_path(out).read_text())
    assert saved["status"] == "interrupted" and "no Ray node" in saved["reason"]


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("num_actors", [None, 1, 2, 3, 8])
@pytest.mark.parametrize("threads", [None, 1, 2, 4])
def test_plan_leaves_cpus_for_decoding(cpus, num_actors, threads) -> None:
    plan = plan_actors(cpus, num_actors, threads)
    assert plan.num_actors == (num_actors or plan.num_actors) and plan.num_actors >= 1
    assert plan.threads == (threads or plan.threads) and plan.threads >= 1
    assert plan.cpus_per_actor > 0 and (plan.cpus_per_actor <= 1 or plan.cpus_per_actor.is_integer())
    assert plan.num_actors * plan.cpus_per_actor + plan.decode_cpus <= cpus + 1e-9
    assert 0 < plan.cpus_per_decode_task <= plan.decode_cpus
    if cpus >= 2:
        assert plan.decode_cpus >= 1


def test_plan_two_cpus() -> None:
    """The measured case: 2 CPUs, 2 actors at 1 CPU each never finished; 0.5 each leaves 1 CPU to read."""
    two = plan_actors(2, num_actors=2)
    assert (two.num_actors, two.cpus_per_actor, two.threads, two.decode_cpus) == (2, 0.5, 1, 1.0)
    one = plan_actors(2, num_actors=1)
    assert (one.num_actors, one.cpus_per_actor, one.decode_cpus) == (1, 1.0, 1.0)
    assert plan_actors(2).num_actors == 1
    assert plan_actors(16, actor_threads=4) == plan_actors(16, num_actors=3, actor_threads=4)
    assert plan_actors(16, actor_threads=4).cpus_per_actor == 4.0
    with pytest.raises(UsageError, match="no CPUs"):
        plan_actors(0)


def test_layout_two_single_cpu_nodes_never_deadlocks() -> None:
    """Issue 24: 2 nodes x 1 CPU with 2 actors of 0.5 CPU left 0.5 CPU per node for decode tasks of 1 CPU."""
    two = layout_pool({"a": 1.0, "b": 1.0}, 2, None)
    assert two.actor_nodes == ("a", "b") and two.plan.cpus_per_actor == 0.5 and two.cpus_per_decode_task == 0.5
    one = layout_pool({"a": 1.0, "b": 1.0}, None, None)  # default: one actor of 1 CPU, the other node decodes
    assert one.actor_nodes == ("a",) and one.plan.cpus_per_actor == 1.0 and one.cpus_per_decode_task == 1.0
    assert layout_pool({"a": 1.0}, 2, None).cpus_per_decode_task == 0.5  # what is left after losing a node
    # default sizing shrinks the actors until one fits a node (8 CPUs in nodes of 1 CPU)
    many = layout_pool({str(i): 1.0 for i in range(8)}, None, None)
    assert many.plan.cpus_per_actor <= 1.0 and many.cpus_per_decode_task > 0


def test_layout_refuses_what_no_node_can_hold() -> None:
    """A given pool is checked node by node, not against the cluster's total: 3 CPUs per actor on nodes of 2."""
    assert layout_pool({"big": 8.0, "small": 1.0}, 1, 6).actor_nodes == ("big",)
    with pytest.raises(UsageError, match="does not fit the Ray nodes: 1 actors x 3 CPU on nodes of 2, 2 CPU"):
        layout_pool({"a": 2.0, "b": 2.0}, 1, 3)


def test_without_ray_says_how_to_install(monkeypatch, export, images, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'cfvit-deploy\[ray\]'"):
        infer(export, images, engine="ray")
    assert (
        _cli(export, *images, "--engine", "ray", "--output", tmp_path / "r.csv") == 1
    )  # a missing extra is exit 1 (MissingExtraError), checked before any work
    assert "pip install 'cfvit-deploy[ray]'" in capsys.readouterr().err  # the one extras message (cli preflight)
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "ray", "--overlay", "ov"], "--overlay is not supported"),
        (["--engine", "ray", "--threads", "2"], "--actor-threads"),
        (["--engine", "ray", "--provider", "cuda"], "CPU providers only"),
        (["--engine", "ray", "--allow-fallback"], "--allow-fallback is not supported"),
        (["--engine", "ray", "--num-actors", "0"], "--num-actors must be a positive integer"),
        (["--engine", "ray", "--actor-threads", "0"], "--actor-threads must be a positive integer"),
        (["--engine", "ray", "--output", "r.txt"], ".parquet"),
        (["--engine", "spark"], "--engine must be one of local, ray"),
        (["--num-actors", "2"], "need --engine ray"),
        (["--shared-export"], "need --engine ray"),
        (["--stall-timeout", "5"], "need --engine ray"),
        (["--engine", "ray", "--stall-timeout", "0"], "--stall-timeout must be a positive number"),
    ],
)
def test_usage_errors(export, images, tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    assert _cli(export, *images, *args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_actor_verifies_checksums(export, tmp_path) -> None:
    """What each actor loads: coarse and fine only (baseline.onnx is not shipped), sha256 verified."""
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    manifest = load_pipeline_manifest(copy)
    assert set(manifest.graphs) == {"coarse", "fine"}
    fine = copy / manifest.graphs["fine"].file
    fine.write_bytes(fine.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="checksum mismatch"):
        load_pipeline_manifest(copy)


def test_cli_starts_and_stops_its_own_cluster(export, images, local_rows, tmp_path) -> None:
    """`--engine ray` in a fresh process: a private local cluster, started and shut down by the run."""
    pytest.importorskip("ray")
    out = tmp_path / "ray.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(cli.__file__)),
            "infer",
            str(export),
            *map(str, images),
            "--engine",
            "ray",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    # issue 13 item 11: only the command's own summary line, none of Ray's WARNING/E/INFO lines
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("files: 25") and "errors: 4" in lines[0], proc.stderr
    _assert_same_rows(_read(out), local_rows[".jsonl"])
    assert json.loads(summary_path(out).read_text())["engine"] == "ray"


def test_ray_interrupt_keeps_the_rows_done(ray_2cpu, export, images, local_rows, tmp_path) -> None:
    """Ctrl-C while Ray rows arrive: the shared shell keeps them as a clean Parquet table plus the summary."""
    import pandas as pd

    out, seen = tmp_path / "r.parquet", []

    def stop_after_five(row: InferRow) -> None:
        seen.append(row)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(InferInterrupted) as info:
        infer(export, images, engine="ray", batch_size=4, output=out, on_row=stop_after_five)
    assert (info.value.summary.rows, info.value.summary.inputs) == (5, 25)
    table = pd.read_parquet(out)
    assert list(table["path"]) == [r["path"] for r in local_rows[".jsonl"][:5]]
    assert json.loads(summary_path(out).read_text())["status"] == "interrupted"


def test_serve_address_needs_the_ray_engine(export, capsys) -> None:
    """`serve --address` is a Ray option, refused (exit 2, one line) with the local engine, before any work."""
    assert cli.main(["serve", str(export), "--address", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --address needs --engine ray"


class _DyingHandle:
    """A Ray Serve deployment handle whose replica died `deaths` times, then answers (row, batch 1, position 0)."""

    def __init__(self, deaths: int) -> None:
        self.deaths, self.calls = deaths, 0

    def remote(self, item):
        from ray.exceptions import ActorDiedError

        self.calls += 1
        dead = self.calls <= self.deaths

        async def answer():
            if dead:
                raise ActorDiedError()
            return ("row", 1, 0)

        return answer()


@pytest.mark.parametrize("deaths, want", [(2, "row"), (10**9, "unavailable")])
def test_ray_serve_stage_call_retries_then_answers_503(export, deaths, want) -> None:
    """A stage call whose replica died is sent again; past call_timeout_s it is EngineBusy("unavailable")
    (the HTTP layer's 503 + Retry-After), never held."""
    import asyncio
    import time

    pytest.importorskip("ray.serve")
    from runtimes.engine import EngineBusy, EngineConfig
    from runtimes.ray_serve import RayServeEngine

    engine = RayServeEngine(export, EngineConfig(), call_timeout_s=1.0)
    engine._handles = {"coarse": _DyingHandle(deaths)}
    started = time.monotonic()
    if want == "row":
        assert asyncio.run(engine._call("coarse", None)) == "row" and engine.retries == 2
    else:
        with pytest.raises(EngineBusy, match="unavailable"):
            asyncio.run(engine._call("coarse", None))
        assert 0.5 < time.monotonic() - started < 10 and engine.retries >= 2
    assert engine.depth("coarse") == 0
