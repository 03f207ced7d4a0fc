"""The results store's done mask: chunked by whole image blocks, written from the driver's row."""

from __future__ import annotations

import numpy as np

from cryolike_dask.io.sources import ImageIds
from cryolike_dask.io.zarr_stores import ResultsStore, StackInfo, done_chunk


def _store(path, n_images: int, image_block: int) -> ResultsStore:
    n = n_images
    ids = ImageIds(
        np.array([f"{i}" for i in range(n)]), np.zeros(n, np.int64), np.arange(n), np.arange(n)
    )
    return ResultsStore.create(
        path,
        structures=["a", "b"],
        n_templates=[4, 4],
        n_images=n,
        image_block=image_block,
        template_block=4,
        displacements=np.zeros((2, 1)),
        rotations=np.linspace(0, 2 * np.pi, 8, endpoint=False),
        real_dtype=np.dtype(np.float32),
        fingerprint={"test": True},
        stacks=[StackInfo("s", 0, n, "")],
        image_ids=ids,
    )


def test_done_chunks_hold_whole_image_blocks() -> None:
    assert done_chunk(10**6, 4082) == 16 * 4082  # ~64 KiB
    assert done_chunk(10**6, 100_000) == 100_000  # one block when blocks are large
    assert done_chunk(1000, 64) == 1000  # never more than the images
    for n, block in ((10**6, 4082), (5000, 7), (123, 1000)):
        assert done_chunk(n, block) % min(block, n) == 0 or done_chunk(n, block) == n


def test_write_done_writes_the_rows_marks_and_nothing_else(tmp_path) -> None:
    store = _store(tmp_path / "results.zarr", 5000, 7)
    chunk = int(store._done.chunks[1])
    row = np.zeros(5000, np.uint8)
    ranges = [(14, 21), (chunk + 7, chunk + 14)]  # two blocks in two chunks
    for a, b in ranges:
        row[a:b] |= 3
    store.write_done(0, ranges, row)
    again = ResultsStore.open(tmp_path / "results.zarr", mode="r")
    np.testing.assert_array_equal(again.done_images(0), row)
    assert not np.any(again.done_images(1))  # the other structure's row is untouched
    # a later mark keeps the earlier ones (the row is the driver's whole state)
    row[0:7] |= 1
    store.write_done(0, [(0, 7)], row)
    np.testing.assert_array_equal(store.done_images(0), row)
    np.testing.assert_array_equal(store.done()[0, :4], [1, 0, 3, 0])  # per block of 7


def test_write_done_rewrites_only_the_touched_chunks(tmp_path) -> None:
    store = _store(tmp_path / "results.zarr", 5000, 7)
    chunk = int(store._done.chunks[1])
    store._done[0, 2 * chunk : 3 * chunk] = 9  # a chunk no range touches
    row = np.zeros(5000, np.uint8)
    row[0:7] = 1
    row[3 * chunk : 3 * chunk + 7] = 1
    store.write_done(0, [(0, 7), (3 * chunk, 3 * chunk + 7)], row)
    done = store.done_images(0)
    assert np.all(done[2 * chunk : 3 * chunk] == 9)  # not rewritten from the row
    np.testing.assert_array_equal(done[:chunk], row[:chunk])
    np.testing.assert_array_equal(done[3 * chunk : 4 * chunk], row[3 * chunk : 4 * chunk])
