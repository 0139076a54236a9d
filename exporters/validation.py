"""Validation: the exported graphs against PyTorch, per graph and end to end, Polygraphy style.

For each batch size (and real images, if given) it compares
* the coarse graph against ``model.coarse_stage`` (every output),
* the fine graph fed with PyTorch's coarse products against ``model.fine_stage`` (logits and the
  selected patches),
* the chain coarse.onnx -> fine.onnx against ``model.forward`` (logits, selected patches, top-1),
* the exit decision (max softmax >= eta) at several eta,
* ``baseline.onnx``, when the export has one, against ``model.fine_stage_dense`` (the plain ViT),
* ``single.onnx``, when the export has one, against PyTorch and against the pair at η = 0, η = 1,
  the η list and a mixed per-image η (see :mod:`exporters.single_validation`).

fp32 must match within atol/rtol (default 1e-4 absolute on logits, 10x that on token features) with
identical patches, top-1 and decisions. fp16/int8 are judged by criteria that mean the same for
random and trained weights (see :class:`Criteria`): the RMS logit error relative to the spread of the
logits, and top-1 / exit agreement counted where the fp32 decision is clear of the measured error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch

from cfvit_deploy.checkpoints import EMA_KEYS, load_checkpoint
from cfvit_deploy.checks import check_batch_sizes, check_etas, check_fraction
from cfvit_deploy.data.reader import list_images, read_images
from cfvit_deploy.errors import CheckpointError, UnreadableCheckpointError, UsageError
from cfvit_deploy.manifest import Manifest, sha256_file
from cfvit_deploy.model import CFViT
from cfvit_deploy.progress import ProgressHook, report
from runtimes.backends import SessionConfig, check_provider, create_backend

from .criteria import (  # noqa: F401  (re-exported: exporters.validation is the public module)
    DECISIVE_FACTOR,
    DEFAULT_ETAS,
    ETA_TIE,
    FEATURE_SCALE,
    MAX_REAL_IMAGES,
    MAX_REL_ERR,
    Check,
    Checker,
    Criteria,
    ValidationReport,
    closeness_ratio,
    relative_logit_error,
    smooth_random_images,
    softmax_confidence,
    top2_margin,
)
from .single_validation import compare_single

log = logging.getLogger(__name__)


def _real_images(files: list[Path], manifest: Manifest, report_: ValidationReport) -> np.ndarray:
    """Up to MAX_REAL_IMAGES readable images of `files` (unreadable ones skipped and reported)."""
    read = read_images(files, manifest.preprocessing, limit=MAX_REAL_IMAGES)
    report_.skipped_images = [f"{p}: {why}" for p, why in read.skipped]
    return read.images


def checkpoint_warning(manifest: Manifest, checkpoint: str | Path | None) -> str | None:
    """A warning when `checkpoint` (None: the one the manifest records) is not the file the export was
    made from (its sha256 differs), e.g. a recorded checkpoint that training has since overwritten."""
    recorded = manifest.source.get("checkpoint") or {}
    want = recorded.get("sha256")
    path = Path(checkpoint if checkpoint is not None else recorded.get("path") or "")
    if not want or not path.is_file():
        return None
    have = sha256_file(path)
    if have == want:
        return None
    if checkpoint is None:
        return (
            f"the checkpoint recorded in the manifest, {path}, has changed since the export (sha256 {have[:12]}… "
            f"now, {want[:12]}… then): the checks compare the graphs with another model; pass the original "
            "as --checkpoint, or export again"
        )
    return (
        f"--checkpoint {path} (sha256 {have[:12]}…) is not the checkpoint this export was made from "
        f"({recorded.get('path')}, sha256 {want[:12]}…): the checks compare the graphs with another model"
    )


def _resolve_checkpoint(manifest: Manifest, checkpoint: str | Path | CFViT | None) -> tuple[CFViT, str]:
    if isinstance(checkpoint, CFViT):
        return checkpoint.eval(), getattr(checkpoint, "source_path", "<model>")
    recorded = manifest.source.get("checkpoint") or {}
    if checkpoint is None:
        if not recorded.get("path"):
            raise UsageError("no --checkpoint given and the manifest records none; pass --checkpoint CKPT")
        if not Path(recorded["path"]).is_file():
            raise UsageError(
                f"no --checkpoint given and the checkpoint recorded in the manifest ({recorded['path']}) no longer "
                "exists; pass --checkpoint CKPT"
            )
        checkpoint = recorded["path"]
    key = recorded.get("weights")  # the state_dict the export was made from (trained or EMA)
    weights = "auto" if not key else "ema" if key in EMA_KEYS else "model"
    try:
        model = load_checkpoint(checkpoint, config=manifest.model, weights=weights)
    except UnreadableCheckpointError:
        raise  # not a checkpoint at all: its own message says what the file is
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint does not match this export: {exc}") from None
    return model, str(checkpoint)


def check_validate_args(
    batch_sizes: Any, etas: Any, min_top1: float | None, min_exit: float | None, max_rel_err: float | None = None
) -> tuple[list[int], list[float]]:
    """Every argument check of :func:`validate`, runnable before any work (the CLI calls it first)."""
    sizes = check_batch_sizes(batch_sizes, "--batch-sizes")
    eta_list = check_etas(etas, "--etas")
    for value, name in ((min_top1, "--min-top1"), (min_exit, "--min-exit")):
        if value is not None:
            check_fraction(value, name)
    if max_rel_err is not None and not (isinstance(max_rel_err, (int, float)) and max_rel_err > 0):
        raise UsageError(f"max_rel_err must be a positive number, got {max_rel_err!r}")
    return sizes, eta_list


def validate(
    export_dir: str | Path,
    checkpoint: str | Path | CFViT | None = None,
    *,
    images: str | Path | None = None,
    provider: str = "cpu",
    batch_sizes: tuple[int, ...] = (1, 4),
    etas: tuple[float, ...] = DEFAULT_ETAS,
    atol: float | None = None,
    rtol: float | None = None,
    min_top1: float | None = None,
    min_exit: float | None = None,
    max_rel_err: float | None = None,
    seed: int = 0,
    allow_fallback: bool = False,
    progress: ProgressHook | None = None,
    warn: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Compare every graph of an export with PyTorch; the report's `passed` is True only if every check passed.

    `warn` receives warnings before the checks run (default: ``logging``); they are also in the report.
    `progress` is called as ``progress("validate", done, total)`` per input.
    """
    sizes, eta_list = check_validate_args(batch_sizes, etas, min_top1, min_exit, max_rel_err)
    check_provider(provider)
    files = list_images(images) if images is not None else None  # a bad --images costs nothing
    manifest = Manifest.load(export_dir)
    model, ckpt_name = _resolve_checkpoint(manifest, checkpoint)
    warnings: list[str] = []  # said once the checkpoint loaded (an unusable one is just one error line)
    if not isinstance(checkpoint, CFViT):  # the recorded default is checked like an explicit file
        note = checkpoint_warning(manifest, checkpoint)
        if note:
            warnings.append(note)
            (warn or log.warning)(note)
    graphs = tuple(g for g in ("coarse", "fine", "baseline", "single") if g in manifest.graphs)
    backend = create_backend(manifest, provider, SessionConfig(allow_fallback=allow_fallback), graphs=graphs)
    crit = Criteria.for_precision(manifest.precision, atol, rtol, min_top1, min_exit, max_rel_err)
    result = ValidationReport(
        str(export_dir),
        ckpt_name,
        provider,
        manifest.precision,
        sizes,
        eta_list,
        warnings=warnings,
        criteria=crit.describe(),
    )
    check = Checker(result, crit)
    rng = np.random.default_rng(seed)
    inputs = {("random", b): smooth_random_images(rng, b, manifest.image_size) for b in sizes}
    if files is not None:
        real = _real_images(files, manifest, result)
        inputs[("real images", len(real))] = real
    for done, ((label, batch), x) in enumerate(inputs.items()):
        report(progress, "validate", done, len(inputs))
        check.input, check.batch = label, batch
        torch_ref = _compare(model, backend, x, tuple(eta_list), check)
        if "single" in graphs:
            compare_single(backend, x, tuple(eta_list), torch_ref, check)
        if "baseline" in graphs:
            _compare_baseline(model, backend, x, check)
    report(progress, "validate", len(inputs), len(inputs))
    return result


