"""`cfvit export | validate | train | make-data`: parse, call the library twin, print."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from cfvit_deploy.app.cli_app import app, console, progress_hook
from cfvit_deploy.app.cli_support import (
    needs,
    needs_provider,
    print_table,
)
from cfvit_deploy.checks import check_fraction
from cfvit_deploy.errors import UsageError
from cfvit_deploy.wording import plural


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
    single_graph: bool = typer.Option(
        False, "--single-graph", help="Also write single.onnx: both stages and the eta gate in one graph."
    ),
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
        single_graph=single_graph,
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
    print_table(table)
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
    from cfvit_deploy.training import DEMO_RECIPE, TrainRecipe, check_train_args, resume_recipe, train

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
    check_train_args(out or resume or Path("cfvit.pth"), init, resume, threads, force)  # before generating data
    if synthetic:
        data = ensure_synthetic_dataset(data)
    with progress_hook() if progress else contextlib.nullcontext() as hook:
        result = train(
            data,
            out or resume or Path("cfvit.pth"),
            recipe,
            init=init,
            resume=resume,
            val_fraction=val_fraction,
            force=force,
            progress=hook,
            threads=threads,
        )
    val = result.val
    print(
        f"trained {recipe.arch}/{recipe.size} g={recipe.coarse_grid} on {len(result.class_names)} classes for "
        f"{plural(len(result.history), 'epoch')} in {result.seconds:.0f} s: val accuracy coarse {val.coarse_acc:.1%}, "
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


@app.command("triton-repo")
def triton_repo_cmd(
    export_dir: Path = typer.Argument(..., help="Export folder with single.onnx (`cfvit export --single-graph`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model repository folder to create."),
    model_name: str = typer.Option("cfvit", "--model-name", help="Model folder and name in the repository."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Largest batch Triton's dynamic batcher forms."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    max_queue_delay_us: int = typer.Option(
        5000, "--max-queue-delay-us", help="Longest a request waits to be batched (microseconds)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing repository folder."),
) -> None:
    """Write a Triton model repository (onnxruntime backend, dynamic batching) serving single.onnx. See docs/triton.md."""
    from cfvit_deploy.app.triton_repo import TritonOptions, write_triton_repo

    options = TritonOptions(model_name, max_batch_size, instances, max_queue_delay_us)
    model_dir = write_triton_repo(export_dir, out, options, force=force)
    console.print(f"wrote {model_dir}/config.pbtxt, labels.txt and 1/model.onnx", markup=False)
