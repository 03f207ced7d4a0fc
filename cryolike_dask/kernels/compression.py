"""Bounded-error compression of the template spectra (``prepare_templates(tolerance=...)``).

The exact kernel forms, for every angular order ``q = 0 … Q−1`` (``Q = ⌊W/2⌋ + 1``), the
product ``P_q = A_q X_q`` of the images' spectrum ``A_q [m, N]`` and the templates' spectrum
``X_q [N, J]`` (``J = S·D``, column ``j = s·D + d``), then
``X[m, j, w] = irfft_q(P[m, j, q])`` with the ``"forward"`` scaling (no factor on the
inverse: both spectra already carry the orthonormal ``W^{-1/2}``):

``X[m, j, w] = Σ_q c_q Re(P_q[m, j] e^{2πiqw/W})``, ``c_q = 1`` for ``q = 0`` and, when ``W``
is even, ``q = W/2``; ``c_q = 2`` otherwise.

Compression. The ``J`` columns of ``X_q`` live in ``C^N`` with ``N ≪ J`` and, for smooth
templates and displacements, span few directions. With ``U_q [N, r_q]`` the leading
eigenvectors of the Gram matrix ``X_q X_qᴴ`` (float64) and ``C_q = U_qᴴ X_q [r_q, J]``,
``P_q ≈ (A_q U_q) C_q``: two GEMMs of ``m·N·r_q + m·r_q·J`` instead of ``m·N·J`` products,
and the prepared block holds ``C_q`` instead of ``X_q``. Orders are grouped in bands of
consecutive orders that share one rank (the band's bases are padded with each order's next
eigenvectors, which only lowers the error), so the GEMMs stay batched.

Error bound. With ``R_q = X_q − U_q C_q`` (orthogonal to the range of ``U_q``):

* ``|ΔP_q[m, j]| = |A_q[m, :] · R_q[:, j]| ≤ ‖A_q[m, :]‖ ‖R_q[:, j]‖`` and
  ``‖R_q[:, j]‖² = ‖X_q[:, j]‖² − ‖C_q[:, j]‖²`` (Pythagoras);
* ``|ΔX[m, j, w]| ≤ Σ_q c_q |ΔP_q[m, j]|`` (``|Re(z e^{iφ})| ≤ |z|``);
* Cauchy–Schwarz with weights ``c_q``: ``|ΔX[m, j, w]| ≤ a_m ρ_j`` with
  ``a_m² = Σ_q c_q ‖A_q[m, :]‖²`` and ``ρ_j² = Σ_q c_q ‖R_q[:, j]‖²``;
* so ``|Δcc[m, s, d, w]| ≤ a_m ρ_{s·D+d} / sqrt(Ixx[m, s, w] · Iyy[m])``.

The bound holds in exact arithmetic for every pose; both the exact and the compressed kernel
add their own rounding (relative ``eps`` of the working precision) on top of it.

Ranks. With ``‖X_j‖² = Σ_q c_q ‖X_q[:, j]‖²`` the ranks are chosen so that
``ρ_j ≤ β · tolerance · ‖X_j‖`` for every column, with ``β`` = :data:`SAFETY_FACTOR`: since
``a_m ‖X_j‖ / sqrt(Iyy[m] · Ixx[m, s, w])`` is a factor of order one (the CTF's: the templates'
low frequencies, where the CTF is small, weigh more in ``‖X_j‖`` than in ``Ixx``; about 2 on
real maps with defocus 0.8-2 µm), ``β = 1/4`` makes the bound at correlate time meet the
tolerance for almost every pair, at little cost: the ranks grow slowly as the tolerance
falls (on emd_1832, ``β = 1/2`` instead keeps 3 % less work and falls back on a few % of the
pairs). The budget ``(β · tolerance)²`` is shared over bands greedily: starting from full rank,
the rank whose removal adds the least (worst-column) relative residual per unit of GEMM work
is removed first, while the sum of the worst-column residuals of all orders (an upper bound
of every column's ``ρ_j² / ‖X_j‖²``) stays within the budget.

At correlate time the bound is evaluated per (image, template) (max over ``d`` and ``w``);
where it exceeds the tolerance, that pair is recomputed exactly from the raw templates and
translation kernel kept in :class:`CompressedSpectrum` (``D`` times smaller than the exact
spectrum), so every reported cross-correlation is within the tolerance of the exact one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryolike_dask.kernels.backend import array_module, eigh, matmul, to_host

#: ``β``: the ranks aim at ``ρ_j ≤ β · tolerance · ‖X_j‖`` (see the module docstring).
SAFETY_FACTOR = 0.25

#: Consecutive orders that share one rank (one batched GEMM pair per band).
BAND_ORDERS = 8


def order_weights(n_orders: int, n_inplanes: int) -> np.ndarray:
    """``c_q``: the weight of order ``q`` in the inverse real FFT (1 at ``q = 0`` and, for
    even ``W``, at ``q = W/2``; 2 elsewhere), float64 ``[Q]``."""
    c = np.full(n_orders, 2.0)
    c[0] = 1.0
    if n_inplanes % 2 == 0 and n_orders > 1:
        c[-1] = 1.0
    return c


@dataclass(frozen=True)
class CompressedSpectrum:
    """The compressed template spectrum of a :class:`PreparedTemplates` block.

    Attributes
    ----------
    bands : tuple of ``(q0, q1)``
        Consecutive order ranges; each has one rank ``r_b``.
    bases : tuple of complex ``[q1 − q0, N, r_b]`` or None
        ``U_q`` (orthonormal columns) of each band's orders; ``None`` for a band kept
        exact (where two GEMMs would cost more than one).
    coefficients : tuple of complex ``[q1 − q0, r_b, S·D]``
        ``C_q = U_qᴴ X_q``; column ``s·D + d`` (``X_q`` itself in an exact band).
    residual : float64 ``[S, D]``
        ``ρ_{s,d} = sqrt(Σ_q c_q ‖X_q[:, j] − U_q C_q[:, j]‖²)``.
    tolerance : float
        Allowed error of the normalised cross-correlation.
    safety : float
        ``β`` used for the ranks.
    templates : complex ``[S, N, W]``
        The templates (working precision), to rebuild exact spectra for the fallback.
    translation : complex ``[D, N, W]``
        The translation kernel, likewise.
    grid : PolarGrid
    precision : str
    """

    bands: tuple[tuple[int, int], ...]
    bases: tuple[Any, ...]
    coefficients: tuple[Any, ...]
    residual: Any
    tolerance: float
    safety: float
    templates: Any
    translation: Any
    grid: Any
    precision: str

    @property
    def ranks(self) -> np.ndarray:
        """Rank of each order ``[Q]`` (int)."""
        out = [
            np.full(q1 - q0, int(c.shape[1]))
            for (q0, q1), c in zip(self.bands, self.coefficients, strict=True)
        ]
        return np.concatenate(out)

    @property
    def n_orders(self) -> int:
        return self.bands[-1][1]

    def work_fraction(self) -> float:
        """Products of the two GEMMs per image over the exact kernel's ``Q·N·S·D``."""
        n_n = int(self.templates.shape[1])
        n_j = int(self.coefficients[0].shape[-1])
        kept = 0
        for (q0, q1), b, c in zip(self.bands, self.bases, self.coefficients, strict=True):
            r = int(c.shape[1])
            kept += (q1 - q0) * (n_n * n_j if b is None else r * (n_n + n_j))
        return kept / float(self.n_orders * n_n * n_j)

    @property
    def nbytes(self) -> int:
        return int(
            sum(b.nbytes for b in self.bases if b is not None)
            + sum(c.nbytes for c in self.coefficients)
            + self.residual.nbytes
            + self.templates.nbytes
            + self.translation.nbytes
        )

    def take(self, index: Any) -> CompressedSpectrum:
        """The templates ``index`` (shared bases, a copy of their coefficients)."""
        n_s, n_d = self.residual.shape
        n_t = int(index.shape[0]) if hasattr(index, "shape") else len(index)
        coeffs = tuple(
            c.reshape(c.shape[0], c.shape[1], n_s, n_d)[:, :, index].reshape(
                c.shape[0], c.shape[1], n_t * n_d
            )
            for c in self.coefficients
        )
        return CompressedSpectrum(
            self.bands,
            self.bases,
            coeffs,
            self.residual[index],
            self.tolerance,
            self.safety,
            self.templates[index],
            self.translation,
            self.grid,
            self.precision,
        )


