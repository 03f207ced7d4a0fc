"""The (best score, pose, log-sum) monoid: any reduction tree gives the one-shot answer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp as scipy_logsumexp

from cryolike_dask.kernels.reduction import (
    combine_best,
    combine_log_sums,
    logsumexp,
    reduce_partials,
)


@st.composite
def partials(draw):
    k = draw(st.integers(1, 6))
    m = draw(st.integers(1, 5))
    # few distinct scores so that ties are frequent
    scores = np.array(
        draw(st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9]), min_size=k * m, max_size=k * m))
    ).reshape(k, m)
    poses = np.array(draw(st.permutations(range(k * m)))).reshape(k, m).astype(np.int64)
    logs = np.array(draw(st.lists(st.floats(-50, 50), min_size=k * m, max_size=k * m))).reshape(
        k, m
    )
    return scores, poses, logs


@settings(max_examples=200, deadline=None)
@given(partials(), st.randoms(use_true_random=False))
def test_any_tree_order_gives_first_maximum(data, random) -> None:
    scores, poses, logs = data
    k, m = scores.shape
    # reference: the highest score, ties to the smallest pose index
    for i in range(m):
        best = max(range(k), key=lambda j: (scores[j, i], -poses[j, i]))
        order = list(range(k))
        random.shuffle(order)
        acc_s, acc_p = scores[order[0], i], poses[order[0], i]
        for j in order[1:]:
            acc_s, acc_p = combine_best(acc_s, acc_p, scores[j, i], poses[j, i])
        assert (acc_s, acc_p) == (scores[best, i], poses[best, i])
    _s, _p, lsum = reduce_partials(scores, poses, logs)
    np.testing.assert_allclose(lsum, scipy_logsumexp(logs, axis=0), rtol=1e-12, atol=1e-12)


def test_nan_never_wins() -> None:
    s, p = combine_best(
        np.array([np.nan, 0.2]), np.array([0, 1]), np.array([0.1, np.nan]), np.array([5, 6])
    )
    np.testing.assert_array_equal(s, [0.1, 0.2])
    np.testing.assert_array_equal(p, [5, 1])


def test_log_sums() -> None:
    a, b = np.array([1000.0, -np.inf, 3.0]), np.array([1000.0, -np.inf, -np.inf])
    np.testing.assert_allclose(combine_log_sums(a, b), [1000 + np.log(2), -np.inf, 3.0])
    x = np.array([[1.0, -np.inf], [2.0, -np.inf]])
    np.testing.assert_allclose(logsumexp(x, axis=0), [np.log(np.e + np.e**2), -np.inf])
