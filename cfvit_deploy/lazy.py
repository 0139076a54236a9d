"""Lazy package attributes (PEP 562), shared by ``cfvit_deploy``, ``exporters`` and ``runtimes``.

A package lists which submodule defines each public name; the name is imported on first access, so
importing the package stays cheap and does not pull in optional dependencies (torch, OpenVINO, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package` that imports ``names[name]`` (a submodule) on first use."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