@dataclass(frozen=True)
class CompressionStats:
    """What the compressed kernel did for one block (``BlockResult.compression``).

    Attributes
    ----------
    tolerance : float
    work_fraction : float
        GEMM products kept, relative to the exact kernel.
    max_bound : float
        Largest bound on ``|Δcc|`` over the pairs kept compressed (0 when none).
    max_bound_before_fallback : float
        Largest bound over all pairs, before the exact fallback.
    fallback_pairs, pairs : int
        (Image, template) pairs recomputed exactly, and all pairs.
    bound : real ``[M, S]``
        Per pair, the bound on ``|Δcc|`` over ``(d, w)`` (0 where recomputed exactly).
    """

    tolerance: float
    work_fraction: float
    max_bound: float
    max_bound_before_fallback: float
    fallback_pairs: int
    pairs: int
    bound: Any


def compress_spectrum(
    spectrum: Any,
    n_inplanes: int,
    tolerance: float,
    *,
    safety: float = SAFETY_FACTOR,
    band: int = BAND_ORDERS,
    workers: int | None = None,
) -> tuple[tuple[tuple[int, int], ...], tuple[Any, ...], tuple[Any, ...], Any]:
    """``(bands, bases, coefficients, residual [J])`` of the exact spectrum ``[Q, N, J]``.

    See the module docstring for the rank choice and the bound.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    xp = array_module(spectrum)
    n_q, n_n, n_j = spectrum.shape
    cdt = spectrum.dtype
    c = order_weights(n_q, n_inplanes)

    col2_q = []  # ‖X_q[:, j]‖² (float64)
    for q in range(n_q):
        x64 = spectrum[q].astype(np.complex128)
        col2_q.append(xp.sum(x64.real**2 + x64.imag**2, axis=0))
    col2 = sum(float(c[q]) * col2_q[q] for q in range(n_q))
    with np.errstate(divide="ignore"):
        inv_col2 = xp.where(col2 > 0, 1.0 / xp.where(col2 > 0, col2, 1.0), 0.0)

    # pass 1: eigenbases and the worst-column relative residual of every rank
    vectors = []
    err = np.zeros((n_q, n_n + 1))  # err[q, r]: c_q max_j ‖R_q(r)[:, j]‖² / ‖X_j‖²
    for q in range(n_q):
        x64 = spectrum[q].astype(np.complex128)
        gram = matmul(xp, x64, xp.ascontiguousarray(xp.conj(x64.T)), workers=workers)
        u = xp.ascontiguousarray(eigh(xp, gram)[1][:, ::-1])  # descending eigenvalues
        vectors.append(u)
        p = matmul(xp, xp.ascontiguousarray(xp.conj(u.T)).astype(cdt), spectrum[q], workers=workers)
        p2 = (p.real**2 + p.imag**2).astype(np.float64)
        del p
        tail = xp.cumsum(p2[::-1], axis=0)[::-1]  # tail[r] = Σ_{k ≥ r} |u_kᴴ x_j|²
        worst = xp.max(tail * inv_col2[None, :], axis=1)
        err[q, :n_n] = c[q] * to_host(worst)

    # greedy ranks per band: remove the cheapest residual per unit of work first
    bands = tuple((q0, min(n_q, q0 + band)) for q0 in range(0, n_q, band))
    band_err = np.stack([err[q0:q1].sum(axis=0) for q0, q1 in bands])  # [B, N + 1]
    ranks = [n_n] * len(bands)
    budget = (safety * tolerance) ** 2
    heap = [((band_err[b, n_n - 1] - band_err[b, n_n]) / (q1 - q0), b)
            for b, (q0, q1) in enumerate(bands)]  # fmt: skip
    heapq.heapify(heap)
    total = 0.0
    while heap:
        _, b = heapq.heappop(heap)
        r = ranks[b]
        delta = band_err[b, r - 1] - band_err[b, r]
        if total + delta > budget:
            break
        total += delta
        ranks[b] = r - 1
        if r - 1 > 0:
            q0, q1 = bands[b]
            heapq.heappush(heap, ((band_err[b, r - 2] - band_err[b, r - 1]) / (q1 - q0), b))

    # pass 2: coefficients in float64 and the exact residual norms
    bases, coefficients = [], []
    rho2 = xp.zeros(n_j, dtype=np.float64)
    for (q0, q1), r in zip(bands, ranks, strict=True):
        if r * (n_n + n_j) >= n_n * n_j:  # two GEMMs cost more than the exact one
            bases.append(None)
            coefficients.append(xp.ascontiguousarray(spectrum[q0:q1]))
            continue
        u_b = xp.empty((q1 - q0, n_n, r), dtype=cdt)
        c_b = xp.empty((q1 - q0, r, n_j), dtype=cdt)
        for i, q in enumerate(range(q0, q1)):
            u = vectors[q][:, :r]
            c64 = matmul(
                xp,
                xp.ascontiguousarray(xp.conj(u.T)),
                spectrum[q].astype(np.complex128),
                workers=workers,
            )
            kept = xp.sum(c64.real**2 + c64.imag**2, axis=0)
            rho2 += float(c[q]) * xp.maximum(col2_q[q] - kept, 0.0)
            u_b[i] = u.astype(cdt)
            c_b[i] = c64.astype(cdt)
        bases.append(u_b)
        coefficients.append(c_b)
    return bands, tuple(bases), tuple(coefficients), xp.sqrt(rho2)


def compressed_products(
    compressed: CompressedSpectrum, image_side: list[Any], s0: int, s1: int, out: Any,
    workers: int | None = None,
) -> Any:  # fmt: skip
    """``P_q ≈ (A_q U_q) C_q`` ``[Q, m, (s1 − s0)·D]`` into ``out``; ``image_side`` from
    :func:`image_side`."""
    xp = array_module(out)
    n_d = compressed.residual.shape[1]
    n_s = compressed.residual.shape[0]
    for (q0, q1), au, c_b in zip(
        compressed.bands, image_side, compressed.coefficients, strict=True
    ):
        r = c_b.shape[1]
        view = out[q0:q1]
        if r == 0:
            view[...] = 0
            continue
        cols = c_b.reshape(q1 - q0, r, n_s, n_d)[:, :, s0:s1, :].reshape(q1 - q0, r, -1)
        res = matmul(xp, au, cols, out=view, workers=workers)
        if res is not view:
            view[...] = res
    return out


def image_side(
    compressed: CompressedSpectrum, spectrum: Any, workers: int | None = None
) -> list[Any]:
    """``A_q U_q`` per band ``[q1 − q0, m, r_b]`` for the images' spectrum ``[Q, m, N]``."""
    xp = array_module(spectrum)
    return [
        spectrum[q0:q1]
        if u_b is None
        else (matmul(xp, spectrum[q0:q1], u_b, workers=workers) if u_b.shape[-1] else None)
        for (q0, q1), u_b in zip(compressed.bands, compressed.bases, strict=True)
    ]


def image_norms(spectrum: Any, n_inplanes: int) -> Any:
    """``a_m = sqrt(Σ_q c_q ‖A_q[m, :]‖²)`` (float64 ``[M]``) of the images' spectrum."""
    xp = array_module(spectrum)
    c = xp.asarray(order_weights(spectrum.shape[0], n_inplanes))
    s = spectrum.astype(np.complex128)
    per_q = xp.sum(s.real**2 + s.imag**2, axis=2)  # [Q, M]
    return xp.sqrt(xp.sum(c[:, None] * per_q, axis=0))


__all__ = [
    "BAND_ORDERS",
    "SAFETY_FACTOR",
    "CompressedSpectrum",
    "CompressionStats",
    "compress_spectrum",
    "order_weights",
]
