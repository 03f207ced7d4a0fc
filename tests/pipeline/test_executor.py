"""The executor: batches overlap (the next is submitted before the current one ends)."""

from __future__ import annotations

import time

import dask

from cryolike_dask.pipeline.executor import Batch, Executor


def _slow(x: int) -> int:
    time.sleep(0.3)
    return x


def test_next_batch_is_submitted_while_the_current_one_runs(local_client) -> None:
    events: list[str] = []

    def batches():
        for b in range(3):
            events.append(f"submit {b}")
            units = [(dask.delayed(_slow)(10 * b + i, dask_key_name=f"slow-{b}-{i}"), 1)
                     for i in range(2)]  # fmt: skip
            yield Batch(
                units,
                on_done=lambda i, b=b: events.append(f"done {b}.{i}"),
                on_complete=lambda b=b: events.append(f"complete {b}"),
            )

    n = Executor(local_client, progress=False).run_batches(batches(), depth=2)
    assert n == 3
    # batch 1 is submitted before batch 0 completes; batch 2 once batch 0's units are all
    # done, before batch 0's on_complete runs (its exports must not delay the next batch)
    assert events.index("submit 1") < events.index("done 0.0")
    assert max(events.index("done 0.0"), events.index("done 0.1")) < events.index("submit 2")
    assert events.index("submit 2") < events.index("complete 0")
    assert events.index("submit 2") < events.index("complete 2")
    assert [e for e in events if e.startswith("complete")] == [
        "complete 0",
        "complete 1",
        "complete 2",
    ]
    assert sum(e.startswith("done") for e in events) == 6


def test_local_scheduler_runs_batches_in_order() -> None:
    events: list[str] = []
    batches = [
        Batch(
            [(dask.delayed(_slow)(b), 1)],
            on_done=lambda i, b=b: events.append(f"done {b}"),
            on_complete=lambda b=b: events.append(f"complete {b}"),
        )
        for b in range(2)
    ]
    assert Executor(None, "sync", progress=False).run_batches(batches) == 2
    assert events == ["done 0", "complete 0", "done 1", "complete 1"]


def test_a_failure_cancels_the_batches_in_flight(local_client) -> None:
    import pytest

    def boom() -> None:
        raise RuntimeError("task failed")

    batches = [Batch([(dask.delayed(boom)(dask_key_name="boom"), 1)])]
    batches.append(Batch([(dask.delayed(_slow)(1, dask_key_name="slow-after-boom"), 1)]))
    with pytest.raises(RuntimeError, match="task failed"):
        Executor(local_client, progress=False).run_batches(batches, depth=2)
