"""The gated two-stage pipeline (torch-free): coarse graph, the η gate, the fine graph on the rest.

The gate is the paper's (:mod:`runtimes.gate`): an image exits at the coarse stage iff
max softmax(coarse_logits) >= η.
Only the images that did not exit are gathered (in input order) into the fine graph's sub-batch;
their fine logits are merged back in place. The host work between the graphs is one softmax over
(B, classes), a comparison and one gather: vectorised numpy, no per-image Python.

On a backend with an IOBinding device (:attr:`~runtimes.ort_backend.OrtBackend.io_device`, on by default for CUDA and
TensorRT) the coarse outputs stay on the device: only ``coarse_logits`` comes back to the host for
the gate, and the sub-batch is gathered on the device by a tiny ONNX ``Gather`` graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from cfvit_deploy.checks import check_eta
from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import Manifest

from .backends import Backend, SessionConfig, create_backend
from .gate import NOT_REFINED, exits, fine_indices, gather, max_softmax, merge, softmax

#: the gate's pieces live in runtimes.gate (shared with the serving engines); re-exported here
__all__ = ["CFViTPipeline", "NOT_REFINED", "PipelineResult", "StageTimings", "check_eta", "max_softmax", "softmax"]

_FINE_OUTPUTS = ("fine_logits", "informative_idx")


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock seconds of one :meth:`CFViTPipeline.run`."""

    coarse_s: float  #: coarse graph (with the host<->device copies it needs for the gate)
    gate_s: float  #: softmax, gate, sub-batch gather and merge: the orchestration overhead
    fine_s: float  #: fine graph on the sub-batch (0 when every image exited)

    @property
    def total_s(self) -> float:
        return self.coarse_s + self.gate_s + self.fine_s


@dataclass(frozen=True)
class PipelineResult:
    """Outputs of one batch, in input order."""

    logits: np.ndarray  #: (B, classes) float32: coarse logits where exited, fine logits elsewhere
    exited: np.ndarray  #: (B,) bool: max softmax(coarse_logits) >= eta
    coarse_logits: np.ndarray  #: (B, classes) float32
    confidence: np.ndarray  #: (B,) float32 max softmax(coarse_logits)
    #: (B, k) int64 coarse patches refined by the fine stage (descending score); NOT_REFINED (-1)
    #: fills the rows of images that exited
    informative_idx: np.ndarray
    eta: float
    timings: StageTimings

    @property
    def exit_rate(self) -> float:
        return float(self.exited.mean())


class CFViTPipeline:
    """Coarse graph -> η gate -> fine graph on the images that did not exit.

    `source` is an export folder, a loaded :class:`Manifest` (a backend is created for `provider`
    with `config`), or a ready backend (then `provider` and `config` are not used).

    :meth:`run` keeps no state between calls, so it is safe to call from several threads when the
    backend's ``run`` is (ONNX Runtime sessions and :class:`OpenVinoBackend` are).
    """

    def __init__(
        self, source: str | Path | Manifest | Backend, provider: str = "cpu", config: SessionConfig | None = None
    ) -> None:
        if isinstance(source, (str, Path)):
            source = Manifest.load(source)
        if isinstance(source, Manifest):
            self.backend: Backend = create_backend(source, provider, config, graphs=("coarse", "fine"))
        elif callable(getattr(source, "run", None)) and isinstance(getattr(source, "manifest", None), Manifest):
            self.backend = source
        else:
            raise UsageError(
                f"CFViTPipeline needs an export folder, a Manifest or a backend, got {type(source).__name__}"
            )
        self.manifest: Manifest = self.backend.manifest
        self._fine_inputs = tuple(self.manifest.graphs["fine"].input_names())
        #: IOBinding device of the backend, or None for plain host-array runs
        self.io_device: str | None = getattr(self.backend, "io_device", None)

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    def check_images(self, images: Any) -> np.ndarray:
        """`images` as a C-contiguous (B, 3, S, S) float32 array, or a :class:`UsageError`."""
        s = self.image_size
        expected = f"a (batch, 3, {s}, {s}) float32 numpy array of normalized images"
        if not isinstance(images, np.ndarray):
            raise UsageError(f"images must be {expected}, got {type(images).__name__}")
        if images.dtype != np.float32:
            raise UsageError(f"images must be {expected}, got dtype {images.dtype} (use images.astype(np.float32))")
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or images.shape[0] < 1:
            raise UsageError(f"images must be {expected} with batch >= 1, got shape {images.shape}")
        return np.ascontiguousarray(images)

    def run(self, images: np.ndarray, eta: float | None = None) -> PipelineResult:
        """Classify a batch; `eta` defaults to the manifest's ``default_eta`` (η=0: all exit, η=1: none
        exits unless its float32 confidence is exactly 1.0, as in PyTorch)."""
        images = self.check_images(images)
        eta = check_eta(self.manifest.default_eta if eta is None else eta)
        backend, bound, n = self.backend, self.io_device is not None, len(images)

        t0 = perf_counter()
        if bound:
            on_device = backend.to_device(images)  # type: ignore[attr-defined]
            coarse = backend.run_bound("coarse", {"images": on_device}, ("coarse_logits",))  # type: ignore[attr-defined]
            coarse["images"] = on_device
        else:
            coarse = backend.run("coarse", {"images": images})
            coarse["images"] = images
        coarse_logits = coarse["coarse_logits"]
        t1 = perf_counter()

        confidence = max_softmax(coarse_logits)
        exited = exits(confidence, eta)
        todo = fine_indices(exited)
        fine: dict[str, Any] = {}
        fine_s = 0.0
        if todo.size:
            take = backend.take if bound else None  # type: ignore[attr-defined]
            feeds = gather({name: coarse[name] for name in self._fine_inputs}, todo, n, take)
            t2 = perf_counter()
            if bound:
                fine = backend.run_bound("fine", feeds, _FINE_OUTPUTS)  # type: ignore[attr-defined]
            else:
                fine = backend.run("fine", feeds)
            fine_s = perf_counter() - t2
        logits, informative = merge(
            coarse_logits, todo, fine.get("fine_logits"), fine.get("informative_idx"), self.manifest.model.k
        )
        total = perf_counter() - t0
        timings = StageTimings(coarse_s=t1 - t0, gate_s=total - (t1 - t0) - fine_s, fine_s=fine_s)
        return PipelineResult(logits, exited, coarse_logits, confidence, informative, eta, timings)
