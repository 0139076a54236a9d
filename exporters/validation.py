"""Validation: the exported graphs against PyTorch, per graph and end to end, Polygraphy style.

For each batch size (and real images, if given) it compares
* the coarse graph against ``model.coarse_stage`` (every output),
* the fine graph fed with PyTorch's coarse products against ``model.fine_stage`` (logits and the
  selected patches),
* the chain coarse.onnx -> fine.onnx against ``model.forward`` (logits, selected patches, top-1),
* the exit decision (max softmax >= eta) at several eta.

fp32 must match within atol/rtol (default 1e-4 absolute on logits) with identical patches and
decisions; fp16/int8 are judged by top-1 and exit-decision agreement rates against thresholds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch

from cfvit_deploy.checkpoints import load_checkpoint
from cfvit_deploy.errors import CheckpointError, UsageError
from cfvit_deploy.io import atomic_write_path
from cfvit_deploy.manifest import Manifest
from cfvit_deploy.model import CFViT
from cfvit_deploy.preprocessing import is_image_file, load_and_preprocess
from runtimes.backends import SessionConfig, create_backend

DEFAULT_ETAS = (0.25, 0.5, 0.75, 0.9)
#: Confidences this close to eta are ties: either decision is accepted.
ETA_TIE = 1e-5
MAX_REAL_IMAGES = 64
#: Tolerance multipliers for outputs that are not logits: LayerNorm-ed token features amplify
#: rounding where a token's variance is small.
FEATURE_SCALE = {"reuse_tokens": 10.0, "coarse_embedding": 10.0}


@dataclass
class Check:
    """One PASSED/FAILED line of the report."""

    name: str
    passed: bool
    metric: str
    value: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return f"{verdict} | {self.name} | {self.metric} {self.value:.3g} (limit {self.threshold:.3g})"


@dataclass
class ValidationReport:
    """Every check of one validation run; `passed` only if all passed."""

    export_dir: str
    checkpoint: str
    provider: str
    precision: str
    batch_sizes: list[int]
    etas: list[float]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def save(self, path: Path) -> Path:
        with atomic_write_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, default=float) + "\n")
        return Path(path)


@dataclass(frozen=True)
class Criteria:
    """Pass/fail thresholds for one precision."""

    atol: float
    rtol: float
    exact: bool  #: fp32: tolerances and identical patches are required
    min_top1: float
    min_exit: float

    @classmethod
    def for_precision(cls, precision: str, atol: float | None, rtol: float | None,
                      min_top1: float | None, min_exit: float | None) -> "Criteria":
        exact = precision == "fp32"
        return cls(
            atol=atol if atol is not None else (1e-4 if exact else 5e-2),
            rtol=rtol if rtol is not None else (1e-4 if exact else 5e-2),
            exact=exact,
            min_top1=min_top1 if min_top1 is not None else (1.0 if exact else 0.9),
            min_exit=min_exit if min_exit is not None else (1.0 if exact else 0.9),
        )


def smooth_random_images(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """Normalized-range images with natural-image-like smoothness (random 8x8 fields, upsampled).

    White noise drives untrained or random-weight models into chaotic regimes where fp32 rounding
    differences between runtimes are amplified; smooth fields behave like photographs.
    """
    coarse = rng.uniform(-2.0, 2.0, size=(batch, 3, 8, 8)).astype(np.float32)
    pos = np.linspace(0, 7, size, dtype=np.float32)
    i0 = np.clip(np.floor(pos).astype(int), 0, 6)
    w = (pos - i0)[None, None, :]
    rows = coarse[:, :, i0, :] * (1 - w[..., None]) + coarse[:, :, i0 + 1, :] * w[..., None]
    out = rows[:, :, :, i0] * (1 - w[:, :, None, :]) + rows[:, :, :, i0 + 1] * w[:, :, None, :]
    return np.ascontiguousarray(out, dtype=np.float32)


def _softmax_conf(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


class _Checker:
    def __init__(self, report: ValidationReport, crit: Criteria) -> None:
        self.report, self.crit = report, crit

    def close(self, name: str, got: np.ndarray, ref: np.ndarray, scale: float = 1.0) -> None:
        """max |got - ref| <= scale * (atol + rtol * max |ref|): rtol is relative to the tensor's range, so
        a logit near zero is not held to a tighter bound than its neighbours (fp32 rounding is absolute
        at the scale of the tensor's largest values)."""
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        bound = scale * (self.crit.atol + self.crit.rtol * float(np.abs(ref).max(initial=0.0)))
        ratio = float(err.max(initial=0.0) / bound)
        denom = np.maximum(np.abs(ref), 1e-12)
        info = {"max_abs_err": float(err.max(initial=0)), "max_rel_err": float((err / denom).max(initial=0)),
                "atol": scale * self.crit.atol, "rtol": scale * self.crit.rtol}
        passed = ratio <= 1.0 if self.crit.exact else True
        metric = "max |err| / (atol + rtol max|ref|)" + ("" if self.crit.exact else ", info only")
        self.report.checks.append(Check(name, passed, metric, ratio, 1.0, info))

    def rate(self, name: str, agree: np.ndarray, threshold: float, metric: str, info: dict | None = None) -> None:
        value = float(agree.mean()) if agree.size else 1.0
        self.report.checks.append(Check(name, value >= threshold, metric, value, threshold, info or {}))

    def patches(self, name: str, got: np.ndarray, ref: np.ndarray, score: np.ndarray) -> None:
        """Selections agree if they pick patches of the same scores in the same order: they may differ
        only among exactly tied scores (flat image regions), where either choice is the model's."""
        rows = np.arange(len(ref))[:, None]
        same = np.all(np.isclose(score[rows, got], score[rows, ref], rtol=1e-6, atol=1e-9), axis=1)
        identical = np.all(got == ref, axis=1)
        overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got.tolist(), ref.tolist())])
        threshold = 1.0 if self.crit.exact else 0.0
        self.rate(name, same, threshold, "selection agreement rate (up to tied scores)",
                  {"identical_rate": float(identical.mean()), "mean_set_overlap": float(overlap)})


