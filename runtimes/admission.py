"""Admission control: one bounded counter of work in flight (torch-free, no HTTP).

Every bound on work the server holds at once (images in an engine, request bodies being read) is an
:class:`Admission`: take units before the work starts, give them back when it ends, and refuse when
the units are gone instead of queueing without limit. A request that carries several images takes
them all at once or none (:meth:`Admission.try_acquire` with ``n``), so a batch is never half admitted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from cfvit_deploy.checks import check_positive_int


class AdmissionFull(Exception):
    """:meth:`Admission.hold` could not take its units: the counter is at capacity."""


class Admission:
    """At most `capacity` units in use; acquiring is all-or-nothing and never waits.

    Thread-safe (a lock guards the count; it is held for a few instructions only, so an event loop
    may call it too): engines count on the event loop, decoders and workers may release from threads.
    """

    def __init__(self, capacity: int, name: str = "capacity") -> None:
        self._capacity = check_positive_int(capacity, name)
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        """Units taken and not yet released."""
        return self._in_use

    @property
    def available(self) -> int:
        return self._capacity - self._in_use

    def try_acquire(self, n: int = 1) -> bool:
        """Take `n` units if all `n` are free (True), else take none (False)."""
        check_positive_int(n, "n")
        with self._lock:
            if self._in_use + n > self._capacity:
                return False
            self._in_use += n
            return True

    def release(self, n: int = 1) -> None:
        """Give back `n` units; releasing more than are in use is a bug and raises ValueError."""
        check_positive_int(n, "n")
        with self._lock:
            if n > self._in_use:
                raise ValueError(f"release({n}) with only {self._in_use} in use")
            self._in_use -= n

    @contextlib.contextmanager
    def hold(self, n: int = 1) -> Iterator[None]:
        """Hold `n` units while the block runs; raises :class:`AdmissionFull` when they are not free."""
        if not self.try_acquire(n):
            raise AdmissionFull(f"{n} wanted, {self.available} of {self._capacity} free")
        try:
            yield
        finally:
            self.release(n)

    def __repr__(self) -> str:
        return f"Admission({self._in_use}/{self._capacity})"
