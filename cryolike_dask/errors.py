"""The errors a user of the package can cause, all derived from :class:`CryoLikeDaskError`.

Every error that means "bad input, bad option or an output in the way" derives from
:class:`CryoLikeDaskError` (a :class:`ValueError`), so the command line reports it as one line
and exit status 2, while any other exception shows as what it is: a bug.
"""

from __future__ import annotations

import errno
import os


class CryoLikeDaskError(ValueError):
    """Base of every user-facing error of the package (bad input, option or output folder)."""


class ParameterError(CryoLikeDaskError):
    """A grid, image or run parameter has a value that cannot be used."""


class OutputExistsError(CryoLikeDaskError, FileExistsError):
    """An output would replace files the user has not asked to replace."""


class StructureIndexError(CryoLikeDaskError, IndexError):
    """A structure (template file) index is out of range."""


#: ``errno`` values of a full disk or an exhausted quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CryoLikeDaskError):
    """The disk (or the quota) filled up while writing ``filename``.

    Like an :class:`OSError`, it has ``errno`` and ``filename``.
    """

    def __init__(self, filename: str | None = None, code: int = errno.ENOSPC) -> None:
        self.filename, self.errno = filename, code
        where = f"{filename}: " if filename else ""
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{where}no space left on device (the disk is full, errno {name})")

    def __reduce__(self):  # rebuilt from its fields, also in another process
        return (type(self), (self.filename, self.errno))


def write_error(exc: OSError, path: str | os.PathLike) -> OSError | DiskFullError:
    """The error to raise for a failed write of ``path``: a :class:`DiskFullError` when the
    disk is full, else ``exc`` naming ``path`` (a failed ``write`` names no file, a
    temporary file's name means nothing to the user)."""
    if exc.errno in DISK_FULL:
        return DiskFullError(str(path), exc.errno)
    if exc.filename is None or ".tmp-" in str(exc.filename):
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


__all__ = [
    "DISK_FULL",
    "CryoLikeDaskError",
    "DiskFullError",
    "OutputExistsError",
    "ParameterError",
    "StructureIndexError",
    "write_error",
]
