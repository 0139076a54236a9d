"""The validation criteria (torch-free): checks, their report, and the bounds fp32/fp16/int8 are judged by.

:mod:`exporters.validation` runs PyTorch and the graphs on the same inputs and feeds the outputs to
:class:`Checker`, which applies these criteria; the mutation-testing scope includes this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfvit_deploy.io import atomic_write_path

DEFAULT_ETAS = (0.25, 0.5, 0.75, 0.9)
#: Confidences this close to eta are ties: either decision is accepted.
ETA_TIE = 1e-5
MAX_REAL_IMAGES = 64
#: Tolerance multipliers for outputs that are not logits: LayerNorm-ed token features amplify
#: rounding where a token's variance is small.
FEATURE_SCALE = {"reuse_tokens": 10.0, "coarse_embedding": 10.0}
#: Reduced precision: a decision counts when the fp32 margin exceeds this many RMS errors (the
#: difference of two logit errors has about sqrt(2) RMS; 4 RMS is ~2.8 of its standard deviations).
DECISIVE_FACTOR = 4.0
#: Reduced precision: largest RMS logit error relative to the logits' standard deviation.
MAX_REL_ERR = {"fp32": 0.0, "fp16": 0.01, "int8": 0.2}


@dataclass
class Check:
    """One PASSED/FAILED row of the report: what was compared, on which input and batch."""

    name: str
    passed: bool
    metric: str
    value: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    input: str = ""
    batch: int = 0

    def line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        where = f" [{self.input}, batch {self.batch}]" if self.input else ""
        return f"{verdict} | {self.name}{where} | {self.metric} {self.value:.3g} (limit {self.threshold:.3g})"


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
    #: What the user should know before reading the checks (e.g. a checkpoint other than the export's).
    warnings: list[str] = field(default_factory=list)
    #: The pass criteria in words (they differ between fp32 and reduced precision).
    criteria: str = ""
    skipped_images: list[str] = field(default_factory=list)

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
    """Pass/fail thresholds for one precision.

    fp32 (``exact``): every output within ``scale * (atol + rtol * max|ref|)``, identical selections,
    top-1 and exit decisions (rates ``min_top1`` = ``min_exit`` = 1).

    fp16/int8: (1) the RMS logit error divided by the standard deviation of the fp32 logits is at
    most ``max_rel_err`` (a bound relative to the logits' own spread, so it means the same for random
    weights with logits of 0.1 and a trained model with logits of 20); (2) top-1 agreement is counted
    over the images whose fp32 margin (top-1 minus top-2 logit) exceeds ``decisive`` RMS logit errors,
    and the exit decision over those whose confidence is that far from eta: an image whose fp32
    decision is within the measured noise is a tie either way. Random weights give margins below the
    int8 noise, so counting every image (the old criterion) failed correct int8 exports.
    """

    atol: float
    rtol: float
    exact: bool  #: fp32: tolerances and identical patches are required
    min_top1: float
    min_exit: float
    max_rel_err: float = 0.0
    decisive: float = DECISIVE_FACTOR

    @classmethod
    def for_precision(
        cls,
        precision: str,
        atol: float | None,
        rtol: float | None,
        min_top1: float | None,
        min_exit: float | None,
        max_rel_err: float | None = None,
    ) -> Criteria:
        exact = precision == "fp32"
        return cls(
            atol=atol if atol is not None else (1e-4 if exact else 5e-2),
            rtol=rtol if rtol is not None else (1e-4 if exact else 5e-2),
            exact=exact,
            min_top1=min_top1 if min_top1 is not None else (1.0 if exact else 0.9),
            min_exit=min_exit if min_exit is not None else (1.0 if exact else 0.9),
            max_rel_err=max_rel_err if max_rel_err is not None else MAX_REL_ERR.get(precision, 0.2),
        )

    def describe(self) -> str:
        if self.exact:
            return (
                f"fp32: max |onnx - torch| <= scale * ({self.atol:g} + {self.rtol:g} * max|torch|) per output "
                "(scale 1 for logits and attention, 10 for token features); identical patch selections (up "
                f"to tied scores); top-1 and exit-decision agreement >= {self.min_top1:g} / {self.min_exit:g}"
            )
        return (
            f"reduced precision: RMS logit error / std of the fp32 logits <= {self.max_rel_err:g}; top-1 "
            f"agreement >= {self.min_top1:g} over images whose fp32 margin (top-1 minus top-2 logit) exceeds "
            f"{self.decisive:g} RMS logit errors; exit-decision agreement >= {self.min_exit:g} over images "
            f"whose fp32 confidence is more than {self.decisive:g} RMS confidence errors from eta; "
            "token features and patch selections are reported, not judged"
        )


def closeness_ratio(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, scale: float = 1.0) -> float:
    """max |got - ref| / (scale * (atol + rtol * max|ref|)); the fp32 check passes when it is <= 1.

    rtol is relative to the tensor's range, so a logit near zero is not held to a tighter bound than its
    neighbours (fp32 rounding is absolute at the scale of the tensor's largest values).
    """
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = scale * (atol + rtol * float(np.abs(ref).max(initial=0.0)))
    return float(err.max(initial=0.0) / bound)


def relative_logit_error(got: np.ndarray, ref: np.ndarray) -> float:
    """RMS(got - ref) / std(ref): the logit error relative to the logits' spread (reduced precision)."""
    err = got.astype(np.float64) - ref.astype(np.float64)
    spread = float(np.std(ref.astype(np.float64)))
    return float(np.sqrt(np.mean(err**2)) / max(spread, 1e-12))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row (inf with a single class)."""
    if logits.shape[1] < 2:
        return np.full(len(logits), np.inf)
    part = np.sort(logits.astype(np.float64), axis=1)
    return part[:, -1] - part[:, -2]


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


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """Each row's largest softmax probability (the coarse stage's confidence), computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


