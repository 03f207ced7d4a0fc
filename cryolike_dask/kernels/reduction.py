"""Reductions used by the kernels and by the reduction over template blocks.

The partial result of one template block for one image is the triple
``(best cross-correlation, packed pose index, log-sum)``. :func:`combine_best` and
:func:`combine_log_sums` are associative and commutative, so partials can be reduced in any
tree: ties in the cross-correlation go to the smaller pose index, which is CryoLike's first
maximum in flat order (template, displacement, rotation).
"""

from __future__ import annotations

from typing import Any

from cryolike_dask.kernels.backend import array_module


def logsumexp(x: Any, axis: int | tuple[int, ...]) -> Any:
    """``log Σ exp(x)`` over ``axis``, stable; ``-inf`` where every entry is ``-inf``."""
    xp = array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    with _quiet(xp):
        out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return xp.squeeze(out, axis=axis)


def logsumexp_inplace(x: Any, axis: tuple[int, ...]) -> Any:
    """Like :func:`logsumexp` but overwrites ``x`` (saves one temporary of ``x``'s size)."""
    xp = array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    x -= m
    xp.exp(x, out=x)
    with _quiet(xp):
        out = xp.log(xp.sum(x, axis=axis, keepdims=True)) + m
    return xp.squeeze(out, axis=axis)


def combine_log_sums(a: Any, b: Any) -> Any:
    """``log(exp(a) + exp(b))`` elementwise (the log-sum monoid)."""
    xp = array_module(a, b)
    m = xp.maximum(a, b)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    with _quiet(xp):
        return xp.log(xp.exp(a - m) + xp.exp(b - m)) + m


def combine_best(score_a: Any, pose_a: Any, score_b: Any, pose_b: Any) -> tuple[Any, Any]:
    """Elementwise best of two partials: higher score wins, ties go to the smaller pose index.

    NaN scores never win against a number (a NaN partial only survives against another NaN).
    """
    xp = array_module(score_a, score_b)
    a_nan = xp.isnan(score_a)
    take_b = (score_b > score_a) | ((score_b == score_a) & (pose_b < pose_a))
    take_b |= a_nan & ~xp.isnan(score_b)
    return xp.where(take_b, score_b, score_a), xp.where(take_b, pose_b, pose_a)


def reduce_partials(scores: Any, poses: Any, log_sums: Any | None = None) -> tuple[Any, ...]:
    """Reduce stacked partials ``[k, M]`` along axis 0 with the monoid above.

    Returns ``(score [M], pose [M])`` or ``(score, pose, log_sum)`` when ``log_sums`` is given.
    """
    xp = array_module(scores)
    best_s, best_p = scores[0], poses[0]
    for i in range(1, scores.shape[0]):
        best_s, best_p = combine_best(best_s, best_p, scores[i], poses[i])
    if log_sums is None:
        return best_s, best_p
    return best_s, best_p, logsumexp(xp.asarray(log_sums), axis=0)


class _quiet:
    """Silence divide/log warnings for ``-inf`` inputs (NumPy only)."""

    def __init__(self, xp: Any):
        self._np = xp if hasattr(xp, "errstate") and xp.__name__ == "numpy" else None

    def __enter__(self) -> None:
        if self._np is not None:
            self._ctx = self._np.errstate(divide="ignore", invalid="ignore", over="ignore")
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._np is not None:
            self._ctx.__exit__(*exc)


#: Fields of a packed partial ``[..., 3]`` float64: best score, pose index, log-sum.
SCORE, POSE, LOG_SUM = 0, 1, 2


def pack_partial(score: Any, pose: Any, log_sum: Any | None = None) -> Any:
    """``[M, 3]`` float64 ``(score, pose, log_sum)``; pose indices are exact below 2**53."""
    xp = array_module(score)
    out = xp.empty((score.shape[0], 3), dtype=xp.float64)
    out[:, SCORE] = score
    out[:, POSE] = pose
    out[:, LOG_SUM] = 0.0 if log_sum is None else log_sum
    return out


def reduce_packed(packed: Any, axis: int = 0, keepdims: bool = False) -> Any:
    """Reduce packed partials ``[k, M, 3]`` along ``axis`` 0 with the monoid.

    The signature fits ``dask.array.reduction``'s ``combine``/``aggregate`` callbacks.
    """
    if axis not in (0, (0,)):
        raise ValueError("packed partials reduce along axis 0")
    score, pose, log_sum = reduce_partials(
        packed[..., SCORE], packed[..., POSE], packed[..., LOG_SUM]
    )
    out = pack_partial(score, pose, log_sum)
    return out[None] if keepdims else out
