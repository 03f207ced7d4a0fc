"""One writer per output folder: a lock held by the driver for the whole run.

The lock is an OS file lock (the well-kept ``filelock`` package: ``flock``/``fcntl`` on POSIX)
on ``OUT/.cryolike_dask.lock``, so it is released by the operating system when its holder
dies: a stale lock of a killed run never blocks the next one. Beside it,
``OUT/.cryolike_dask.lock.json`` names the holder (pid, host, start time, command) so that a
refused run can say who is writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from cryolike_dask.errors import CryoLikeDaskError

LOCK_NAME = ".cryolike_dask.lock"
_HELD: dict[str, int] = {}


class FolderLockedError(CryoLikeDaskError):
    """Another run is writing into the output folder."""


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (
            f"pid {info['pid']} on {info['host']}, started {info['started']}: "
            f"{info.get('command', '')}"
        ).rstrip(": ")
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``folder`` (created if missing) for the duration of the block.

    Raises :class:`FolderLockedError` at once, naming the holder, when another process holds
    it. Re-entrant within one process. A folder this call created and that holds nothing but
    the lock afterwards (the run failed before writing) is removed again.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    info = folder / (LOCK_NAME + ".json")
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{folder}: another run is writing into this folder ({_owner(info)}); wait for "
            "it to finish or choose another output folder"
        ) from None
    _HELD[key] = 1
    try:
        info.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv),
                }
            )
        )
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            info.unlink()
        lock.release()
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: the run wrote nothing


__all__ = ["LOCK_NAME", "FolderLockedError", "output_lock"]
