"""`cfvit infer | bench | sweep | demo | serve`: parse, call the library twin, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from cfvit_deploy.app.cli_app import app, console, progress_hook
from cfvit_deploy.app.cli_support import (
    bench_needs,
    needs,
    needs_infer,
    needs_provider,
    print_table,
)
from cfvit_deploy.errors import UsageError
from cfvit_deploy.signals import exit_code_for, sigterm_as_interrupt

if TYPE_CHECKING:
    from runtimes.ray_cluster import RayOptions


@app.command("infer")
def infer_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    eta: Optional[float] = typer.Option(None, "--eta", help="Exit threshold in [0, 1] (default: the manifest's)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per pipeline call."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Accept a fallback to the CPU provider."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="results.csv, .jsonl or .parquet (default: rows on stdout)."
    ),
    topk: int = typer.Option(5, "--topk", help="Labels per row (at most the number of classes)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also read the sub-folders of folders."),
    overlay: Optional[Path] = typer.Option(
        None, "--overlay", help="Folder for PNGs of fine-stage images with the refined patches."
    ),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", help="Largest image accepted (default 89,478,485 pixels)."
    ),
    decode: str = typer.Option(
        "exact", "--decode", help="exact | fast (JPEG draft mode and reducing resize: faster on large photos)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file and overlay PNGs."),
    engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data; pip install 'cfvit-deploy[ray]')."),
    graph: str = typer.Option("pair", "--graph", help="pair (coarse.onnx + fine.onnx) | single (single.onnx)."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray: local (default, a private cluster), auto, or ray://host:10001."
    ),
    num_actors: Optional[int] = typer.Option(
        None, "--num-actors", help="Ray: pipeline actors (default: from the cluster's CPUs)."
    ),
    actor_threads: Optional[int] = typer.Option(None, "--actor-threads", help="Ray: ONNX Runtime threads per actor."),
    shared_export: bool = typer.Option(
        False,
        "--shared-export",
        help="Ray: actors load EXPORT_DIR by path (shared file system), not from the object store.",
    ),
    stall_timeout: Optional[float] = typer.Option(
        None,
        "--stall-timeout",
        help="Ray: end the run (rows kept, exit 1) when no batch finishes for this long (s, default 120).",
    ),
) -> int:
    """Classify images with the gated two-stage pipeline: one row per input file.

    An image exits at the coarse stage when its max softmax probability is >= eta; the others are re-split and classified by the fine stage. Unreadable files get an error row and the run goes on. With --output, OUTPUT.summary.json records the counts, timing and export.

    Exit codes: 0 every file classified; 1 some files failed (or the export or provider is unusable); 2 usage error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): the output keeps the rows done so far.
    """
    needs_infer(output, engine, provider)

    from cfvit_deploy.preprocessing import DEFAULT_MAX_PIXELS
    from runtimes.backends import SessionConfig
    from runtimes.decode_hint import infer_hint
    from runtimes.infer import InferInterrupted, InferRow, infer

    if hint := infer_hint(export_dir, inputs, recursive, decode):
        print(hint, file=sys.stderr)

    def show(row: InferRow) -> None:
        if row.error:
            print(f"{row.path}\terror: {row.error}")
        else:
            top = ", ".join(f"{label} {p:.3f}" for label, p in zip(row.labels, row.probs, strict=True))
            print(f"{row.path}\t{row.stage}\tconf {row.confidence:.3f}\tpatches {row.patches}\t{top}")

    config = (
        SessionConfig(threads=threads, allow_fallback=allow_fallback) if threads is not None or allow_fallback else None
    )
    with progress_hook() as progress, sigterm_as_interrupt():
        try:
            s = infer(
                export_dir,
                inputs,
                engine=engine,
                eta=eta,
                batch_size=batch_size,
                topk=topk,
                recursive=recursive,
                provider=provider,
                config=config,
                output=output,
                force=force,
                overlay=overlay,
                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                decode=decode,
                ray=ray_options(address, num_actors, actor_threads, shared_export, stall_timeout),
                graph=graph,
                on_row=None if output else show,
                progress=progress,
            )
        except InferInterrupted as exc:
            s = exc.summary
            where = f" to {s.output}" if s.output else ""
            print(f"error: interrupted, {s.rows} of {s.inputs} inputs written{where}", file=sys.stderr)
            return exit_code_for(exc)
    for line in s.warnings:  # faults the engine recovered from (a lost Ray node)
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"files: {s.inputs}  classified: {s.images}  exited at coarse: {s.exited} ({s.exit_rate:.1%})  "
        f"went to fine: {s.fine}  errors: {s.errors}  {s.images_per_s:.1f} img/s"
        + (f"  overlays: {s.overlays}" if overlay else "")
        + (f"  -> {s.output}" if s.output else ""),
        file=sys.stderr,
    )
    return 1 if s.errors else 0


def ray_options(
    address: Optional[str],
    num_actors: Optional[int],
    actor_threads: Optional[int],
    shared_export: bool,
    stall_timeout: Optional[float],
) -> RayOptions | None:
    """infer's RayOptions from the CLI's Ray flags (None when none was given: the local engine refuses the rest)."""
    from runtimes.ray_cluster import DEFAULT_STALL_TIMEOUT, RayOptions

    given = (address, num_actors, actor_threads, stall_timeout)
    if all(v is None for v in given) and not shared_export:
        return None
    timeout = DEFAULT_STALL_TIMEOUT if stall_timeout is None else stall_timeout
    return RayOptions(address, num_actors, actor_threads, shared_export, timeout)


@app.command("bench")
def bench_cmd(
    export_dir: Path = typer.Argument(
        ..., help="Export folder (from `cfvit export`; --baseline for the baseline rows)."
    ),
    providers: str = typer.Option("cpu", "--providers", help="Comma-separated: cpu, cuda, tensorrt, openvino."),
    precisions: Optional[str] = typer.Option(
        None,
        "--precisions",
        help="Comma-separated: fp32, fp16, int8 (dynamic), int8-static (calibrated QDQ; needs --calibration), "
        "optimized, int8-optimized (default: the export's).",
    ),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="Image folder that calibrates the int8-static variant (as `cfvit export`)."
    ),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Batch sizes: a,b,c or start:stop:step."),
    eta: Optional[str] = typer.Option(None, "--eta", help="Exit thresholds (real gate): a,b,c or start:stop:step."),
    fine_fraction: Optional[str] = typer.Option(
        None,
        "--fine-fraction",
        help="Fine fractions (synthetic gate): a,b,c or start:stop:step. Only the values given are measured; "
        "1 is the both-stages (eta=1) reference. Default without --eta: 0.24,0.52,1.",
    ),
    images: Optional[Path] = typer.Option(
        None,
        "--images",
        help="Folder of real images (default: synthetic inputs; unreadable files are skipped and reported).",
    ),
    end_to_end: bool = typer.Option(
        False,
        "--end-to-end",
        help="Also time every pipeline cell end to end on the --images files: decode + preprocessing + pipeline "
        "(through infer), once per --decode mode.",
    ),
    decode: str = typer.Option("exact,fast", "--decode", help="Decode modes of the --end-to-end cells: exact, fast."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed calls per cell (the first runs both stages)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per cell."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of timed calls per cell (default 3)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Intra-op threads for every runtime (default: physical cores)."
    ),
    graph: str = typer.Option(
        "pair", "--graph", help="pair | single | pair,single: the gated model as two graphs and/or single.onnx."
    ),
    torch: bool = typer.Option(False, "--torch", help="Also time PyTorch eager (gated predict and the plain ViT)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Checkpoint for --torch (default: the manifest's)."
    ),
    repeats: int = typer.Option(
        1, "--repeats", help="Measure every cell this many times (separate passes); keep the fastest run of each."
    ),
    in_process: bool = typer.Option(
        False, "--in-process", help="Run every cell in this process (faster, less isolated)."
    ),
    quiet_below: Optional[float] = typer.Option(
        None,
        "--quiet-below",
        help="Wait for, and re-measure cells disturbed by, other processes using more than this CPU %.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for results.json/csv and plots."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> int:
    """Time the gated pipeline against the plain ViT across providers x precisions x batch sizes x gates.

    Pipelines are built as users build them (CFViTPipeline with the default SessionConfig); each cell runs in its own process.
    Exit codes: 0 every requested runtime measured (single skipped cells are listed with their reason); 1 every cell of a runtime was skipped, or the export is unusable; 2 usage error.
    """
    bench_needs(export_dir, precisions, torch)  # a missing runtime (openvino) is a skipped cell, as documented
    from cfvit_deploy.app.bench import NothingMeasuredError, render_table, run_bench

    def show(result) -> None:
        print_table(render_table(result))
        for note in result.notes:
            print(f"note: {note}")

    try:
        with progress_hook() as hook:  # bars only on a terminal
            result = run_bench(
                export_dir,
                providers=providers,
                precisions=precisions,
                batch_sizes=batch_sizes,
                etas=eta or (),
                fine_fractions=fine_fraction,
                images=images,
                end_to_end=end_to_end,
                decodes=decode,
                calibration=calibration,
                warmup=warmup,
                iterations=iterations,
                duration=duration,
                threads=threads,
                graphs=graph,
                repeats=repeats,
                torch=torch,
                checkpoint=checkpoint,
                isolation="inline" if in_process else "process",
                quiet_below=quiet_below,
                out=out,
                force=force,
                progress=hook,
            )
    except NothingMeasuredError as exc:
        show(exc.result)  # the skip reasons, then the one error line
        raise
    show(result)
    if out:
        print(f"results: {out}/results.json, results.csv, latency.png, throughput.png", file=sys.stderr)
    return 0


@app.command("sweep")
def sweep_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    folder: Path = typer.Argument(..., help="Labelled images: FOLDER/<class>/<images>."),
    etas: str = typer.Option("0:1:0.05", "--etas", help="start:stop:step or a comma-separated list."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per orchestrator call."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most N images (seeded sample)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Accept a fallback to the CPU provider."),
    graph: str = typer.Option("pair", "--graph", help="pair (coarse.onnx + fine.onnx) | single (single.onnx)."),
    max_drop: Optional[float] = typer.Option(
        None, "--max-drop", help="Choose the cheapest eta whose top-1 is at most this many points below eta=1."
    ),
    max_latency_ms: Optional[float] = typer.Option(
        None,
        "--max-latency-ms",
        help="Choose the most accurate eta within this measured ms per image (at --batch-size).",
    ),
    repeats: int = typer.Option(
        1, "--repeats", help="Time every eta this many passes over the folder; keep the fastest."
    ),
    quiet_below: Optional[float] = typer.Option(
        None,
        "--quiet-below",
        help="Wait for, and re-time passes disturbed by, other processes using more than this CPU %.",
    ),
    write_eta: bool = typer.Option(False, "--write-eta", help="Store the chosen eta as the export's default_eta."),
    decode: str = typer.Option("exact", "--decode", help="exact | fast (JPEG draft mode, reducing resize)."),
    out: Path = typer.Option(Path("sweep"), "--out", "-o", help="Output folder (sweep.json, sweep.csv, sweep.png)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Accuracy, exit rate, expected GMACs and measured img/s for each eta, with the trade-off plot.

    With --max-drop or --max-latency-ms it also chooses eta for that budget (and with --write-eta makes it the export's default).
    """
    needs("bench", "sweep", "matplotlib")
    needs_provider("sweep", provider)
    from rich.table import Table

    from cfvit_deploy.app.sweep import check_plotting, sweep, write_default_eta
    from cfvit_deploy.io import check_output

    if write_eta and max_drop is None and max_latency_ms is None:
        raise UsageError("--write-eta needs a budget: --max-drop or --max-latency-ms")
    check_output(out, force)
    check_plotting()
    with progress_hook() as hook:  # a bar only on a terminal; the INFO lines name each eta anyway
        result = sweep(
            export_dir,
            folder,
            etas,
            provider=provider,
            batch_size=batch_size,
            threads=threads,
            max_images=max_images,
            allow_fallback=allow_fallback,
            graph=graph,
            max_drop=max_drop,
            max_latency_ms=max_latency_ms,
            repeats=repeats,
            quiet_below=quiet_below,
            decode=decode,
            progress=hook,
        )
    table = Table(title=f"cfvit sweep: {result.n_images} images, {provider}, batch {batch_size}")
    for col in ("eta", "top-1", "exit rate", "GMACs/img", "img/s", "ms/img", "background CPU"):
        table.add_column(col, justify="right")
    for r in result.rows:
        table.add_row(
            f"{r.eta:.2f}",
            f"{100 * r.accuracy:.1f}%",
            f"{100 * r.exit_rate:.0f}%",
            f"{r.expected_gmacs:.3f}",
            f"{r.img_per_s:.1f}",
            f"{r.ms_per_image:.3f}",
            "" if r.background_cpu_pct is None else f"{r.background_cpu_pct:.0f}%",
        )
    print_table(table)
    if result.skipped_files:
        console.print(f"skipped {len(result.skipped_files)} unreadable files (listed in sweep.json)")
    console.print(f"wrote {result.save(out, force=force)}/sweep.json, sweep.csv, sweep.png")
    if result.choice:
        c = result.choice
        print(
            f"chosen eta {c['eta']:g}: top-1 {100 * c['accuracy']:.1f}%, exit rate {100 * c['exit_rate']:.0f}%, "
            f"{c['ms_per_image']:.3f} ms/image (batch {batch_size}), {c['expected_gmacs']:.3f} GMACs/image"
        )
        if write_eta:
            write_default_eta(export_dir, c["eta"], chosen_by=c)
            print(f"wrote default_eta {c['eta']:g} to {export_dir / 'manifest.json'}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for everything the demo writes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing demo folder."),
    quick: bool = typer.Option(False, "--quick", help="Tiny data and one epoch: a smoke test of every step."),
) -> None:
    """Generate data, train, export, validate, infer, sweep and bench; write OUT/report.md."""
    # one pip line with every extra the demo runs, whichever module is missing first
    needs("export,train,bench", "demo", "torch", "onnx", "onnxsim", "onnxconverter_common", "psutil", "matplotlib")
    from cfvit_deploy.app.demo import run_demo, summary_lines

    with progress_hook() as hook:  # bars only on a terminal, and on stderr
        result = run_demo(
            out, force=force, quick=quick, say=lambda msg: console.print(msg, markup=False), progress=hook
        )
    for line in summary_lines(result):  # the summary on stdout: `cfvit demo > log` keeps it
        print(line)


