"""The one executor every workflow uses (likelihood driver, ``make_templates``,
``convert_particles``): it runs Dask collections or task functions on a client, or on a local
scheduler when there is none, with one labelled progress display per step, and hands each
finished unit of work back in completion order (so the driver can mark blocks done as they
finish, and conversion can store stacks as they come).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da

from cryolike_dask.pipeline._progress import Progress
from cryolike_dask.pipeline.cluster import interrupted


def _nothing(*args: Any) -> None:
    return None


def when_done(collections: Any) -> Any:
    """One ``Delayed`` that finishes when every chunk of ``collections`` has (e.g. the
    ``store-map`` arrays of ``da.store(..., compute=False)``), returning nothing: a unit of
    work whose completion the driver can track without moving data."""
    from dask.base import tokenize
    from dask.core import flatten
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    if not isinstance(collections, (list, tuple)):
        collections = [collections]
    keys = [k for c in collections for k in flatten(c.__dask_keys__())]
    name = "stored-" + tokenize(*collections)
    graph = HighLevelGraph.from_collections(
        name, {name: (_nothing, *keys)}, dependencies=list(collections)
    )
    return Delayed(name, graph)


#: Scheduler priority of side tasks (:meth:`Executor.submit_side`): above the batches' loads
#: and kernels (0), below the tasks that finish a block (``graph.FINISHING_PRIORITY``).
SIDE_PRIORITY = 1


@dataclass
class Batch:
    """One graph's worth of tracked units for :meth:`Executor.run_batches`.

    Attributes
    ----------
    units : list of (delayed, weight)
        What to compute; ``weight`` progress units each (e.g. kernel blocks).
    bar : Progress or None
        The display the weights count on.
    on_done : callable, optional
        ``on_done(i)`` in the driver once unit ``i`` has finished (completion order).
    on_complete : callable, optional
        Called once every unit of the batch has finished.
    """

    units: list[tuple[Any, int]]
    bar: Progress | None = None
    on_done: Callable[[int], None] | None = None
    on_complete: Callable[[], None] | None = None


class Executor:
    """Runs work on ``client`` (a ``distributed.Client``) or a local scheduler.

    Parameters
    ----------
    client : distributed.Client or None
        ``None`` runs on ``scheduler`` (``"sync"`` or ``"threads"``, default threads).
    scheduler : str, optional
        The local scheduler when ``client`` is ``None``.
    progress : bool
        Show a progress display per call.
    workers : list of str, optional
        Run only on these workers (e.g. those with a GPU).
    """

    def __init__(
        self,
        client: Any = None,
        scheduler: str | None = None,
        progress: bool = True,
        workers: list[str] | None = None,
    ):
        self.client = client
        self.scheduler = scheduler or "threads"
        self.progress = progress
        self.workers = workers
        self._side: list[Any] = []  # futures of side tasks (see submit_side)

    def submit_side(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` beside the batches: a task on the cluster that the driver does
        not wait for (e.g. a stack's export once its blocks are stored), or at once on a
        local scheduler. :meth:`run_batches` waits for every side task before it returns and
        raises the first one's error."""
        if self.client is None:
            fn(*args)
            return
        # ahead of the batches' queued loads and kernels (a side task is small and should not
        # wait for them), after the tasks that finish blocks
        future = self.client.submit(
            fn, *args, pure=False, workers=self.workers, priority=SIDE_PRIORITY
        )
        self._side.append(future)

    def _check_side(self) -> None:
        done = [f for f in self._side if f.done()]
        if done:
            self._side = [f for f in self._side if not f.done()]
            for future in done:
                future.result()  # raises the side task's error
                future.release()

    def run(
        self,
        units: Sequence[tuple[Any, int]],
        label: str,
        *,
        unit: str = "block",
        bar: Progress | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        """Compute every ``(delayed, weight)`` of ``units`` (see :func:`when_done`).

        ``weight`` is how many progress units the collection stands for (e.g. its kernel
        blocks); ``on_done(i)`` is called in the driver, in completion order, once unit ``i``
        has finished. The first failure cancels the rest and is raised. ``bar`` continues an
        existing progress display (one per structure over several batches).
        """
        if not units:
            return
        own = bar is None
        if bar is None:
            bar = Progress(sum(w for _, w in units), label, unit, self.progress)
        try:
            self.run_batches([Batch(list(units), bar, on_done)])
        finally:
            if own:
                bar.close()

    def run_batches(self, batches: Iterable[Batch], *, depth: int = 2) -> int:
        """Run ``batches`` in order, keeping up to ``depth`` of them submitted at once.

        The next batch is taken from ``batches`` (which may build it only then) and
        submitted while the earlier ones are still running, so the cluster never drains
        between batches: graph building, submission and the scheduler's intake of batch
        ``k + 1`` overlap the compute of batch ``k``, and its tasks fill the workers that
        batch ``k``'s last wave leaves idle (the scheduler runs earlier graphs first). Each
        batch's ``on_complete`` is called once all its units are done, after the next batch
        has been submitted. On a local scheduler the batches run one after another.
        Returns the number of batches run.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", da.PerformanceWarning)
            if self.client is None:
                n = 0
                for batch in batches:
                    self._run_local(batch.units, batch.bar, batch.on_done)
                    if batch.on_complete is not None:
                        batch.on_complete()
                    n += 1
                return n
            return self._run_pipelined(iter(batches), max(1, depth))

    def _run_local(self, units, bar: Progress | None, on_done) -> None:
        from dask.callbacks import Callback

        collections = [c for c, _ in units]
        weights = {}
        for c, w in units:
            weights[c.key] = weights.get(c.key, 0) + w

        def posttask(key, result, dsk, state, worker_id):
            if key in weights and bar is not None:
                bar.update(weights[key])

        with Callback(posttask=posttask):
            dask.compute(*collections, scheduler=self.scheduler)
        if on_done is not None:
            for i in range(len(units)):
                on_done(i)

    def _run_pipelined(self, batches: Iterator[Batch], depth: int) -> int:
        pending: list[tuple[Any, list, int]] = []  # (future, [batch, units left], unit)
        in_flight = [0]
        submitted = [0]

        def top_up() -> None:
            while in_flight[0] < depth:
                batch = next(batches, None)
                if batch is None:
                    return
                if not batch.units:
                    if batch.on_complete is not None:
                        batch.on_complete()
                    continue
                futures = self.client.compute([c for c, _ in batch.units], workers=self.workers)
                state = [batch, len(futures)]
                pending.extend((f, state, i) for i, f in enumerate(futures))
                in_flight[0] += 1
                submitted[0] += 1

        def finished(entry: tuple[Any, list, int]) -> None:
            future, state, i = entry
            future.result()  # raises the task's error
            batch = state[0]
            if batch.bar is not None:
                batch.bar.update(batch.units[i][1])
            if batch.on_done is not None:
                batch.on_done(i)
            future.release()
            state[1] -= 1
            if state[1] == 0:
                in_flight[0] -= 1
                top_up()  # the next batch first: it should not wait for this one's finish
                if batch.on_complete is not None:
                    batch.on_complete()

        top_up()
        self._drain(pending, finished, future_of=lambda entry: entry[0])
        return submitted[0]

    def _drain(
        self,
        pending: list,
        finished: Callable[[Any], None],
        future_of: Callable[[Any], Any] = lambda future: future,
    ) -> None:
        """Hand each entry of ``pending`` to ``finished`` as its future completes (``finished``
        may add entries), and check the side tasks, until nothing is left; cancel everything
        still running on any error or on an interruption (checked at least twice a second)."""
        try:
            while pending or self._side:
                if interrupted():
                    raise KeyboardInterrupt
                self._check_side()
                done = [e for e in pending if future_of(e).done()]
                if not done:
                    time.sleep(0.05)
                    continue
                ids = {id(e) for e in done}
                pending[:] = [e for e in pending if id(e) not in ids]
                for entry in done:
                    finished(entry)
        except BaseException:
            self.client.cancel([future_of(e) for e in pending] + self._side)
            self._side = []
            raise

    def map(
        self,
        fn: Callable[..., Any],
        args: Sequence[tuple],
        label: str,
        *,
        unit: str = "task",
        on_result: Callable[[int, Any], None] | None = None,
    ) -> None:
        """Run ``fn(*a)`` for each ``a`` of ``args`` (one task each, not cached).

        ``on_result(i, result)`` is called in the driver in completion order.
        """
        with Progress(len(args), label, unit, self.progress) as bar:
            if self.client is None:
                for i, a in enumerate(args):
                    result = fn(*a)
                    bar.update(1)
                    if on_result is not None:
                        on_result(i, result)
                return
            futures = [self.client.submit(fn, *a, pure=False, workers=self.workers) for a in args]
            index = {f.key: i for i, f in enumerate(futures)}

            def finished(future: Any) -> None:
                result = future.result()
                bar.update(1)
                if on_result is not None:
                    on_result(index[future.key], result)
                future.release()

            self._drain(futures, finished)
