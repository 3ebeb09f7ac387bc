"""Errors a user can fix: each one prints as a single line and exits with code 2.

Every error that means "your input is wrong" (a flag, a file, a model directory, a checkpoint)
derives from `UserError`. The command-line entry points catch `UserError` once and print
`lora-dist <command>: error: <message>`; `LORA_DIST_DEBUG=1` shows the traceback instead.
Anything else is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, with a message that says what to change."""


class ConfigError(UserError):
    """A setting or DeepSpeed config that cannot run as given."""


class AdapterError(UserError):
    """An adapter directory that cannot be loaded as asked."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from."""


class DataError(UserError):
    """A data file or row that cannot be read; the message names the file and line."""


class ModelError(UserError):
    """A model directory or file that is not what the command needs."""


class MissingDataFile(DataError, FileNotFoundError):
    """A data file that does not exist (also a FileNotFoundError)."""