def _compare_baseline(model: CFViT, backend: Any, x: np.ndarray, check: Checker) -> None:
    """baseline.onnx against the PyTorch plain-ViT path of the same weights."""
    with torch.no_grad():
        ref = model.fine_stage_dense(torch.from_numpy(x), None).numpy()
    got = backend.run("baseline", {"images": x})["logits"]
    check.close("baseline graph: logits", got, ref, logits=True)
    check.top1("baseline graph: top-1 agreement", got, ref)


def _compare(
    model: CFViT, backend: Any, x: np.ndarray, etas: tuple[float, ...], check: Checker
) -> dict[str, np.ndarray]:
    """The pair's checks on `x`; returns PyTorch's outputs for it (for the single graph's checks)."""
    with torch.no_grad():
        images = torch.from_numpy(x)
        coarse = model.coarse_stage(images)
        inf, uninf = model.select(coarse.score)
        fine_ref = model.fine_stage(images, coarse.features, coarse.embedding, inf, uninf).numpy()
    ref = {
        "coarse_logits": coarse.logits.numpy(),
        "global_attention": coarse.score.numpy(),
        "reuse_tokens": coarse.features.numpy(),
        "coarse_embedding": coarse.embedding.numpy(),
    }
    got = backend.run("coarse", {"images": x})
    for name, value in ref.items():  # intermediate token features get 10x the logit tolerance
        check.close(
            f"coarse graph: {name}", got[name], value, FEATURE_SCALE.get(name, 1.0), logits=name == "coarse_logits"
        )
    # the fine graph in isolation, fed with PyTorch's coarse products
    fed = backend.run("fine", {"images": x, **{k: v for k, v in ref.items() if k != "coarse_logits"}})
    check.close("fine graph: fine_logits", fed["fine_logits"], fine_ref, logits=True)
    score = ref["global_attention"]
    check.patches("fine graph: selected patches", fed["informative_idx"], inf.numpy(), score)
    # end to end: coarse.onnx -> fine.onnx
    chained = backend.run(
        "fine", {"images": x, **{k: got[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}}
    )
    check.close("end to end: fine_logits", chained["fine_logits"], fine_ref, logits=True)
    check.patches("end to end: selected patches", chained["informative_idx"], inf.numpy(), score)
    check.top1("end to end: coarse top-1 agreement", got["coarse_logits"], ref["coarse_logits"])
    check.top1("end to end: fine top-1 agreement", chained["fine_logits"], fine_ref)
    conf_got, conf_ref = softmax_confidence(got["coarse_logits"]), softmax_confidence(ref["coarse_logits"])
    for eta in etas:
        check.exits(f"exit decision at eta={eta:g}", conf_got, conf_ref, eta)
    return {**ref, "fine_logits": fine_ref, "informative_idx": inf.numpy()}
