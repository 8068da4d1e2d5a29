"""Errors a user can fix. The launcher prints their message (no traceback) and exits with their code.

Every stage raises these; none of them imports anything, so any module of medsft may use them.
"""


class MedsftError(Exception):
    """Base of every user-facing error: bad config, bad data, bad model path."""

    exit_code = 1


class ConfigError(MedsftError, ValueError):
    """A config value that composes but cannot work; the message names the key."""

    exit_code = 2


class DataError(MedsftError):
    """Bad training/eval data; the message names the file, the record and the field."""

    exit_code = 3


class ModelSourceError(MedsftError):
    """A model path that cannot be resolved or loaded."""

    exit_code = 4


class TrainingDiverged(MedsftError):
    """Too many non-finite steps in a row (or a non-finite step applied); the last good checkpoint is kept."""

    exit_code = 5