class Checker:
    """Applies the criteria: each check it is given becomes one row of the validation report."""

    def __init__(self, report: ValidationReport, crit: Criteria) -> None:
        self.report, self.crit = report, crit
        self.input, self.batch = "", 0

    def add(
        self, name: str, passed: bool, metric: str, value: float, threshold: float, info: dict | None = None
    ) -> None:
        self.report.checks.append(
            Check(name, bool(passed), metric, value, threshold, info or {}, self.input, self.batch)
        )

    def close(self, name: str, got: np.ndarray, ref: np.ndarray, scale: float = 1.0, logits: bool = False) -> None:
        """fp32: the closeness ratio must be <= 1. Reduced precision: logits must keep the relative RMS
        error bound; other outputs are reported (info only)."""
        crit = self.crit
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        ratio = closeness_ratio(got, ref, crit.atol, crit.rtol, scale)
        rel = relative_logit_error(got, ref)
        info = {
            "max_abs_err": float(err.max(initial=0)),
            "relative_rms_err": rel,
            "atol": scale * crit.atol,
            "rtol": scale * crit.rtol,
            "closeness_ratio": ratio,
        }
        if crit.exact:
            self.add(name, ratio <= 1.0, "max |err| / (atol + rtol max|ref|)", ratio, 1.0, info)
        elif logits:
            self.add(name, rel <= crit.max_rel_err, "RMS error / std of fp32 logits", rel, crit.max_rel_err, info)
        else:
            self.add(name, True, "max |err| / (atol + rtol max|ref|), info only", ratio, 1.0, info)

    def rate(self, name: str, agree: np.ndarray, threshold: float, metric: str, info: dict | None = None) -> None:
        value = float(agree.mean()) if agree.size else 1.0
        self.add(name, value >= threshold, metric, value, threshold, info)

    def top1(self, name: str, got: np.ndarray, ref: np.ndarray) -> None:
        agree = got.argmax(1) == ref.argmax(1)
        if self.crit.exact:
            self.rate(name, agree, self.crit.min_top1, "top-1 agreement rate")
            return
        rms = float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2)))
        decisive = top2_margin(ref) > self.crit.decisive * rms
        self.rate(
            name,
            agree[decisive],
            self.crit.min_top1,
            f"top-1 agreement where the fp32 margin > {self.crit.decisive:g} RMS errors",
            {
                "decisive": int(decisive.sum()),
                "images": len(ref),
                "rms_logit_err": rms,
                "agreement_all_images": float(agree.mean()),
            },
        )

    def exits(self, name: str, conf_got: np.ndarray, conf_ref: np.ndarray, eta: float) -> None:
        info = {"exit_rate_onnx": float((conf_got >= eta).mean()), "exit_rate_torch": float((conf_ref >= eta).mean())}
        agree = ((conf_got >= eta) == (conf_ref >= eta)) | (np.abs(conf_ref - eta) < ETA_TIE)
        if self.crit.exact:
            self.rate(name, agree, self.crit.min_exit, "agreement rate", info)
            return
        rms = float(np.sqrt(np.mean((conf_got.astype(np.float64) - conf_ref) ** 2)))
        decisive = np.abs(conf_ref - eta) > self.crit.decisive * rms
        self.rate(
            name,
            agree[decisive],
            self.crit.min_exit,
            f"agreement where |fp32 confidence - eta| > {self.crit.decisive:g} RMS errors",
            {**info, "decisive": int(decisive.sum()), "images": len(conf_ref), "rms_confidence_err": rms},
        )

    def patches(self, name: str, got: np.ndarray, ref: np.ndarray, score: np.ndarray) -> None:
        """Selections agree if they pick patches of the same scores in the same order: they may differ
        only among exactly tied scores (flat image regions), where either choice is the model's."""
        rows = np.arange(len(ref))[:, None]
        same = np.all(np.isclose(score[rows, got], score[rows, ref], rtol=1e-6, atol=1e-9), axis=1)
        identical = np.all(got == ref, axis=1)
        overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got.tolist(), ref.tolist(), strict=True)])
        threshold = 1.0 if self.crit.exact else 0.0
        self.rate(
            name,
            same,
            threshold,
            "selection agreement rate (up to tied scores)",
            {"identical_rate": float(identical.mean()), "mean_set_overlap": float(overlap)},
        )
