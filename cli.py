"""`cfvit` command line: a thin Typer layer over the library (every command has a Python twin).

User errors (:class:`cfvit_deploy.errors.CFViTError`) print one line ``error: ...`` and exit 1
(2 for usage errors); a traceback is shown only with ``--debug``. Internal errors keep theirs.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cfvit_deploy.errors import CFViTError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="CF-ViT deployment toolkit: train, export, validate, infer, bench, sweep, demo.",
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too.")) -> None:
    _state["debug"] = debug


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
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads (official files: default 6)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8."),
    optimize: bool = typer.Option(False, "--optimize", help="ONNX Runtime transformer fusions."),
    baseline: bool = typer.Option(False, "--baseline", help="Also export baseline.onnx (plain ViT, all fine tokens)."),
    eta: float = typer.Option(0.7, "--eta", help="Default confidence threshold recorded in the manifest."),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Run onnxsim on each graph."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export folder."),
) -> None:
    """Export a checkpoint as coarse.onnx + fine.onnx (+ baseline.onnx) + manifest.json."""
    from exporters import export

    manifest = export(checkpoint, out, num_heads=num_heads, opset=opset, precision=precision, optimize=optimize,
                      baseline=baseline, simplify=simplify, default_eta=eta, force=force,
                      progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    cfg = manifest.model
    console.print(f"exported CF-ViT {cfg.arch} g={cfg.coarse_grid} ({manifest.precision}"
                  f"{', optimized' if manifest.optimized else ''}) to {out}")
    for name, spec in manifest.graphs.items():
        size = (out / spec.file).stat().st_size / 1e6
        console.print(f"  {spec.file:<14} {size:7.1f} MB  {manifest.source['notes'][name]}")


@app.command("validate")
def validate_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="PyTorch reference (default: the manifest's)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of real images to compare on too."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes."),
    etas: str = typer.Option("0.25,0.5,0.75,0.9", "--etas", help="Comma-separated eta values for the exit check."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (fp32 default 1e-4)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (fp32 default 1e-4)."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Top-1 agreement rate required."),
    min_exit: Optional[float] = typer.Option(None, "--min-exit", help="Exit-decision agreement rate required."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report (default EXPORT_DIR/validation.json)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Accept a fallback to the CPU provider."),
) -> int:
    """Compare the graphs with PyTorch; exit 0 only if every check PASSED."""
    from exporters import validate
    from rich.table import Table

    from cfvit_deploy.io import check_output

    if report is not None:  # a --report in a missing folder is refused before the run, not after it
        check_output(report, force=True)
    result = validate(export_dir, checkpoint, images=images, provider=provider,
                      batch_sizes=tuple(_csv_list(batch_sizes, int, "--batch-sizes")),
                      etas=tuple(_csv_list(etas, float, "--etas")), atol=atol, rtol=rtol,
                      min_top1=min_top1, min_exit=min_exit, allow_fallback=allow_fallback)
    table = Table(title=f"cfvit validate {export_dir} ({result.precision}, {provider})")
    for col in ("check", "metric", "value", "limit", "result"):
        table.add_column(col)
    for c in result.checks:
        table.add_row(c.name, c.metric, f"{c.value:.3g}", f"{c.threshold:.3g}",
                      "[green]PASSED[/green]" if c.passed else "[red]FAILED[/red]")
    Console().print(table)
    for c in result.checks:
        print(c.line())
    path = result.save(report or export_dir / "validation.json")
    n_failed = len(result.failed)
    print(f"{'PASSED' if result.passed else 'FAILED'}: {len(result.checks) - n_failed}/{len(result.checks)} checks "
          f"passed (report: {path})")
    return 0 if result.passed else 1


@app.command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Image folder: DATA/train + DATA/val, or class folders with --val-fraction."),
    synthetic: bool = typer.Option(
        False, "--synthetic", help="Use the built-in image set at DATA (made if absent); defaults: the demo recipe."),
    arch: Optional[str] = typer.Option(None, "--arch", help="deit | lvvit (default: deit)."),
    size: Optional[str] = typer.Option(None, "--size", help="micro | tiny | small (default: micro)."),
    coarse_grid: Optional[int] = typer.Option(None, "--coarse-grid", help="Coarse grid g, 7 or 9 (default: 7)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: 30)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, cosine) (default: 1e-3)."),
    selection_after: Optional[int] = typer.Option(
        None, "--selection-after",
        help="Warm-up epochs on all fine tokens before informative selection (default: 2/3, at least one selection epoch)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, order and augmentation (default: 0)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Split flat class folders by this fraction."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint's weights."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run saved in this checkpoint."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Checkpoint to write (default: cfvit.pth, or RESUME)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Show a progress bar per epoch (the per-epoch summary lines stay)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch intra-op threads (default: the idle cores)."),
) -> None:
    """Train a CF-ViT (CE on fine + KL(fine || coarse); all fine tokens, then informative selection)."""
    from dataclasses import replace

    from cfvit_deploy.data.synthetic import ensure_synthetic_dataset
    from cfvit_deploy.training import DEMO_RECIPE, TrainRecipe, resume_recipe, train

    given = {k: v for k, v in dict(arch=arch, size=size, coarse_grid=coarse_grid, epochs=epochs, batch_size=batch_size,
                                   lr=lr, selection_after=selection_after, seed=seed).items() if v is not None}
    base = resume_recipe(resume) if resume else DEMO_RECIPE if synthetic else TrainRecipe()
    recipe = replace(base, **given)
    if synthetic:
        data = ensure_synthetic_dataset(data)
    result = train(data, out or resume or Path("cfvit.pth"), recipe, init=init, resume=resume,
                   val_fraction=val_fraction, force=force, progress=progress, threads=threads)
    val = result.val
    print(f"trained {recipe.arch}/{recipe.size} g={recipe.coarse_grid} on {len(result.class_names)} classes for "
          f"{len(result.history)} epochs in {result.seconds:.0f} s: val accuracy coarse {val.coarse_acc:.1%}, "
          f"fine {val.fine_acc:.1%} -> {result.path}")


@app.command("make-data")
def make_data_cmd(
    out: Path = typer.Argument(
        ..., help="Folder to create: train/ and val/ (class folders + labels.csv each) and meta.json."),
    per_class: int = typer.Option(250, "--per-class", help="Training images per class."),
    val_per_class: Optional[int] = typer.Option(
        None, "--val-per-class", help="Validation images per class (default: per-class / 5)."),
    image_size: int = typer.Option(256, "--image-size", help="Image side in pixels (256: pixel-exact for g=7)."),
    hard_fraction: float = typer.Option(
        0.6, "--hard-fraction", help="Share of hard images (small, off-centre, cluttered)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
) -> None:
    """Generate the built-in synthetic image set (6 classes of patterned objects, easy and hard).

    Run again with the same options it writes nothing; a set with files missing is regenerated."""
    from cfvit_deploy.data.synthetic import SyntheticSpec, generate_synthetic

    n_val = val_per_class if val_per_class is not None else max(1, per_class // 5)
    done = generate_synthetic(out, SyntheticSpec(per_class, n_val, seed, image_size, hard_fraction), force)
    images = f"{per_class} training and {n_val} validation images per class"
    print({"reused": f"{done.root} already holds this set ({images}): nothing written",
           "repaired": f"{done.root} had {done.missing} file(s) of this set missing: regenerated it ({images})",
           "replaced": f"replaced {done.root}: wrote {images}",
           "written": f"wrote {images} to {done.root}"}[done.action])


@app.command("infer")
def infer_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    eta: Optional[float] = typer.Option(None, "--eta", help="Exit threshold in [0, 1] (default: the manifest's)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per pipeline call."),
    provider: str = typer.Option("cpu", "--provider", help="cpu | cuda | tensorrt | openvino."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Accept a fallback to the CPU provider."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="results.csv or .jsonl (.parquet with --engine ray) (default: rows on stdout)."),
    topk: int = typer.Option(5, "--topk", help="Labels per row (at most the number of classes)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also read the sub-folders of folders."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Folder for PNGs of fine-stage images with the refined patches."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Largest image accepted (default 89,478,485 pixels)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file and overlay PNGs."),
    engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data; pip install 'cfvit-deploy[ray]')."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray: local (default, a private cluster), auto, or ray://host:10001."),
    num_actors: Optional[int] = typer.Option(None, "--num-actors", help="Ray: pipeline actors (default: from the cluster's CPUs)."),
    actor_threads: Optional[int] = typer.Option(None, "--actor-threads", help="Ray: ONNX Runtime threads per actor."),
    shared_export: bool = typer.Option(False, "--shared-export", help="Ray: actors load EXPORT_DIR by path (shared file system), not from the object store."),
) -> int:
    """Classify images with the gated two-stage pipeline: one row per input file.

    An image exits at the coarse stage when its max softmax probability is >= eta; the others are re-split and classified by the fine stage. Unreadable files get an error row and the run goes on.

    Exit codes: 0 every file classified; 1 some files failed (or the export or provider is unusable); 2 usage error; 130 interrupted (the output keeps the rows done so far and a final note).
    """
    from cfvit_deploy.preprocessing import DEFAULT_MAX_PIXELS
    from runtimes.backends import SessionConfig
    from runtimes.infer import InferInterrupted, InferRow, infer

    def show(row: InferRow) -> None:
        if row.error:
            print(f"{row.path}\terror: {row.error}")
        else:
            top = ", ".join(f"{label} {p:.3f}" for label, p in zip(row.labels, row.probs))
            print(f"{row.path}\t{row.stage}\tconf {row.confidence:.3f}\tpatches {row.patches}\t{top}")

    try:
        pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if engine == "ray":
            from runtimes.ray_engine import infer_ray

            local_only = {"--threads (use --actor-threads)": threads, "--overlay": overlay, "--allow-fallback": allow_fallback}
            if any(local_only.values()):
                raise UsageError(f"{next(f for f, v in local_only.items() if v)} is not supported with --engine ray")
            s = infer_ray(export_dir, inputs, eta=eta, batch_size=batch_size, topk=topk, recursive=recursive,
                          provider=provider, address=address or "local", num_actors=num_actors,
                          actor_threads=actor_threads, shared_export=shared_export, output=output, force=force,
                          max_pixels=pixels, on_row=None if output else show, progress=console.is_terminal)
        elif engine != "local":
            raise UsageError(f"unknown engine {engine!r}; available: local, ray")
        elif address is not None or num_actors is not None or actor_threads is not None or shared_export:
            raise UsageError("--address, --num-actors, --actor-threads and --shared-export need --engine ray")
        else:
            s = infer(export_dir, inputs, eta=eta, batch_size=batch_size, topk=topk, recursive=recursive,
                      provider=provider, config=SessionConfig(threads=threads, allow_fallback=allow_fallback),
                      output=output, force=force, overlay=overlay, max_pixels=pixels,
                      on_row=None if output else show, progress=console if console.is_terminal else None)
    except InferInterrupted as exc:
        s = exc.summary
        where = f" to {s.output}" if s.output else ""
        print(f"interrupted: {s.rows} of {s.inputs} rows written{where}", file=sys.stderr)
        return 130
    print(f"files: {s.inputs}  classified: {s.images}  exited at coarse: {s.exited} ({s.exit_rate:.1%})  "
          f"went to fine: {s.fine}  errors: {s.errors}  {s.images_per_s:.1f} img/s"
          + (f"  overlays: {s.overlays}" if overlay else "") + (f"  -> {s.output}" if s.output else ""),
          file=sys.stderr)
    return 1 if s.errors else 0



@app.command("bench")
def bench_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder (from `cfvit export`; --baseline for the baseline rows)."),
    providers: str = typer.Option("cpu", "--providers", help="Comma-separated: cpu, cuda, tensorrt, openvino."),
    precisions: Optional[str] = typer.Option(
        None, "--precisions", help="Comma-separated: fp32, fp16, int8, optimized, int8-optimized (default: the export's)."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes."),
    eta: Optional[str] = typer.Option(None, "--eta", help="Comma-separated exit thresholds (real gate)."),
    fine_fraction: Optional[str] = typer.Option(
        None, "--fine-fraction", help="Comma-separated fine fractions (synthetic gate; default 0.24,0.52,1.0 without --eta)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of real images (default: synthetic inputs)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed calls per cell (the first runs both stages)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Timed calls per cell."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of timed calls per cell (default 3)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for every runtime (default: physical cores)."),
    torch: bool = typer.Option(False, "--torch", help="Also time PyTorch eager (gated predict and the plain ViT)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint for --torch (default: the manifest's)."),
    ort_threading: Optional[str] = typer.Option(
        None, "--ort-threading",
        help="shared (one spinning pool for both graphs; default) | spin | no-spin (pool per session; --in-process default)."),
    repeats: int = typer.Option(1, "--repeats", help="Measure every cell this many times (separate passes); keep the fastest run of each."),
    in_process: bool = typer.Option(False, "--in-process", help="Run every cell in this process (faster, less isolated)."),
    quiet_below: Optional[float] = typer.Option(
        None, "--quiet-below", help="Wait for, and re-measure cells disturbed by, other processes using more than this CPU %."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for results.json/csv and plots."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> int:
    """Time the gated pipeline against the plain ViT across providers x precisions x batch sizes x gates.

    Exit codes: 0 at least one cell measured (skipped cells are listed with their reason); 1 nothing could be measured, or the export is unusable; 2 usage error.
    """
    from runtimes.bench import render_table, run_bench

    result = run_bench(
        export_dir, providers=_csv_list(providers, str, "--providers"),
        precisions=_csv_list(precisions, str, "--precisions") if precisions else None,
        batch_sizes=_csv_list(batch_sizes, int, "--batch-sizes"),
        etas=_csv_list(eta, float, "--eta") if eta else (),
        fine_fractions=_csv_list(fine_fraction, float, "--fine-fraction") if fine_fraction else None,
        images=images, warmup=warmup, iterations=iterations, duration=duration, threads=threads,
        ort_threading=ort_threading, repeats=repeats, torch=torch,
        checkpoint=checkpoint, isolation="inline" if in_process else "process", quiet_below=quiet_below,
        out=out, force=force,
        progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    Console(width=None if sys.stdout.isatty() else 200).print(render_table(result))
    for note in result.notes:
        print(f"note: {note}")
    if out:
        print(f"results: {out}/results.json, results.csv, latency.png, throughput.png", file=sys.stderr)
    return 0 if result.find() else 1

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
    out: Path = typer.Option(Path("sweep"), "--out", "-o", help="Output folder (sweep.json, sweep.csv, sweep.png)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Accuracy, exit rate, expected GMACs and measured img/s for each eta, with the trade-off plot."""
    from rich.table import Table

    from cfvit_deploy.io import check_output
    from runtimes.sweep import sweep

    check_output(out, force)
    result = sweep(export_dir, folder, etas, provider=provider, batch_size=batch_size, threads=threads,
                   max_images=max_images, allow_fallback=allow_fallback, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    table = Table(title=f"cfvit sweep: {result.n_images} images, {provider}, batch {batch_size}")
    for col in ("eta", "top-1", "exit rate", "GMACs/img", "img/s"):
        table.add_column(col, justify="right")
    for r in result.rows:
        table.add_row(f"{r.eta:.2f}", f"{100 * r.accuracy:.1f}%", f"{100 * r.exit_rate:.0f}%",
                      f"{r.expected_gmacs:.3f}", f"{r.img_per_s:.1f}")
    Console().print(table)
    if result.skipped_files:
        console.print(f"skipped {len(result.skipped_files)} unreadable files (listed in sweep.json)")
    console.print(f"wrote {result.save(out, force=force)}/sweep.json, sweep.csv, sweep.png")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for everything the demo writes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing demo folder."),
    quick: bool = typer.Option(False, "--quick", help="Tiny data and one epoch: a smoke test of every step."),
) -> None:
    """Generate data, train, export, validate, infer, sweep and bench; write OUT/report.md."""
    from cfvit_deploy.demo import run_demo

    result = run_demo(out, force=force, quick=quick, say=lambda msg: console.print(msg, markup=False))
    s = result.summary
    console.print(f"coarse top-1 {100 * s['val_coarse_acc']:.1f}%, fine top-1 {100 * s['val_fine_acc']:.1f}%, "
                  f"export validation {'PASSED' if s['validation_passed'] else 'FAILED'}; "
                  f"total {sum(result.seconds.values()):.0f} s")
    console.print(f"report: {result.report}\nexport: {out / 'export'}\npredictions: {out / 'predictions.csv'} "
                  f"(overlays in {out / 'overlays'})\nsweep: {out / 'sweep'}\nbench: {out / 'bench'}")


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        result = app(args=argv, standalone_mode=False)
    except CFViTError as exc:
        if _state["debug"] or "--debug" in (argv if argv is not None else sys.argv):
            traceback.print_exc()  # then the same line and exit code as without --debug
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click's usage errors (typer vendors click): duck-typed
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            message = exc.format_message()
            if message:  # `cfvit` alone has printed the help already; its message is empty
                print(f"error: {message}", file=sys.stderr)
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
