"""One request's coarse stage, gate and fine stage as separate calls (torch-free, no queueing).

:class:`StageRunner` holds the pieces :class:`runtimes.batching.BatchingEngine` batches and the Ray
Serve deployments call: the coarse graph on a batch, the gate per request, the fine graph on the fine
inputs of several requests, and the answer for one image, built by :func:`runtimes.rows.rows_for_batch`
from the arrays :mod:`runtimes.gate` computes for :class:`~runtimes.pipeline.CFViTPipeline` too (confidence,
the float32 ``>= η`` decision, the merge), so it equals ``cfvit infer``'s row. A batch of requests may
mix η: :meth:`StageRunner.gate` decides them all at once with one η per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cfvit_deploy.manifest import Manifest

from .backends import Backend
from .gate import exits, max_softmax, merge
from .pipeline import PipelineResult, StageTimings
from .rows import InferRow, rows_for_batch

STAGES = ("coarse", "fine")


@dataclass(frozen=True)
class CoarseRow:
    """One request's coarse outputs: what the gate needs and the fine graph's inputs (one row each)."""

    logits: np.ndarray  #: (classes,) float32 coarse logits
    confidence: float  #: max softmax of the coarse logits, compared with η
    fine_inputs: dict[str, np.ndarray]  #: the fine graph's inputs for this image (no batch axis)


@dataclass(frozen=True)
class FineRow:
    logits: np.ndarray  #: (classes,) float32 fine logits
    informative_idx: np.ndarray  #: (k,) int64 refined coarse patches


@dataclass(frozen=True)
class Answer:
    """The result for one request: ``cfvit infer``'s row plus the refined patch indices and η."""

    row: InferRow
    refined: tuple[int, ...]  #: coarse patches refined by the fine stage (empty when it exited)
    eta: float
    logits: np.ndarray | None = None  #: (classes,) float32 logits of the stage that answered


class StageRunner:
    """The coarse graph, the gate and the fine graph as separate calls on one backend.

    The backend needs the graphs it is asked to run (a coarse-only backend can serve a coarse Ray
    Serve deployment). Calls keep no state, so one runner may serve several threads.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.labels = self.manifest.labels()
        self.fine_input_names = tuple(self.manifest.graphs["fine"].input_names())

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    def run_coarse(self, images: np.ndarray) -> list[CoarseRow]:
        """Coarse graph on a (B, 3, S, S) float32 batch -> one :class:`CoarseRow` per image."""
        out = self.backend.run("coarse", {"images": images})
        out["images"] = images
        confidence = max_softmax(out["coarse_logits"])
        return [
            CoarseRow(
                out["coarse_logits"][i], float(confidence[i]), {name: out[name][i] for name in self.fine_input_names}
            )
            for i in range(len(images))
        ]

    def run_fine(self, rows: Sequence[dict[str, np.ndarray]]) -> list[FineRow]:
        """Fine graph on the stacked fine inputs of `rows` (from several requests) -> one row each."""
        feeds = {name: np.stack([r[name] for r in rows]) for name in self.fine_input_names}
        out = self.backend.run("fine", feeds)
        return [FineRow(out["fine_logits"][i], out["informative_idx"][i]) for i in range(len(rows))]

    def warm_up(self, stages: Sequence[str] = STAGES) -> None:
        """One call of each stage on zero inputs (first calls allocate and pick kernels)."""
        if "coarse" in stages:
            s = self.image_size
            self.run_coarse(np.zeros((1, 3, s, s), np.float32))
        if "fine" in stages:  # inputs shaped by the manifest (only the batch axis is symbolic)
            specs = self.manifest.graphs["fine"].inputs
            self.run_fine(
                [{t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape[1:]], t.dtype) for t in specs}]
            )

    def answer(self, coarse: CoarseRow, eta: float, topk: int, fine: FineRow | None = None) -> Answer:
        """The answer for one image, computed as ``cfvit infer`` computes its row."""
        exited = fine is None
        todo = np.arange(0 if exited else 1)
        logits, informative = merge(
            coarse.logits[None],
            todo,
            None if fine is None else fine.logits[None],
            None if fine is None else fine.informative_idx[None],
            self.manifest.model.k,
        )
        result = PipelineResult(
            logits=logits,
            exited=np.array([exited]),
            coarse_logits=coarse.logits[None],
            confidence=np.array([coarse.confidence], np.float32),
            informative_idx=informative,
            eta=eta,
            timings=StageTimings(0.0, 0.0, 0.0),
        )
        row = rows_for_batch(result, [""], self.labels, min(topk, self.manifest.num_classes))[0]
        refined = () if exited else tuple(int(i) for i in informative[0] if i >= 0)
        return Answer(row=row, refined=refined, eta=eta, logits=logits[0])

    def gate(self, rows: Sequence[CoarseRow], etas: Sequence[float]) -> np.ndarray:
        """(B,) bool: which of `rows` exit, each at its own request's η (the paper's gate, float32 >= η)."""
        return exits(np.array([row.confidence for row in rows], np.float32), np.array(etas, np.float32))

    def exits(self, coarse: CoarseRow, eta: float) -> bool:
        """The gate for one request (see :meth:`gate`)."""
        return bool(self.gate([coarse], [eta])[0])
