"""What a lost node costs `cfvit infer --engine ray` and `cfvit serve --engine ray` on a two-node cluster.

    python benchmarks/ray_faults.py [--images 800] [--repeats 1]

Starts a head and a worker node of 1 CPU each with ``ray start`` on 127.0.0.1 (:mod:`tests.ray_nodes`),
then, with the real CLI joining it by ``--address``:

- infer: a healthy run, and runs whose worker node is lost (its raylet SIGKILLed) once 48 rows are
  out, with the default pool and with ``--num-actors 2``: rows, order, exit code, wall time, stderr;
- serve: ``--coarse-replicas 1 --fine-replicas 2``; requests one after another, the worker node
  killed after 5 answers; every response's status and time until 10 answers in a row are 200.

A new worker node is started before each loss. Writes ``benchmarks/results/ray_faults.json`` and
``ray_faults.md`` with the machine's load average (the machine is shared: times are from a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ray_bench import FIXTURE, RESULTS, load, machine, make_images  # noqa: E402
from tests.ray_nodes import LocalCluster, free_port, post_image, ray_env  # noqa: E402

KILL_AFTER_ROWS = 48
BATCH = 16


def infer_run(cluster: LocalCluster, export: Path, folder: Path, name: str, args: list[str], kill: bool) -> dict:
    if kill and cluster.raylet(len(cluster.nodes) - 1) is None:
        cluster.add_worker()
    cmd = [sys.executable, str(ROOT / "cli.py"), "infer", str(export), str(folder), "--engine", "ray"]
    cmd += ["--address", cluster.address, "--batch-size", str(BATCH), *args]
    started = time.monotonic()
    env = {**ray_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows, killed_at = [], None
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        rows.append(line.split("\t")[0])
        if kill and killed_at is None and len(rows) == KILL_AFTER_ROWS:
            cluster.kill_node(len(cluster.nodes) - 1)
            killed_at = time.monotonic() - started
    code, stderr = proc.wait(), proc.stderr.read()
    want = sorted(str(p) for p in folder.iterdir())
    return {
        "run": name,
        "exit": code,
        "rows": len(rows),
        "one_row_per_input_in_order": rows == want,
        "killed_at_s": None if killed_at is None else round(killed_at, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "stderr": stderr.strip().splitlines(),
    }


def serve_run(cluster: LocalCluster, export: Path, image: Path) -> dict:
    if cluster.raylet(len(cluster.nodes) - 1) is None:
        cluster.add_worker()
    port = free_port()
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", str(export), "--engine", "ray", "--address"]
    cmd += [cluster.address, "--port", str(port), "--coarse-replicas", "1", "--fine-replicas", "2", "--threads", "1"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=ray_env(), stderr=subprocess.PIPE, text=True)
    body, log = image.read_bytes(), []
    try:
        while True:
            try:
                if post_image(port, body, 30)[0] == 200:
                    break
            except OSError:
                time.sleep(1)
        for _ in range(5):
            log.append(("before", *post_image(port, body, 90)[::2]))
        cluster.kill_node(len(cluster.nodes) - 1)
        killed = time.monotonic()
        ok = 0
        while ok < 10 and time.monotonic() - killed < 300:
            status, _, took = post_image(port, body, 90)
            log.append((round(time.monotonic() - killed, 1), status, round(took, 2)))
            ok = ok + 1 if status == 200 else 0
        server.send_signal(15)
        _, stderr = server.communicate(timeout=120)
    finally:
        server.kill()
    after = [e for e in log if e[0] != "before"]
    return {
        "requests_after_loss": len(after),
        "statuses_after_loss": [e[1] for e in after],
        "longest_request_s": max(e[2] for e in after),
        "first_200_after_loss_s": next((e[0] for e in after if e[1] == 200), None),
        "log": log,
        "exit_on_sigterm": server.returncode,
        "stderr": stderr.strip().splitlines()[-3:],
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Ray engine: a lost node on a two-node cluster",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared by both nodes and other developers' jobs: a BUSY machine), "
        f"Ray {m['ray']}. Load average before {result['load_before']}, after {result['load_after']}. "
        f"A head and a worker node of 1 CPU each (`ray start` on 127.0.0.1); {result['images']} generated JPEGs, "
        f"batch {BATCH}, model deit_g7 fixture; the worker's raylet SIGKILLed after {KILL_AFTER_ROWS} rows.",
        "",
        "| infer run | exit | rows | one per input, in order | killed at s | wall s | stderr |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in result["infer"]:
        err = "<br>".join(r["stderr"])
        lines.append(
            f"| {r['run']} | {r['exit']} | {r['rows']} | {r['one_row_per_input_in_order']} | "
            f"{r['killed_at_s'] or '-'} | {r['wall_s']} | {err} |"
        )
    s = result["serve"]
    lines += [
        "",
        "`cfvit serve --engine ray --coarse-replicas 1 --fine-replicas 2`, one request at a time (eta=1: both "
        "stages), the worker node killed after 5 answers:",
        "",
        f"- requests after the loss until 10 answers in a row were 200: {s['requests_after_loss']}, statuses "
        f"{s['statuses_after_loss']}",
        f"- longest request after the loss: {s['longest_request_s']} s; first 200 after the loss at "
        f"{s['first_200_after_loss_s']} s",
        f"- SIGTERM afterwards: exit {s['exit_on_sigterm']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    args = parser.parse_args()
    os.environ.update(ray_env())
    with tempfile.TemporaryDirectory(prefix="cfvit-rf-") as tmp:
        from exporters import export as do_export

        export = Path(tmp) / "export"
        do_export(FIXTURE, export, num_heads=3)
        folder = Path(tmp) / "images"
        make_images(folder, args.images)
        result: dict[str, Any] = {"machine": machine(), "load_before": load(), "images": args.images}
        cluster = LocalCluster(Path(tmp) / "ray", workers=1, cpus=1)
        try:
            cluster.start()
            result["infer"] = [
                infer_run(cluster, export, folder, "healthy, default pool", [], kill=False),
                infer_run(cluster, export, folder, "worker lost, default pool", [], kill=True),
                infer_run(cluster, export, folder, "worker lost, --num-actors 2", ["--num-actors", "2"], kill=True),
            ]
            result["serve"] = serve_run(cluster, export, sorted(folder.iterdir())[0])
        finally:
            cluster.stop()
        result["load_after"] = load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ray_faults.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
