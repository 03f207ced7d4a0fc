"""Independent brute-force references for the kernel tests (written from the spec, not the kernels).

Everything here is a direct sum over the in-plane angle, with explicit index shifts, in
complex128/float64 - no FFTs.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from scipy.special import logsumexp as scipy_logsumexp


def direct_correlation(templates, images, ctf, kernel, weights):
    """Spec §10.1 by direct sums. Returns ``(X [M,S,D,W], Ixx [M,S,W], Iyy [M])``.

    ``X[m,s,d,w] = Σ_n Σ_v ω[n,v] C[m,n,v] conj(I[m,n,v]) T[s,n,v+w] K[d,n,v+w]``,
    ``Ixx[m,s,w] = Σ_n Σ_v ω[n,v] C[m,n,v]² |T[s,n,v+w]|²``, ``Iyy[m] = Σ ω |I[m]|²``.
    """
    t = np.asarray(templates, np.complex128)
    y = np.asarray(images, np.complex128)
    c = np.broadcast_to(np.asarray(ctf, np.float64), y.shape)
    k = np.asarray(kernel, np.complex128)
    w_ = np.asarray(weights, np.float64)
    n_m, _, n_w = y.shape
    n_s, n_d = t.shape[0], k.shape[0]
    a = w_[None] * c * np.conj(y)  # [M, N, W]
    b = t[:, None] * k[None]  # [S, D, N, W]
    power = np.abs(t) ** 2
    x = np.empty((n_m, n_s, n_d, n_w))
    ixx = np.empty((n_m, n_s, n_w))
    imag = 0.0
    for w in range(n_w):
        shifted = np.roll(b, -w, axis=-1)  # shifted[..., v] = b[..., v + w]
        xc = np.einsum("mnv,sdnv->msd", a, shifted)
        imag = max(imag, float(np.abs(xc.imag).max()))
        x[..., w] = xc.real
        ixx[..., w] = np.einsum("mnv,snv->ms", w_[None] * c**2, np.roll(power, -w, axis=-1))
    iyy = np.sum(w_[None] * np.abs(y) ** 2, axis=(1, 2))
    scale = float(np.abs(x).max())
    assert imag <= 1e-9 * scale, "inputs are not Hermitian: the correlation is not real"
    return x, ixx, iyy


def normalized(x, ixx, iyy):
    """``cc = X / sqrt(Ixx · Iyy)`` broadcast to ``[M, S, D, W]``."""
    return x / np.sqrt(ixx[:, :, None, :] * iyy[:, None, None, None])


def bioem_per_pose(x, ixx, iyy, isx, isy, iss, n_pixels):
    """Spec §11 per-pose log-likelihood, ``[M,S,D,W]``, with ``lnΓ`` from SciPy."""
    a = ixx[:, :, None, :] * iss - np.abs(isx[:, :, None, None]) ** 2
    b = x * iss - np.real(np.conj(isx[:, :, None, None]) * isy[:, None, None, None])
    c = np.abs(isy[:, None, None, None]) ** 2 - iyy[:, None, None, None] * iss
    d = -(b**2 / a + c)
    p = n_pixels / 2.0 - 2.0
    const = (
        (3.0 - n_pixels) / 2.0 * np.log(2 * np.pi)
        - np.log(2.0)
        - 0.5 * np.log(iss)
        + gammaln(n_pixels / 2.0 - 2.0)
        + p * np.log(2 * iss)
    )
    return -p * np.log(d) - 0.5 * np.log(a) + const


def per_pair_integrated(ll_msdw):
    """``logsumexp`` over (d, w)."""
    return scipy_logsumexp(ll_msdw, axis=(2, 3))


def first_argmax_dw(cc):
    """Best value and first flat ``d·W + w`` per (m, s), by a plain Python scan."""
    n_m, n_s, _n_d, _n_w = cc.shape
    best = np.empty((n_m, n_s))
    arg = np.empty((n_m, n_s), np.int64)
    for m in range(n_m):
        for s in range(n_s):
            flat = cc[m, s].ravel()
            i = 0
            for j in range(1, flat.size):
                if flat[j] > flat[i]:
                    i = j
            best[m, s], arg[m, s] = flat[i], i
    return best, arg
