"""``cupy.ndarray`` and ``cupy.ufunc`` of the CuPy test stand-in: NumPy arrays that act as
if they lived on a GPU.

An :class:`ndarray` wraps a private NumPy array (``_host``) and behaves as strictly as a
CuPy array, or more strictly:

* it never turns into a NumPy array implicitly: ``__array__`` raises CuPy's ``TypeError``,
  NumPy functions called on it (``__array_function__``) raise ``TypeError``, and NumPy
  arrays mixed into its operations, indices, assignments or ufuncs raise
  ``TypeError("Unsupported type <class 'numpy.ndarray'>")`` (Python and NumPy scalars, and
  0-d NumPy arrays, are accepted, as CuPy accepts them);
* it cannot be pickled (device data must not cross a task boundary);
* ``.get()``, ``cupy.asnumpy``, ``item()``, ``tolist()``, ``float()``, ``int()``,
  ``bool()``, ``complex()``, ``repr()`` and ``str()`` are host syncs and are counted.

Every computation delegates to NumPy on the wrapped data; results are wrapped again
(NumPy scalars become 0-d arrays, as CuPy returns them) and their buffers are accounted
as device memory (:mod:`cupy._device`).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from cupy._device import Device, state

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)
_PICKLE = (
    "cupy stand-in: a device array cannot be pickled: device data must not cross a task "
    "boundary (copy it to the host with .get() or cupy.asnumpy() first)"
)
_SCALARS = (bool, int, float, complex, np.generic)


def unsupported(obj: Any) -> TypeError:
    """CuPy's error for an operand it does not take (a NumPy array, above all)."""
    return TypeError(f"Unsupported type {type(obj)}")


def is_scalar(obj: Any) -> bool:
    """Python or NumPy scalar, or a 0-d NumPy array (operands CuPy accepts with arrays)."""
    return isinstance(obj, _SCALARS) or (isinstance(obj, np.ndarray) and obj.ndim == 0)


def unwrap(obj: Any, seen: dict[int, ndarray], strict: bool = True) -> Any:
    """``obj`` with device arrays replaced by their host buffers (inside lists, tuples, dicts).

    ``seen`` maps each buffer to its device array, so that a result that *is* an input is
    returned as that same array. With ``strict``, a NumPy array (not 0-d) raises.
    """
    if isinstance(obj, ndarray):
        seen[id(obj._host)] = obj
        return obj._host
    if isinstance(obj, np.ndarray):
        if strict and obj.ndim > 0:
            raise unsupported(obj)
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(unwrap(o, seen, strict) for o in obj)
    if type(obj) is dict:
        return {k: unwrap(v, seen, strict) for k, v in obj.items()}
    return obj


def wrap(result: Any, seen: dict[int, ndarray], scalars: bool = True) -> Any:
    """NumPy results as device arrays (scalars as 0-d arrays when ``scalars``)."""
    if isinstance(result, np.ndarray):
        same = seen.get(id(result))
        return same if same is not None else ndarray._from_host(result)
    if scalars and isinstance(result, _SCALARS):
        return ndarray._from_host(np.asarray(result))
    if type(result) in (list, tuple):
        return type(result)(wrap(r, seen, scalars) for r in result)
    return result


