"""The η gate, once (torch-free, numpy only): confidence, the exit decision, the gather and the merge.

The paper's rule: an image exits at the coarse stage iff max softmax(coarse_logits) >= η. Both
orchestrations use these functions: :class:`runtimes.pipeline.CFViTPipeline` on a batch with one η,
and the serving engines (:class:`runtimes.stages.StageRunner`), whose batches mix requests with
different η, so η may be given per image. The comparison is made in float32, the confidence's
own precision (η is rounded to float32 first), as the exported graphs and PyTorch compute it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: Fill value of the refined-patch indices in the rows of images that exited.
NOT_REFINED = -1

#: a backend's on-device gather: (feeds, indices) -> the rows `indices` of every feed
Take = Callable[[Mapping[str, Any], np.ndarray], dict[str, Any]]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (max-subtracted), in the input's float dtype."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """max softmax per row, the gate's confidence: exp(0) / sum(exp(l - max)) = 1 / sum(exp(l - max))."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(z, out=z).sum(axis=-1)


def exits(confidence: np.ndarray, eta: float | np.ndarray) -> np.ndarray:
    """(B,) bool: float32 confidence >= η per image; `eta` is one number or one per image.

    Both sides are float32: a Python float next to a float32 array is rounded to float32 by numpy
    anyway, but a float64 array of per-request η would otherwise move the comparison to float64 and
    turn an η equal to an image's own confidence into "does not exit".
    """
    return np.asarray(confidence, np.float32) >= np.asarray(eta, np.float32)


def fine_indices(exited: np.ndarray) -> np.ndarray:
    """Positions of the images that go on to the fine stage, in input order."""
    return np.flatnonzero(~exited)


def gather(feeds: Mapping[str, Any], todo: np.ndarray, batch: int, take: Take | None = None) -> dict[str, Any]:
    """The fine graph's inputs for the images `todo` of a batch of `batch` (all of them: no copy).

    `take` gathers on the backend's device (IOBinding); without it the rows are taken on the host.
    """
    if todo.size == batch:
        return dict(feeds)
    if take is not None:
        return take(feeds, todo)
    return {name: np.take(value, todo, axis=0) for name, value in feeds.items()}


def merge(
    coarse_logits: np.ndarray, todo: np.ndarray, fine_logits: np.ndarray | None, fine_idx: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, refined patch indices) of the batch: the coarse logits and :data:`NOT_REFINED` where
    an image exited, the fine stage's outputs (rows of `todo`, in order) where it did not."""
    logits = coarse_logits.copy()
    informative = np.full((len(coarse_logits), k), NOT_REFINED, dtype=np.int64)
    if todo.size:
        logits[todo] = fine_logits
        informative[todo] = fine_idx
    return logits, informative
