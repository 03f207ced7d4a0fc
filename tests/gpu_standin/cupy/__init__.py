"""A strict stand-in for CuPy 14.2, for the test suite (no GPU, not CuPy).

Importable as ``cupy`` when ``tests/gpu_standin`` comes first on ``sys.path`` (or on
``PYTHONPATH`` for worker processes); ``tests/standin.py`` does that. Arrays are NumPy
arrays that refuse to meet NumPy (see :mod:`cupy._core`); the devices, their memory and the
accounting are emulated (:mod:`cupy._device`, :mod:`cupy._standin`).

Only names that real CuPy 14.2 exports exist (:mod:`cupy._api`): a name CuPy does not have
raises ``AttributeError`` as CuPy would, and a CuPy name the stand-in does not emulate
raises ``AttributeError`` saying so. Functions bind their arguments to CuPy's own
signatures, so a keyword CuPy lacks (``workers=``, ``overwrite_x=`` ...) raises
``TypeError``.
"""

import sys as _sys

import numpy as _np

from cupy import _api, _core, _device, _standin  # noqa: F401
from cupy._core import ndarray, ufunc

# ------------------------------------------------------------------------------ types, constants
#: Scalar types, dtypes and constants: NumPy's own, as in CuPy.
_FROM_NUMPY = """
bool bool_ byte cdouble complex128 complex64 complexfloating csingle double dtype e
euler_gamma finfo float16 float32 float64 floating generic half iinfo inexact inf int16
int32 int64 int8 int_ intc integer intp long longlong nan number pi short signedinteger
single ubyte uint uint16 uint32 uint64 uint8 uintc uintp ulong ulonglong unsignedinteger
ushort
""".split()
globals().update({name: getattr(_np, name) for name in _FROM_NUMPY})
float_, complex_, cfloat, singlecomplex = _np.float64, _np.complex128, _np.complex128, _np.complex64
newaxis = None
Inf = Infinity = PINF = infty = float("inf")
NINF = float("-inf")
NAN = NaN = float("nan")
PZERO, NZERO = 0.0, -0.0
AxisError = _np.exceptions.AxisError
ComplexWarning = _np.exceptions.ComplexWarning
ModuleDeprecationWarning = _np.exceptions.ModuleDeprecationWarning
RankWarning = _np.exceptions.RankWarning
TooHardError = _np.exceptions.TooHardError
VisibleDeprecationWarning = _np.exceptions.VisibleDeprecationWarning

# ------------------------------------------------------------------------------ function tables
#: Functions on device arrays (NumPy arrays refused); NumPy's function of the same name.
_DEVICE = """
all allclose amax amin angle any append argmax argmin argpartition argsort argwhere around
array_equal array_split ascontiguousarray asfortranarray astype atleast_1d atleast_2d
atleast_3d average bincount broadcast_arrays broadcast_to choose clip column_stack compress
concat concatenate convolve copy copyto corrcoef correlate count_nonzero cov cross cumprod
cumsum cumulative_prod cumulative_sum delete diag diagflat diagonal diff digitize dot dsplit
dstack einsum empty_like expand_dims extract fill_diagonal flatnonzero flip fliplr flipud
full_like histogram hsplit hstack imag inner interp isclose iscomplex isin isneginf isposinf
isreal kron matrix_transpose max mean median meshgrid min moveaxis nan_to_num nanargmax
nanargmin nancumprod nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd nansum nanvar
nonzero ones_like outer pad partition percentile permute_dims prod ptp put put_along_axis
putmask quantile ravel ravel_multi_index real repeat reshape resize roll rollaxis rot90
round row_stack searchsorted select sort sort_complex split squeeze stack std sum swapaxes
take take_along_axis tensordot tile trace transpose trapezoid tril triu unique unravel_index
vdot vsplit vstack where zeros_like
arange diag_indices empty eye full identity indices linspace logspace ones tri tril_indices
triu_indices zeros
""".split()
#: Functions that answer from metadata (shapes, dtypes): host values, NumPy arrays accepted.
_QUERY = """
broadcast_shapes can_cast common_type isdtype iscomplexobj isfortran isrealobj isscalar
issubdtype iterable may_share_memory min_scalar_type ndim promote_types result_type shape
shares_memory size
""".split()
#: CuPy names whose NumPy counterpart has another name.
_ALIASES = {
    "alltrue": "all", "sometrue": "any", "product": "prod", "cumproduct": "cumprod",
    "round_": "round", "trapz": "trapezoid",
}  # fmt: skip
#: Arg-reductions: CuPy's have a ``dtype`` parameter where NumPy's have ``out``.
_ARG_REDUCTIONS = {"argmax", "argmin", "nanargmax", "nanargmin"}
#: Creation functions whose size is checked against the device memory before allocating.
_PREALLOCATE = {"empty", "zeros", "ones", "full"}