def _real_images(folder: Path, manifest: Manifest) -> np.ndarray:
    if not folder.is_dir():
        raise UsageError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))[:MAX_REAL_IMAGES]
    if not files:
        raise UsageError(f"--images {folder} holds no image files")
    return np.stack([load_and_preprocess(p, manifest.preprocessing) for p in files])


def _resolve_checkpoint(manifest: Manifest, checkpoint: str | Path | CFViT | None) -> tuple[CFViT, str]:
    if isinstance(checkpoint, CFViT):
        return checkpoint.eval(), getattr(checkpoint, "source_path", "<model>")
    if checkpoint is None:
        recorded = (manifest.source.get("checkpoint") or {}).get("path")
        if not recorded:
            raise UsageError("no --checkpoint given and the manifest records none; pass --checkpoint CKPT")
        if not Path(recorded).is_file():
            raise UsageError(
                f"no --checkpoint given and the checkpoint recorded in the manifest ({recorded}) no longer exists; "
                "pass --checkpoint CKPT"
            )
        checkpoint = recorded
    try:
        model = load_checkpoint(checkpoint, config=manifest.model)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint does not match this export: {exc}") from None
    return model, str(checkpoint)


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
    seed: int = 0,
    allow_fallback: bool = False,
) -> ValidationReport:
    """Compare an export with PyTorch; the report's `passed` is True only if every check passed."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if any(not 0.0 <= e <= 1.0 or math.isnan(e) for e in etas):
        raise UsageError(f"every eta must lie in [0, 1], got {list(etas)}")
    manifest = Manifest.load(export_dir)
    model, ckpt_name = _resolve_checkpoint(manifest, checkpoint)
    backend = create_backend(manifest, provider, SessionConfig(allow_fallback=allow_fallback), graphs=("coarse", "fine"))
    crit = Criteria.for_precision(manifest.precision, atol, rtol, min_top1, min_exit)
    report = ValidationReport(str(export_dir), ckpt_name, provider, manifest.precision, list(batch_sizes), list(etas))
    check = _Checker(report, crit)
    size = manifest.image_size
    rng = np.random.default_rng(seed)
    inputs = {f"random, batch {b}": smooth_random_images(rng, b, size) for b in batch_sizes}
    if images is not None:
        inputs["real images"] = _real_images(Path(images), manifest)
    for label, x in inputs.items():
        _compare(model, backend, x, label, etas, check)
    return report


def _compare(model: CFViT, backend: Any, x: np.ndarray, label: str, etas: tuple[float, ...], check: _Checker) -> None:
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
        check.close(f"coarse graph: {name} [{label}]", got[name], value, FEATURE_SCALE.get(name, 1.0))
    # the fine graph in isolation, fed with PyTorch's coarse products
    fed = backend.run("fine", {"images": x, **{k: v for k, v in ref.items() if k != "coarse_logits"}})
    check.close(f"fine graph: fine_logits [{label}]", fed["fine_logits"], fine_ref)
    score = ref["global_attention"]
    check.patches(f"fine graph: selected patches [{label}]", fed["informative_idx"], inf.numpy(), score)
    # end to end: coarse.onnx -> fine.onnx
    chained = backend.run("fine", {"images": x, **{k: got[k] for k in ("global_attention", "reuse_tokens", "coarse_embedding")}})
    check.close(f"end to end: fine_logits [{label}]", chained["fine_logits"], fine_ref)
    check.patches(f"end to end: selected patches [{label}]", chained["informative_idx"], inf.numpy(), score)
    crit = check.crit
    for stage, a, b in (("coarse", got["coarse_logits"], ref["coarse_logits"]), ("fine", chained["fine_logits"], fine_ref)):
        check.rate(f"end to end: {stage} top-1 agreement [{label}]", a.argmax(1) == b.argmax(1), crit.min_top1,
                   "top-1 agreement rate")
    conf_got, conf_ref = _softmax_conf(got["coarse_logits"]), _softmax_conf(ref["coarse_logits"])
    for eta in etas:
        agree = ((conf_got >= eta) == (conf_ref >= eta)) | (np.abs(conf_ref - eta) < ETA_TIE)
        check.rate(f"exit decision at eta={eta:g} [{label}]", agree, crit.min_exit, "agreement rate",
                   {"exit_rate_onnx": float((conf_got >= eta).mean()), "exit_rate_torch": float((conf_ref >= eta).mean())})
