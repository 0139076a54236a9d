"""The one admission counter (runtimes.admission) and the serving-engine interface (runtimes.engine)
that both engines implement: the same refusals, counted by the same class."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cfvit_deploy.errors import UsageError
from cfvit_deploy.manifest import Manifest
from runtimes.admission import Admission, AdmissionFull
from runtimes.backends import create_backend
from runtimes.batching import BatchingEngine
from runtimes.engine import EngineBusy, EngineConfig, ServingEngine, admit
from runtimes.stages import StageRunner

TIMEOUT = 60


# -- the counter -----------------------------------------------------------------------------------
def test_acquire_is_all_or_nothing():
    a = Admission(5)
    assert a.try_acquire(3) and a.in_use == 3 and a.available == 2
    assert not a.try_acquire(3) and a.in_use == 3  # 3 wanted, 2 free: none taken
    assert a.try_acquire(2) and a.in_use == 5 and not a.try_acquire()
    a.release(4)
    assert a.in_use == 1 and a.try_acquire(4) and a.in_use == 5


def test_release_beyond_use_and_bad_counts_are_refused():
    a = Admission(2)
    a.try_acquire()
    with pytest.raises(ValueError, match="release"):
        a.release(2)
    assert a.in_use == 1  # the failed release changed nothing
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError):
            a.try_acquire(bad)
    with pytest.raises(UsageError, match="--max-queue"):
        Admission(0, "--max-queue")


def test_hold_releases_on_exit_and_on_error():
    a = Admission(3)
    with a.hold(2):
        assert a.in_use == 2
        with pytest.raises(AdmissionFull, match="2 wanted, 1 of 3 free"), a.hold(2):
            pass
        assert a.in_use == 2
    assert a.in_use == 0
    with pytest.raises(RuntimeError), a.hold(3):
        raise RuntimeError("boom")
    assert a.in_use == 0


def test_counts_are_exact_under_threads():
    """Acquire/release from 8 threads: never above capacity, back to zero at the end."""
    a = Admission(4)
    peak = [0]
    lock = threading.Lock()

    def worker(_: int) -> int:
        taken = 0
        for _ in range(2000):
            if a.try_acquire():
                taken += 1
                with lock:
                    peak[0] = max(peak[0], a.in_use)
                a.release()
        return taken

    with ThreadPoolExecutor(8) as pool:
        taken = sum(pool.map(worker, range(8)))
    assert a.in_use == 0 and 0 < peak[0] <= 4 and taken > 0


def test_admit_refuses_in_order_and_returns_a_preacquired_unit():
    a = Admission(1)
    for ready, closing, reason in ((False, True, "closing"), (True, True, "closing"), (False, False, "not ready")):
        with pytest.raises(EngineBusy) as info:
            admit(a, ready=ready, closing=closing)
        assert info.value.reason == reason and a.in_use == 0
    admit(a, ready=True, closing=False)
    with pytest.raises(EngineBusy, match="full"):
        admit(a, ready=True, closing=False)
    assert a.in_use == 1
    with pytest.raises(EngineBusy, match="closing"):  # the caller's unit goes back with the refusal
        admit(a, ready=True, closing=True, admitted=True)
    assert a.in_use == 0


# -- the engines -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(export_dir_factory) -> Path:
    return export_dir_factory("deit_g7")


def _engine(export_dir: Path, **config) -> BatchingEngine:
    return BatchingEngine(
        lambda: StageRunner(create_backend(Manifest.load(export_dir), "cpu")), EngineConfig(max_wait_ms=0, **config)
    )


def test_both_engines_implement_the_interface(export_dir):
    assert isinstance(_engine(export_dir), ServingEngine)
    pytest.importorskip("ray.serve")
    from runtimes.ray_serve import RayServeEngine

    ray_engine = RayServeEngine(export_dir, EngineConfig(max_queue=3))
    assert isinstance(ray_engine, ServingEngine)
    assert ray_engine.admission.capacity == 3 and ray_engine.pending == 0


def test_a_batch_is_admitted_whole_then_answered_image_by_image(export_dir):
    """A caller takes n units at once, submits each image with admitted=True; every unit comes back."""
    engine = _engine(export_dir, max_queue=3, max_batch=4)
    s = Manifest.load(export_dir).image_size
    image = np.zeros((3, s, s), np.float32)

    async def main() -> tuple:
        await engine.start()
        assert not engine.admission.try_acquire(4)  # a 4-image batch over --max-queue 3: refused whole
        assert engine.admission.try_acquire(3)
        with pytest.raises(EngineBusy, match="full"):  # the batch holds every unit
            await engine.submit(image, 0.0, 1)
        answers = await asyncio.wait_for(
            asyncio.gather(*(engine.submit(image, 0.0, 1, admitted=True) for _ in range(3))), TIMEOUT
        )
        after = engine.pending
        with pytest.raises(UsageError, match="eta"):  # a bad request gives its unit back
            await engine.submit(image, 2.0, 1)
        bad_eta = engine.pending
        await engine.close()
        with pytest.raises(EngineBusy, match="closing"):
            await engine.submit(image, 0.0, 1)
        return answers, after, bad_eta

    answers, after, bad_eta = asyncio.run(main())
    assert [a.row.stage for a in answers] == ["coarse"] * 3
    assert after == 0 and bad_eta == 0 and engine.pending == 0