def _function(name, impl, query=False):
    """``cupy.<name>``: ``impl`` (NumPy) with CuPy's signature, on device arrays."""
    sig = _api.signature("cupy", name)

    def function(*args, **kwargs):
        if sig is not None:  # CuPy's parameters; passed on positionally where CuPy has them
            bound = sig.bind(*args, **kwargs)
            args, kwargs = bound.args, bound.kwargs
            if name in _PREALLOCATE:
                _reserve(**bound.arguments)
        if query:
            return impl(*_core.unwrap(args, {}, False), **_core.unwrap(kwargs, {}, False))
        return _core.call(impl, *args, **kwargs)

    function.__name__ = function.__qualname__ = name
    function.__module__ = "cupy"
    function.__doc__ = f"Test stand-in for ``cupy.{name}``: NumPy's ``{impl.__name__}``."
    if sig is not None:
        function.__signature__ = sig
    return function


def _reserve(shape, dtype=None, fill_value=0.0, **_):
    """Check that an array of ``shape`` fits the device before allocating it."""
    if dtype is None:
        dtype = getattr(fill_value, "dtype", None)
        dtype = _np.result_type(fill_value) if dtype is None else dtype
    size = int(_np.prod(shape, dtype=_np.int64))
    _device.state.reserve(size * _np.dtype(dtype).itemsize)


def _arg_reduction(impl):
    def run(a, axis=None, dtype=None, out=None, keepdims=False):
        index = impl(a, axis, out, keepdims=keepdims)
        return index if dtype is None else index.astype(dtype)

    run.__name__ = impl.__name__
    return run


def _define():
    names = _api.members("cupy")
    for name in [*_DEVICE, *_QUERY, *_ALIASES]:
        if name not in names:
            raise ImportError(f"cupy stand-in: real CuPy 14.2 has no cupy.{name}")
        impl = getattr(_np, _ALIASES.get(name, name))
        if name in _ARG_REDUCTIONS:
            impl = _arg_reduction(impl)
        globals()[name] = _function(name, impl, name in _QUERY)
    for name, entry in names.items():
        if entry["kind"] in ("ufunc", "_GUFunc") and hasattr(_np, name):
            sig = _api.signature("cupy", name)
            allowed = None if sig is None else frozenset(list(sig.parameters)[1:])
            globals()[name] = ufunc(name, getattr(_np, name), allowed)


_define()


# ------------------------------------------------------------------------------ host <-> device
def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    """Upload ``obj`` (or copy a device array, or return it when ``copy=False`` allows)."""
    if isinstance(obj, ndarray):
        return _core.call(_np.array, obj, dtype=dtype, copy=copy, order=order, ndmin=ndmin)
    return _upload(_np.array(_host_data(obj), dtype=dtype, order=order, ndmin=ndmin))


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """Upload ``a``; a device array is returned itself (or converted on the device)."""
    if isinstance(a, ndarray):
        return _core.call(_np.asarray, a, dtype=dtype, order=order, copy=copy)
    return _upload(_np.array(_host_data(a), dtype=dtype, order=order or "K"))


def asanyarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """As :func:`asarray`."""
    return asarray(a, dtype, order, copy=copy, blocking=blocking)


def _host_data(obj):
    """Host data to upload: nested sequences may hold device arrays, which are read back."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_data(o) for o in obj)
    return obj.get() if isinstance(obj, ndarray) else obj


def _upload(host):
    device_array = ndarray._from_host(host)  # raises OutOfMemoryError if it does not fit
    _device.state.count(upload=host.nbytes)
    return device_array


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """A NumPy copy of ``a`` (a host sync for a device array)."""
    if isinstance(a, ndarray):
        return a.get(stream, order, out, blocking)
    result = _np.asarray(a, order=order)
    if out is None:
        return result
    out[...] = result
    return out


def get_array_module(*args):
    """``cupy`` (this stand-in) if any argument is a device array, else ``numpy``."""
    return _sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def get_default_memory_pool():
    return _device.MEMORY_POOL


def get_default_pinned_memory_pool():
    return _device.PINNED_MEMORY_POOL


def is_available():
    """Whether a device is visible (never raises)."""
    try:
        return cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


from cupy import cuda, fft  # noqa: E402, F401


def __getattr__(name):
    if name in _api.members("cupy"):
        raise AttributeError(
            f"cupy stand-in: cupy.{name} exists in CuPy 14.2 but is not emulated "
            "(add it to tests/gpu_standin/cupy)"
        )
    raise AttributeError(f"module 'cupy' has no attribute '{name}'")
