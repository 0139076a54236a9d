"""The Ray cluster side of ``--engine ray``: connecting quietly, the options, and a pool layout per node.

:func:`ray_cluster` connects for one run and disconnects afterwards. ``local`` always means a
private cluster on this machine (``ray.init(address="local")``), never a cluster that ``ray start``
left running here. Ray's own log lines stay off stderr, and the signal handlers Ray's core worker
installs (a C++ stack dump on SIGTERM) are replaced by the caller's again, so Ctrl-C and SIGTERM
keep the rows done so far as with the local engine.

Sizing: Ray schedules by CPU requests *per node*. :func:`plan_actors` splits the cluster's CPUs
between the actor pool and the decode tasks; :func:`layout_pool` then places every actor on a node
(the node with the most CPUs left, so actors spread) and sizes the decode tasks to what the nodes
keep free, so no layout can leave every node unable to run a decode task (the deadlock of 2 nodes
x 1 CPU with 2 actors of 0.5 CPU and decode tasks of 1 CPU). A pool that does not fit the nodes is
refused before any work (:class:`UsageError`, exit 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cfvit_deploy.checks import check_positive_int
from cfvit_deploy.errors import UsageError
from cfvit_deploy.extras import require

#: Environment for a quiet Ray: no dedup summaries, no Ray Data progress bars or tips.
_QUIET_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
log = logging.getLogger(__name__)
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
DEFAULT_STALL_TIMEOUT = 120.0  #: seconds without a finished batch before a run ends (``--stall-timeout``)
_GRANULARITY = 1e-4  #: Ray's resource granularity
MIN_DECODE_CPUS = 0.1  #: smallest decode-task request: a node with less free cannot decode


@dataclass(frozen=True)
class RayOptions:
    """The Ray engine's options of :func:`runtimes.infer.infer` (``cfvit infer --engine ray``)."""

    address: str | None = None  #: ``local`` (default: a private cluster), ``auto``, ``host:port``, ``ray://host:10001``
    num_actors: int | None = None  #: pipeline actors (default: from the cluster's CPUs)
    actor_threads: int | None = None  #: ONNX Runtime threads per actor
    shared_export: bool = False  #: actors load the export folder by path instead of from the object store
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  #: seconds without progress before the run ends (rows kept)

    def check(self) -> None:
        for name, value in (("--num-actors", self.num_actors), ("--actor-threads", self.actor_threads)):
            if value is not None:
                check_positive_int(value, name)
        if isinstance(self.stall_timeout, bool) or not (
            isinstance(self.stall_timeout, (int, float)) and 0 < self.stall_timeout < math.inf
        ):
            raise UsageError(f"--stall-timeout must be a positive number of seconds, got {self.stall_timeout!r}")


def import_ray() -> Any:
    """The ``ray`` module, or a MissingExtraError naming ``cfvit-deploy[ray]``."""
    return require("ray", "ray", "--engine ray")


@dataclass(frozen=True)
class ActorPlan:
    """Resource requests of one run."""

    num_actors: int
    cpus_per_actor: float  #: Ray CPU request of each actor (scheduling only; may be fractional)
    threads: int  #: ONNX Runtime intra-op threads of each actor's sessions
    decode_cpus: float  #: CPUs the actors leave free for the decode tasks
    cpus_per_decode_task: float