def call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func`` (a NumPy callable) on the host buffers of device arrays, results wrapped.

    Like CuPy, it emits no floating-point warnings.
    """
    state.count()
    seen: dict[int, ndarray] = {}
    args, kwargs = unwrap(args, seen), unwrap(kwargs, seen)
    with np.errstate(all="ignore"):
        return wrap(func(*args, **kwargs), seen)


class _Flags:
    """``ndarray.flags``: ``c_contiguous``, ``f_contiguous``, ``owndata``."""

    def __init__(self, host: np.ndarray):
        self.c_contiguous = bool(host.flags.c_contiguous)
        self.f_contiguous = bool(host.flags.f_contiguous)
        self.owndata = bool(host.flags.owndata)

    def __getitem__(self, name: str) -> bool:
        return getattr(self, name.lower())

    def __repr__(self) -> str:
        return "\n".join(f"  {k.upper()} : {v}" for k, v in vars(self).items())


class ndarray:
    """Test stand-in for ``cupy.ndarray`` (see the module docstring); not CuPy."""

    __slots__ = ("_device_id", "_host")
    __array_priority__ = 100.0

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None,
                 order: str = "C"):  # fmt: skip
        if memptr is not None or strides is not None:
            raise NotImplementedError("cupy stand-in: ndarray(memptr=, strides=)")
        dtype = np.dtype(dtype)
        state.reserve(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        state.count()
        host = np.empty(shape, dtype, order=order)
        self._device_id = state.allocate(host)
        self._host = host

    @classmethod
    def _from_host(cls, host: np.ndarray) -> ndarray:
        """Wrap a NumPy array as device data (accounted unless its buffer already is)."""
        self = object.__new__(cls)
        self._device_id = state.allocate(host)
        self._host = host
        return self

    # -- no implicit host conversion, no pickling
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(
            f"cupy stand-in: NumPy function numpy.{func.__name__} called on a device array; "
            f"use cupy.{func.__name__}, or copy the array to the host with .get() first"
        )

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """NumPy ufuncs on device arrays and scalars run on the device, as CuPy's do."""
        for x in (*inputs, *kwargs.get("out", ())):
            if not (isinstance(x, ndarray) or is_scalar(x)):
                if isinstance(x, np.ndarray):
                    raise unsupported(x)
                return NotImplemented
        return call(getattr(ufunc, method), *inputs, **kwargs)

    def __reduce__(self) -> Any:
        raise TypeError(_PICKLE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_PICKLE)

    def __getstate__(self) -> Any:
        raise TypeError(_PICKLE)

    def __copy__(self) -> ndarray:
        return call(np.copy, self)

    def __deepcopy__(self, memo: Any) -> ndarray:
        return call(np.copy, self)

    # -- host syncs
    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True):
        """A NumPy copy (into ``out`` if given): a host sync."""
        state.count(sync=self.nbytes)
        if out is None:
            return np.array(self._host, order=order, copy=True)
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        np.copyto(out, self._host)
        return out

    def set(self, arr: Any, stream: Any = None) -> None:
        """Copy the NumPy array ``arr`` in (same shape and dtype): an upload."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray: {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{self.dtype} array cannot be set to {arr.dtype} array")
        state.count(upload=arr.nbytes)
        np.copyto(self._host, arr)

    def item(self) -> Any:
        state.count(sync=self.itemsize)
        return self._host.item()

    def tolist(self) -> Any:
        state.count(sync=self.nbytes)
        return self._host.tolist()

    def tobytes(self, order: str = "C") -> bytes:
        state.count(sync=self.nbytes)
        return self._host.tobytes(order)

    def __bool__(self) -> bool:
        state.count(sync=self.nbytes)
        return bool(self._host)

    def __int__(self) -> int:
        state.count(sync=self.nbytes)
        return int(self._host)

    def __float__(self) -> float:
        state.count(sync=self.nbytes)
        return float(self._host)

    def __complex__(self) -> complex:
        state.count(sync=self.nbytes)
        return complex(self._host)

    def __repr__(self) -> str:
        state.count(sync=self.nbytes)
        return repr(self._host)

    def __str__(self) -> str:
        state.count(sync=self.nbytes)
        return str(self._host)

    def __format__(self, spec: str) -> str:
        state.count(sync=self.nbytes)
        return format(self._host, spec)

    # -- attributes (no device work)
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    nbytes = property(lambda self: self._host.nbytes)
    itemsize = property(lambda self: self._host.itemsize)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: _Flags(self._host))
    device = property(lambda self: Device(self._device_id))
    T = property(lambda self: call(getattr, self, "T"))
    mT = property(lambda self: call(getattr, self, "mT"))
    real = property(lambda self: call(np.real, self))
    imag = property(lambda self: call(np.imag, self))

    def __len__(self) -> int:
        return len(self._host)

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    # -- indexing (device arrays, ints, slices, lists; not NumPy arrays)
    def __getitem__(self, key: Any) -> ndarray:
        return call(operator.getitem, self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        call(operator.setitem, self, key, value)

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> ndarray:  # fmt: skip
        kwargs = {} if casting is None else {"casting": casting}
        return call(np.ndarray.astype, self, dtype, order=order, copy=copy, **kwargs)


def _operand(other: Any) -> bool:
    """Whether ``other`` may meet a device array in an operator (NumPy arrays raise)."""
    if isinstance(other, ndarray) or is_scalar(other):
        return True
    if isinstance(other, np.ndarray):
        raise unsupported(other)
    return False


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False) -> Any:
    def op(self: ndarray, other: Any) -> Any:
        if not _operand(other):
            return NotImplemented
        if inplace:
            return call(ufunc, self, other, out=self)
        return call(ufunc, other, self) if reflected else call(ufunc, self, other)

    return op


def _method(impl: Any) -> Any:
    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        return call(impl, self, *args, **kwargs)

    method.__doc__ = f"Stand-in: ``{getattr(impl, '__qualname__', impl)}`` on the device."
    return method


#: Python operators -> the NumPy ufunc they apply (``__op__``, ``__rop__``, ``__iop__``).
_OPERATORS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "matmul": np.matmul,
    "truediv": np.true_divide, "floordiv": np.floor_divide, "mod": np.remainder,
    "pow": np.power, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
    "lshift": np.left_shift, "rshift": np.right_shift, "divmod": np.divmod,
}  # fmt: skip
_NO_INPLACE = {"matmul", "divmod"}  # real CuPy has no __imatmul__, Python has no __idivmod__
_COMPARISONS = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal,
}  # fmt: skip
_UNARY = {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}
#: ndarray methods -> their NumPy implementation, run on the host buffer.
_METHODS = {
    name: getattr(np.ndarray, name)
    for name in (
        "all", "any", "argmax", "argmin", "argsort", "clip", "conj", "conjugate", "copy",
        "cumprod", "cumsum", "diagonal", "dot", "fill", "flatten", "max", "mean", "min",
        "nonzero", "prod", "ravel", "repeat", "reshape", "round", "sort", "squeeze", "std",
        "sum", "swapaxes", "take", "trace", "transpose", "var", "view",
    )
} | {"ptp": np.ptp}  # fmt: skip

for _name, _ufunc in _OPERATORS.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    if _name not in _NO_INPLACE:
        setattr(ndarray, f"__i{_name}__", _binary(_ufunc, inplace=True))
for _name, _ufunc in _COMPARISONS.items():
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in _UNARY.items():
    setattr(ndarray, f"__{_name}__", _method(_ufunc))
for _name, _impl in _METHODS.items():
    setattr(ndarray, _name, _method(_impl))
ndarray.__hash__ = None  # type: ignore[assignment]
del _name, _ufunc, _impl


class ufunc:
    """Test stand-in for ``cupy.ufunc``: a NumPy ufunc on device arrays and scalars."""

    def __init__(self, name: str, impl: Any, kwargs: frozenset[str] | None = None):
        self.__name__ = self.name = name
        self._impl = impl
        self._kwargs = kwargs if kwargs is not None else frozenset({"out", "dtype", "casting"})
        self.nin = getattr(impl, "nin", 1)
        self.nout = getattr(impl, "nout", 1)
        self.nargs = self.nin + self.nout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not set(kwargs) <= self._kwargs:
            raise TypeError(f"Wrong arguments {sorted(kwargs)}")
        for a in args:
            if not (isinstance(a, ndarray) or is_scalar(a)):
                raise unsupported(a)
        return call(self._impl, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<ufunc '{self.name}'>"

    def _method(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return call(getattr(self._impl, method), *args, **kwargs)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return self._method("reduce", *args, **kwargs)

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        return self._method("accumulate", *args, **kwargs)

    def reduceat(self, *args: Any, **kwargs: Any) -> Any:
        return self._method("reduceat", *args, **kwargs)

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return self._method("outer", *args, **kwargs)

    def at(self, *args: Any, **kwargs: Any) -> Any:
        return self._method("at", *args, **kwargs)


ndarray.__module__ = ufunc.__module__ = "cupy"
