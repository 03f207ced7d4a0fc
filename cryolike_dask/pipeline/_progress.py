"""Progress display: one labelled bar per step, counting work units (kernel blocks, stacks).

* In a notebook: tqdm's widget.
* On a terminal: tqdm's text bar on stderr.
* Otherwise (a log file, CI): plain ``logging`` lines, at most one every few seconds, with no
  escape codes or carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger("cryolike_dask.progress")

#: Seconds between plain progress lines when the output is not a terminal.
LINE_INTERVAL = 5.0


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """A progress display for ``total`` units of one step (see the module docstring).

    Parameters
    ----------
    total : int
        Units of work (e.g. kernel blocks = template blocks × image blocks).
    label : str
        What is being done, e.g. ``"likelihood 'apo'"``.
    unit : str
        Name of one unit.
    enabled : bool
        ``False``: show nothing.
    """

    def __init__(self, total: int, label: str, unit: str = "block", enabled: bool = True):
        self.total, self.label, self.unit = int(total), label, unit
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start
        self._bar: Any = None
        self._lines = False
        if not enabled or total <= 0:
            return
        if _in_notebook():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit)
        elif sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr)
        else:
            self._lines = True

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = time.monotonic()
            if now - self._last >= LINE_INTERVAL and self.done < self.total:
                self._last = now
                self._line()

    def _line(self) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        logger.info(
            "%s: %d/%d %ss (%.0f%%), %.0f s",
            self.label,
            self.done,
            self.total,
            self.unit,
            pct,
            time.monotonic() - self._start,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            self._line()
            self._lines = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
