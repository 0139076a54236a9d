"""Typed errors. Every user-facing failure is one of these; the CLI prints them as one line."""

from __future__ import annotations


class CFViTError(Exception):
    """Base class of every error the toolkit raises on purpose (bad input, bad files, bad flags)."""

    exit_code: int = 1


class UsageError(CFViTError, ValueError):
    """A flag or argument is invalid (exit code 2). Also a ``ValueError`` for Python callers."""

    exit_code = 2


class CheckpointError(CFViTError):
    """A checkpoint is missing, unreadable, not a CF-ViT, or does not match the model."""


class UnreadableCheckpointError(CheckpointError):
    """The file is missing or is no PyTorch checkpoint at all (text, random bytes, truncated, unsafe)."""


class ManifestError(CFViTError):
    """An export folder is incomplete, tampered with, or of an unknown format version."""


class ExportError(CFViTError):
    """Exporting a graph failed."""


class ImageError(CFViTError):
    """An image file cannot be read or decoded; `reason` says why as a machine-readable code.

    The reasons: ``not_an_image`` (unrecognised bytes, or a format off the allowlist),
    ``too_many_pixels`` (above the pixel limit), ``empty`` (no bytes), ``truncated``, ``corrupt``
    (the data cannot be decoded) and ``unreadable`` (missing file, directory, permission, symlink loop).
    """

    REASONS = ("not_an_image", "too_many_pixels", "empty", "truncated", "corrupt", "unreadable")

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:  # keep the reason across pickling (process pools, Ray)
        return (type(self), (str(self), self.reason))


class ProviderError(CFViTError):
    """An execution provider or runtime is unavailable or not active."""


class OutputError(CFViTError):
    """An output cannot be written: the disk is full, read-only, over quota, or not writable (exit 1)."""


class OutputExistsError(UsageError):
    """An output exists and --force was not given."""


class MissingExtraError(CFViTError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra
