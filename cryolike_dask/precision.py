"""Working precision: ``single`` (float32/complex64) or ``double`` (float64/complex128)."""

from __future__ import annotations

from enum import Enum

import numpy as np

from cryolike_dask.errors import ParameterError


class Precision(str, Enum):
    """Floating-point precision of a computation or of stored arrays.

    ``DEFAULT`` exists because CryoLike's parameter files may hold ``'default'``; it resolves
    to single precision unless the context says otherwise.
    """

    SINGLE = "single"
    DOUBLE = "double"
    DEFAULT = "default"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        """Return the member for ``value`` (case-insensitive), or raise a clear ``ValueError``."""
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ParameterError(
                f"precision must be one of 'single', 'double', 'default', not {value!r}"
            ) from None

    def resolve(self, default: Precision | None = None) -> Precision:
        """Replace ``DEFAULT`` by ``default`` (itself falling back to ``SINGLE``)."""
        if self is not Precision.DEFAULT:
            return self
        if default is None or default is Precision.DEFAULT:
            return Precision.SINGLE
        return default

    @property
    def real_dtype(self) -> np.dtype:
        """``float32`` for single, ``float64`` for double."""
        return np.dtype(np.float64 if self.resolve() is Precision.DOUBLE else np.float32)

    @property
    def complex_dtype(self) -> np.dtype:
        """``complex64`` for single, ``complex128`` for double."""
        return np.dtype(np.complex128 if self.resolve() is Precision.DOUBLE else np.complex64)

    @classmethod
    def of_dtype(cls, dtype: np.dtype | type) -> Precision:
        """The precision of a real or complex dtype (double for 64-bit reals)."""
        dt = np.dtype(dtype)
        return cls.DOUBLE if dt in (np.float64, np.complex128) else cls.SINGLE