@app.command("serve")
def serve_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: a free one)."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    eta: Optional[float] = typer.Option(
        None, "--eta", help="Default exit threshold of requests without ?eta= (default: the manifest's)."
    ),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images per graph call (1: no batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="Longest a stage waits for more requests to batch."),
    max_queue: int = typer.Option(
        256, "--max-queue", help="Most requests in the engine; beyond it: 503 with Retry-After."
    ),
    max_bytes: int = typer.Option(
        20 * 1024 * 1024, "--max-bytes", help="Largest request body (bytes); beyond it: 413."
    ),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image (width x height); beyond it: 413."),
    decode_pixels: int = typer.Option(
        64_000_000,
        "--decode-pixels",
        help="Most pixels (width x height, summed) decoded at once; beyond it: 503 with Retry-After.",
    ),
    decode: str = typer.Option("exact", "--decode", help="exact | fast (JPEG draft mode, reducing resize)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    shared_threads: bool = typer.Option(
        False,
        "--shared-threads",
        help="One process-wide ONNX Runtime pool for both graphs instead of a pool per session (the default, as infer).",
    ),
    engine: str = typer.Option(
        "local", "--engine", help="local | ray (Ray Serve deployments; pip install 'cfvit-deploy[ray]')."
    ),
    graph: str = typer.Option("pair", "--graph", help="pair (coarse.onnx + fine.onnx) | single (single.onnx)."),
    coarse_replicas: int = typer.Option(1, "--coarse-replicas", help="Ray: replicas of the coarse deployment."),
    fine_replicas: int = typer.Option(1, "--fine-replicas", help="Ray: replicas of the fine deployment."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray: local (default, a private cluster), auto, or host:port of a cluster."
    ),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds for a request's body; beyond: 408."),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", help="Seconds for a request's headers (from connect or the last answer); beyond: 408."
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="Longest SIGTERM waits for requests in flight before closing them."
    ),
    max_connections: int = typer.Option(
        512, "--max-connections", help="Open connections beyond which a new one gets 503 and is closed."
    ),
    model_name: str = typer.Option("cfvit", "--model-name", help="The model's name on the /v2 routes (KServe v2)."),
) -> int:
    """Serve the export over HTTP with two-stage dynamic batching: POST /v1/classify, the KServe v2 routes
    (/v2/models/NAME/infer ...), /healthz, /readyz, /metrics.

    SIGTERM stops accepting, answers the requests in flight (at most --drain-timeout) and exits 0; a second
    SIGTERM or Ctrl-C exits at once. See docs/serve.md.
    """
    needs("serve", "serve", "starlette", "uvicorn", "prometheus_client", "multipart")
    if engine == "ray":
        needs("ray", "serve --engine ray", "ray")
    needs_provider("serve", provider)
    from cfvit_deploy.app.serve import ServeOptions, serve

    options = ServeOptions(
        host=host,
        port=port,
        provider=provider,
        eta=eta,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        decode_pixels=decode_pixels,
        decode=decode,
        threads=threads,
        shared_threads=shared_threads,
        engine=engine,
        replicas={"coarse": coarse_replicas, "fine": fine_replicas},
        address=address,
        graph=graph,
        body_timeout=body_timeout,
        header_timeout=header_timeout,
        drain_timeout=drain_timeout,
        max_connections=max_connections,
        model_name=model_name,
    )
    return serve(export_dir, options)
