"""One exception family so callers can catch every clipforge error with a single ``except``."""

from __future__ import annotations


class ClipforgeError(Exception):
    """Base class: the message must tell the user what is wrong and where (file, line, key)."""


class ConfigError(ClipforgeError, ValueError):
    """A configuration value or a model name is invalid."""


class CheckpointError(ClipforgeError):
    """A checkpoint could not be read, is unsafe, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would run code when unpickled; we refuse it rather than execute it."""


class DataError(ClipforgeError):
    """A dataset, table or image is malformed in a way that cannot be skipped."""


class DownloadError(ClipforgeError):
    """Weights are not cached and could not be downloaded."""
