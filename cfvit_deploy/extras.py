"""Optional dependencies, imported lazily: a missing one is one error line naming the extra.

The base install (``pip install cfvit-deploy``) runs ``cfvit infer``; every other capability lives
in an extra. Code that needs an optional module calls :func:`require` at the point of use, so that
``import`` of the package never fails and the user is told exactly what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# The extra that provides each optional top-level module (pyproject.toml's optional-dependencies).
EXTRA_OF = {
    "torch": "export",
    "onnx": "export",
    "onnxsim": "export",
    "onnxconverter_common": "export",
    "matplotlib": "bench",
    "psutil": "bench",
    "openvino": "openvino",
    "ray": "ray",
    "pyarrow": "parquet",
    "starlette": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "multipart": "serve",
}


def install_hint(extra: str) -> str:
    return f"pip install 'cfvit-deploy[{extra}]'"


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import `module`, or raise :class:`MissingExtraError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        missing = (exc.name or top).split(".")[0]
        if missing != top and missing not in EXTRA_OF:
            raise  # a broken install of something else: not ours to reword
        name = extra or EXTRA_OF.get(missing) or EXTRA_OF.get(top, "all")
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingExtraError(f"{missing} is not installed{what}: {install_hint(name)}", extra=name) from None
