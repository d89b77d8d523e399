"""Errors a user can fix: the CLI prints their message and exits non-zero, with no traceback."""


class UserError(Exception):
    """A problem in the user's config, data or environment; the message says what and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """The config file is invalid; the message lists every problem with its field path."""


class DataError(UserError):
    """A data file cannot be read or breaks the data contract; the message names file, row and column."""


class ModelError(UserError):
    """The model cannot be resolved or loaded; the message says how to point at one that can."""


class ResourceError(UserError):
    """The machine ran out of something (GPU memory); the message says which settings to lower."""
