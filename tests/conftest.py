"""Shared test fixtures: the upstream reference checkpoints and small models."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A suite started as a background job of a non-interactive shell (`bash .ci/run &`, nohup) inherits SIGINT
# ignored, and so would every `cfvit` child it starts (an ignored signal stays ignored across exec): the
# SIGINT tests would then test the shell, not the CLI. A handler (unlike SIG_IGN) is reset to the default at
# exec, so children get Python's usual KeyboardInterrupt whatever started the suite.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
FIXTURES = Path(os.environ.get("CFVIT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "upstream"))
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.pth") if (p.with_suffix(".npz")).exists())


class UpstreamFixture:
    """One reference checkpoint with the outputs the original code produced for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pth = FIXTURES / f"{name}.pth"
        self.info = json.loads((FIXTURES / f"{name}.json").read_text())
        with np.load(FIXTURES / f"{name}.npz") as data:
            self.ref = {k: data[k] for k in data.files}

    @property
    def num_heads(self) -> int:
        return int(self.info["num_heads"])

    @property
    def images(self) -> np.ndarray:
        return self.ref["fine_images"]


@pytest.fixture(params=FIXTURE_NAMES or [pytest.param(None, marks=pytest.mark.skip("no upstream fixtures"))])
def upstream(request: pytest.FixtureRequest) -> UpstreamFixture:
    return UpstreamFixture(request.param)


@pytest.fixture(scope="session")
def export_dir_factory(tmp_path_factory: pytest.TempPathFactory):
    """make(fixture_name, **export_kwargs) -> export folder (exported once per session and kwargs)."""
    cache: dict[tuple, Path] = {}

    def make(name: str, **kwargs) -> Path:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            from exporters import export

            fx = UpstreamFixture(name)
            shared = os.environ.get("CFVIT_EXPORT_CACHE")  # `make mutation`: export once, not once per mutant
            if shared:
                tag = "-".join(f"{k}={v}" for k, v in key[1])
                out = Path(shared) / f"{name}{'-' + tag if tag else ''}" / "export"
                out.parent.mkdir(parents=True, exist_ok=True)
                if not (out / "manifest.json").exists():
                    try:
                        export(fx.pth, out, num_heads=fx.num_heads, **kwargs)
                    except Exception:  # a concurrent worker wrote it first
                        if not (out / "manifest.json").exists():
                            raise
            else:
                out = tmp_path_factory.mktemp(f"export-{name}") / "export"
                export(fx.pth, out, num_heads=fx.num_heads, **kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture
def upstream_export(upstream: UpstreamFixture, export_dir_factory) -> tuple[UpstreamFixture, Path]:
    """An upstream fixture and its fp32 export folder."""
    return upstream, export_dir_factory(upstream.name)
