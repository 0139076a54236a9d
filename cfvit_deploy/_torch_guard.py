"""Imported just before ``import torch`` by every torch-side module.

On a base install (no torch) importing e.g. ``cfvit_deploy.model`` then raises
:class:`~cfvit_deploy.errors.MissingExtraError` ("torch is not installed: pip install
'cfvit-deploy[export]'"), one line in the CLI, instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

from .extras import require

require("torch", "export")