def plan_actors(cluster_cpus: float, num_actors: int | None = None, actor_threads: int | None = None) -> ActorPlan:
    """Split `cluster_cpus` between the actor pool and the decode tasks so every stage progresses.

    A quarter of the CPUs (at least 1, at most half) is kept for decoding; the actors share the
    rest. Missing values are derived: `actor_threads` from the actors' share (at least 1), and
    `num_actors` as many as fit the share at `actor_threads` (2 by default) each. Each actor
    requests ``min(threads, share / num_actors)`` CPUs, whole above 1 CPU, so the pool never takes
    the decoders' CPUs however many actors are asked for.
    """
    if not cluster_cpus > 0:
        raise UsageError(f"the Ray cluster has no CPUs ({cluster_cpus}); --engine ray needs at least one")
    decode = min(max(1.0, cluster_cpus / 4), cluster_cpus / 2)
    share = cluster_cpus - decode
    if num_actors is None:
        num_actors = max(1, int(share // (actor_threads or 2)))
    threads = actor_threads or max(1, int(share // num_actors))
    request = min(float(threads), share / num_actors)
    request = float(math.floor(request)) if request > 1 else _floor(request)
    return ActorPlan(num_actors, request, threads, decode, min(1.0, decode))


def _floor(cpus: float) -> float:
    return math.floor(cpus / _GRANULARITY + 1e-6) * _GRANULARITY


@dataclass(frozen=True)
class PoolLayout:
    """Where the actors go and what a decode task requests, for the nodes alive now."""

    plan: ActorPlan
    actor_nodes: tuple[str, ...]  #: node id of each actor
    cpus_per_decode_task: float
    node_cpus: dict[str, float]  #: CPUs of each alive node (node id -> CPUs)

    def describe(self) -> str:
        nodes = ", ".join(f"{c:g}" for c in self.node_cpus.values())
        return (
            f"{self.plan.num_actors} actor(s) x {self.plan.cpus_per_actor:g} CPU, decode tasks "
            f"{self.cpus_per_decode_task:g} CPU, on {len(self.node_cpus)} node(s) of {nodes} CPU"
        )


def layout_pool(node_cpus: dict[str, float], num_actors: int | None, actor_threads: int | None) -> PoolLayout:
    """A pool for `node_cpus` (node id -> CPUs) in which some node can always run a decode task.

    Each actor goes to the node with the most CPUs left (ties: the order of `node_cpus`); decode
    tasks request ``min(1, the most any node keeps free)``. With `num_actors` derived, more and
    smaller actors are tried until they fit the largest node; a given `num_actors` that does not
    fit, or leaves no node a tenth of a CPU for decoding, is a :class:`UsageError`.
    """
    total = sum(node_cpus.values())
    plan = plan_actors(total, num_actors, actor_threads)
    while num_actors is None and plan.cpus_per_actor > max(node_cpus.values(), default=0) and plan.num_actors < 64:
        plan = plan_actors(total, plan.num_actors + 1, actor_threads)
    free = dict(node_cpus)
    nodes: list[str] = []
    for _ in range(plan.num_actors):
        node = max(free, key=free.__getitem__)
        if free[node] + 1e-9 < plan.cpus_per_actor:
            raise UsageError(
                f"the actor pool does not fit the Ray nodes: {plan.num_actors} actors x "
                f"{plan.cpus_per_actor:g} CPU on nodes of {_cpus(node_cpus)} CPU; pass a smaller --num-actors"
            )
        free[node] -= plan.cpus_per_actor
        nodes.append(node)
    decode = _floor(min(plan.cpus_per_decode_task, max(free.values())))
    if decode < MIN_DECODE_CPUS:
        raise UsageError(
            f"the actor pool leaves no Ray node CPU for decoding: {plan.num_actors} actors x "
            f"{plan.cpus_per_actor:g} CPU on nodes of {_cpus(node_cpus)} CPU; pass a smaller --num-actors"
        )
    return PoolLayout(plan, tuple(nodes), decode, dict(node_cpus))


def _cpus(node_cpus: dict[str, float]) -> str:
    return ", ".join(f"{c:g}" for c in node_cpus.values()) or "no"


def alive_nodes(ray: Any) -> dict[str, float]:
    """CPUs of each alive node with CPUs (node id -> CPUs), in Ray's order."""
    return {
        n["NodeID"]: float(n["Resources"].get("CPU", 0))
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
    }


@contextlib.contextmanager
def ray_cluster(address: str = "local") -> Iterator[Any]:
    """Connect Ray for one run and disconnect afterwards; an already initialised Ray is used as is.

    ``local`` starts a private cluster with this machine's cores (no dashboard), whatever runs on
    the machine; anything else (``auto``, ``ray://host:10001``, ``host:6379``) is passed to
    ``ray.init(address=...)``. Python's SIGINT and SIGTERM handlers are put back after Ray's.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    disconnect = connect_ray(address)
    try:
        yield ray
    finally:
        disconnect()


def connect_ray(address: str | None, num_cpus: int | None = None, **init: Any) -> Callable[[], None]:
    """``ray.init`` for `address` (None or ``local``: a private cluster of `num_cpus`, default this machine's
    cores), quiet, with Python's signal handlers kept; returns the function that disconnects again."""
    ray = import_ray()
    _quiet_ray()
    handlers = _python_handlers()
    restore_messages = _cluster_messages_to_log()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, **init}
    try:
        if address in (None, "local"):
            ray.init(address="local", num_cpus=num_cpus or _machine_cpus(), include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:  # nothing there; a bad address; no ray[client]
        restore_messages()
        raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    finally:
        _restore_handlers(handlers)

    def disconnect() -> None:
        handlers = _python_handlers()
        try:
            ray.shutdown()
        finally:
            _restore_handlers(handlers)
            restore_messages()

    return disconnect


def _cluster_messages_to_log() -> Callable[[], None]:
    """Send the cluster's error messages to this module's DEBUG log instead of the driver's stdout; returns the undo.

    Ray's driver prints every error the cluster publishes ("(raylet) Raylet is terminated...", "Task
    ... failed ... will be retried", a lost node's last 20 log lines) to *stdout*, whatever
    ``log_to_driver`` says, from a thread that calls ``ray._private.worker.print_to_stdstream``
    (Ray 2.60). stdout holds the rows of ``cfvit infer`` without ``--output``, and the faults these
    messages describe are handled and reported by the engine, so they go to the log here.
    """
    import importlib

    worker = importlib.import_module("ray._private.worker")
    original = getattr(worker, "print_to_stdstream", None)
    if original is None:  # another Ray: nothing to redirect
        return lambda: None

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", ()):
            log.debug("ray %s: %s", data.get("pid"), line)

    def restore() -> None:
        worker.print_to_stdstream = original

    worker.print_to_stdstream = to_log
    return restore


def _python_handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(handlers: dict[int, Any]) -> None:
    """Install Python's handlers again: Ray's core worker replaces them with its own (a stack dump on SIGTERM)."""
    for sig, handler in handlers.items():
        if handler is not None:
            with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to set
                signal.signal(sig, handler)


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _quiet_ray() -> None:
    """Keep Ray's own log lines off stderr (the CLI prints only its own lines)."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
