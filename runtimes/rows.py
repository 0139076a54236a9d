"""Rows and summary of an inference run (torch-free): what the engines produce and the sinks write.

At the bottom of the runtime (numpy and :mod:`runtimes.gate` only), so the sinks, the stage runner
and the inference shell all import it and none of them imports another for these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .gate import softmax

if TYPE_CHECKING:  # rows_for_batch reads a result's arrays; the type is only named here
    from .pipeline import PipelineResult


@dataclass(frozen=True)
class InferRow:
    """The result for one input file."""

    path: str
    stage: str = ""  #: "coarse" | "fine" ("" for an error row)
    confidence: float | None = None  #: max softmax(coarse logits)
    patches: int | None = None  #: refined coarse patches: k for "fine", 0 for "coarse"
    labels: tuple[str, ...] = ()  #: top-k class names, most probable first
    probs: tuple[float, ...] = ()
    overlay: str = ""  #: the overlay PNG written for this input ("" when none)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "stage": self.stage or None,
            "confidence": self.confidence,
            "patches": self.patches,
            "topk": [{"label": label, "prob": p} for label, p in zip(self.labels, self.probs, strict=True)],
            "overlay": self.overlay,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> InferRow:
        """:meth:`to_json`, inverted."""
        topk = record.get("topk") or []
        return cls(
            path=record["path"],
            stage=record.get("stage") or "",
            confidence=record.get("confidence"),
            patches=record.get("patches"),
            labels=tuple(t["label"] for t in topk),
            probs=tuple(t["prob"] for t in topk),
            overlay=record.get("overlay") or "",
            error=record.get("error") or "",
        )


@dataclass
class InferSummary:
    """Counts of one run (the CLI's final line and the summary JSON)."""

    inputs: int = 0  #: input files found
    exited: int = 0  #: images answered by the coarse stage
    fine: int = 0  #: images that went to the fine stage
    errors: int = 0  #: files that could not be read
    seconds: float = 0.0
    output: Path | None = None
    overlays: int = 0  #: overlay PNGs written
    interrupted: bool = False
    signal: str | None = None  #: "SIGINT" or "SIGTERM" when interrupted
    reason: str | None = None  #: why an engine stopped the run early (runtimes.inference.InferStopped)
    warnings: list[str] = field(default_factory=list)  #: what the engine recovered from (e.g. a lost Ray node)
    engine: str = "local"
    decode: str = "exact"  #: the decode mode (exact or fast)
    batch_size: int = 0  #: the batch size used (capped at the number of inputs)
    export: dict[str, Any] = field(default_factory=dict)  #: the export's identity
    #: how the rows were made: eta, provider, precision, batch_size, decode (see runtimes.infer.run_settings)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """Images classified."""
        return self.exited + self.fine

    @property
    def rows(self) -> int:
        return self.images + self.errors

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_rate(self) -> float:
        return self.exited / self.images if self.images else 0.0

    def count(self, row: InferRow) -> None:
        if row.error:
            self.errors += 1
        elif row.stage == "coarse":
            self.exited += 1
        else:
            self.fine += 1
        self.overlays += bool(row.overlay)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "interrupted" if self.interrupted else "complete",
            "signal": self.signal,
            "reason": self.reason,
            "warnings": self.warnings,
            "inputs": self.inputs,
            "rows": self.rows,
            "classified": self.images,
            "exited": self.exited,
            "fine": self.fine,
            "errors": self.errors,
            "overlays": self.overlays,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "engine": self.engine,
            "decode": self.decode,
            "batch_size": self.batch_size,
            "output": None if self.output is None else str(self.output),
            "export": self.export,
            "settings": self.settings,
        }


def _rounded(x: float) -> float:
    return float(f"{x:.6g}")


def rows_for_batch(
    result: PipelineResult, paths: Sequence[Path | str], labels: Sequence[str], topk: int
) -> list[InferRow]:
    """Rows for one pipeline batch (vectorised softmax and top-k)."""
    probs = softmax(result.logits)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    top_p = np.take_along_axis(probs, top, axis=1)
    patches = (result.informative_idx >= 0).sum(axis=1)
    return [
        InferRow(
            path=str(path),
            stage="coarse" if result.exited[i] else "fine",
            confidence=_rounded(float(result.confidence[i])),
            patches=int(patches[i]),
            labels=tuple(labels[j] for j in top[i]),
            probs=tuple(_rounded(float(p)) for p in top_p[i]),
        )
        for i, path in enumerate(paths)
    ]
