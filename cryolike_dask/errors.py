"""The errors a user of the package can cause, all derived from :class:`CryoLikeDaskError`.

Every error that means "bad input, bad option or an output in the way" derives from
:class:`CryoLikeDaskError` (a :class:`ValueError`), so the command line reports it as one line
and exit status 2, while any other exception shows as what it is: a bug.
"""

from __future__ import annotations


class CryoLikeDaskError(ValueError):
    """Base of every user-facing error of the package (bad input, option or output folder)."""


class ParameterError(CryoLikeDaskError):
    """A grid, image or run parameter has a value that cannot be used."""


class OutputExistsError(CryoLikeDaskError, FileExistsError):
    """An output would replace files the user has not asked to replace."""


class StructureIndexError(CryoLikeDaskError, IndexError):
    """A structure (template file) index is out of range."""


__all__ = ["CryoLikeDaskError", "OutputExistsError", "ParameterError", "StructureIndexError"]
