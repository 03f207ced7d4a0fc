"""Benchmarks (not tests): ``python -m benchmarks.kernel`` and ``python -m benchmarks.end_to_end``.

They print figures and write ``docs/performance.md``.
"""
