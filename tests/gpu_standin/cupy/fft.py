"""``cupy.fft`` of the CuPy test stand-in: ``numpy.fft`` on device arrays, CuPy's signatures.

Like CuPy's, these functions take no ``workers`` or ``overwrite_x``, and refuse NumPy arrays.
"""

import numpy as _np

from cupy import _core


def _run(name, a, *args):
    if not isinstance(a, _core.ndarray):
        raise TypeError(f"The input array a must be a cupy.ndarray, not {type(a)}")
    return _core.call(getattr(_np.fft, name), a, *args)


def fft(a, n=None, axis=-1, norm=None):
    return _run("fft", a, n, axis, norm)


def ifft(a, n=None, axis=-1, norm=None):
    return _run("ifft", a, n, axis, norm)


def rfft(a, n=None, axis=-1, norm=None):
    return _run("rfft", a, n, axis, norm)


def irfft(a, n=None, axis=-1, norm=None):
    return _run("irfft", a, n, axis, norm)


def hfft(a, n=None, axis=-1, norm=None):
    return _run("hfft", a, n, axis, norm)


def ihfft(a, n=None, axis=-1, norm=None):
    return _run("ihfft", a, n, axis, norm)


def fft2(a, s=None, axes=(-2, -1), norm=None):
    return _run("fft2", a, s, axes, norm)


def ifft2(a, s=None, axes=(-2, -1), norm=None):
    return _run("ifft2", a, s, axes, norm)


def rfft2(a, s=None, axes=(-2, -1), norm=None):
    return _run("rfft2", a, s, axes, norm)


def irfft2(a, s=None, axes=(-2, -1), norm=None):
    return _run("irfft2", a, s, axes, norm)


def fftn(a, s=None, axes=None, norm=None):
    return _run("fftn", a, s, axes, norm)


def ifftn(a, s=None, axes=None, norm=None):
    return _run("ifftn", a, s, axes, norm)


def rfftn(a, s=None, axes=None, norm=None):
    return _run("rfftn", a, s, axes, norm)


def irfftn(a, s=None, axes=None, norm=None):
    return _run("irfftn", a, s, axes, norm)


def fftshift(x, axes=None):
    return _run("fftshift", x, axes)


def ifftshift(x, axes=None):
    return _run("ifftshift", x, axes)


def fftfreq(n, d=1.0):
    return _core.call(_np.fft.fftfreq, n, d)


def rfftfreq(n, d=1.0):
    return _core.call(_np.fft.rfftfreq, n, d)


def __getattr__(name):
    from cupy import _api

    if name in _api.members("cupy.fft"):
        raise AttributeError(f"cupy stand-in: cupy.fft.{name} (CuPy 14.2) is not emulated")
    raise AttributeError(f"module 'cupy.fft' has no attribute '{name}'")
