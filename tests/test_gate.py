"""runtimes.gate: the one definition of the η gate that the pipeline and the serving engines share."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cfvit_deploy.manifest import Manifest
from runtimes import CFViTPipeline
from runtimes.backends import create_backend
from runtimes.batching import BatchingEngine, EngineConfig
from runtimes.gate import NOT_REFINED, exits, fine_indices, gather, max_softmax, merge
from runtimes.stages import StageRunner

TIMEOUT = 60


def test_exits_compares_in_float32_with_one_eta_or_one_per_image():
    conf = np.array([0.7, 0.3, 0.9], np.float32)  # float32(0.7) < 0.7 in float64
    assert exits(conf, 0.7).tolist() == [True, False, True]
    per_image = np.array([0.7, 0.3, 0.95])  # float64, as a list of request η becomes
    assert exits(conf, per_image).tolist() == [True, True, False]  # in float64, 0.7 would not exit
    above = float(np.nextafter(np.float32(0.7), np.float32(1)))
    assert exits(conf, np.array([above, 0.0, 1.0])).tolist() == [False, True, False]
    assert exits(np.ones(2, np.float32), 1.0).all()  # confidence exactly 1 exits at η = 1


def test_gather_and_merge_keep_input_order():
    coarse = np.arange(12, dtype=np.float32).reshape(4, 3)
    exited = exits(max_softmax(coarse), np.array([0.0, 1.0, 0.0, 1.0]))
    todo = fine_indices(exited)
    assert todo.tolist() == [1, 3]
    feeds = {"x": np.arange(8).reshape(4, 2)}
    assert gather(feeds, todo, 4)["x"].tolist() == [[2, 3], [6, 7]]
    assert gather(feeds, np.arange(4), 4)["x"] is feeds["x"]  # nobody exited: no copy
    taken = gather(feeds, todo, 4, take=lambda f, idx: {"x": f["x"][idx] * 10})
    assert taken["x"].tolist() == [[20, 30], [60, 70]]  # the device gather when a backend gives one
    fine = -np.ones((2, 3), np.float32)
    logits, idx = merge(coarse, todo, fine, np.array([[5, 6], [7, 8]]), 2)
    assert logits[[0, 2]].tolist() == coarse[[0, 2]].tolist() and (logits[[1, 3]] == -1).all()
    assert idx.tolist() == [[NOT_REFINED] * 2, [5, 6], [NOT_REFINED] * 2, [7, 8]] and idx.dtype == np.int64
    logits, idx = merge(coarse, fine_indices(np.ones(4, bool)), None, None, 2)
    assert (logits == coarse).all() and logits is not coarse and (idx == NOT_REFINED).all()


@pytest.fixture(scope="module")
def deit(export_dir_factory):
    from tests.conftest import UpstreamFixture

    return Manifest.load(export_dir_factory("deit_g7")), UpstreamFixture("deit_g7").images


def test_engine_batch_with_mixed_eta_gates_like_the_pipeline(deit):
    """Requests with different η in one coarse batch: each is gated at its own η, at the tie too."""
    manifest, images = deit
    images = np.ascontiguousarray(np.concatenate([images, images[..., ::-1]]))  # 6 images (mirrored too)
    pipe = CFViTPipeline(manifest)
    conf = pipe.run(images, 0.0).confidence
    order = np.argsort(conf)
    # per request: η on its own confidence (must exit), one float32 step above (must not), 0 and 1
    etas = [0.0] * len(images)
    etas[order[1]] = float(conf[order[1]])
    etas[order[2]] = float(np.nextafter(conf[order[2]], np.float32(2)))
    etas[order[-1]] = 1.0
    c3 = conf[order[3]]  # just above its confidence in float64, equal to it in float32: exits
    etas[order[3]] = float(c3) + float(np.nextafter(c3, np.float32(2)) - c3) / 4
    # the same batch in one coarse call gives the same float32 confidences (test_gate_ties relies on it too)
    want = [bool(conf[i] >= np.float32(etas[i])) for i in range(len(images))]
    assert want[order[1]] and not want[order[2]] and not want[order[-1]] and want[order[0]] and want[order[3]]
    assert pipe.run(images, etas[order[3]]).exited[order[3]]  # as the pipeline decides with that η
    runner = StageRunner(create_backend(manifest, "cpu"))
    engine = BatchingEngine(lambda: runner, EngineConfig(max_batch=len(images), max_wait_ms=1000))
    batches: list[int] = []
    engine.observer.on_batch = lambda stage, n, s: stage == "coarse" and batches.append(n)

    async def main() -> list:
        await engine.start()
        with engine.expect():  # announced: the coarse stage waits for the whole batch
            tasks = [asyncio.ensure_future(engine.submit(images[i], etas[i], 1)) for i in range(len(images))]
        answers = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        await engine.close()
        return answers

    answers = asyncio.run(main())
    assert batches == [len(images)]  # the mixed-η requests shared one coarse batch
    assert [a.row.stage == "coarse" for a in answers] == want
