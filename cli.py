"""`cfvit` command line: a thin Typer layer over the library (every command has a Python twin).

User errors (:class:`cfvit_deploy.errors.CFViTError`) print one line ``error: ...`` and exit 1
(2 for usage errors); a traceback is shown only with ``--debug``. Internal errors keep theirs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cfvit_deploy.app.cli_support import (
    LIBRARY_LOGGERS,
    bench_needs,
    needs,
    needs_infer,
    needs_provider,
    progress_bars,
    run_app,
    use_plain_commands,
    version,
)
from cfvit_deploy.checks import check_fraction
from cfvit_deploy.errors import UsageError
from cfvit_deploy.progress import ProgressHook
from cfvit_deploy.signals import exit_code_for, sigterm_as_interrupt

# rich_markup_mode=None: help is plain text, so "pip install 'cfvit-deploy[ray]'" keeps its brackets
# (rich markup would eat them) and flags get no "<bool>" placeholder.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="CF-ViT deployment toolkit: train, export, validate, infer, bench, sweep, demo.",
)
console = Console(stderr=True)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        print(f"cfvit-deploy {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug
    if debug:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


def _csv_list(value: str, kind: type, flag: str) -> list:
    """Parse a comma-separated flag value ("1,4") into a list of `kind`."""
    try:
        items = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated {kind.__name__} values, got {value!r}") from None
    if not items:
        raise UsageError(f"{flag} is empty")
    return items


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="CF-ViT checkpoint (official or cfvit-deploy's)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to create."),
    num_heads: Optional[int] = typer.Option(
        None, "--num-heads", help="Attention heads (default: what the file records or its training args say, else 6)."
    ),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8."),
    optimize: bool = typer.Option(False, "--optimize", help="ONNX Runtime transformer fusions."),
    baseline: bool = typer.Option(False, "--baseline", help="Also export baseline.onnx (plain ViT, all fine tokens)."),
    eta: float = typer.Option(0.7, "--eta", help="Default confidence threshold recorded in the manifest."),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Run onnxsim on each graph."),
    weights: str = typer.Option(
        "auto",
        "--weights",
        help="auto | model | ema: the trained or the EMA weights of a file that holds both (auto: EMA for timm's "
        "state_dict_ema files, the trained weights otherwise).",
    ),
    attention: Optional[str] = typer.Option(
        None,
        "--attention",
        help="fused (one ONNX Runtime MultiHeadAttention node per block) | plain "
        "(default: exporters.attention.DEFAULT_ATTENTION, the one measured faster).",
    ),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="Image folder: makes --precision int8 static (calibrated QDQ), not dynamic."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing export folder."),
) -> None:
    """Export a checkpoint as coarse.onnx + fine.onnx (+ baseline.onnx) + manifest.json."""
    needs("export", "export", "torch", "onnx", "onnxsim", "onnxconverter_common")
    from cfvit_deploy.io import check_output
    from exporters.onnx_export import check_export_args

    check_export_args(precision, optimize, opset, eta, num_heads, weights, attention, calibration)  # before any work
    check_output(out, force)
    from exporters import export

    manifest = export(
        checkpoint,
        out,
        num_heads=num_heads,
        opset=opset,
        precision=precision,
        optimize=optimize,
        baseline=baseline,
        simplify=simplify,
        default_eta=eta,
        attention=attention,
        calibration=calibration,
        force=force,
        weights=weights,
        progress=lambda msg: console.print(f"[dim]{msg}[/dim]"),
    )
    cfg = manifest.model
    loaded = (manifest.source.get("checkpoint") or {}).get("weights")
    if loaded:
        kind = "EMA" if loaded in ("state_dict_ema", "model_ema") else "trained"
        console.print(f"loaded the {kind} weights ({loaded}) of {checkpoint}", markup=False, soft_wrap=True)
    console.print(
        f"exported CF-ViT {cfg.arch} g={cfg.coarse_grid} ({manifest.precision}, {manifest.attention} attention"
        f"{', optimized' if manifest.optimized else ''}) to {out}"
    )
    for name, spec in manifest.graphs.items():
        size = (out / spec.file).stat().st_size / 1e6
        console.print(f"  {spec.file:<14} {size:7.1f} MB  {manifest.source['notes'][name]}")


@app.command("validate")
def validate_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="PyTorch reference (default: the manifest's)."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of real images to compare on too."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Batch sizes: a,b,c or start:stop:step."),
    etas: str = typer.Option(
        "0.25,0.5,0.75,0.9", "--etas", help="Eta values of the exit check: a,b,c or start:stop:step."
    ),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (fp32 default 1e-4)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (fp32 default 1e-4)."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Top-1 agreement rate required."),
    min_exit: Optional[float] = typer.Option(None, "--min-exit", help="Exit-decision agreement rate required."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report (default EXPORT_DIR/validation.json)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Accept a fallback to the CPU provider."),
) -> int:
    """Compare every graph with PyTorch; exit 0 only if every check PASSED."""
    needs("export", "validate", "torch", "onnx")
    needs_provider("validate", provider)
    from cfvit_deploy.checks import parse_batch_sizes, parse_etas
    from cfvit_deploy.data.reader import list_images
    from cfvit_deploy.io import check_output
    from runtimes.backends import check_provider

    sizes, eta_list = parse_batch_sizes(batch_sizes), parse_etas(etas)  # every flag before any work
    check_provider(provider)
    for value, flag in ((min_top1, "--min-top1"), (min_exit, "--min-exit")):
        if value is not None:
            check_fraction(value, flag)
    if report is not None:  # a --report in a missing folder is refused before the run, not after it
        check_output(report, force=True)
        if report.is_dir():
            raise UsageError(f"{report} is a folder; give a file name for the output")
    if images is not None:
        list_images(images)
    from rich.table import Table

    from exporters import validate

    with progress_hook() as hook:
        result = validate(
            export_dir,
            checkpoint,
            images=images,
            provider=provider,
            batch_sizes=tuple(sizes),
            etas=tuple(eta_list),
            atol=atol,
            rtol=rtol,
            min_top1=min_top1,
            min_exit=min_exit,
            allow_fallback=allow_fallback,
            progress=hook,
            warn=lambda msg: console.print(f"warning: {msg}", markup=False, soft_wrap=True),
        )
    table = Table(title=f"cfvit validate {export_dir} ({result.precision}, {provider})")
    for col in ("input", "batch", "check", "metric", "value", "limit", "result"):
        table.add_column(col, justify="right" if col in ("batch", "value", "limit") else "left")
    for c in result.checks:
        table.add_row(
            c.input,
            str(c.batch),
            c.name,
            c.metric,
            f"{c.value:.3g}",
            f"{c.threshold:.3g}",
            "[green]PASSED[/green]" if c.passed else "[red]FAILED[/red]",
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if result.skipped_images:
        console.print(f"skipped {len(result.skipped_images)} unreadable images (listed in the report)")
    path = result.save(report or export_dir / "validation.json")
    n_failed = len(result.failed)
    print(
        f"{'PASSED' if result.passed else 'FAILED'}: {len(result.checks) - n_failed}/{len(result.checks)} checks "
        f"passed (report: {path})"
    )
    return 0 if result.passed else 1


@app.command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Image folder: DATA/train + DATA/val, or class folders with --val-fraction."),
    synthetic: bool = typer.Option(
        False, "--synthetic", help="Use the built-in image set at DATA (made if absent); defaults: the demo recipe."
    ),
    arch: Optional[str] = typer.Option(None, "--arch", help="deit | lvvit (default: deit)."),
    size: Optional[str] = typer.Option(None, "--size", help="micro | tiny | small (default: micro)."),
    coarse_grid: Optional[int] = typer.Option(None, "--coarse-grid", help="Coarse grid g, 7 or 9 (default: 7)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: 30)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, cosine) (default: 1e-3)."),
    selection_after: Optional[int] = typer.Option(
        None,
        "--selection-after",
        help="Warm-up epochs on all fine tokens before informative selection (default: 2/3, at least one selection epoch).",
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of initialisation, order and augmentation (default: 0)."
    ),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Split flat class folders by this fraction."
    ),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint's weights."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run saved in this checkpoint."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Checkpoint to write (default: cfvit.pth, or RESUME)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Show a progress bar per epoch (the per-epoch summary lines stay)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch intra-op threads (default: the idle cores)."),
) -> None:
    """Train a CF-ViT (CE on fine + KL(fine || coarse); all fine tokens, then informative selection)."""
    needs("train", "train", "torch")
    from dataclasses import replace

    from cfvit_deploy.data.synthetic import ensure_synthetic_dataset
    from cfvit_deploy.training import DEMO_RECIPE, TrainRecipe, resume_recipe, train

    given = {
        k: v
        for k, v in dict(
            arch=arch,
            size=size,
            coarse_grid=coarse_grid,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            selection_after=selection_after,
            seed=seed,
        ).items()
        if v is not None
    }
    base = resume_recipe(resume) if resume else DEMO_RECIPE if synthetic else TrainRecipe()
    recipe = replace(base, **given)
    if synthetic:
        data = ensure_synthetic_dataset(data)
    result = train(
        data,
        out or resume or Path("cfvit.pth"),
        recipe,
        init=init,
        resume=resume,
        val_fraction=val_fraction,
        force=force,
        progress=progress,
        threads=threads,
    )
    val = result.val
    print(
        f"trained {recipe.arch}/{recipe.size} g={recipe.coarse_grid} on {len(result.class_names)} classes for "
        f"{len(result.history)} epochs in {result.seconds:.0f} s: val accuracy coarse {val.coarse_acc:.1%}, "
        f"fine {val.fine_acc:.1%} -> {result.path}"
    )


@app.command("make-data")
def make_data_cmd(
    out: Path = typer.Argument(
        ..., help="Folder to create: train/ and val/ (class folders + labels.csv each) and meta.json."
    ),
    per_class: int = typer.Option(250, "--per-class", help="Training images per class."),
    val_per_class: Optional[int] = typer.Option(
        None, "--val-per-class", help="Validation images per class (default: per-class / 5)."
    ),
    image_size: int = typer.Option(256, "--image-size", help="Image side in pixels (256: pixel-exact for g=7)."),
    hard_fraction: float = typer.Option(
        0.6, "--hard-fraction", help="Share of hard images (small, off-centre, cluttered)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
) -> None:
    """Generate the built-in synthetic image set (6 classes of patterned objects, easy and hard).

    Run again with the same options it writes nothing; a set with files missing is regenerated."""
    from cfvit_deploy.data.synthetic import SyntheticSpec, generate_synthetic

    n_val = val_per_class if val_per_class is not None else max(1, per_class // 5)
    done = generate_synthetic(out, SyntheticSpec(per_class, n_val, seed, image_size, hard_fraction), force)
    images = f"{per_class} training and {n_val} validation images per class"
    print(
        {
            "reused": f"{done.root} already holds this set ({images}): nothing written",
            "repaired": f"{done.root} had {done.missing} file(s) of this set missing: regenerated it ({images})",
            "replaced": f"replaced {done.root}: wrote {images}",
            "written": f"wrote {images} to {done.root}",
        }[done.action]
    )


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
    force: bool = typer.Option(False, "--force", help="Overwrite the output file and overlay PNGs."),
    engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data; pip install 'cfvit-deploy[ray]')."),
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
) -> int:
    """Classify images with the gated two-stage pipeline: one row per input file.

    An image exits at the coarse stage when its max softmax probability is >= eta; the others are re-split and classified by the fine stage. Unreadable files get an error row and the run goes on. With --output, OUTPUT.summary.json records the counts, timing and export.

    Exit codes: 0 every file classified; 1 some files failed (or the export or provider is unusable); 2 usage error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): the output keeps the rows done so far.
    """
    needs_infer(output, engine, provider)

    from cfvit_deploy.preprocessing import DEFAULT_MAX_PIXELS
    from runtimes.backends import SessionConfig
    from runtimes.infer import InferInterrupted, InferRow, infer

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
                address=address,
                num_actors=num_actors,
                actor_threads=actor_threads,
                shared_export=shared_export,
                on_row=None if output else show,
                progress=progress,
            )
        except InferInterrupted as exc:
            s = exc.summary
            where = f" to {s.output}" if s.output else ""
            print(f"error: interrupted, {s.rows} of {s.inputs} inputs written{where}", file=sys.stderr)
            return exit_code_for(exc)
    print(
        f"files: {s.inputs}  classified: {s.images}  exited at coarse: {s.exited} ({s.exit_rate:.1%})  "
        f"went to fine: {s.fine}  errors: {s.errors}  {s.images_per_s:.1f} img/s"
        + (f"  overlays: {s.overlays}" if overlay else "")
        + (f"  -> {s.output}" if s.output else ""),
        file=sys.stderr,
    )
    return 1 if s.errors else 0


@app.command("bench")
def bench_cmd(
    export_dir: Path = typer.Argument(
        ..., help="Export folder (from `cfvit export`; --baseline for the baseline rows)."
    ),
    providers: str = typer.Option("cpu", "--providers", help="Comma-separated: cpu, cuda, tensorrt, openvino."),
    precisions: Optional[str] = typer.Option(
        None,
        "--precisions",
        help="Comma-separated: fp32, fp16, int8, optimized, int8-optimized (default: the export's).",
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
    warmup: int = typer.Option(3, "--warmup", help="Untimed calls per cell (the first runs both stages)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per cell."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of timed calls per cell (default 3)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Intra-op threads for every runtime (default: physical cores)."
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
        Console(width=None if sys.stdout.isatty() else 200).print(render_table(result))
        for note in result.notes:
            print(f"note: {note}")

    try:
        result = run_bench(
            export_dir,
            providers=providers,
            precisions=precisions,
            batch_sizes=batch_sizes,
            etas=eta or (),
            fine_fractions=fine_fraction,
            images=images,
            warmup=warmup,
            iterations=iterations,
            duration=duration,
            threads=threads,
            repeats=repeats,
            torch=torch,
            checkpoint=checkpoint,
            isolation="inline" if in_process else "process",
            quiet_below=quiet_below,
            out=out,
            force=force,
            progress=lambda task, done, total: console.print(f"[dim][{done}/{total}] {task}[/dim]"),
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
    max_drop: Optional[float] = typer.Option(
        None, "--max-drop", help="Choose the cheapest eta whose top-1 is at most this many points below eta=1."
    ),
    max_latency_ms: Optional[float] = typer.Option(
        None,
        "--max-latency-ms",
        help="Choose the most accurate eta within this measured ms per image (at --batch-size).",
    ),
    write_eta: bool = typer.Option(False, "--write-eta", help="Store the chosen eta as the export's default_eta."),
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
    result = sweep(
        export_dir,
        folder,
        etas,
        provider=provider,
        batch_size=batch_size,
        threads=threads,
        max_images=max_images,
        allow_fallback=allow_fallback,
        max_drop=max_drop,
        max_latency_ms=max_latency_ms,
        progress=lambda task, done, total: console.print(f"[dim]{task}: eta {done}/{total}[/dim]"),
    )
    table = Table(title=f"cfvit sweep: {result.n_images} images, {provider}, batch {batch_size}")
    for col in ("eta", "top-1", "exit rate", "GMACs/img", "img/s", "ms/img"):
        table.add_column(col, justify="right")
    for r in result.rows:
        table.add_row(
            f"{r.eta:.2f}",
            f"{100 * r.accuracy:.1f}%",
            f"{100 * r.exit_rate:.0f}%",
            f"{r.expected_gmacs:.3f}",
            f"{r.img_per_s:.1f}",
            f"{r.ms_per_image:.3f}",
        )
    Console().print(table)
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
    needs("export", "demo", "torch", "onnx", "onnxsim", "onnxconverter_common")
    needs("bench", "demo", "psutil", "matplotlib")
    from cfvit_deploy.app.demo import run_demo

    result = run_demo(
        out, force=force, quick=quick, say=lambda msg: console.print(msg, markup=False), progress=console.is_terminal
    )  # bars only on a terminal, and on stderr
    s = result.summary
    console.print(
        f"coarse top-1 {100 * s['val_coarse_acc']:.1f}%, fine top-1 {100 * s['val_fine_acc']:.1f}%, "
        f"export validation {'PASSED' if s['validation_passed'] else 'FAILED'}; "
        f"total {sum(result.seconds.values()):.0f} s"
    )
    if choice := s.get("eta_choice"):
        console.print(
            f"chosen eta {choice['eta']:g} (top-1 at most {choice['budget']['max_drop']:g} point below eta = 1, "
            f"now the export's default): top-1 {100 * choice['accuracy']:.1f}%, exit at coarse "
            f"{100 * choice['exit_rate']:.0f}%, {choice['ms_per_image']:.2f} ms/image "
            f"(batch {choice['batch_size']})",
            markup=False,
        )
    console.print(
        f"report: {result.report}\nexport: {out / 'export'}\npredictions: {out / 'predictions.csv'} "
        f"(overlays in {out / 'overlays'})\nsweep: {out / 'sweep'}\nbench: {out / 'bench'}"
    )


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
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    shared_threads: bool = typer.Option(
        False,
        "--shared-threads",
        help="One process-wide ONNX Runtime pool for both graphs instead of a pool per session (the default, as infer).",
    ),
    engine: str = typer.Option(
        "local", "--engine", help="local | ray (Ray Serve deployments; pip install 'cfvit-deploy[ray]')."
    ),
    coarse_replicas: int = typer.Option(1, "--coarse-replicas", help="Ray: replicas of the coarse deployment."),
    fine_replicas: int = typer.Option(1, "--fine-replicas", help="Ray: replicas of the fine deployment."),
) -> int:
    """Serve the export over HTTP with two-stage dynamic batching: POST /v1/classify, /healthz, /readyz, /metrics.

    SIGTERM stops accepting, answers every queued request and exits 0. See docs/serve.md.
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
        threads=threads,
        shared_threads=shared_threads,
        engine=engine,
        replicas={"coarse": coarse_replicas, "fine": fine_replicas},
    )
    return serve(export_dir, options)


use_plain_commands(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit code (errors as one line, SIGTERM like Ctrl-C)."""
    return run_app(app, argv, _state)


def progress_hook() -> contextlib.AbstractContextManager[Optional[ProgressHook]]:
    """Rich progress bars on stderr as a :class:`ProgressHook` (None when stderr is not a terminal)."""
    return progress_bars(console)


if __name__ == "__main__":
    sys.exit(main())
