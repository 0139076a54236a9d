"""A process pinned to fewer CPUs than the machine has (`taskset -c 0`, a container's cpuset) gets that many
threads by default, not a pool sized for the whole machine's cores on its one allowed CPU."""

from __future__ import annotations

import os

import pytest

from cfvit_deploy.app.bench import machine
from cfvit_deploy.manifest import Manifest
from runtimes import backends, infer
from runtimes.backends import SessionConfig, create_backend, pinned_cpus


@pytest.fixture
def one_of_four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)


def test_pinned_cpus_counts_the_allowed_cpus_only_when_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    assert pinned_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert pinned_cpus() is None and SessionConfig().effective_threads is None


@pytest.mark.usefixtures("one_of_four_cpus")
def test_defaults_follow_the_affinity() -> None:
    assert SessionConfig().effective_threads == 1
    assert SessionConfig(threads=3).effective_threads == 3  # an explicit count is kept
    assert infer.default_decode_workers() == 1
    assert machine.default_threads() == 1
    assert backends.pinned_cpus() == 1


def test_onnxruntime_sessions_get_the_pinned_thread_count(export_dir_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = Manifest.load(export_dir_factory("deit_g7"))
    free = create_backend(manifest, "cpu", SessionConfig(), graphs=("coarse",))
    assert free.sessions["coarse"].get_session_options().intra_op_num_threads == 0  # ONNX Runtime's default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    pinned = create_backend(manifest, "cpu", SessionConfig(), graphs=("coarse",))
    assert pinned.sessions["coarse"].get_session_options().intra_op_num_threads == 1
