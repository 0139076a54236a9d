"""``cfvit serve``: online inference over HTTP with two-stage dynamic batching (torch-free).

Starlette + uvicorn in front of :class:`runtimes.batching.BatchingEngine` (or Ray Serve
deployments with ``engine="ray"``); install with ``pip install 'cfvit-deploy[serve]'``.
"""

from __future__ import annotations

from .server import ServeOptions, build_app, serve

__all__ = ["ServeOptions", "build_app", "serve"]
