"""Timing helpers of the bench cells: the timed loop and the η that sends a given fraction to the
fine stage. Below every cell (ONNX, PyTorch, the GEMM peak), so the cells import it and not each other."""

from __future__ import annotations

import math
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy as np

#: Fewest timed calls in duration mode.
MIN_ITERATIONS = 5


def timed_loop(
    call: Callable[[int], Any], n_batches: int, warmup: int, iterations: int | None, duration: float
) -> tuple[list[float], list[Any]]:
    """`warmup` untimed calls, then timed calls (`iterations`, or at least `duration` seconds and
    MIN_ITERATIONS calls) ending on a whole pass over the `n_batches` input batches."""
    for i in range(warmup):
        call(i)
    times: list[float] = []
    outputs: list[Any] = []
    start = perf_counter()
    i = 0
    while True:
        t0 = perf_counter()
        out = call(i)
        times.append(perf_counter() - t0)
        outputs.append(out)
        i += 1
        done = i >= iterations if iterations else (i >= MIN_ITERATIONS and perf_counter() - start >= duration)
        if done and i % n_batches == 0:
            return times, outputs


def eta_for_fine_fraction(confidence: np.ndarray, fraction: float) -> float:
    """The η that sends round(fraction * n) of the n images (the least confident) to the fine stage.

    η is one of the float32 confidences itself, so ``confidence >= η`` splits exactly at it (barring ties).
    """
    c = np.sort(np.asarray(confidence, dtype=np.float32).ravel())
    m = int(math.floor(fraction * c.size + 0.5))
    if m <= 0:
        return 0.0
    if m >= c.size:
        return 1.0
    return float(c[m])
