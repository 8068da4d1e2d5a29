"""Errors a user can fix. The launcher prints their message (no traceback) and exits with their code.

Every stage raises these; none of them imports anything of medsft, so any module of medsft may use them.
The exit codes are documented in the README ("Exit codes"): 0 done, 1 unexpected error, 2 config, 3 data,
4 model source, 5 training diverged, 6 output location, 75 preempted (medsft.train.signals).
"""

from __future__ import annotations

import errno
from typing import Optional


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
    """Too many non-finite steps in a row, or non-finite weights at a checkpoint; the last good checkpoint is
    kept."""

    exit_code = 5


class OutputError(MedsftError):
    """A place the run writes to that cannot take it: not a writable directory, no space left, held by another
    run, or holding only damaged checkpoints. The message names the path."""

    exit_code = 6


# errno values that mean "the place you asked me to write to cannot take it": the user fixes them, not us.
_USER_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "is a directory",
}


def output_error_from_os_error(err: BaseException) -> Optional[OutputError]:
    """An OutputError naming the file for an OSError a user can fix (disk full, permission, read-only), else
    None. Looks through the exception's causes too (libraries wrap OS errors in their own)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in _USER_OS_ERRORS:
            where = err.filename if err.filename is not None else "an output location"
            other = f" -> {err.filename2}" if getattr(err, "filename2", None) else ""
            verb = "cannot write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "cannot use"
            return OutputError(f"{verb} {where}{other}: {_USER_OS_ERRORS[err.errno]} ([Errno {err.errno}] "
                               f"{err.strerror})")
        err = err.__cause__ or err.__context__
        seen += 1
    return None
