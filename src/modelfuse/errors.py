"""Exceptions for bad user input.

Every error a user can cause (a missing file, a corrupt checkpoint, a wrong
parameter, mismatched arrays) raises a subclass of :class:`ModelfuseError`.
The command line prints its message as one line and exits with code 2; the
Python API lets it propagate. Messages name the file, tensor or key, what was
expected, what was received and the fix.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelfuseError",
    "OutputError",
]


class ModelfuseError(Exception):
    """Base class of every error caused by user input; exit code 2 on the CLI."""


class ConfigError(ModelfuseError, ValueError):
    """A configuration or parameter is invalid (unknown key, out-of-range value)."""


class CheckpointError(ModelfuseError, ValueError):
    """A checkpoint is missing, not a checkpoint, corrupt, or inconsistent with the others."""


class DataError(ModelfuseError, ValueError):
    """Arrays of predictions, scores or labels are malformed or inconsistent."""


class OutputError(ModelfuseError):
    """The output cannot be written (it exists, or the disk filled up); nothing was left behind."""
