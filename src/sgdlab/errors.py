"""Exceptions that the CLI turns into a one-line message and exit code 2 (no traceback)."""

from __future__ import annotations

__all__ = ["SgdlabError", "ConfigError", "DataError", "NonFiniteLossError"]


class SgdlabError(Exception):
    """Base class of the errors a user can fix by changing their input."""


class ConfigError(SgdlabError, ValueError):
    """A config that does not validate: unknown or ill-typed key, unknown model name, ..."""


class DataError(SgdlabError, ValueError):
    """A dataset that cannot be loaded: missing folder, truncated or malformed file, ..."""


class NonFiniteLossError(SgdlabError, FloatingPointError):
    """The training loss became NaN or infinite; the run stopped, its last good checkpoint is kept."""
