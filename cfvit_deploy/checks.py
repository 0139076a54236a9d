"""Argument checks shared by every command and the Python API: one wording, one grammar per kind.

Every check raises :class:`~cfvit_deploy.errors.UsageError` (also a ``ValueError``) naming the flag
or argument. A list of numbers is written ``a,b,c`` or ``start:stop:step`` (stop included) everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

from .errors import UsageError


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_eta(eta: Any, name: str = "eta") -> float:
    """η as a float in [0, 1]; anything else (NaN, a bool, a string) is a :class:`UsageError`."""
    if not _is_number(eta):
        raise UsageError(f"{name} must be a number in [0, 1], got {eta!r}")
    value = float(eta)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A fraction in [0, 1] (fine fraction, agreement rate)."""
    return check_eta(value, name)


def check_positive_int(value: Any, name: str) -> int:
    """An integer >= 1 (batch size, iterations, threads)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_batch_size(value: Any, name: str = "--batch-size") -> int:
    """A batch size: an integer >= 1."""
    return check_positive_int(value, name)


def check_batch_sizes(values: Iterable[Any], name: str = "--batch-sizes") -> list[int]:
    """Batch sizes: a non-empty list of integers >= 1, duplicates removed, order kept."""
    items = list(values)
    if not items:
        raise UsageError(f"{name} is empty")
    return list(dict.fromkeys(check_positive_int(v, name) for v in items))


def check_etas(values: Iterable[Any], name: str = "--etas") -> list[float]:
    """η values: a non-empty list in [0, 1], sorted, duplicates removed."""
    items = list(values)
    if not items:
        raise UsageError(f"{name} is empty")
    return sorted({check_eta(v, name) for v in items})


def _range(spec: str, kind: type) -> list[float] | list[int]:
    start, stop, step = (kind(v) for v in spec.split(":"))
    if step <= 0 or stop < start:
        raise ValueError(spec)
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if kind is int:
        return [start + i * step for i in range(count)]
    return [round(start + i * step, 10) for i in range(count)]


def parse_number_list(spec: str, kind: type = float, name: str = "value") -> list:
    """``"a,b,c"`` or ``"start:stop:step"`` (stop included) -> a list of `kind` (int or float)."""
    text = spec.strip()
    try:
        if ":" in text:
            values = _range(text, kind)
        else:
            values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"{name} expects comma-separated {kind.__name__} values (a,b,c) or start:stop:step, got {spec!r}"
        ) from None
    if not values:
        raise UsageError(f"{name} is empty")
    return values


def parse_etas(spec: str, name: str = "--etas") -> list[float]:
    """η values from a flag: ``0:1:0.05`` or ``0.3,0.5,0.7`` -> sorted values in [0, 1]."""
    return check_etas(parse_number_list(spec, float, name), name)


def parse_batch_sizes(spec: str, name: str = "--batch-sizes") -> list[int]:
    """Batch sizes from a flag: ``1,8,32`` or ``1:33:8``."""
    return check_batch_sizes(parse_number_list(spec, int, name), name)


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """One of `choices`, named in the message when it is not."""
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
